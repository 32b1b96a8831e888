"""Column names and pyarrow schemas of every table: the one source of truth.

Other modules refer to columns through these constants, never through string literals.
"""

from __future__ import annotations

import pyarrow as pa

USER_ID = "user_id"
ITEM_ID = "item_id"
LABEL = "label"
TS = "ts"
RATING = "rating"
TITLE = "title"
TEXT = "text"
NEIGHBOR_IDS = "neighbor_ids"
SIMILARITIES = "similarities"
SOURCE = "source"
SCORE = "score"
EXIT_LAYER = "exit_layer"
MODEL_VERSION = "model_version"
REASON = "reason"
USER_HASH = "user_hash"
PREFIX_IDS = "prefix_ids"
SUFFIX_IDS = "suffix_ids"
RATED_ITEMS = "rated_items"
RATED_VALUES = "rated_values"
TARGET_IDS = "target_ids"
SIDE = "side"

INTERACTIONS = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(LABEL, pa.int8(), nullable=False),
        pa.field(TS, pa.int64(), nullable=False),
        pa.field(RATING, pa.float32(), nullable=True),
    ]
)

ITEMS = pa.schema(
    [
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(TITLE, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=True),
    ]
)

# Candidates carry these two columns plus any pass-through columns (e.g. label).
CANDIDATE_KEYS = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.int64(), nullable=False),
    ]
)

NEIGHBORS = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(NEIGHBOR_IDS, pa.list_(pa.int64()), nullable=False),
        pa.field(SIMILARITIES, pa.list_(pa.float32()), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
    ]
)

# Scores: these columns first, then the candidates' pass-through columns.
SCORE_COLUMNS = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),
        pa.field(EXIT_LAYER, pa.int16(), nullable=False),
        pa.field(MODEL_VERSION, pa.string(), nullable=False),
    ]
)

# The context stage's tables (optirag.context_tables): users sorted by user_hash (ids.user_hash,
# what shards are ranges of), items by id. A user's rated_items are
# every item their neighbours rated (sorted; repeated when several did), rated_values the
# ratings, most similar neighbour first within an item; side: the user's or item's side of
# the side features of hybrid heads (null without them).
USER_CONTEXT = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(USER_HASH, pa.int64(), nullable=False),
        pa.field(PREFIX_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(RATED_ITEMS, pa.list_(pa.int64()), nullable=False),
        pa.field(RATED_VALUES, pa.list_(pa.float32()), nullable=False),
        pa.field(SIDE, pa.list_(pa.float32()), nullable=True),
    ]
)

ITEM_CONTEXT = pa.schema(
    [
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(TARGET_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(SIDE, pa.list_(pa.float32()), nullable=True),
    ]
)

# Reasons a candidate row lands in rejects/ instead of scores/.
REJECT_NULL_ID = "null_id"
REJECT_ID_OUT_OF_RANGE = "id_out_of_range"  # e.g. a uint64 id above int64's range
REJECT_UNKNOWN_ITEM = "unknown_item"
REJECT_DUPLICATE_PAIR = "duplicate_pair"  # a later copy of a (user, item) pair


class SchemaError(ValueError):
    """An input table does not have the columns or types a stage needs."""


def check_columns(schema: pa.Schema, required: pa.Schema, source: str) -> None:
    """Fail with the file and column named when `schema` lacks a column of `required`.

    Integer widths may differ (an int32 id column is accepted where int64 is required);
    anything else of the wrong type is an error.
    """
    for field in required:
        if field.name not in schema.names:
            raise SchemaError(
                f"{source}: missing column {field.name!r} (has {', '.join(schema.names)})"
            )
        actual = schema.field(field.name).type
        if not _compatible(actual, field.type):
            raise SchemaError(
                f"{source}: column {field.name!r} has type {actual}, expected {field.type}"
            )


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return False
