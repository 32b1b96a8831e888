"""Early-exit scorer speed on one machine, in one run, on the same pairs:

  full depth, no sharing | full depth, shared prefixes | early exit + shared prefixes @ taus

    python bench/early_exit.py --config conf/demo.yaml [--users 10 --per-user 20]

Uses the trained heads (exits.heads_uri, default <root>/exits; hybrid heads with their side
features) when present, else untrained heads, for which the exit rates mean little. Writes
bench/results/<name>.json (default early_exit, or early_exit_gpu on a GPU, with the card's
name) and prints a markdown table. On a GPU, bf16 (backbone.dtype=auto) and larger batches:

    python bench/early_exit.py --users 200 --per-user 50 compute.batch_tokens=32768
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import artifacts as A  # noqa: E402
from optirag import schema as S  # noqa: E402
from optirag.backbones import load_backbone  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.context import ContextStore  # noqa: E402
from optirag.early_exit import ExitRule  # noqa: E402
from optirag.model_files import local_backbone  # noqa: E402
from optirag.pair_scorer import make_pair_scorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/demo.yaml")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--taus", default="0.005,0.02,0.05,0.1")
    parser.add_argument("--name", help="results file name (default by device)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    backbone = load_backbone(local_backbone(cfg))
    trained = A.has_trained_heads(cfg)
    model = A.load_scoring_model(cfg, backbone)
    heads = model.heads
    train, items, neighbors = A.read_prompt_tables(cfg)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)

    rng = np.random.default_rng(0)
    users = rng.choice(np.unique(train[S.USER_ID].to_numpy()), args.users, replace=False)
    catalog = items[S.ITEM_ID].to_numpy()
    pair_users = np.repeat(users, args.per_user)
    pair_items = np.concatenate([rng.choice(catalog, args.per_user, replace=False) for _ in users])

    def run(name: str, rule: ExitRule, share: bool) -> dict:
        compute = cfg.compute.model_copy(update={"share_prefixes": share})
        scorer = make_pair_scorer(
            cfg.model_copy(update={"compute": compute}), backbone, model, contexts, rule
        )
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = scorer.score(pair_users, pair_items)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        n = len(pair_users)
        return {
            "variant": name,
            "rule": rule.kind,
            "tau": rule.threshold,
            "shared": share,
            "pairs": n,
            "seconds": round(seconds, 2),
            "pairs_per_s": round(n / seconds, 2),
            "tokens_per_pair": round(out.layer_tokens / backbone.num_layers / n, 1),
            "layer_tokens_per_pair": round(out.layer_tokens / n),
            "mean_exit_layer": float(out.exit_layers.mean()),
            "scores": out.scores,
        }

    # Warm-up so the first variant does not pay for lazy initialisation.
    make_pair_scorer(cfg, backbone, model, contexts, ExitRule("none")).score(
        pair_users[:2], pair_items[:2]
    )
    rows = [
        run("full depth, no sharing", ExitRule("none"), False),
        run("full depth, shared prefixes", ExitRule("none"), True),
    ]
    rows += [
        run(f"early exit tau={t}, shared", ExitRule("agreement", float(t)), True)
        for t in args.taus.split(",")
    ]
    base, shared = rows[0], rows[1]
    max_diff = float(np.abs(base["scores"] - shared["scores"]).max())
    for r in rows:
        r["speedup_vs_unshared"] = round(r["pairs_per_s"] / base["pairs_per_s"], 2)
        r["speedup_vs_shared_full"] = round(r["pairs_per_s"] / shared["pairs_per_s"], 2)
        r["predicted_speedup_from_depth"] = round(backbone.num_layers / r["mean_exit_layer"], 2)
        r["predicted_speedup_from_layer_tokens"] = round(
            shared["layer_tokens_per_pair"] / r["layer_tokens_per_pair"], 2
        )
        del r["scores"]
    result = {
        "machine": machine(),
        "backbone": backbone.version,
        "dtype": str(backbone.dtype),
        "device": str(backbone.device),
        "trained_heads": trained,
        "layers": heads.layers,
        "side_features": heads.side_names,
        "batch_rows": cfg.compute.batch_rows,
        "users": args.users,
        "candidates_per_user": args.per_user,
        "shared_vs_plain_max_score_diff": max_diff,
        "rows": rows,
    }
    name = args.name or ("early_exit_gpu" if backbone.device.type == "cuda" else "early_exit")
    write_results(
        name,
        result,
        [
            (
                r["variant"],
                r["pairs_per_s"],
                r["tokens_per_pair"],
                f"{r['mean_exit_layer']:.1f}",
                r["speedup_vs_shared_full"],
                r["predicted_speedup_from_layer_tokens"],
            )
            for r in rows
        ],
        (
            "variant",
            "pairs/s",
            "tokens/pair",
            "mean exit layer",
            "speedup vs shared full",
            "predicted (layer-tokens)",
        ),
    )


if __name__ == "__main__":
    main()
