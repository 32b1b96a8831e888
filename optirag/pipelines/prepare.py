"""The prepare job: raw interactions (MovieLens-100k or the user's parquet) -> the canonical
interactions, items and candidates tables under storage.root."""

from __future__ import annotations

import logging

from optirag import artifacts as A
from optirag import data, storage
from optirag import schema as S
from optirag.config import DataConfig, StorageConfig

log = logging.getLogger(__name__)


def run(cfg: DataConfig, store: StorageConfig) -> dict[str, int]:
    """Build and write every canonical table; returns row counts per table.

    Everything is validated and computed before the first write, so a bad input leaves
    nothing behind.
    """
    if cfg.source == "movielens":
        raw_interactions, raw_items = data.load_movielens(cfg.movielens_dir)
        source = cfg.movielens_dir
    else:
        assert cfg.interactions_uri and cfg.items_uri  # checked by DataConfig
        raw_interactions, raw_items = data.rename_user_data(
            cfg,
            storage.read_table(cfg.interactions_uri, store),
            storage.read_table(cfg.items_uri, store),
        )
        source = cfg.interactions_uri
    interactions = data.canonical_interactions(raw_interactions, cfg.like_threshold, source)
    items = data.canonical_items(raw_items, cfg.items_uri or cfg.movielens_dir)
    splits = data.split(interactions, cfg)

    outputs = {A.items_uri(store.root): items}
    for name, table in splits.items():
        outputs[A.interactions_uri(store.root, name)] = table
        if name != "train":
            outputs[A.candidates_uri(store.root, name)] = data.candidates_from(table)
    if cfg.sample_users:
        sample = data.sample_users(splits["test"], cfg.sample_users, seed=0)
        outputs[A.candidates_uri(store.root, "test_sample")] = data.candidates_from(sample)
    counts = {}
    for uri, table in outputs.items():
        storage.write_table(table, uri, store)
        counts[uri] = table.num_rows
        log.info("wrote %s (%d rows)", uri, table.num_rows)
    return counts


def partition_candidates(
    key: str, store: StorageConfig, sample_users: int | None = None
) -> dict[str, int]:
    """Write the test candidates (and the test sample's, when there is one, or `sample_users`
    of its users) again as Hive partitions by the interactions' time (`key`: date or month),
    for backfills; returns the rows per partition folder."""
    test = storage.read_table(A.interactions_uri(store.root, "test"), store)
    splits = {"test": test}
    sample_uri = A.candidates_uri(store.root, "test_sample")
    if storage.exists(sample_uri, store):
        sample = storage.read_table(sample_uri, store)
        if sample_users:
            sample = data.sample_users(sample, sample_users, seed=0)
        keys = sample.select([S.USER_ID, S.ITEM_ID])
        splits["test_sample"] = test.join(keys, [S.USER_ID, S.ITEM_ID], join_type="inner")
    elif sample_users:
        log.warning(
            "backfill.sample_users=%d: there is no %s to sample from (data.sample_users "
            "makes one), so only the test candidates are partitioned",
            sample_users,
            sample_uri,
        )
    counts = {}
    for split, table in splits.items():
        folder = A.partitioned_candidates_uri(store.root, split, key)
        if storage.exists(folder, store):
            storage.delete_folder(folder, store)  # a rerun must not keep stale partitions
        partitions = data.partition_by_time(table, key)
        for value, part in partitions.items():
            uri = A.partition_file(folder, key, value)
            storage.write_table(part, uri, store)
            counts[uri] = part.num_rows
        log.info("wrote %s (%d partitions)", folder, len(partitions))
    return counts
