"""Metrics, exit simulation, threshold sweep and calibration, slices and intervals, plots.

Heads read cached last-token states, so every exit rule can be evaluated exactly from the
per-head probabilities: `simulate_exits` reproduces what the batched engine does (a test
checks the two agree), and the sweep costs no model time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from sklearn.metrics import log_loss, roc_auc_score

from optirag import schema as S
from optirag.early_exit import ExitRule


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


def simulate_exits(
    head_probs: np.ndarray, layers: list[int], rule: ExitRule
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, exit layers) the engine gives under `rule`, from (N, heads) probabilities."""
    p = torch.as_tensor(head_probs)
    fire = torch.zeros_like(p, dtype=torch.bool)
    for h in range(p.shape[1]):
        fire[:, h] = rule.fires(p[:, h], p[:, h - 1] if h else None)
    fire[:, -1] = True
    first = fire.int().argmax(dim=1).numpy()
    rows = np.arange(len(first))
    return head_probs[rows, first], np.asarray(layers)[first]


@dataclass
class SweepRow:
    rule: str
    threshold: float
    auc: float
    logloss: float
    mean_exit_layer: float
    compute: float  # mean exit layer / num_layers

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def evaluate_rule(
    head_probs: np.ndarray,
    labels: np.ndarray,
    layers: list[int],
    num_layers: int,
    rule: ExitRule,
) -> SweepRow:
    scores, exits = simulate_exits(head_probs, layers, rule)
    mean_exit = float(exits.mean())
    return SweepRow(
        rule.kind,
        rule.threshold,
        auc(labels, scores),
        logloss(labels, scores),
        mean_exit,
        mean_exit / num_layers,
    )


def sweep(
    head_probs: np.ndarray,
    labels: np.ndarray,
    layers: list[int],
    num_layers: int,
    taus: list[float],
    confidences: list[float],
) -> list[SweepRow]:
    """Full depth, then the agreement rule at each tau, then the confidence rule at each c."""
    rules = [ExitRule("none", 0.0)]
    rules += [ExitRule("agreement", t) for t in taus]
    rules += [ExitRule("confidence", c) for c in confidences]
    return [evaluate_rule(head_probs, labels, layers, num_layers, r) for r in rules]


def calibrate(rows: list[SweepRow], budget: float) -> SweepRow:
    """The agreement rule with the largest tau whose AUC loss versus full depth stays within
    `budget`; full depth (tau 0) when none does."""
    full = next(r for r in rows if r.rule == "none")
    ok = [r for r in rows if r.rule == "agreement" and full.auc - r.auc <= budget]
    if not ok:
        return SweepRow(
            "agreement", 0.0, full.auc, full.logloss, full.mean_exit_layer, full.compute
        )
    return max(ok, key=lambda r: r.threshold)


# ----------------------------------------------------------------------------- plots


def plot_sweep(rows: list[SweepRow], calibrated: SweepRow, title: str) -> bytes:
    """AUC against layer compute for every rule, the calibrated one starred: a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("agreement", "o-"), ("confidence", "s--")):
        pts = sorted((r.compute, r.auc) for r in rows if r.rule == kind)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker, label=f"{kind} rule")
    full = next(r for r in rows if r.rule == "none")
    ax.axhline(full.auc, color="grey", lw=0.8, label="full depth")
    ax.plot(
        [calibrated.compute],
        [calibrated.auc],
        "r*",
        ms=14,
        label=f"calibrated tau={calibrated.threshold:g}",
    )
    ax.set_xlabel("layer compute relative to full depth")
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


# ----------------------------------------------------------------------------- slices, CIs


def slice_masks(
    train: pa.Table,
    users: np.ndarray,
    items: np.ndarray,
    cold_item_max: int = 5,
    light_user_max: int = 20,
) -> dict[str, np.ndarray]:
    """Pairs of every test slice: all, cold-start items and light users (by train ratings)."""
    item_count = _train_counts(train[S.ITEM_ID].to_numpy(), items)
    user_count = _train_counts(train[S.USER_ID].to_numpy(), users)
    return {
        "all": np.ones(len(users), dtype=bool),
        f"cold items (<= {cold_item_max} train ratings)": item_count <= cold_item_max,
        f"light users (<= {light_user_max} train ratings)": user_count <= light_user_max,
    }


def _train_counts(column: np.ndarray, ids) -> np.ndarray:
    """How often each of `ids` occurs in `column` (0 for ids it lacks)."""
    from optirag.ids import lookup

    uniq, counts = np.unique(column, return_counts=True)
    pos = lookup(uniq, np.asarray(ids))
    return np.where(pos >= 0, counts[np.maximum(pos, 0)], 0)


def weighted_aucs(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of `scores` under each row of `weights` (R, N) at once (ties count one half):
    a bootstrap resample is a weighting of the pairs by how often each was drawn. nan where a
    row weighs only one class."""
    order = np.argsort(scores, kind="mergesort")
    s, pos = scores[order], labels[order].astype(bool)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    num = (w_pos * (neg_below + 0.5 * w_neg)).sum(1)
    den = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def auc_difference(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same pairs, with a paired cluster-bootstrap 95% percentile
    interval: each resample draws `groups` (users) with replacement and keeps all their pairs,
    for both models at once. Pairs of one user are correlated, so resampling pairs
    (`groups=None`: every pair its own group) gives intervals that are too narrow."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan, math.nan, math.nan
    diff = auc(labels, a) - auc(labels, b)
    cluster = (
        np.arange(len(labels)) if groups is None else np.unique(groups, return_inverse=True)[1]
    )
    n_groups = int(cluster.max()) + 1
    rng = np.random.default_rng(seed)
    diffs = []
    for chunk in np.array_split(np.arange(n_resamples), max(1, n_resamples // 200)):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=len(chunk))
        weights = counts[:, cluster].astype(np.float64)
        diffs.append(
            weighted_aucs(labels, np.asarray(a), weights)
            - weighted_aucs(labels, np.asarray(b), weights)
        )
    lo, hi = np.nanpercentile(np.concatenate(diffs), [2.5, 97.5])
    return diff, float(lo), float(hi)


def model_table(
    models: dict[str, np.ndarray],
    labels: np.ndarray,
    masks: dict[str, np.ndarray],
    reference: str,
    probabilities: set[str],
    n_resamples: int = 1000,
    groups: np.ndarray | None = None,
) -> list[dict]:
    """Per model and slice: pairs, AUC, the AUC difference to `reference` with its paired
    bootstrap interval (resampling `groups`, the pairs' users; pairs when None), and LogLoss
    for the models whose scores are probabilities."""
    rows = []
    for name, scores in models.items():
        row = {"model": name, "slices": {}}
        for slice_name, mask in masks.items():
            if not mask.any():  # e.g. no cold-start item among a small sample's pairs
                row["slices"][slice_name] = {"pairs": 0, "auc": math.nan}
                continue
            y, s = labels[mask], scores[mask]
            entry = {"pairs": int(mask.sum()), "auc": auc(y, s)}
            if name != reference:
                g = groups[mask] if groups is not None else None
                d, lo, hi = auc_difference(y, s, models[reference][mask], n_resamples, groups=g)
                entry.update(diff_vs_reference=d, diff_ci=[lo, hi])
            if name in probabilities:
                entry["logloss"] = logloss(y, s)
            row["slices"][slice_name] = entry
        rows.append(row)
    return rows
