"""A/B comparison of two score sets on the pairs both scored (pure statistics on tables and
arrays; the job that reads runs and writes the report is optirag.pipelines.compare).

`pair_up` inner-joins the two sides on (user, item) and any partition columns, then:

- score distributions: quantiles, mean, the two-sample Kolmogorov-Smirnov statistic;
- rank agreement: Spearman and Kendall tau-b of each user's list (a user within one
  partition) with at least two pairs, scipy.stats; a list where either side is constant has
  no defined value and is left out;
- top-k overlap: |top-k of A & top-k of B| / min(k, n) per list, ties broken by item id;
- exit layers: histogram, mean, layer compute (mean exit layer / the deepest exit layer);
- with labels: AUC, LogLoss, reliability bins and the expected calibration error of each
  side, and the differences B - A with paired user-level bootstrap intervals (each resample
  draws users with replacement and keeps all their pairs, the same draws for both sides).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from optirag import metrics as M
from optirag import schema as S

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
CALIBRATION_BINS = 10
SIDES = ("a", "b")
LOGLOSS_EPS = 1e-7  # probabilities are clipped as metrics.logloss clips them


class DuplicatePairs(ValueError):
    """One side scored the same pair twice (e.g. a location holding several model versions)."""


def column(name: str, side: str) -> str:
    """The joined frame's column of one side: score_a, exit_layer_b, ..."""
    return f"{name}_{side}"


@dataclass
class Paired:
    """The pairs both sides scored, one row each, sorted by the join keys: the keys, each
    side's score and exit layer, and the label when there is one."""

    frame: pd.DataFrame
    keys: list[str]
    only_a: int
    only_b: int

    def scores(self, side: str) -> np.ndarray:
        return self.frame[column(S.SCORE, side)].to_numpy(np.float64)

    def exits(self, side: str) -> np.ndarray:
        return self.frame[column(S.EXIT_LAYER, side)].to_numpy(np.int64)

    @property
    def users(self) -> np.ndarray:
        return self.frame[S.USER_ID].to_numpy(np.int64)

    @property
    def items(self) -> np.ndarray:
        return self.frame[S.ITEM_ID].to_numpy(np.int64)

    @property
    def lists(self) -> np.ndarray:
        """A ranking list id per pair: the user within its partition (date, ...)."""
        by = [k for k in self.keys if k != S.ITEM_ID]
        return self.frame.groupby(by, sort=True).ngroup().to_numpy(np.int64)


def pair_up(a: pa.Table, b: pa.Table, keys: list[str], names: tuple[str, str]) -> Paired:
    """Inner join of the two sides' score rows on `keys`, with the counts of pairs only one
    side scored. A pair scored twice by one side is an error that names the side."""
    frames = []
    for table, side, name in zip((a, b), SIDES, names, strict=True):
        frame = table.select([*keys, S.SCORE, S.EXIT_LAYER]).to_pandas()
        dup = frame.duplicated(keys, keep=False)
        if dup.any():
            first = frame.loc[dup, keys].iloc[0].to_dict()
            raise DuplicatePairs(
                f"side {side.upper()} ({name}) scored {int(dup.sum())} rows of repeated "
                f"({', '.join(keys)}) pairs, e.g. {first}; a location holding several model "
                f"versions needs compare.model_{side}"
            )
        renames = {c: column(c, side) for c in (S.SCORE, S.EXIT_LAYER)}
        frames.append(frame.rename(columns=renames))
    merged = frames[0].merge(frames[1], on=keys, how="outer", indicator=True, sort=True)
    where = merged.pop("_merge")
    both = merged[where == "both"].reset_index(drop=True)
    for side in SIDES:
        both[column(S.EXIT_LAYER, side)] = both[column(S.EXIT_LAYER, side)].astype(np.int64)
    return Paired(
        both, list(keys), int((where == "left_only").sum()), int((where == "right_only").sum())
    )


def attach_labels(paired: Paired, labels: pd.DataFrame) -> tuple[Paired, int]:
    """The pairs with a label from `labels` (the join keys it has, plus S.LABEL): label > 0 is
    positive; a pair labelled more than once counts as positive when any label is. Pairs
    without a label are dropped. Returns (labelled pairs, pairs the labels table repeats)."""
    on = [k for k in paired.keys if k in labels.columns]
    frame = labels[[*on, S.LABEL]].dropna(subset=[S.LABEL])
    frame = frame.assign(**{S.LABEL: (frame[S.LABEL] > 0).astype(np.int64)})
    repeated = int(frame.duplicated(on).sum())
    frame = frame.groupby(on, as_index=False, sort=False)[S.LABEL].max()
    joined = paired.frame.drop(columns=[S.LABEL], errors="ignore").merge(frame, on=on)
    joined = joined.sort_values(paired.keys, kind="stable").reset_index(drop=True)
    return Paired(joined, paired.keys, paired.only_a, paired.only_b), repeated


# ----------------------------------------------------------------------------- distributions


def score_summary(scores: np.ndarray) -> dict:
    values = np.quantile(scores, QUANTILES)
    return {
        "mean": float(scores.mean()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)},
    }


def score_shift(a: np.ndarray, b: np.ndarray) -> dict:
    """How B's scores differ from A's on the same pairs."""
    ks = stats.ks_2samp(a, b)
    return {
        "mean_diff": float(b.mean() - a.mean()),
        "mean_abs_diff": float(np.abs(b - a).mean()),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
    }


def exit_summary(exits: np.ndarray, deepest: int) -> dict:
    layers, counts = np.unique(exits, return_counts=True)
    mean = float(exits.mean())
    return {
        "histogram": {str(int(k)): int(v) for k, v in zip(layers, counts, strict=True)},
        "mean_exit_layer": mean,
        "deepest_exit_layer": int(deepest),
        "layer_compute": mean / deepest if deepest else math.nan,
    }


# ----------------------------------------------------------------------------- rankings


def _segments(lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): `order` sorts the pairs by list; list i is order[starts[i]:starts[i+1]]."""
    order = np.argsort(lists, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(lists[order]) != 0]) if len(lists) else []
    return order, np.r_[starts, len(lists)].astype(np.int64)


def rank_agreement(lists: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """Mean over lists of Spearman's rho and Kendall's tau-b between the two sides' scores."""
    order, bounds = _segments(lists)
    rhos, taus, eligible = [], [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo < 2:
            continue
        eligible += 1
        sa, sb = a[order[lo:hi]], b[order[lo:hi]]
        if np.all(sa == sa[0]) or np.all(sb == sb[0]):
            continue  # no ranking on one side: correlation undefined
        rhos.append(stats.spearmanr(sa, sb).statistic)
        # tau-b itself does not depend on `method` (the p-value's, unused here; the
        # asymptotic one is the cheaper, but scipy's divides by n - 2: two pairs, which
        # cannot tie here, take the exact one).
        method = "exact" if hi - lo == 2 else "asymptotic"
        taus.append(stats.kendalltau(sa, sb, variant="b", method=method).statistic)
    return {
        "users_with_2_pairs": eligible,
        "users_used": len(rhos),
        "spearman_mean": float(np.mean(rhos)) if rhos else math.nan,
        "spearman_median": float(np.median(rhos)) if rhos else math.nan,
        "kendall_tau_b_mean": float(np.mean(taus)) if taus else math.nan,
        "kendall_tau_b_median": float(np.median(taus)) if taus else math.nan,
    }


def _ranks_in_list(lists: np.ndarray, items: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each pair's 0-based position in its list by score descending, ties by item ascending."""
    order = np.lexsort((items, -scores, lists))
    starts = np.flatnonzero(np.r_[True, np.diff(lists[order]) != 0])
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - first
    return ranks


def topk_overlap(
    lists: np.ndarray, items: np.ndarray, a: np.ndarray, b: np.ndarray, k: int
) -> dict:
    """Mean over lists of |top-k of A & top-k of B| / min(k, pairs in the list)."""
    if not len(lists):
        return {"k": k, "users": 0, "mean": math.nan}
    both = (_ranks_in_list(lists, items, a) < k) & (_ranks_in_list(lists, items, b) < k)
    ids = np.unique(lists, return_inverse=True)[1]
    shared = np.bincount(ids, weights=both.astype(np.float64))
    sizes = np.bincount(ids)
    overlap = shared / np.minimum(k, sizes)
    return {
        "k": k,
        "users": len(sizes),
        "mean": float(overlap.mean()),
        "median": float(np.median(overlap)),
    }


# ----------------------------------------------------------------------------- labels


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability bins of equal width on [0, 1] (mean predicted, observed rate, count; None
    for an empty bin) and the expected calibration error (count-weighted |predicted - observed|)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(idx, weights=probs, minlength=bins) / count
        observed = np.bincount(idx, weights=labels, minlength=bins) / count
    filled = count > 0
    ece = float((count[filled] * np.abs(predicted - observed)[filled]).sum() / count.sum())
    rows = [
        {
            "lo": float(edges[i]),
            "hi": float(edges[i + 1]),
            "count": int(count[i]),
            "mean_predicted": float(predicted[i]) if filled[i] else None,
            "observed_rate": float(observed[i]) if filled[i] else None,
        }
        for i in range(bins)
    ]
    return {"bins": rows, "ece": ece}


def logloss_difference(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """LogLoss(b) - LogLoss(a) on the same pairs, with a paired cluster-bootstrap 95%
    percentile interval: each resample draws `groups` (users) with replacement and keeps all
    their pairs, for both sides at once."""
    diff = M.logloss(labels, b) - M.logloss(labels, a)
    y = np.asarray(labels, dtype=np.float64)

    def pair_loss(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, LOGLOSS_EPS, 1 - LOGLOSS_EPS)
        return -(y * np.log(p) + (1 - y) * np.log1p(-p))

    cluster = np.unique(groups, return_inverse=True)[1]
    n_groups = int(cluster.max()) + 1
    delta = np.bincount(cluster, weights=pair_loss(b) - pair_loss(a), minlength=n_groups)
    size = np.bincount(cluster, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    diffs = []
    for chunk in np.array_split(np.arange(n_resamples), max(1, n_resamples // 200)):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=len(chunk))
        diffs.append((counts @ delta) / (counts @ size))
    lo, hi = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return diff, float(lo), float(hi)


def label_metrics(paired: Paired, n_resamples: int, seed: int) -> dict:
    """AUC, LogLoss and calibration of each side on the labelled pairs, and B - A of AUC and
    LogLoss with paired user-level bootstrap intervals."""
    y = paired.frame[S.LABEL].to_numpy(np.int64)
    a, b, users = paired.scores("a"), paired.scores("b"), paired.users
    out: dict = {"pairs": len(y), "users": int(len(np.unique(users))), "positives": int(y.sum())}
    if not len(y):
        return out
    for side, s in (("a", a), ("b", b)):
        out[side] = {
            "auc": M.auc(y, s),
            "logloss": M.logloss(y, s),
            "calibration": calibration(y, s),
        }
    d, lo, hi = M.auc_difference(y, b, a, n_resamples, seed, groups=users)
    out["auc_diff_b_minus_a"] = {"diff": d, "ci95": [lo, hi]}
    d, lo, hi = logloss_difference(y, a, b, users, n_resamples, seed)
    out["logloss_diff_b_minus_a"] = {"diff": d, "ci95": [lo, hi]}
    out["bootstrap"] = {"resamples": n_resamples, "seed": seed, "unit": "user"}
    return out


# ----------------------------------------------------------------------------- all of it


def compare(paired: Paired, deepest: tuple[int, int], top_k: int) -> dict:
    """Every statistic of the joined pairs that needs no label (`label_metrics` adds those);
    nan where undefined (`plain` makes it JSON)."""
    lists = paired.lists
    out: dict = {
        "pairs": len(paired.frame),
        "users": int(len(np.unique(paired.users))),
        "only_a": paired.only_a,
        "only_b": paired.only_b,
        "join_keys": paired.keys,
    }
    for side, depth in zip(SIDES, deepest, strict=True):
        out[side] = {
            "scores": score_summary(paired.scores(side)),
            "exits": exit_summary(paired.exits(side), depth),
        }
    a, b = paired.scores("a"), paired.scores("b")
    out["score_shift"] = score_shift(a, b)
    out["rank_agreement"] = rank_agreement(lists, a, b)
    out["topk_overlap"] = topk_overlap(lists, paired.items, a, b, top_k)
    return out


def plain(value):
    """`value` as strict JSON data: numpy scalars to Python, nan and infinities to None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def plot_scores(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> bytes:
    """Both sides' score histograms on the same bins, overlaid: a PNG."""
    plt, fig, ax = _figure()
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    for scores, name in zip((a, b), names, strict=True):
        ax.hist(scores, bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("score")
    ax.set_ylabel("pairs")
    ax.set_title("Score distributions on the pairs both scored")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_exits(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> bytes:
    """Pairs per exit layer of both sides, bars side by side: a PNG."""
    plt, fig, ax = _figure()
    layers = np.unique(np.r_[a, b])
    x = np.arange(len(layers))
    for offset, exits, name in zip((-0.2, 0.2), (a, b), names, strict=True):
        counts = [(exits == layer).sum() for layer in layers]
        ax.bar(x + offset, counts, width=0.4, label=name)
    ax.set_xticks(x, [str(int(v)) for v in layers])
    ax.set_xlabel("exit layer")
    ax.set_ylabel("pairs")
    ax.set_title("Exit layers on the pairs both scored")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_calibration(curves: tuple[dict, dict], names: tuple[str, str]) -> bytes:
    """Reliability diagram of both sides (`calibration` outputs): a PNG."""
    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect calibration")
    for curve, name in zip(curves, names, strict=True):
        pts = [(r["mean_predicted"], r["observed_rate"]) for r in curve["bins"] if r["count"]]
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{name} (ECE {curve['ece']:.3f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title("Calibration on the labelled pairs")
    ax.legend(fontsize=8)
    return _png(plt, fig)
