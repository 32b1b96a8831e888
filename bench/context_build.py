"""The context stage's build alone (no scoring) on bench/stream.py's synthetic data set with
a neighbour table and hybrid heads' side features: build seconds, the object store's peak
(from the raylet) and each process kind's largest peak private memory, per users size and
shuffle setting, the largest worker by the task it ran and when the driver's shared memory
grew. A quick probe of what the keyed shuffles park in the object store.

    python bench/context_build.py --users 200000 600000 \
        --variant ray_default compute.shuffle_batch_mib=1024 \
        --variant batch_128 \
        --variant batch_128_disk compute.disk_shuffle=true

Each variant is a name and its config overrides; every users size gets one synthetic data
set, built once per variant with a fresh local Ray. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ObjectStorePeak, PeakMemory, gib, machine, top_tasks, write_results  # noqa: E402
from stream import write_neighbors, write_side_features, write_synthetic  # noqa: E402

from optirag.config import load_config  # noqa: E402
from optirag.pipelines import context  # noqa: E402


def config(workdir: str, users: int, overrides: list[str]):
    return load_config(
        None,
        [
            f"storage.root={workdir}",
            "backbone.source=tiny",
            f"backbone.cache_dir={workdir}/models",
            f"synthetic.num_users={users}",
            "synthetic.num_items=20000",
            "synthetic.candidates_per_user=20",
            "synthetic.history_per_user=10",
            "synthetic.candidate_users=5000",
            "synthetic.users_per_shard=25000",
            "exits.rule=agreement",
            "exits.threshold=1.0",
            *overrides,
        ],
    )


def build_once(workdir: str, users: int, overrides: list[str], num_cpus: int) -> dict:
    cfg = config(workdir, users, overrides)
    shutil.rmtree(Path(workdir, "context"), ignore_errors=True)
    ray.init(include_dashboard=False, num_cpus=num_cpus)
    try:
        with PeakMemory() as mem, ObjectStorePeak() as store:
            start = time.perf_counter()
            data = f"{workdir}/synthetic"
            context.build(
                cfg, f"{data}/interactions/train", f"{data}/items.parquet", f"{data}/neighbors"
            )
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "users": users,
        "overrides": overrides,
        "build_s": round(seconds, 1),
        "object_store_peak_gib": gib(store.peak),
        "object_store_spilled_gib": gib(store.spilled),
        "peak_single_anon_gib_by_kind": {
            k: gib(v) for k, v in mem.peak_single_anon_by_kind.items()
        },
        "peak_single_anon_gib_by_task": top_tasks(mem.peak_single_anon_by_task),
        "driver_shmem_mib_trace": _changes(mem.driver_trace, "shmem_mib"),
    }


def _changes(trace: list[dict], field: str) -> list[list[float]]:
    """[seconds, value] where `field` changes in a trace: when the driver maps more."""
    out = [[t["s"], t[field]] for t in trace]
    return [row for i, row in enumerate(out) if i == 0 or row[1] != out[i - 1][1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[200_000, 600_000])
    parser.add_argument("--neighbors", type=int, default=10)
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "OVERRIDE"),
        help="a name, then its a.b=c overrides",
    )
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--name", default="context_build")
    args = parser.parse_args()
    runs = []
    for users in args.users:
        with tempfile.TemporaryDirectory() as workdir:
            cfg = config(workdir, users, [])
            ray.init(include_dashboard=False, num_cpus=args.num_cpus)
            try:
                ray.get(write_synthetic.remote(cfg))
                write_neighbors(f"{workdir}/synthetic/neighbors", users, args.neighbors)
                ray.get(write_side_features.remote(cfg, users, 20000))
            finally:
                ray.shutdown()
            for name, *overrides in args.variant:
                runs.append(
                    {"variant": name, **build_once(workdir, users, overrides, args.num_cpus)}
                )
                print(runs[-1], flush=True)
    result = {
        "machine": machine(),
        "command": " ".join(["python", "bench/context_build.py", *sys.argv[1:]]),
        "runs": runs,
    }
    for name, *_ in args.variant:
        mine = [r for r in runs if r["variant"] == name]
        if len(mine) > 1:
            result[f"object_store_peak_ratio_{name}"] = round(
                mine[-1]["object_store_peak_gib"] / mine[0]["object_store_peak_gib"], 3
            )
    write_results(
        args.name,
        result,
        [
            (
                r["variant"],
                f"{r['users']:,}",
                r["build_s"],
                r["object_store_peak_gib"],
                r["peak_single_anon_gib_by_kind"].get("driver"),
                max(v for k, v in r["peak_single_anon_gib_by_kind"].items() if k != "driver"),
            )
            for r in runs
        ],
        (
            "variant",
            "users",
            "build s",
            "object store peak GiB",
            "driver peak anon GiB",
            "largest other process peak anon GiB",
        ),
    )


if __name__ == "__main__":
    main()
