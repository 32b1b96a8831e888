"""The baselines of the accuracy study on their own (issue 15), on both splits: item
popularity, MF as it used to be (20 epochs, l2 0.03, one seed), MF tuned on valid (l2 on a
grid, early stopping on valid AUC, 3 seeds) and logistic regression on ids with C tuned on
valid, on the test candidates of the same user sample as the accuracy study, with paired
user-level bootstrap intervals (and, for comparison, pair-level ones). No LLM rows: this is
the CPU-cheap part of the study.

    python bench/baselines.py --config conf/accuracy.yaml [--splits user_time global_time]

MovieLens-100k is read from data.movielens_dir and split in memory (nothing is written but
bench/results/baselines.json and .md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import baselines as B  # noqa: E402
from optirag import cf, data  # noqa: E402
from optirag import metrics as M  # noqa: E402
from optirag import pairs as P  # noqa: E402
from optirag.config import load_config  # noqa: E402

UNTUNED_MF = "matrix factorisation (20 epochs, l2 0.03, seed 0: the old baseline)"


def run_split(cfg, split: str) -> dict:
    dc = cfg.data.model_copy(update={"split": split})
    raw, _ = data.load_movielens(dc.movielens_dir)
    interactions = data.canonical_interactions(raw, dc.like_threshold, dc.movielens_dir)
    splits = data.split(interactions, dc)
    train, valid = splits["train"], splits["valid"]
    pairs = P.candidate_pairs(
        data.candidates_from(splits["test"]), cfg.evaluation.test_users, cfg.heads.seed
    )
    ec = cfg.evaluation
    started = time.perf_counter()
    tuned = B.tune_all(train, valid, pairs.users, pairs.items, ec)
    models = B.baseline_scores(train, pairs.users, pairs.items)
    models[UNTUNED_MF] = cf.MatrixFactorisation.fit(train).probs(pairs.users, pairs.items)
    models.update({t.name: t.scores for t in tuned})
    fit_s = time.perf_counter() - started
    # Settings are chosen; the test labels are read from here on.
    labels = pairs.labels
    masks = M.slice_masks(train, pairs.users, pairs.items)
    table = M.model_table(
        models,
        labels,
        masks,
        B.MF_BASELINE,
        set(models),
        ec.bootstrap_resamples,
        groups=pairs.users,
    )
    pair_level = M.model_table(
        models, labels, masks, B.MF_BASELINE, set(models), ec.bootstrap_resamples, groups=None
    )
    widths = {}
    for user_row, pair_row in zip(table, pair_level, strict=True):
        for name, e in user_row["slices"].items():
            if "diff_ci" in e:
                pe = pair_row["slices"][name]
                widths.setdefault(user_row["model"], {})[name] = (
                    e["diff_ci"][1] - e["diff_ci"][0]
                ) / (pe["diff_ci"][1] - pe["diff_ci"][0])
    return {
        "split": split,
        "time_quantiles": list(dc.time_quantiles) if split == "global_time" else None,
        "train_rows": train.num_rows,
        "valid_rows": valid.num_rows,
        "test_pairs": len(pairs),
        "test_users": int(len(np.unique(pairs.users))),
        "models": table,
        "baselines": [t.report(labels, masks) for t in tuned],
        "interval_width_user_over_pair": widths,
        "fit_s": round(fit_s, 1),
        "intervals": f"paired user-level bootstrap, {ec.bootstrap_resamples} resamples",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/accuracy.yaml")
    parser.add_argument("--splits", nargs="+", default=["user_time", "global_time"])
    parser.add_argument("--name", default="baselines")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    result = {
        "machine": machine(),
        "config": args.config,
        "overrides": args.overrides,
        "splits": {},
    }
    rows = []
    for split in args.splits:
        r = result["splits"][split] = run_split(cfg, split)
        for m in r["models"]:
            e = m["slices"]["all"]
            diff = ""
            if "diff_ci" in e:
                lo, hi = e["diff_ci"]
                diff = f"{e['diff_vs_reference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            over = next(
                (
                    b["test_auc_over_seeds"]["all"]
                    for b in r["baselines"]
                    if b["model"] == m["model"]
                ),
                None,
            )
            seeds = f"{over['mean']:.4f} +- {over['std']:.4f}" if over else "-"
            rows.append((split, r["test_pairs"], m["model"], f"{e['auc']:.4f}", seeds, diff))
    header = (
        "split",
        "test pairs",
        "model",
        "AUC all (seed 0)",
        "AUC over seeds (mean +- sd)",
        "vs tuned MF [95% CI, user-level]",
    )
    write_results(args.name, result, rows, header)


if __name__ == "__main__":
    main()
