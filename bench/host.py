"""Host feed: pairs/s per CPU core of the context stage and token assembly (issue 16), the
CPU work in front of the model, with no model.

    python bench/host.py --config conf/demo.yaml [--users 400] [--per-user 50]

On the tables `make demo` prepared (MovieLens history, items, GCN neighbours, the SmolLM2
tokenizer), in this one process (one core):

  - movielens: the test candidates as they are (about 10.6 per user);
  - dense: the same users, each with `--per-user` candidates drawn from the catalog (what a
    nightly candidate set looks like).

Each with `prompts.target_ratings` off and on. The time counted per pair is the users table
rows of the candidates' users (prefix ids, neighbours' ratings) and assembling every pair's
token block from them; the goal is >= 5,000 pairs/s per core at 50 candidates per user with
target_ratings on, and no slower without it. The items table is made once per night for the
whole catalogue whatever the number of pairs, so it is timed on its own (`items_s`;
`pairs_per_s_with_items` charges it to these few pairs).
Writes bench/results/host.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import artifacts as A  # noqa: E402
from optirag import schema as S  # noqa: E402
from optirag import storage  # noqa: E402
from optirag.backbones import load_tokenizer  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.context import ContextStore, ItemRatings  # noqa: E402
from optirag.context_tables import ColdStart, TokenAssembler, item_rows, user_rows  # noqa: E402
from optirag.model_files import local_backbone  # noqa: E402
from optirag.prompts import PromptBuilder  # noqa: E402


def measure(cfg, history: pa.Table, items: pa.Table, neighbors, cands: pa.Table) -> dict:
    prompts = PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)
    users = np.unique(cands[S.USER_ID].to_numpy())
    ratings = ItemRatings.from_interactions(history) if cfg.prompts.target_ratings else None
    contexts = ContextStore(history, items, neighbors, cfg.prompts, ratings)
    t0 = time.perf_counter()
    user_table = user_rows(users, contexts, prompts, None)
    t1 = time.perf_counter()
    item_table = item_rows(contexts, prompts, None)
    t2 = time.perf_counter()
    assembler = TokenAssembler(
        prompts, ColdStart.make(prompts, None), None, cfg.prompts.max_neighbor_ratings
    )
    batch = cands.select([S.USER_ID, S.ITEM_ID]).append_column(
        S.REASON, pa.nulls(len(cands), pa.string())
    )
    block = assembler.assemble(batch, user_table, item_table)
    t3 = time.perf_counter()
    n = len(cands)
    mean_suffix = float(np.mean([len(s) for s in block[S.SUFFIX_IDS].to_pylist()]))
    mean_prefix = float(np.mean([len(p) for p in user_table[S.PREFIX_IDS].to_pylist()]))
    return {
        "pairs": n,
        "users": len(users),
        "items": len(item_table),
        "pairs_per_user": round(n / len(users), 1),
        "users_s": round(t1 - t0, 3),
        "items_s": round(t2 - t1, 3),
        "assemble_s": round(t3 - t2, 3),
        "ms_per_user": round(1000 * (t1 - t0) / len(users), 3),
        "us_per_pair_assembly": round(1e6 * (t3 - t2) / n, 2),
        "pairs_per_s": round(n / (t3 - t2 + t1 - t0), 1),
        "pairs_per_s_with_items": round(n / (t3 - t0), 1),
        "mean_prefix_tokens": round(mean_prefix, 1),
        "mean_suffix_tokens": round(mean_suffix, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/demo.yaml")
    parser.add_argument("--users", type=int, default=400, help="users of the test candidates")
    parser.add_argument("--per-user", type=int, default=50)
    parser.add_argument("--name", default="host")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    store, root = cfg.storage, cfg.storage.root
    history = storage.read_table(A.interactions_uri(root, "train"), store)
    items = storage.read_table(A.items_uri(root), store)
    neighbors = storage.read_table(A.neighbors_uri(root), store)
    test = storage.read_table(A.candidates_uri(root, "test"), store)
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(np.unique(test[S.USER_ID].to_numpy()), args.users, replace=False))
    test = test.filter(pa.compute.is_in(test[S.USER_ID], pa.array(users)))
    catalog = items[S.ITEM_ID].to_numpy()
    drawn = [rng.choice(catalog, args.per_user, replace=False) for _ in users]
    dense = pa.table({S.USER_ID: np.repeat(users, args.per_user), S.ITEM_ID: np.concatenate(drawn)})
    rows = []
    for name, cands in (("movielens", test), (f"dense-{args.per_user}", dense)):
        for target_ratings in (False, True):
            prompts = cfg.prompts.model_copy(update={"target_ratings": target_ratings})
            one = measure(
                cfg.model_copy(update={"prompts": prompts}), history, items, neighbors, cands
            )
            rows.append({"candidates": name, "target_ratings": target_ratings, **one})
            print(rows[-1], flush=True)
    result = {
        "machine": machine(),
        "config": args.config,
        "overrides": args.overrides,
        "rows": rows,
        "goal_pairs_per_s_per_core": 5000,
    }
    write_results(
        args.name,
        result,
        [
            (
                r["candidates"],
                r["target_ratings"],
                r["pairs"],
                r["pairs_per_user"],
                r["ms_per_user"],
                r["us_per_pair_assembly"],
                r["pairs_per_s"],
                r["items_s"],
            )
            for r in rows
        ],
        (
            "candidates",
            "target_ratings",
            "pairs",
            "pairs/user",
            "ms/user (users table)",
            "µs/pair (assembly)",
            "pairs/s per core",
            "items table s (once)",
        ),
    )


if __name__ == "__main__":
    main()
