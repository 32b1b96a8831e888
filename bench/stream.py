"""The whole scoring pipeline at scale on synthetic pairs with the tiny random model:
pairs/s and peak memory (driver, Ray system processes, workers) per input size.

    python bench/stream.py --pairs 100000 1000000 10000000
    python bench/stream.py --pairs 10000000 --merge   # add a size to the recorded runs
    python bench/stream.py --pairs 1000000 10000000 --actors 12 --num-cpus 16 \
        --name stream_16cpu backbone.device=cpu compute.torch_threads=1   # a bigger box
    python bench/stream.py --pairs 1000000 --users 1000000 10000000 --name stream_users

The users axis (--users) keeps the pairs fixed and grows the users with a history: every
k-th user has candidates, all of them are in the context tables. The claim there is that a
model actor's peak memory does not grow with the users (it holds only the model), and the
context tables' build time is recorded.

Each size gets a fresh local Ray and a fresh synthetic data set on local disk. Writes
bench/results/stream.json and prints a markdown table; the claim to check is that peak
memory stays flat as the input grows (streaming, not loading).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PeakMemory, gib, machine, write_results  # noqa: E402

from optirag.config import load_config  # noqa: E402
from optirag.pipelines import scoring, synthetic  # noqa: E402


def run_once(
    pairs: int, users: int, per_user: int, workdir: str, actors: int, num_cpus: int,
    extra: list[str],
) -> dict:  # fmt: skip
    overrides = [
        f"storage.root={workdir}", "backbone.source=tiny", f"backbone.cache_dir={workdir}/models",
        f"synthetic.num_users={users}", "synthetic.num_items=20000",
        f"synthetic.candidates_per_user={per_user}", "synthetic.history_per_user=10",
        f"synthetic.candidate_users={pairs // per_user}",
        "synthetic.users_per_shard=25000",
        f"scoring.candidates_uri={workdir}/synthetic/candidates",
        f"scoring.history_uri={workdir}/synthetic/interactions/train",
        f"scoring.items_uri={workdir}/synthetic/items.parquet",
        "scoring.rows_per_shard=20000", "scoring.run_id=bench",
        f"compute.min_actors={actors}", f"compute.max_actors={actors}",
        "exits.rule=agreement", "exits.threshold=0.01", *extra,
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    ray.init(include_dashboard=False, num_cpus=num_cpus)
    try:
        synthetic.run(cfg.synthetic, cfg.storage)
        with PeakMemory() as mem:
            start = time.perf_counter()
            summary = scoring.run(cfg)
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "pairs": pairs, "users": users, "scored": summary["scored"], "wall_s": round(wall, 1),
        "pairs_per_s": round(pairs / wall, 1), "peak_rss_gib_total": gib(mem.peak),
        "peak_pss_gib_total": gib(mem.peak_pss), "peak_processes_by_kind": mem.peak_count_by_kind,
        "peak_rss_gib_by_kind": {k: gib(v) for k, v in mem.peak_by_kind.items()},
        "peak_anon_gib_by_kind": {k: gib(v) for k, v in mem.peak_anon_by_kind.items()},
        "peak_shmem_gib_by_kind": {k: gib(v) for k, v in mem.peak_shmem_by_kind.items()},
        "model_actor_trace": mem.trace,
        "shards": summary["shards"], "mean_exit_layer": summary["mean_exit_layer"],
        "context_build_s": _context_build_s(workdir),
    }  # fmt: skip


def _context_build_s(workdir: str) -> float | None:
    """The build time the context tables' manifest records (None: no tables)."""
    manifests = list(Path(workdir, "context").glob("*/_SUCCESS"))
    return json.loads(manifests[0].read_text())["build_s"] if manifests else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--users",
        type=int,
        nargs="+",
        default=None,
        help="users axis: these user counts at the one --pairs size",
    )
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--name", default="stream", help="results file name")
    parser.add_argument("overrides", nargs="*", help="extra a.b=c config overrides")
    parser.add_argument(
        "--merge", action="store_true", help="keep other sizes' runs from results/stream.json"
    )
    args = parser.parse_args()
    if args.users and len(args.pairs) != 1:
        parser.error("--users takes one --pairs size")
    sizes = [(p, p // args.per_user) for p in args.pairs]
    if args.users:
        sizes = [(args.pairs[0], u) for u in args.users]
    axis = "users" if args.users else "pairs"
    runs = []
    for pairs, users in sizes:
        with tempfile.TemporaryDirectory() as workdir:
            runs.append(run_once(pairs, users, args.per_user, workdir, args.actors,
                                 args.num_cpus, args.overrides))  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    results_file = RESULTS / f"{args.name}.json"
    if args.merge and results_file.exists():
        previous = json.loads(results_file.read_text())["runs"]
        runs = sorted([r for r in previous if r[axis] not in {r[axis] for r in runs}] + runs,
                      key=lambda r: r[axis])  # fmt: skip
    result = {"machine": machine(), "model": "tiny random Llama (6 layers, hidden 32)",
              "actors": args.actors, "num_cpus": args.num_cpus, "overrides": args.overrides,
              "runs": runs}  # fmt: skip
    if len(runs) > 1:
        for metric in ("rss", "pss"):
            result[f"peak_{metric}_ratio_largest_vs_smallest"] = round(
                runs[-1][f"peak_{metric}_gib_total"] / runs[0][f"peak_{metric}_gib_total"], 3
            )
        for metric in ("rss", "anon"):
            actors = [r.get(f"peak_{metric}_gib_by_kind", {}).get("model_actors") for r in runs]
            if all(actors):
                result[f"model_actor_peak_{metric}_ratio_largest_vs_smallest"] = round(
                    actors[-1] / actors[0], 3
                )
    write_results(
        args.name, result,
        [(f"{r['pairs']:,}", f"{r['users']:,}", r["shards"], r["wall_s"], r["pairs_per_s"],
          r["context_build_s"], r["peak_rss_gib_total"], r["peak_pss_gib_total"],
          r["peak_rss_gib_by_kind"].get("model_actors", 0),
          r.get("peak_anon_gib_by_kind", {}).get("model_actors", "-"),
          r["peak_rss_gib_by_kind"].get("ray_workers", 0))
         for r in runs],
        ("pairs", "users", "shards", "wall s", "pairs/s", "context build s",
         "peak RSS GiB (all)", "peak PSS GiB (all)", "peak RSS GiB (model actors)",
         "peak anon GiB (model actors)", "peak RSS GiB (other workers)"),
    )  # fmt: skip


if __name__ == "__main__":
    main()
