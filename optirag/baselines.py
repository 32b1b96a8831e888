"""The baselines every LLM row is compared with, on the same pairs: item popularity, logistic
regression on ids, matrix factorisation, LightGCN's dot product, and the hybrid heads'
control (logistic regression on the same CF features, without the LLM's state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from optirag import cf
from optirag import schema as S
from optirag.config import EvalConfig
from optirag.ids import lookup

MF_BASELINE = "matrix factorisation (tuned on valid)"
ID_LR_BASELINE = "logistic regression on ids (tuned on valid)"
POPULARITY = "item popularity"
LIGHTGCN_BASELINE = "LightGCN dot product"
SIDE_ONLY = "CF side features only (logistic regression)"
SAME_INFORMATION = "same-information control (CF features + prompt ratings, LR)"
MF_L2_GRID = (0.01, 0.03, 0.1, 0.3)
LR_C_GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class Tuned:
    """A baseline whose settings were chosen on the valid split, then refitted with each seed.

    `scores` (the first seed's test scores) is the row compared with in tables; `seed_scores`
    holds every seed's, so the report can give the mean and spread over seeds."""

    name: str
    settings: dict  # chosen on valid
    grid: list[dict]  # every candidate setting with its valid AUC
    seeds: list[dict]  # per seed: seed, valid AUC, what was chosen for it (MF: epochs)
    seed_scores: list[np.ndarray] = field(repr=False, default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return self.seed_scores[0]

    def report(self, labels: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
        """Settings, grid and per-seed valid and test AUCs, with the mean and spread (sample
        standard deviation) over seeds per slice."""
        per_seed = []
        for info, scores in zip(self.seeds, self.seed_scores, strict=True):
            test = {k: auc(labels[m], scores[m]) if m.any() else math.nan for k, m in masks.items()}
            per_seed.append({**info, "test_auc": test})
        summary = {}
        for k in masks:
            values = np.array([s["test_auc"][k] for s in per_seed], dtype=float)
            spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[k] = {
                "mean": float(values.mean()),
                "std": spread,
                "min": float(values.min()),
                "max": float(values.max()),
            }
        return {
            "model": self.name,
            "chosen_on_valid": self.settings,
            "grid": self.grid,
            "per_seed": per_seed,
            "test_auc_over_seeds": summary,
        }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; nan when the labels hold one class (metrics.auc, which this layer can't import)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def _valid_triple(valid: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (valid[S.USER_ID].to_numpy(), valid[S.ITEM_ID].to_numpy(), valid[S.LABEL].to_numpy())


def tune_mf(
    train: pa.Table,
    valid: pa.Table,
    users: np.ndarray,
    items: np.ndarray,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    l2_grid: list[float] | tuple[float, ...] = MF_L2_GRID,
    max_epochs: int = 40,
    patience: int = 3,
) -> Tuned:
    """MF with the same care as the LLM rows: l2 chosen on valid AUC (first seed, early
    stopped), then each seed early-stopped on valid AUC with that l2 (its epochs chosen on
    valid). Only train and valid labels are read; `users`, `items` are the pairs scored."""
    v = _valid_triple(valid)
    grid = []
    for l2 in l2_grid:
        mf = cf.MatrixFactorisation.fit(
            train, epochs=max_epochs, l2=l2, seed=seeds[0], valid=v, patience=patience
        )
        grid.append({"l2": l2, "epochs": mf.epochs, "valid_auc": max(mf.valid_auc)})
    chosen = max(grid, key=lambda g: g["valid_auc"])
    infos, scores = [], []
    for seed in seeds:
        mf = cf.MatrixFactorisation.fit(
            train, epochs=max_epochs, l2=chosen["l2"], seed=seed, valid=v, patience=patience
        )
        infos.append({"seed": seed, "epochs": mf.epochs, "valid_auc": max(mf.valid_auc)})
        scores.append(mf.probs(users, items))
    settings = {
        "l2": chosen["l2"],
        "epochs": [i["epochs"] for i in infos],
        "max_epochs": max_epochs,
        "patience": patience,
        "dim": 32,
    }
    return Tuned(MF_BASELINE, settings, grid, infos, scores)


def tune_id_lr(
    train: pa.Table,
    valid: pa.Table,
    users: np.ndarray,
    items: np.ndarray,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    c_grid: list[float] | tuple[float, ...] = LR_C_GRID,
) -> Tuned:
    """Logistic regression on ids with C chosen on valid AUC, refitted per seed (the lbfgs
    fit is deterministic, so the seeds agree; they are run to show it)."""
    vu, vi, vy = _valid_triple(valid)
    grid = [
        {"C": c, "valid_auc": auc(vy, id_logistic_regression(train, vu, vi, c))} for c in c_grid
    ]
    chosen = max(grid, key=lambda g: g["valid_auc"])
    infos, scores = [], []
    for seed in seeds:
        both = id_logistic_regression(train, np.r_[vu, users], np.r_[vi, items], chosen["C"], seed)
        infos.append({"seed": seed, "valid_auc": auc(vy, both[: len(vu)])})
        scores.append(both[len(vu) :])
    return Tuned(ID_LR_BASELINE, {"C": chosen["C"]}, grid, infos, scores)


def tune_all(
    train: pa.Table, valid: pa.Table, users: np.ndarray, items: np.ndarray, ec: EvalConfig
) -> list[Tuned]:
    """The baselines tuned on valid (`tune_mf`, `tune_id_lr`) with the evaluation's grids,
    early stopping and seeds; `users`, `items` are the pairs scored."""
    seeds = ec.baseline_seeds
    mf = tune_mf(train, valid, users, items, seeds, ec.mf_l2_grid, ec.mf_max_epochs, ec.mf_patience)
    return [mf, tune_id_lr(train, valid, users, items, seeds, ec.lr_c_grid)]


def baseline_scores(
    train: pa.Table, users: np.ndarray, items: np.ndarray, retriever=None
) -> dict[str, np.ndarray]:
    """The untuned baselines' scores of the pairs (item popularity; LightGCN's when
    `retriever` (embeddings, meta) is given). The tuned ones: `tune_mf`, `tune_id_lr`."""
    models = {POPULARITY: cf.popularity_scores(train, items)}
    if retriever is not None:
        models[LIGHTGCN_BASELINE] = lightgcn_scores(*retriever, users, items)
    return models


def lightgcn_scores(
    embeddings: np.ndarray, meta: dict, users: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """Dot products of the trained LightGCN embeddings (users then items, ids in `meta`);
    0 for users/items it never saw."""
    user_ids, item_ids = np.asarray(meta["user_ids"]), np.asarray(meta["item_ids"])
    u, i = lookup(user_ids, users), lookup(item_ids, items)
    known = (u >= 0) & (i >= 0)
    scores = np.zeros(len(users), dtype=np.float32)
    ue, ie = embeddings[u[known]], embeddings[len(user_ids) + i[known]]
    scores[known] = (ue * ie).sum(1)
    return scores


def side_features_only(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """The hybrid heads' control: logistic regression on the same CF features of the same
    training pairs, without the LLM's state. What a hybrid head adds over this is the LLM."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    return model.predict_proba(x_test)[:, 1]


def id_logistic_regression(
    train: pa.Table, users: np.ndarray, items: np.ndarray, c: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Logistic regression on one-hot user and item ids (scikit-learn), inverse L2 `c`."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    u_all = np.unique(np.concatenate([train[S.USER_ID].to_numpy(), users]))
    i_all = np.unique(np.concatenate([train[S.ITEM_ID].to_numpy(), items]))

    def design(u: np.ndarray, i: np.ndarray):
        n = len(u)
        cols = np.concatenate([np.searchsorted(u_all, u), len(u_all) + np.searchsorted(i_all, i)])
        rows = np.concatenate([np.arange(n), np.arange(n)])
        return sparse.csr_matrix((np.ones(2 * n), (rows, cols)), shape=(n, len(u_all) + len(i_all)))

    model = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    model.fit(
        design(train[S.USER_ID].to_numpy(), train[S.ITEM_ID].to_numpy()), train[S.LABEL].to_numpy()
    )
    return model.predict_proba(design(users, items))[:, 1]


def prompt_rating_features(
    contexts, users: np.ndarray, items: np.ndarray, cutoffs: np.ndarray | None, slots: int
) -> np.ndarray:
    """What the CF prompt (prompts.target_ratings) tells the LLM about each pair, as numbers:
    the target's mean rating (centred at 3, 0 when unrated) and whether it has one, log1p of
    its rating count, the mean and number of the neighbours' ratings shown, and each shown
    rating (centred, 0 when absent), in `slots` slots. `contexts` is a ContextStore with
    target ratings; `cutoffs` the training pairs' time cuts (what their prompts may know),
    None for pairs whose prompts see the whole train split. (N, 5 + slots) float32."""
    out = np.zeros((len(users), 5 + slots), dtype=np.float32)
    for n, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        cut = int(cutoffs[n]) if cutoffs is not None else None
        mean, count, shown = contexts.target_ratings(u, i, cut)
        rated = mean == mean
        out[n, :3] = (mean - 3.0 if rated else 0.0, float(rated), np.log1p(count))
        if shown:
            out[n, 3:5] = (np.mean(shown) - 3.0, len(shown))
            out[n, 5 : 5 + min(len(shown), slots)] = np.asarray(shown[:slots]) - 3.0
    return out


def tuned_logistic_regression(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    x_test: np.ndarray,
    c_grid: list[float] | tuple[float, ...] = LR_C_GRID,
) -> tuple[np.ndarray, dict]:
    """Standardised features, logistic regression with C chosen on valid AUC: (test
    probabilities, {"C": chosen, "grid": [{"C", "valid_auc"}]})."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))

    grid = []
    for c in c_grid:
        fitted = model(c).fit(x_train, y_train)
        grid.append({"C": c, "valid_auc": auc(y_valid, fitted.predict_proba(x_valid)[:, 1])})
    chosen = max(grid, key=lambda g: g["valid_auc"])
    fitted = model(chosen["C"]).fit(x_train, y_train)
    return fitted.predict_proba(x_test)[:, 1], {"C": chosen["C"], "grid": grid}
