"""Id lookups in sorted id arrays and the user hash (numpy only, so prompt code stays free of
torch)."""

from __future__ import annotations

import numpy as np


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in `sorted_ids`, -1 where it is absent."""
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
    found = len(sorted_ids) > 0 and sorted_ids[pos] == ids
    return np.where(found, pos, -1)


HASH_SPACE = 1 << 32


def user_hash(users: np.ndarray) -> np.ndarray:
    """A fixed multiplicative hash of user ids into [0, 2**32), the same in every process.
    Shards are ranges of it (runs.shard_of), and the context stage's users table is sorted
    by it, so a shard's users are one contiguous stretch of that table."""
    mixed = np.asarray(users).astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (mixed >> np.uint64(32)).astype(np.int64)


def hash_range(shard: int, num_shards: int) -> tuple[int, int]:
    """The [low, high) user hashes of a shard."""
    return -(-shard * HASH_SPACE // num_shards), -(-(shard + 1) * HASH_SPACE // num_shards)


def range_of(users: np.ndarray, num_ranges: int) -> np.ndarray:
    """The hash range of each user id when [0, 2**32) is cut into `num_ranges` equal ranges:
    the job's one partitioning key. A scoring shard and a block of the context stage's users
    table are such ranges, so every row knows its shard and block from its own user id."""
    return (user_hash(users) * num_ranges) >> 32
