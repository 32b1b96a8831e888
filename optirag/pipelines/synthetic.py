"""The synthetic-data job: one Ray Data task per shard generates and writes it
(optirag.synthetic), so memory per task is independent of num_users."""

from __future__ import annotations

import logging

import numpy as np
import ray

from optirag import artifacts as A
from optirag import storage
from optirag.config import StorageConfig, SyntheticConfig
from optirag.synthetic import generate_shard, item_factors, items_table, num_shards

log = logging.getLogger(__name__)


def run(cfg: SyntheticConfig, store: StorageConfig) -> dict[str, int]:
    """Write the synthetic data set; returns total rows per table. Needs ray.init() first."""
    if cfg.candidates_per_user > cfg.num_items or cfg.history_per_user > cfg.num_items:
        raise ValueError("synthetic: candidates_per_user and history_per_user must be <= num_items")
    paths = A.SyntheticPaths(storage.join(store.root, cfg.output))
    storage.write_table(items_table(cfg), paths.items, store)
    factors_ref = ray.put(item_factors(cfg))

    def write_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        factors = ray.get(factors_ref)
        counts: dict[str, list[int]] = {"candidates": [], "history": []}
        for shard in batch["id"]:
            for table, data in generate_shard(cfg, int(shard), factors).items():
                storage.write_table(data, paths.part(table, int(shard)), store)
                counts[table].append(data.num_rows)
        return {k: np.asarray(v or [0] * len(batch["id"])) for k, v in counts.items()}

    n = num_shards(cfg)
    written = (
        ray.data.range(n, override_num_blocks=n)
        .map_batches(write_shards, batch_size=1)
        .sum(["candidates", "history"])
    )
    totals = {"items": cfg.num_items}
    totals.update({k.removeprefix("sum(").removesuffix(")"): int(v) for k, v in written.items()})
    log.info("synthetic data in %s: %s", paths.root, totals)
    return totals
