"""Scores as an Apache Iceberg table: what warehouses (Spark, Trino, DuckDB, Snowflake) read.

A backfill publishes each committed partition (one scoring run) into the table in one
atomic commit that replaces that (partition value, model_version) slice: a reader sees the
slice whole or not at all, and a commit that fails leaves the previous snapshot current. The
scoring runs stay the source of truth (exactly once, resumable); the table commit is the last
step, and republishing a run gives the same table contents.
"""

from __future__ import annotations

import threading
import warnings

import pyarrow as pa

from optirag import schema as S
from optirag.config import TableConfig


class TableCommitFailed(RuntimeError):
    """A table commit failed; the table is as it was before it."""


_COMMITS = threading.Lock()  # one table commit at a time from this process


def open_table(cfg: TableConfig, key: str, embedded: dict[str, str]):
    """The scores table (created on first use, partitioned by `key` and model_version) in
    the configured catalog, else in the `embedded` one (artifacts.embedded_catalog)."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(cfg.catalog_name, **(cfg.catalog or embedded))
    namespace = cfg.name.split(".")[0]
    catalog.create_namespace_if_not_exists(namespace)
    schema = pa.schema([*S.SCORE_COLUMNS, pa.field(key, pa.string(), nullable=False)])
    table = catalog.create_table_if_not_exists(cfg.name, schema=schema)
    if not table.spec().fields:
        with table.update_spec() as spec:
            spec.add_identity(key)
            spec.add_identity(S.MODEL_VERSION)
    return table


def _slice(key: str, value: str, version: str):
    from pyiceberg.expressions import And, EqualTo

    return And(EqualTo(key, value), EqualTo(S.MODEL_VERSION, version))


def publish(table, scores: pa.Table, key: str, value: str, version: str) -> int:
    """Replace the (key=value, model_version) slice by `scores` in one commit; new
    pass-through columns are added to the table's schema. Returns the snapshot id."""
    rows = scores.append_column(
        pa.field(key, pa.string(), nullable=False), pa.array([value] * len(scores), pa.string())
    )
    with _COMMITS:
        try:
            with table.update_schema() as update:
                update.union_by_name(rows.schema)
            with warnings.catch_warnings():  # the first publish of a slice deletes nothing
                warnings.filterwarnings("ignore", "Delete operation did not match any records")
                rows = _conform(rows, table.schema().as_arrow())
                table.overwrite(rows, _slice(key, value, version))
        except Exception as err:  # pyiceberg's errors share no base class
            raise TableCommitFailed(
                f"Iceberg table {table.name()}: {key}={value}, model_version={version} was not "
                f"published ({type(err).__name__}: {err}); the previous snapshot stays current"
            ) from err
        return table.current_snapshot().snapshot_id


def _conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """`rows` in the table's column order and types; columns it lacks are null."""
    columns = [
        rows[f.name].cast(f.type) if f.name in rows.column_names else pa.nulls(len(rows), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def has_slice(table, key: str, value: str, version: str) -> bool:
    table.refresh()
    return table.scan(row_filter=_slice(key, value, version), limit=1).to_arrow().num_rows > 0
