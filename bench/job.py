"""The scoring job end to end on the MovieLens candidates with the real backbone, as a user
runs it (`jobs/score.py --config conf/demo.yaml`), from a given checkout: pairs/s of the whole
job (staging, the context stage, the model, the commit; Ray's start not counted).

    python bench/job.py --users 10                        # this checkout, 10 users' pairs
    python bench/job.py --users 10 --checkout ../other --name job_before   # another commit

Runs the job `--repeats` times into a fresh output folder each time (a first run builds the
context tables, later runs reuse them). Needs `make demo`'s data (and its heads, when the
config names hybrid heads). Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_job(checkout: Path, config: Path, overrides: list[str]) -> dict:
    """One `jobs/score.py` run in `checkout`; its printed summary."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "jobs/score.py", "--config", str(config), *overrides],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the code to run")
    parser.add_argument("--config", type=Path, default=ROOT / "conf" / "demo.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--users",
        type=int,
        default=None,
        help="score only this many users of the sample (drawn with seed 0)",
    )
    parser.add_argument("--name", default="job")
    parser.add_argument("overrides", nargs="*", help="extra a.b=c config overrides")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout.strip()
    storage_root = ROOT / "data" / "demo"
    sample = pq.read_table(storage_root / "candidates" / "test_sample.parquet")
    if args.users is not None:
        users = np.unique(sample["user_id"].to_numpy())
        chosen = np.random.default_rng(0).choice(users, min(args.users, len(users)), replace=False)
        sample = sample.filter(pc.is_in(sample["user_id"], value_set=pa.array(chosen)))
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            pq.write_table(sample, f"{out}/candidates.parquet")
            overrides = [
                f"storage.root={storage_root}",
                f"backbone.cache_dir={ROOT / 'data' / 'cache' / 'models'}",
                f"scoring.candidates_uri={out}/candidates.parquet",
                f"scoring.output_uri={out}/scores",
                "scoring.run_id=bench",
                *args.overrides,
            ]
            summary = run_job(checkout, args.config.resolve(), overrides)
        rows.append(
            {
                "repeat": repeat,
                "pairs": summary["scored"],
                "wall_s": summary["wall_s"],
                "pairs_per_s": summary["pairs_per_s"],
                "mean_exit_layer": summary.get("mean_exit_layer"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": machine(),
        "commit": commit,
        "config": str(args.config.name),
        "users": args.users,
        "overrides": args.overrides,
        "runs": rows,
    }
    write_results(
        args.name,
        result,
        [(commit, r["repeat"], r["pairs"], r["wall_s"], r["pairs_per_s"]) for r in rows],
        ("commit", "run", "pairs", "wall s", "pairs/s"),
    )


if __name__ == "__main__":
    main()
