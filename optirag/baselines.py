"""The baselines every LLM row is compared with, on the same pairs: item popularity, logistic
regression on ids, matrix factorisation, LightGCN's dot product, and the hybrid heads'
control (logistic regression on the same CF features, without the LLM's state)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from optirag import cf
from optirag import schema as S
from optirag.ids import lookup

MF_BASELINE = "matrix factorisation (dim 32, BCE)"
LIGHTGCN_BASELINE = "LightGCN dot product"
SIDE_ONLY = "CF side features only (logistic regression)"


def baseline_scores(
    train: pa.Table, users: np.ndarray, items: np.ndarray, retriever=None
) -> dict[str, np.ndarray]:
    """Every baseline's scores of the pairs; LightGCN's when `retriever` (embeddings, meta)
    is given."""
    models = {
        "item popularity": cf.popularity_scores(train, items),
        "logistic regression on ids": id_logistic_regression(train, users, items),
        MF_BASELINE: cf.MatrixFactorisation.fit(train).probs(users, items),
    }
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


def id_logistic_regression(train: pa.Table, users: np.ndarray, items: np.ndarray):
    """Logistic regression on one-hot user and item ids (scikit-learn)."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    u_all = np.unique(np.concatenate([train[S.USER_ID].to_numpy(), users]))
    i_all = np.unique(np.concatenate([train[S.ITEM_ID].to_numpy(), items]))

    def design(u: np.ndarray, i: np.ndarray):
        n = len(u)
        cols = np.concatenate([np.searchsorted(u_all, u), len(u_all) + np.searchsorted(i_all, i)])
        rows = np.concatenate([np.arange(n), np.arange(n)])
        return sparse.csr_matrix((np.ones(2 * n), (rows, cols)), shape=(n, len(u_all) + len(i_all)))

    model = LogisticRegression(C=0.5, max_iter=1000)
    model.fit(design(train[S.USER_ID].to_numpy(), train[S.ITEM_ID].to_numpy()),
              train[S.LABEL].to_numpy())  # fmt: skip
    return model.predict_proba(design(users, items))[:, 1]
