"""Id lookups in sorted id arrays (numpy only, so prompt code stays free of torch)."""

from __future__ import annotations

import numpy as np


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in `sorted_ids`, -1 where it is absent."""
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
    found = len(sorted_ids) > 0 and sorted_ids[pos] == ids
    return np.where(found, pos, -1)
