"""Synthetic generator at scale: rows written, wall time and peak memory (driver + Ray).

    python bench/synthetic.py --rows 100_000_000

Writes bench/results/synthetic.json. Peak memory is the summed RSS of this process and every
Ray process it started (GCS, raylet, workers), sampled every 100 ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, gib, machine, write_results  # noqa: E402

from optirag import synthetic  # noqa: E402
from optirag.config import StorageConfig, SyntheticConfig  # noqa: E402
from optirag.pipelines import synthetic as synthetic_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--candidates-per-user", type=int, default=20)
    parser.add_argument("--users-per-shard", type=int, default=50_000)
    parser.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = parser.parse_args()

    cfg = SyntheticConfig(
        num_users=args.rows // args.candidates_per_user,
        num_items=100_000,
        candidates_per_user=args.candidates_per_user,
        history_per_user=0,
        users_per_shard=args.users_per_shard,
    )
    with tempfile.TemporaryDirectory(dir=args.out) as root, PeakMemory() as mem:
        ray.init(num_cpus=None, include_dashboard=False)
        start = time.perf_counter()
        totals = synthetic_job.run(cfg, StorageConfig(root=root))
        wall = time.perf_counter() - start
        ray.shutdown()
    rows = totals["candidates"]
    result = {
        "machine": machine(),
        "config": cfg.model_dump(),
        "rows": rows,
        "shards": synthetic.num_shards(cfg),
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall),
        "peak_rss_gib_total": gib(mem.peak),
        "peak_rss_gib_by_kind": {k: gib(v) for k, v in mem.peak_by_kind.items()},
    }
    write_results(
        "synthetic",
        result,
        [
            (
                f"{rows:,}",
                result["shards"],
                result["wall_s"],
                f"{result['rows_per_s']:,}",
                result["peak_rss_gib_total"],
            )
        ],
        ("candidate rows", "shards", "wall s", "rows/s", "peak RSS GiB (driver + Ray)"),
    )


if __name__ == "__main__":
    main()
