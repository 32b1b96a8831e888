"""Helpers shared by the benchmarks: machine facts, peak-memory sampling, result files."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import importlib.metadata as md

    import pyarrow
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
    }
    for package in ("ray", "transformers"):  # a GPU box may run the model benches sans Ray
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class PeakMemory:
    """Samples the memory of this process and its descendants (Ray's raylet, GCS and workers
    when Ray was started here) in a background thread. `.peak` is the maximum summed RSS;
    `.peak_pss` the maximum summed PSS, which counts a page shared by several processes (Ray's
    object store, the model files) once in all rather than once per process.

    Per kind it also keeps the peak of the anonymous (private heap) part of RSS, `RssAnon` in
    /proc/PID/status, and of its shared-memory part, `RssShmem`: a Ray worker that reads a
    block from the object store maps the store's pages, and those count in its RSS as shmem
    although the store, not the worker, holds them. `.trace` has, every `trace_every_s`, the
    model actors' summed RSS, anon and shmem (GiB) by seconds since the first sample.

    RSS comes from /proc/PID/status every `interval_s`; PSS needs a walk of every mapping
    (/proc/PID/smaps), which cost the benchmark's driver ~40% of a core at 0.1 s, so it is
    sampled every `pss_every_s`."""

    def __init__(
        self, interval_s: float = 0.1, trace_every_s: float = 5.0, pss_every_s: float = 2.0
    ) -> None:
        self.interval_s = interval_s
        self.trace_every_s = trace_every_s
        self.pss_every_s = pss_every_s
        self.trace: list[dict] = []
        self.peak_anon_by_kind: dict[str, int] = {}
        self.peak_shmem_by_kind: dict[str, int] = {}
        self.peak = 0
        self.peak_pss = 0
        self.peak_by_kind: dict[str, int] = {}
        self.peak_count_by_kind: dict[str, int] = {}  # processes of each kind at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        start = last_trace = last_pss = time.monotonic()
        with_pss = True
        while not self._stop.is_set():
            by_kind: dict[str, int] = {}
            anon: dict[str, int] = {}
            shmem: dict[str, int] = {}
            count: dict[str, int] = {}
            pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    kind = "driver" if proc.pid == me.pid else _kind(proc.name())
                    status = _rss_parts(proc.pid)
                    rss = sum(status.values()) or proc.memory_info().rss  # no /proc: psutil's
                    pss += proc.memory_full_info().pss if with_pss else 0
                except (psutil.Error, OSError):
                    continue
                by_kind[kind] = by_kind.get(kind, 0) + rss
                anon[kind] = anon.get(kind, 0) + status.get("RssAnon", 0)
                shmem[kind] = shmem.get(kind, 0) + status.get("RssShmem", 0)
                count[kind] = count.get(kind, 0) + 1
            self.peak = max(self.peak, sum(by_kind.values()))
            self.peak_pss = max(self.peak_pss, pss)
            for kind, rss in by_kind.items():
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)
                self.peak_anon_by_kind[kind] = max(self.peak_anon_by_kind.get(kind, 0), anon[kind])
                self.peak_shmem_by_kind[kind] = max(self.peak_shmem_by_kind.get(kind, 0),
                                                    shmem[kind])  # fmt: skip
                self.peak_count_by_kind[kind] = max(self.peak_count_by_kind.get(kind, 0),
                                                    count[kind])  # fmt: skip
            now = time.monotonic()
            with_pss = now - last_pss >= self.pss_every_s
            last_pss = now if with_pss else last_pss
            if "model_actors" in by_kind and now - last_trace >= self.trace_every_s:
                last_trace = now
                self.trace.append({"s": round(now - start), "rss": gib(by_kind["model_actors"]),
                                   "anon": gib(anon["model_actors"]),
                                   "shmem": gib(shmem["model_actors"])})  # fmt: skip
            time.sleep(self.interval_s)


def _rss_parts(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of a process in bytes, which sum to its RSS (Linux;
    empty elsewhere)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return {}
    parts = {}
    for line in lines:
        if line.startswith("Rss"):
            key, value = line.split(":")
            parts[key] = int(value.split()[0]) * 1024
    return parts


def _kind(name: str) -> str:
    if name.startswith("ray::MapWorker"):  # Ray Data's actor pools: the model actors
        return "model_actors"
    return "ray_workers" if name.startswith("ray::") else "ray_system"


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


def write_results(name: str, result: dict, table_rows: Iterable[tuple], header: tuple) -> None:
    """Write bench/results/<name>.json and print (and save) a markdown table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows]
    table = "\n".join(lines)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


def run_variant(config: str, overrides: list[str], folder: str | None) -> dict:
    """train_exits + run_evaluation with extra overrides; heads and evaluation under
    `folder` (None: the config's own locations). Returns training summary and metrics."""
    from optirag import artifacts
    from optirag.cli import _init_ray
    from optirag.config import load_config
    from optirag.pipelines import evaluation, train_exits

    if folder is not None:
        overrides = [*overrides, f"exits.heads_uri={folder}/exits",
                     f"evaluation.output_uri={folder}/evaluation"]  # fmt: skip
    cfg = load_config(config, overrides)
    _init_ray(cfg)
    trained = train_exits.run(cfg)
    evaluation.run(cfg)
    return {"train": trained, "evaluation": artifacts.load_evaluation(cfg)}
