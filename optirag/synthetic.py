"""Synthetic data for scale tests, generated shard by shard.

Users are split into shards of `users_per_shard`; each shard is generated from its own random
stream (seed, shard id), so the output is the same for a seed whatever the parallelism, and
memory per shard is O(users_per_shard), independent of num_users. Labels come from a hidden
low-rank model (sigmoid of a user-item dot product), so a scorer can learn something from the
data. optirag.pipelines.synthetic writes the shards with Ray Data.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from optirag import schema as S
from optirag.config import SyntheticConfig

LATENT_DIM = 8
_ITEM_STREAM = 2**31 - 1  # keeps the item stream apart from every shard's stream


def item_factors(cfg: SyntheticConfig) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, _ITEM_STREAM])
    return rng.normal(size=(cfg.num_items, LATENT_DIM)).astype(np.float32)


def items_table(cfg: SyntheticConfig) -> pa.Table:
    ids = np.arange(cfg.num_items, dtype=np.int64)
    return pa.table(
        {
            S.ITEM_ID: ids,
            S.TITLE: [f"Item {i}" for i in ids],
            S.TEXT: [f"Category {i % 17}" for i in ids],
        },
        schema=S.ITEMS,
    )


def _distinct_items(rng: np.random.Generator, users: int, per_user: int, num_items: int):
    """`per_user` distinct item ids per user: an arithmetic progression mod num_items."""
    base = rng.integers(0, num_items, size=(users, 1))
    step = rng.integers(1, num_items // per_user + 1, size=(users, 1))
    return (base + np.arange(per_user) * step) % num_items  # (U, K)


def generate_shard(cfg: SyntheticConfig, shard: int, factors: np.ndarray) -> dict[str, pa.Table]:
    first = shard * cfg.users_per_shard
    users = np.arange(first, min(cfg.num_users, first + cfg.users_per_shard), dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, shard])
    user_vec = rng.normal(size=(len(users), LATENT_DIM)).astype(np.float32)

    def pairs(chosen: np.ndarray, per_user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = _distinct_items(rng, int(chosen.sum()), per_user, cfg.num_items)  # (U, K)
        logits = np.einsum("ud,ukd->uk", user_vec[chosen], factors[items]) / math.sqrt(LATENT_DIM)
        labels = rng.random(items.shape) < 1.0 / (1.0 + np.exp(-2.0 * logits))
        return np.repeat(users[chosen], per_user), items.ravel(), labels.ravel().astype(np.int8)

    u, i, y = pairs(with_candidates(cfg, users), cfg.candidates_per_user)
    out = {"candidates": pa.table({S.USER_ID: u, S.ITEM_ID: i.astype(np.int64), S.LABEL: y})}
    if cfg.history_per_user:
        u, i, y = pairs(np.ones(len(users), dtype=bool), cfg.history_per_user)
        ts = np.tile(np.arange(cfg.history_per_user, dtype=np.int64), len(users))
        rating = np.where(y == 1, 5.0, 2.0).astype(np.float32)
        out["history"] = pa.table(
            {S.USER_ID: u, S.ITEM_ID: i.astype(np.int64), S.LABEL: y, S.TS: ts, S.RATING: rating},
            schema=S.INTERACTIONS,
        )
    return out


def with_candidates(cfg: SyntheticConfig, users: np.ndarray) -> np.ndarray:
    """Which of `users` get candidates: all of them, or every k-th user id so that about
    `candidate_users` do, spread over the whole id (and so hash) range."""
    if cfg.candidate_users is None:
        return np.ones(len(users), dtype=bool)
    return users % max(1, cfg.num_users // cfg.candidate_users) == 0


def num_shards(cfg: SyntheticConfig) -> int:
    return math.ceil(cfg.num_users / cfg.users_per_shard)
