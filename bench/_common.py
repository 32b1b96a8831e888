"""Helpers shared by the benchmarks: machine facts, peak-memory sampling, result files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil
import pyarrow.fs as pafs

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


class ObjectStorePeak:
    """Samples the local Ray's object store every `interval_s` (what `ray memory
    --stats-only` reads from the raylet): `.peak` the most bytes it held at once, `.spilled`
    the bytes it spilled to disk in all, `.capacity` its size, `.trace` (seconds, GiB held)
    every `trace_s`."""

    def __init__(self, interval_s: float = 1.0, trace_s: float = 5.0) -> None:
        self.interval_s, self.peak, self.spilled, self.capacity = interval_s, 0, 0, 0
        self.trace_s, self.trace, self._start = trace_s, [], time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ObjectStorePeak:
        import ray
        from ray._private.internal_api import get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self._state).store_stats
        self.peak = max(self.peak, stats.object_store_bytes_used)
        seconds = time.monotonic() - self._start
        if not self.trace or seconds - self.trace[-1]["s"] >= self.trace_s:
            self.trace.append({"s": round(seconds), "gib": gib(stats.object_store_bytes_used)})
        self.spilled = max(self.spilled, stats.spilled_bytes_total)
        self.capacity = stats.object_store_bytes_avail

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a slow raylet: the next sample counts
                self._sample()


def top_tasks(by_task: dict[str, int], top: int = 10) -> dict[str, float]:
    """`PeakMemory.peak_single_anon_by_task`'s largest `top` tasks, in GiB, largest first."""
    return {k: gib(v) for k, v in sorted(by_task.items(), key=lambda kv: -kv[1])[:top]}


class PeakMemory:
    """Samples the memory of this process and its descendants (Ray's raylet, GCS and workers
    when Ray was started here) in a background thread. `.peak` is the maximum summed RSS;
    `.peak_pss` the maximum summed PSS, which counts a page shared by several processes (Ray's
    object store, the model files) once in all rather than once per process.

    Per kind it also keeps the peak of the anonymous (private heap) part of RSS, `RssAnon` in
    /proc/PID/status, and of its shared-memory part, `RssShmem`: a Ray worker that reads a
    block from the object store maps the store's pages, and those count in its RSS as shmem
    although the store, not the worker, holds them. `.trace` has, every `trace_every_s`, the
    model actors' summed RSS, anon and shmem (GiB) by seconds since the first sample, and
    `.driver_trace` this process's anon (GiB) and shmem (MiB).

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
        self.driver_trace: list[dict] = []  # this process's anon, to place its peak in a run
        self.peak_anon_by_kind: dict[str, int] = {}
        self.peak_single_anon_by_kind: dict[str, int] = {}  # the largest one process's
        self.peak_shmem_by_kind: dict[str, int] = {}
        # a Ray worker's title names its task (ray::MapBatches(render), ray::IDLE): the
        # largest one worker's private memory while running each
        self.peak_single_anon_by_task: dict[str, int] = {}
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
                single = self.peak_single_anon_by_kind
                single[kind] = max(single.get(kind, 0), status.get("RssAnon", 0))
                shmem[kind] = shmem.get(kind, 0) + status.get("RssShmem", 0)
                count[kind] = count.get(kind, 0) + 1
                if kind == "ray_workers":  # which task a worker's peak happened in
                    task = _task_title(proc.pid)
                    by_task = self.peak_single_anon_by_task
                    by_task[task] = max(by_task.get(task, 0), status.get("RssAnon", 0))
            self.peak = max(self.peak, sum(by_kind.values()))
            self.peak_pss = max(self.peak_pss, pss)
            for kind, rss in by_kind.items():
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)
                self.peak_anon_by_kind[kind] = max(self.peak_anon_by_kind.get(kind, 0), anon[kind])
                self.peak_shmem_by_kind[kind] = max(
                    self.peak_shmem_by_kind.get(kind, 0), shmem[kind]
                )
                self.peak_count_by_kind[kind] = max(
                    self.peak_count_by_kind.get(kind, 0), count[kind]
                )
            now = time.monotonic()
            with_pss = now - last_pss >= self.pss_every_s
            last_pss = now if with_pss else last_pss
            if now - last_trace >= self.trace_every_s:
                last_trace = now
                driver = {
                    "anon": gib(anon.get("driver", 0)),
                    "shmem_mib": mib(shmem.get("driver", 0)),
                }
                self.driver_trace.append({"s": round(now - start), **driver})
                if "model_actors" in by_kind:
                    self.trace.append(
                        {
                            "s": round(now - start),
                            "rss": gib(by_kind["model_actors"]),
                            "anon": gib(anon["model_actors"]),
                            "shmem": gib(shmem["model_actors"]),
                        }
                    )
            time.sleep(self.interval_s)


def _task_title(pid: int) -> str:
    """A Ray worker's process title (Ray sets it to the task it runs), 60 characters."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[:60]
    except OSError:
        return "?"


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


def mib(n_bytes: int) -> float:
    """MiB to 0.1: for figures of a few MiB (a driver's shared memory), where GiB to 0.001
    would make a ratio of its rounding."""
    return round(n_bytes / 2**20, 1)


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
        overrides = [
            *overrides,
            f"exits.heads_uri={folder}/exits",
            f"evaluation.output_uri={folder}/evaluation",
        ]
    cfg = load_config(config, overrides)
    _init_ray(cfg)
    trained = train_exits.run(cfg)
    evaluation.run(cfg)
    return {"train": trained, "evaluation": artifacts.load_evaluation(cfg)}


# ----------------------------------------------------------------------------- storage requests
# The driver's storage requests, counted at the filesystem level (`count_driver_requests`).

REQUESTS: Counter = Counter()
COUNTING = [False]
PAGE = 1000  # entries per listing request on S3


class CountingHandler(pafs.FileSystemHandler):
    """A filesystem that counts each request (when COUNTING) and passes it on."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def _count(self, kind: str, n: int = 1) -> None:
        if COUNTING[0]:
            REQUESTS[kind] += n

    def __eq__(self, other):
        return isinstance(other, CountingHandler) and self.fs.equals(other.fs)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        self._count("info", len(paths))
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        infos = self.fs.get_file_info(selector)
        self._count("list", max(1, math.ceil(len(infos) / PAGE)))
        return infos

    def create_dir(self, path, recursive):
        self._count("create_dir")
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._count("delete", 1)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._count("delete")
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self._count("delete")
        self.fs.delete_file(path)

    def move(self, src, dest):
        self._count("move")
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._count("copy")
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self._count("get")
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self._count("get")
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._count("put")
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._count("put")
        return self.fs.open_append_stream(path, metadata=metadata)


def count_driver_requests() -> None:
    """Wrap what `optirag.storage` resolves, and its calls that write a local file or take
    a lease without the filesystem (a rename, a hard link, a lock): one request each."""
    import ray.cloudpickle

    from optirag import storage

    # the wrapped filesystems travel to Ray tasks (in_tasks' per-file work): by value, so a
    # worker needs no import of this module (it counts nothing there: COUNTING is off)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    resolve = storage.resolve

    def counted_resolve(uri, store):
        fs, path = resolve(uri, store)
        return pafs.PyFileSystem(CountingHandler(fs)), path

    storage.resolve = counted_resolve
    for name, kind in (
        ("write_bytes", "put"),
        ("write_table", "put"),
        ("create_exclusive", "put"),
        ("replace_if_unchanged", "put"),
        ("read_versioned", "get"),
    ):
        setattr(storage, name, _counted(getattr(storage, name), kind))


def _counted(fn, kind: str):
    def wrapped(*args, **kwargs):
        if COUNTING[0]:
            REQUESTS[kind] += 1
        return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def counting():
    """Count the driver's storage requests (into REQUESTS, emptied first) inside the block."""
    REQUESTS.clear()
    COUNTING[0] = True
    try:
        yield REQUESTS
    finally:
        COUNTING[0] = False
