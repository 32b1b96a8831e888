"""The scoring driver's own work at full file and shard counts, without a model: plan the
run, check what is done (resume), commit. A local tree of small candidate files and a
written marker, scores and rejects file per shard stand in for a night's run.

Every storage request the driver process makes is counted at the filesystem level: the
filesystems `optirag.storage.resolve` hands out are wrapped, so pyarrow's own reads count
too, and so are the local writes and lease calls that bypass them (one request each, a
PUT on S3). A listing counts one request per 1,000 entries, as S3 pages them. Requests made in
Ray tasks (the per-file work, `pipelines.parallel.in_tasks`) are not the driver's.

    python bench/driver_dry_run.py                       # 10^5 files, 5x10^4 shards
    python bench/driver_dry_run.py --files 10000 --shards 5000 --name driver_dry_run_small

Writes bench/results/<name>.json: requests and seconds per phase, the bound
2 x (files + shards) / 1000 + 100, and the driver's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import REQUESTS, count_driver_requests, counting, machine, write_results  # noqa: E402
from optirag import runs  # noqa: E402
from optirag import schema as S  # noqa: E402
from optirag.config import Config  # noqa: E402


def build_tree(root: Path, files: int, rows_per_file: int) -> None:
    """Candidates (files x rows_per_file), a small history and items table."""
    done = root / "_tree_done.json"
    spec = {"files": files, "rows_per_file": rows_per_file}
    if done.exists() and json.loads(done.read_text()) == spec:
        return
    rng = np.random.default_rng(0)
    folder = root / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        users = rng.integers(0, 10**8, rows_per_file)
        pq.write_table(
            pa.table({S.USER_ID: users, S.ITEM_ID: rng.integers(0, 1000, rows_per_file)}),
            folder / f"part-{f:06d}.parquet",
        )
    history = S.INTERACTIONS.empty_table()
    pq.write_table(history, root / "history.parquet")
    items = pa.table({S.ITEM_ID: [1], S.TITLE: ["t"], S.TEXT: [None]}, schema=S.ITEMS)
    pq.write_table(items, root / "items.parquet")
    done.write_text(json.dumps(spec))


def write_done_shards(run: runs.Run, shards: int) -> None:
    """What the scoring graph leaves: a marker, scores and rejects file per shard, the
    rows spread so that they add up to the plan's."""
    total = run.total_rows
    rows = np.full(shards, total // shards)
    rows[: total % shards] += 1
    paths = run.paths
    empty = pa.table({S.USER_ID: pa.array([], pa.int64())})
    for folder in (paths.scores_folder, paths.rejects_folder, paths.markers_folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    for shard, n in enumerate(rows.tolist()):
        pq.write_table(empty, paths.scores(shard))
        pq.write_table(empty, paths.rejects(shard))
        marker = {"shard_id": shard, "piece": 0, "pieces": 1, "input_rows": n}
        marker |= {"scored": n, "rejected": {}, "exit_histogram": {"6": n}}
        Path(paths.marker(shard, 0, 1, n)).write_text(json.dumps(marker))


def phase(name: str, fn, timings: dict, requests: dict):
    REQUESTS.clear()
    started = time.perf_counter()
    with counting():
        out = fn()
    timings[name] = round(time.perf_counter() - started, 2)
    requests[name] = dict(REQUESTS)
    print(f"{name}: {timings[name]} s, {sum(REQUESTS.values())} requests {dict(REQUESTS)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=50_000)
    parser.add_argument("--rows-per-file", type=int, default=10)
    parser.add_argument("--root", default="/tmp/optirag_driver_dry_run")
    parser.add_argument("--name", default="driver_dry_run")
    args = parser.parse_args()

    import ray

    from optirag.pipelines.parallel import in_tasks

    root = Path(args.root) / f"{args.files}"
    started = time.perf_counter()
    build_tree(root, args.files, args.rows_per_file)
    setup_s = time.perf_counter() - started
    output = root / "scores"
    if output.exists():
        import shutil

        shutil.rmtree(output)
    total = args.files * args.rows_per_file
    cfg = Config.model_validate(
        {
            "storage": {"root": str(root)},
            "scoring": {
                "candidates_uri": str(root / "candidates"),
                "history_uri": str(root / "history.parquet"),
                "items_uri": str(root / "items.parquet"),
                "output_uri": str(output),
                "run_id": "dry",
                "rows_per_shard": math.ceil(total / args.shards),
            },
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    count_driver_requests()
    timings: dict = {}
    requests: dict = {}
    run = phase("plan", lambda: runs.start(cfg, "dry-v1", map_files=in_tasks), timings, requests)
    assert run.num_shards == args.shards, (run.num_shards, args.shards)
    write_done_shards(run, args.shards)
    done = phase("resume_check", lambda: run.done(cfg.storage), timings, requests)
    assert len(done) == args.shards
    summary = phase(
        "commit",
        lambda: runs.commit(run, cfg, ("dry-v1", {}), time.time(), in_tasks),
        timings,
        requests,
    )
    run.release()
    assert summary["candidates"] == total
    driver_requests = sum(sum(r.values()) for r in requests.values())
    bound = 2 * (args.files + args.shards) / 1000 + 100
    import subprocess

    git = ["git", "rev-parse", "--short", "HEAD"]
    here = Path(__file__).parent
    commit = subprocess.run(git, capture_output=True, text=True, cwd=here).stdout.strip()
    result = {
        "command": " ".join(["python", "bench/driver_dry_run.py", *sys.argv[1:]]),
        "commit": commit,
        "machine": machine(),
        "files": args.files,
        "shards": args.shards,
        "rows": total,
        "seconds": timings,
        "driver_seconds": round(sum(timings.values()), 2),
        "requests": requests,
        "driver_requests": driver_requests,
        "requests_bound": bound,
        "requests_within_bound": driver_requests <= bound,
        "driver_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "tree_setup_s": round(setup_s, 1),
        "note": "a listing counts one request per 1,000 entries (S3 pages); requests in Ray "
        "tasks are not the driver's",
    }
    ray.shutdown()
    rows = [(k, timings[k], sum(requests[k].values())) for k in timings]
    rows.append(("total", result["driver_seconds"], f"{driver_requests} (bound {bound:.0f})"))
    write_results(args.name, result, rows, ("phase", "seconds", "driver requests"))


if __name__ == "__main__":
    main()
