"""The (user, item) pairs heads are trained and evaluated on, and their frozen-backbone states.

Training pairs are leak-free: each user's history is cut in time and the targets come after
the cut. The backbone is frozen, so the last-token state at every exit layer is computed
once per pair and reused for every epoch, for calibration and for evaluation (the heads only
read these states). Extraction runs the same batched engine as scoring, with shared prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from optirag import schema as S
from optirag.cf import SideFeatures
from optirag.ids import lookup
from optirag.pair_scorer import PairScorer, cutoff_array


@dataclass
class Pairs:
    users: np.ndarray  # (N,) int64
    items: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int8
    cutoff: np.ndarray | None = None  # (N,) history strictly before this ts; None: all

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> Pairs:
        cutoff = self.cutoff[rows] if self.cutoff is not None else None
        return Pairs(self.users[rows], self.items[rows], self.labels[rows], cutoff)


def sample_users(users: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    unique = np.unique(users)
    if n is None or n >= len(unique):
        return unique
    return np.sort(np.random.default_rng(seed).choice(unique, n, replace=False))


def training_pairs(
    train: pa.Table, n_users: int | None, history_fraction: float, per_user: int, seed: int
) -> Pairs:
    """Per user: cut the time-ordered train history at `history_fraction`; targets are up to
    `per_user` interactions at or after the cut, all sharing the history before it."""
    table = train.sort_by([(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")])
    keep = sample_users(table[S.USER_ID].to_numpy(), n_users, seed)
    table = table.filter(pc.is_in(table[S.USER_ID], pa.array(keep)))
    users, items = table[S.USER_ID].to_numpy(), table[S.ITEM_ID].to_numpy()
    labels, ts = table[S.LABEL].to_numpy(), table[S.TS].to_numpy()
    rng = np.random.default_rng(seed + 1)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    rows, cutoffs = [], []
    for a, b in zip(starts, ends, strict=True):
        cut = a + max(1, int((b - a) * history_fraction))
        if cut >= b:
            continue
        later = np.arange(cut, b)
        if len(later) > per_user:
            later = np.sort(rng.choice(later, per_user, replace=False))
        rows.append(later)
        cutoffs.append(np.full(len(later), ts[cut]))
    idx = np.concatenate(rows)
    return Pairs(users[idx], items[idx], labels[idx].astype(np.int8), np.concatenate(cutoffs))


def before_cutoffs(train: pa.Table, users: np.ndarray, cutoffs: np.ndarray) -> pa.Table:
    """What training-pair prompts may know: each pair user's interactions before their cut,
    and every interaction of the other users. Side features for training pairs are fitted
    on this, so a head never reads a CF score that has seen its target."""
    pair_users, first = np.unique(users, return_index=True)
    pos = lookup(pair_users, train[S.USER_ID].to_numpy())
    limit = np.where(pos >= 0, cutoffs[first][pos], np.iinfo(np.int64).max)
    return train.filter(pa.array(train[S.TS].to_numpy() < limit))


def training_side_features(names: list[str], seed: int, train: pa.Table, pairs: Pairs):
    """Training pairs' CF side features, fitted on what their prompts may know (before each
    user's cut), so a head never reads a CF score that has seen its target. (N, K) float32."""
    known = before_cutoffs(train, pairs.users, pairs.cutoff)
    return SideFeatures.fit(names, known, seed)(pairs.users, pairs.items)


def candidate_pairs(candidates: pa.Table, n_users: int | None, seed: int) -> Pairs:
    """Evaluation pairs: all candidates of a user sample (history = the whole train split)."""
    keep = sample_users(candidates[S.USER_ID].to_numpy(), n_users, seed)
    table = candidates.filter(pc.is_in(candidates[S.USER_ID], pa.array(keep)))
    return Pairs(
        table[S.USER_ID].to_numpy(),
        table[S.ITEM_ID].to_numpy(),
        table[S.LABEL].to_numpy().astype(np.int8),
    )


def extract_states(scorer: PairScorer, pairs: Pairs, desc: str) -> dict[str, torch.Tensor]:
    """The heads' inputs for every pair: last-token states (N, heads, H), ids and labels."""
    n = len(pairs)
    result = scorer.score(pairs.users, pairs.items, pairs.cutoff, keep_hidden=True, desc=desc)
    return {
        "states": torch.from_numpy(result.hidden),
        "labels": torch.from_numpy(pairs.labels.astype(np.float32)),
        "users": torch.from_numpy(pairs.users.astype(np.int64)),
        "items": torch.from_numpy(pairs.items.astype(np.int64)),
        "cutoff": torch.from_numpy(cutoff_array(pairs.cutoff, n)),
    }
