"""Collaborative-filtering signal trained in this project: biased matrix factorisation and
per-user / per-item statistics of the training interactions.

Used twice: as evaluation baselines, and as the side features that hybrid exit heads read
beside the hidden state (`SideFeatures`). Users and items the table never saw get the
cold-start values: zero MF embedding and bias, prior rates, zero counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from optirag import schema as S
from optirag.ids import lookup

# What a hybrid head can read, each a fixed transform so no scaler has to be fitted:
#   mf          MF logit of the pair
#   user_rate   logit of the user's smoothed like rate;  user_count  log1p(user's ratings)
#   item_rate   logit of the item's smoothed like rate;  item_count  log1p(item's ratings)
SIDE_FEATURES = ("mf", "user_rate", "user_count", "item_rate", "item_count")
PRIOR_WEIGHT = 10.0  # pseudo-ratings at the global like rate in the smoothed rates


def _lookup(ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `query` in sorted `ids` (0 where absent, to index safely) and whether
    each was found."""
    pos = lookup(ids, query)
    return np.maximum(pos, 0), pos >= 0


def _at(values: np.ndarray, pos: np.ndarray, found: np.ndarray, missing: float) -> np.ndarray:
    """`values[pos]` where found, else `missing` (also when `values` is empty: a context
    block whose users the side features never saw)."""
    if not len(values):
        return np.full((len(pos), *values.shape[1:]), missing, values.dtype)
    return np.where(found.reshape(-1, *[1] * (values.ndim - 1)), values[pos], missing)


@dataclass
class MatrixFactorisation:
    """Biased MF: logit = <u, i> + b_u + b_i + b."""

    user_ids: np.ndarray  # (U,) sorted
    item_ids: np.ndarray  # (I,) sorted
    user_emb: np.ndarray  # (U, D)
    item_emb: np.ndarray  # (I, D)
    user_bias: np.ndarray  # (U,)
    item_bias: np.ndarray  # (I,)
    bias: float
    epochs: int = 0  # epochs the returned parameters were trained for
    valid_auc: list[float] = field(default_factory=list)  # per epoch, when fitted with `valid`

    @classmethod
    def fit(
        cls,
        train: pa.Table,
        dim: int = 32,
        epochs: int = 20,
        l2: float = 0.03,  # chosen on the valid split (0.789 valid AUC on MovieLens-100k)
        seed: int = 0,
        valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        patience: int = 3,
    ) -> MatrixFactorisation:
        """Binary cross-entropy on the labels, Adam, L2 on the batch's embeddings.

        With `valid` = (users, items, labels), early stopping: after every epoch the valid
        AUC is measured, training stops after `patience` epochs without a gain, and the
        parameters of the best epoch are returned (`epochs` says which, `valid_auc` holds
        the curve). `epochs` is then the maximum."""
        from sklearn.metrics import roc_auc_score

        torch.manual_seed(seed)
        users, items = train[S.USER_ID].to_numpy(), train[S.ITEM_ID].to_numpy()
        user_ids, tu = np.unique(users, return_inverse=True)
        item_ids, ti = np.unique(items, return_inverse=True)
        tu, ti = torch.as_tensor(tu), torch.as_tensor(ti)
        ty = torch.as_tensor(train[S.LABEL].to_numpy().astype(np.float32))
        ue = torch.nn.Parameter(torch.randn(len(user_ids), dim) * 0.05)
        ie = torch.nn.Parameter(torch.randn(len(item_ids), dim) * 0.05)
        ub = torch.nn.Parameter(torch.zeros(len(user_ids)))
        ib = torch.nn.Parameter(torch.zeros(len(item_ids)))
        bias = torch.nn.Parameter(torch.zeros(()))
        params = [ue, ie, ub, ib, bias]
        opt = torch.optim.Adam(params, lr=0.01)
        gen = torch.Generator().manual_seed(seed)

        def snapshot(n_epochs: int, curve: list[float]) -> MatrixFactorisation:
            arrays = (p.detach().numpy().copy() for p in (ue, ie, ub, ib))
            return cls(user_ids, item_ids, *arrays, float(bias.detach()), n_epochs, curve)

        best, curve = None, []
        for epoch in range(epochs):
            for batch in torch.randperm(len(ty), generator=gen).split(1024):
                u, i = tu[batch], ti[batch]
                logit = (ue[u] * ie[i]).sum(-1) + ub[u] + ib[i] + bias
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ty[batch])
                reg = l2 * (ue[u].pow(2).sum() + ie[i].pow(2).sum() + ib[i].pow(2).sum())
                opt.zero_grad()
                (loss + reg / len(batch)).backward()
                opt.step()
            if valid is None:
                continue
            v_users, v_items, v_labels = valid
            curve.append(float(roc_auc_score(v_labels, snapshot(0, []).logits(v_users, v_items))))
            if best is None or curve[-1] > max(curve[:-1]):
                best = snapshot(epoch + 1, [])
            elif len(curve) - best.epochs >= patience:
                break
        if best is None:
            return snapshot(epochs, curve)
        best.valid_auc = curve
        return best

    def logits(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        u, u_ok = _lookup(self.user_ids, users)
        i, i_ok = _lookup(self.item_ids, items)
        dot = (self.user_emb[u] * self.item_emb[i]).sum(-1) * (u_ok & i_ok)
        return (dot + self.user_bias[u] * u_ok + self.item_bias[i] * i_ok + self.bias).astype(
            np.float32
        )

    def probs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(users, items)))


@dataclass
class Stats:
    """Smoothed like rate and rating count per id (users or items)."""

    ids: np.ndarray
    rate: np.ndarray
    count: np.ndarray
    prior: float

    @classmethod
    def fit(cls, ids: np.ndarray, labels: np.ndarray, prior_weight: float = PRIOR_WEIGHT):
        prior = float(labels.mean()) if len(labels) else 0.5
        uniq, inv = np.unique(ids, return_inverse=True)
        pos = np.bincount(inv, weights=labels.astype(float), minlength=len(uniq))
        count = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
        return cls(uniq, (pos + prior_weight * prior) / (count + prior_weight), count, prior)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, found = _lookup(self.ids, query)
        return _at(self.rate, pos, found, self.prior), _at(self.count, pos, found, 0)


def popularity_scores(train: pa.Table, items: np.ndarray) -> np.ndarray:
    """Smoothed positive rate of each item in the training data."""
    stats = Stats.fit(train[S.ITEM_ID].to_numpy(), train[S.LABEL].to_numpy())
    return stats.lookup(items)[0]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _side(ids, emb, bias, stats: Stats, query: np.ndarray) -> np.ndarray:
    pos, found = _lookup(ids, query)
    rate, count = stats.lookup(query)
    return np.concatenate(
        [
            _at(emb, pos, found, 0),
            _at(bias, pos, found, 0)[:, None],
            _logit(rate)[:, None],
            np.log1p(count)[:, None],
        ],
        axis=1,
        dtype=np.float32,
    )


def combine_sides(
    names: list[str], mf_bias: float, user_side: np.ndarray, item_side: np.ndarray
) -> np.ndarray:
    """The side features of pairs from their user's and item's sides (`SideFeatures.user_side`,
    `item_side`): (N, len(names)) float32, columns in the configured order."""
    dim = user_side.shape[1] - 3
    u_emb, u_bias, u_rate, u_count = (user_side[:, :dim], *user_side[:, dim:].T)
    i_emb, i_bias, i_rate, i_count = (item_side[:, :dim], *item_side[:, dim:].T)
    columns = {
        "mf": lambda: (u_emb * i_emb).sum(-1) + u_bias + i_bias + np.float32(mf_bias),
        "user_rate": lambda: u_rate,
        "user_count": lambda: u_count,
        "item_rate": lambda: i_rate,
        "item_count": lambda: i_count,
    }
    out = np.zeros((len(user_side), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        out[:, j] = columns[name]()
    return out


class SideFeatures:
    """The configured CF features of (user, item) pairs, for hybrid exit heads."""

    def __init__(self, names: list[str], mf: MatrixFactorisation, users: Stats, items: Stats):
        unknown = sorted(set(names) - set(SIDE_FEATURES))
        if unknown:
            raise ValueError(f"unknown side features {unknown}; choose from {SIDE_FEATURES}")
        self.names, self.mf, self.users, self.items = list(names), mf, users, items

    @classmethod
    def fit(cls, names: list[str], train: pa.Table, seed: int = 0) -> SideFeatures:
        labels = train[S.LABEL].to_numpy()
        return cls(
            names,
            MatrixFactorisation.fit(train, seed=seed),
            Stats.fit(train[S.USER_ID].to_numpy(), labels),
            Stats.fit(train[S.ITEM_ID].to_numpy(), labels),
        )

    def __call__(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(N, len(names)) float32, columns in the configured order."""
        return combine_sides(self.names, self.mf.bias, self.user_side(users), self.item_side(items))

    def user_side(self, users: np.ndarray) -> np.ndarray:
        """What the features need of each user, (N, D + 3) float32: MF embedding and bias,
        logit of the like rate, log1p of the count; the cold-start values for unknown users.
        The context stage stores these per user, so a scorer needs no per-user arrays."""
        return _side(self.mf.user_ids, self.mf.user_emb, self.mf.user_bias, self.users, users)

    def item_side(self, items: np.ndarray) -> np.ndarray:
        """As `user_side`, per item."""
        return _side(self.mf.item_ids, self.mf.item_emb, self.mf.item_bias, self.items, items)

    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything the features are computed from: named arrays + small metadata."""
        mf, us, it = self.mf, self.users, self.items
        arrays = {
            "mf.user_ids": mf.user_ids,
            "mf.item_ids": mf.item_ids,
            "mf.user_emb": mf.user_emb,
            "mf.item_emb": mf.item_emb,
            "mf.user_bias": mf.user_bias,
            "mf.item_bias": mf.item_bias,
            "users.ids": us.ids,
            "users.rate": us.rate,
            "users.count": us.count,
            "items.ids": it.ids,
            "items.rate": it.rate,
            "items.count": it.count,
        }
        meta = {
            "names": self.names,
            "bias": mf.bias,
            "user_prior": us.prior,
            "item_prior": it.prior,
        }
        return arrays, meta

    @classmethod
    def from_arrays(cls, t: dict[str, np.ndarray], meta: dict) -> SideFeatures:
        mf = MatrixFactorisation(
            t["mf.user_ids"],
            t["mf.item_ids"],
            t["mf.user_emb"],
            t["mf.item_emb"],
            t["mf.user_bias"],
            t["mf.item_bias"],
            meta["bias"],
        )
        users = Stats(t["users.ids"], t["users.rate"], t["users.count"], meta["user_prior"])
        items = Stats(t["items.ids"], t["items.rate"], t["items.count"], meta["item_prior"])
        return cls(meta["names"], mf, users, items)
