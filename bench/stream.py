"""The whole scoring pipeline at scale on synthetic pairs with the tiny random model:
pairs/s and peak memory (driver, Ray system processes, workers) per input size.

    python bench/stream.py --pairs 100000 1000000 10000000
    python bench/stream.py --pairs 10000000 --merge   # add a size to the recorded runs
    python bench/stream.py --pairs 1000000 10000000 --actors 12 --num-cpus 16 \
        --name stream_16cpu backbone.device=cpu compute.torch_threads=1   # a bigger box
    python bench/stream.py --pairs 1000000 --users 1000000 10000000 --name stream_users
    python bench/stream.py --pairs 1000000 --users 1000000 10000000 --neighbors 10 \
        --name stream_scale      # issue 30's users axis, with a neighbour table
    python bench/stream.py --pairs 1000000 --users 100000 --items 10000 1000000 --name stream_items
    python bench/stream.py ... --side-features   # hybrid heads: every user and item has CF sides

The users axis (--users) keeps the pairs fixed and grows the users with a history: every
k-th user has candidates, all of them are in the context tables. The claim there is that a
model actor's peak memory does not grow with the users (it holds only the model), and the
context tables' build time is recorded.

The items axis (--items) keeps pairs and users fixed and grows the items table.
`--side-features` stores hybrid heads (random, untrained) with side features of every user
and item (random MF arrays of dimension 32 and statistics, as `cf.SideFeatures` stores them),
so the context stage routes each user's side to its block and the actors read side inputs.

Each run also records, per process kind (driver, model actors, other Ray workers, Ray's own
processes), the largest single process's peak private memory (RssAnon), the driver's and
Ray's processes' shared memory (the object store's pages), the storage requests the driver
made (counted at the filesystem level, bench/_common.count_driver_requests), and the files
the run left under its outputs (scores and context tables) against the bound
3 x shards + 2 x input files + 100. `--save-scores` / `--compare-scores` keep a run's
scores to compare another checkout's (PYTHONPATH=<checkout>) on the same inputs.

Each size runs in a process of its own, with a fresh local Ray and a fresh synthetic data set
on local disk. Writes bench/results/<name>.json and prints a markdown table; the claim to
check is that peak memory stays flat as the input grows (streaming, not loading).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    ObjectStorePeak,
    PeakMemory,
    count_driver_requests,
    counting,
    gib,
    machine,
    mib,
    top_tasks,
    write_results,
)

from optirag import schema as S  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.pipelines import scoring, synthetic  # noqa: E402


def run_once(
    pairs: int,
    users: int,
    per_user: int,
    workdir: str,
    actors: int,
    num_cpus: int,
    extra: list[str],
    neighbors: int = 0,
    items: int = 20000,
    scores_file: str | None = None,
    side: bool = False,
) -> dict:
    overrides = [
        f"storage.root={workdir}",
        "backbone.source=tiny",
        f"backbone.cache_dir={workdir}/models",
        f"synthetic.num_users={users}",
        f"synthetic.num_items={items}",
        f"synthetic.candidates_per_user={per_user}",
        "synthetic.history_per_user=10",
        f"synthetic.candidate_users={pairs // per_user}",
        "synthetic.users_per_shard=25000",
        f"scoring.candidates_uri={workdir}/synthetic/candidates",
        f"scoring.history_uri={workdir}/synthetic/interactions/train",
        f"scoring.items_uri={workdir}/synthetic/items.parquet",
        "scoring.rows_per_shard=20000",
        "scoring.run_id=bench",
        f"compute.min_actors={actors}",
        f"compute.max_actors={actors}",
        "exits.rule=agreement",
        "exits.threshold=0.01",
        *extra,
    ]
    if neighbors:
        overrides.append(f"scoring.neighbors_uri={workdir}/synthetic/neighbors")
    cfg = load_config(None, overrides)
    ray.init(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.get(write_synthetic.remote(cfg))
        if neighbors:
            write_neighbors(f"{workdir}/synthetic/neighbors", users, neighbors)
        if side:
            ray.get(write_side_features.remote(cfg, users, items))
        inputs = sum(1 for _ in Path(workdir, "synthetic").rglob("*.parquet"))
        with PeakMemory() as mem, counting() as requests, ObjectStorePeak() as store:
            start = time.perf_counter()
            summary = scoring.run(cfg)
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    files = [p for d in ("scores", "context") for p in Path(workdir, d).rglob("*") if p.is_file()]
    written, written_bytes = len(files), sum(p.stat().st_size for p in files)
    result = {
        "pairs": pairs,
        "users": users,
        "items": items,
        "neighbors": neighbors,
        "side_features": side,
        "scored": summary["scored"],
        "wall_s": round(wall, 1),
        "pairs_per_s": round(pairs / wall, 1),
        "peak_rss_gib_total": gib(mem.peak),
        "peak_pss_gib_total": gib(mem.peak_pss),
        "peak_processes_by_kind": mem.peak_count_by_kind,
        "peak_rss_gib_by_kind": {k: gib(v) for k, v in mem.peak_by_kind.items()},
        "peak_anon_gib_by_kind": {k: gib(v) for k, v in mem.peak_anon_by_kind.items()},
        "peak_single_anon_gib_by_kind": _gibs(mem.peak_single_anon_by_kind),
        "peak_shmem_gib_by_kind": {k: gib(v) for k, v in mem.peak_shmem_by_kind.items()},
        "peak_shmem_mib_by_kind": {k: mib(v) for k, v in mem.peak_shmem_by_kind.items()},
        "peak_single_anon_gib_by_task": top_tasks(mem.peak_single_anon_by_task),
        "object_store_peak_gib": gib(store.peak),
        "object_store_spilled_gib": gib(store.spilled),
        "object_store_capacity_gib": gib(store.capacity),
        "model_actor_trace": mem.trace,
        "driver_trace": mem.driver_trace,
        "object_store_trace": store.trace,
        "shards": summary["shards"],
        "mean_exit_layer": summary["mean_exit_layer"],
        "context_build_s": _context_build_s(workdir),
        "driver_storage_requests": sum(requests.values()),
        "driver_storage_requests_by_kind": dict(requests),
        "input_files": inputs,
        "objects_written": written,
        "gib_written": gib(written_bytes),
        "objects_bound": 3 * summary["shards"] + 2 * inputs + 100,
    }
    result["objects_written_over_bound"] = round(written / result["objects_bound"], 3)
    if scores_file:
        result["scores"] = _scores(workdir)
    return result


def in_a_fresh_process(*args) -> dict:
    """`run_once` in a process of its own: its driver is measured from a clean start, as a
    job's is (in one process a run started where the one before left the heap: 0.06 GiB)."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_counted_run, *args).result()


def _counted_run(*args) -> dict:
    count_driver_requests()
    return run_once(*args)


def _gibs(by_kind: dict[str, int]) -> dict[str, float]:
    return {k: gib(v) for k, v in by_kind.items()}


def write_neighbors(folder: str, users: int, k: int) -> None:
    """A synthetic neighbour table: k other users per user, similarities descending, written
    by Ray tasks (not this process: it is the driver the benchmark measures)."""
    chunk = 250_000

    def write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        part = int(batch["id"][0])
        ids = np.arange(part * chunk, min(users, (part + 1) * chunk), dtype=np.int64)
        rng = np.random.default_rng([7, part])
        picked = (ids[:, None] + rng.integers(1, users, (len(ids), k))) % users
        sims = np.sort(rng.random((len(ids), k)).astype(np.float32), axis=1)[:, ::-1]
        table = pa.table(
            {
                S.USER_ID: ids,
                S.NEIGHBOR_IDS: pa.array(list(picked), pa.list_(pa.int64())),
                S.SIMILARITIES: pa.array(list(sims), pa.list_(pa.float32())),
                S.SOURCE: ["bench"] * len(ids),
            },
            schema=S.NEIGHBORS,
        )
        Path(folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, f"{folder}/part-{part:05d}.parquet")
        return {"rows": np.array([len(ids)])}

    n = -(-users // chunk)
    ray.data.range(n, override_num_blocks=n).map_batches(write, batch_size=1).materialize()


@ray.remote(num_cpus=0, max_calls=1)  # not in the driver: its items table and item factors
def write_synthetic(cfg) -> None:  # would stay in the driver's heap during the measured run
    synthetic.run(cfg.synthetic, cfg.storage)


@ray.remote(max_calls=1)  # a process of its own, gone before the measured run
def write_side_features(cfg, users: int, items: int, dim: int = 32) -> None:
    """Hybrid heads (random) with side features of `users` users and `items` items."""
    from optirag import artifacts as A
    from optirag import cf
    from optirag.backbones import load_backbone
    from optirag.early_exit import ExitHeads
    from optirag.prompts import PromptBuilder

    rng = np.random.default_rng(11)

    def sides(n: int) -> list[np.ndarray]:
        ids = np.arange(n, dtype=np.int64)
        emb = rng.normal(0, 0.1, (n, dim)).astype(np.float32)
        count = rng.integers(1, 50, n).astype(np.float64)
        return [ids, emb, rng.normal(0, 0.1, n).astype(np.float32), rng.random(n), count]

    u_ids, u_emb, u_bias, u_rate, u_count = sides(users)
    i_ids, i_emb, i_bias, i_rate, i_count = sides(items)
    mf = cf.MatrixFactorisation(u_ids.copy(), i_ids.copy(), u_emb, i_emb, u_bias, i_bias, 0.1)
    user_stats, item_stats = (
        cf.Stats(u_ids, u_rate, u_count, 0.5),
        cf.Stats(i_ids, i_rate, i_count, 0.5),
    )
    side = cf.SideFeatures(list(cf.SIDE_FEATURES), mf, user_stats, item_stats)
    backbone = load_backbone(cfg.backbone)
    answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
    heads = ExitHeads.from_backbone(backbone, [2, 4, 6], list(cf.SIDE_FEATURES), answers=answers)
    exit_config = {**heads.spec.as_dict(), "rule": "agreement", "threshold": 0.01}
    A.save_heads(A.StoredHeads(heads.state_dict(), exit_config, None, side.arrays()), cfg)


def _scores(workdir: str) -> pa.Table:
    """The run's (user, item, score), sorted: to compare two checkouts' scores."""
    files = [p for p in Path(workdir, "scores").rglob("scores/*.parquet")]
    columns = [S.USER_ID, S.ITEM_ID, S.SCORE]
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return table.sort_by([(S.USER_ID, "ascending"), (S.ITEM_ID, "ascending")])


def _context_build_s(workdir: str) -> float | None:
    """The build time the context tables' manifest records (None: no tables)."""
    manifests = list(Path(workdir, "context").glob("*/_SUCCESS"))
    return json.loads(manifests[0].read_text())["build_s"] if manifests else None


RATIOS = {  # the issue-30 figures, largest run over smallest along an axis
    "driver_peak_private": lambda r: r["peak_single_anon_gib_by_kind"].get("driver"),
    "largest_worker_peak_private": lambda r: max(
        v for k, v in r["peak_single_anon_gib_by_kind"].items() if k != "driver"
    ),
    "build_s_per_user": lambda r: (r["context_build_s"] or 0) / r["users"],
    "driver_storage_calls": lambda r: r["driver_storage_requests"],
    # in MiB where recorded (a few MiB: GiB to 0.001 made a ratio of rounding)
    "driver_shared": lambda r: r.get("peak_shmem_mib_by_kind", r["peak_shmem_gib_by_kind"]).get(
        "driver"
    ),
    # the raylet's figure (bench/_common.ObjectStorePeak); runs recorded before it have the
    # proxy: the object store's pages as shared memory of the processes that map them
    "object_store_peak": lambda r: (
        r.get("object_store_peak_gib") or max(r["peak_shmem_gib_by_kind"].values())
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--users", type=int, nargs="+", help="users axis: these user counts at one --pairs size"
    )
    parser.add_argument(
        "--items", type=int, nargs="+", default=[20_000], help="items axis: at one --pairs size"
    )
    parser.add_argument("--neighbors", type=int, default=0, help="neighbours per user (0: none)")
    parser.add_argument(
        "--side-features", action="store_true", help="hybrid heads with every user's CF side"
    )
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--name", default="stream", help="results file name")
    parser.add_argument("--save-scores", help="write the first run's scores to this parquet file")
    parser.add_argument("--compare-scores", help="the first run's max |score - this file's|")
    parser.add_argument("overrides", nargs="*", help="extra a.b=c config overrides")
    parser.add_argument(
        "--merge", action="store_true", help="keep other sizes' runs from results/stream.json"
    )
    args = parser.parse_args()
    if (args.users or len(args.items) > 1) and len(args.pairs) != 1:
        parser.error("--users and --items axes take one --pairs size")
    sizes = [(p, p // args.per_user, args.items[0]) for p in args.pairs]
    axis = "pairs"
    if len(args.items) > 1:
        users = (args.users or [args.pairs[0] // args.per_user])[0]
        sizes, axis = [(args.pairs[0], users, n) for n in args.items], "items"
    elif args.users:
        sizes, axis = [(args.pairs[0], u, args.items[0]) for u in args.users], "users"
    runs = []
    for pairs, users, items in sizes:
        keep = bool(args.save_scores or args.compare_scores) and not runs
        with tempfile.TemporaryDirectory() as workdir:
            runs.append(
                in_a_fresh_process(
                    pairs,
                    users,
                    args.per_user,
                    workdir,
                    args.actors,
                    args.num_cpus,
                    args.overrides,
                    args.neighbors,
                    items,
                    keep,
                    args.side_features,
                )
            )
        scores = runs[-1].pop("scores", None)
        if scores is not None and args.save_scores:
            pq.write_table(scores, args.save_scores)
        if scores is not None and args.compare_scores:
            before = pq.read_table(args.compare_scores)
            same = before.select([S.USER_ID, S.ITEM_ID]).equals(
                scores.select([S.USER_ID, S.ITEM_ID])
            )
            diff = np.abs(before[S.SCORE].to_numpy() - scores[S.SCORE].to_numpy()) if same else None
            runs[-1]["max_abs_score_diff_vs_before"] = float(diff.max()) if same else None
            runs[-1]["same_pairs_as_before"] = same
        shown = {k: v for k, v in runs[-1].items() if not k.endswith("_trace")}
        print(json.dumps(shown), flush=True)
    results_file = RESULTS / f"{args.name}.json"
    if args.merge and results_file.exists():
        previous = json.loads(results_file.read_text())["runs"]
        runs = sorted(
            [r for r in previous if r[axis] not in {r[axis] for r in runs}] + runs,
            key=lambda r: r[axis],
        )
    result = {
        "machine": machine(),
        "model": "tiny random Llama (6 layers, hidden 32)",
        "command": " ".join(["python", "bench/stream.py", *sys.argv[1:]]),
        "actors": args.actors,
        "num_cpus": args.num_cpus,
        "overrides": args.overrides,
        "axis": axis,
        "runs": runs,
    }
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
        for name, value in RATIOS.items():
            first, last = value(runs[0]), value(runs[-1])
            if first and last is not None:
                result[f"{name}_ratio_{axis}"] = round(last / first, 3)
    result["driver_peak_private_gib"] = max(
        r["peak_single_anon_gib_by_kind"].get("driver", 0) for r in runs
    )
    result["objects_written_over_bound"] = max(r["objects_written_over_bound"] for r in runs)
    if axis == "items" and len(runs) > 1:
        growth = max(v for k, v in runs[-1]["peak_single_anon_gib_by_kind"].items())
        growth -= max(v for k, v in runs[0]["peak_single_anon_gib_by_kind"].items())
        added = runs[-1]["items"] - runs[0]["items"]
        result["worker_bytes_per_item"] = round(growth * 2**30 / added, 1)
    if "max_abs_score_diff_vs_before" in runs[0]:
        result["max_abs_score_diff_vs_before"] = runs[0]["max_abs_score_diff_vs_before"]
    write_results(
        args.name,
        result,
        [
            (
                f"{r['pairs']:,}",
                f"{r['users']:,}",
                f"{r.get('items', 20000):,}",
                r["shards"],
                r["wall_s"],
                r["pairs_per_s"],
                r["context_build_s"],
                r["peak_single_anon_gib_by_kind"].get("driver", "-"),
                max(v for k, v in r["peak_single_anon_gib_by_kind"].items() if k != "driver"),
                r["driver_storage_requests"],
                f"{r['objects_written']} / {r['objects_bound']}",
            )
            for r in runs
        ],
        (
            "pairs",
            "users",
            "items",
            "shards",
            "wall s",
            "pairs/s",
            "context build s",
            "driver peak anon GiB",
            "largest other process peak anon GiB",
            "driver requests",
            "objects written / bound",
        ),
    )


if __name__ == "__main__":
    main()
