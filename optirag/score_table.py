"""Scores as an Apache Iceberg table: what warehouses (Spark, Trino, DuckDB, Snowflake) read.

A backfill publishes each committed partition (one scoring run) into the table: tasks write
its rows as the table's data files, then one atomic commit replaces that (partition value,
model_version) slice with them, adds any new pass-through column to the schema and records,
as a table property (which survives snapshot expiry), which committed attempt the slice
holds and its row count (checked against the files written before the commit and against
the snapshot after it): a reader sees the slice whole or not at all, and a commit that fails
leaves the previous snapshot current. The table is refreshed before each commit and the
commit retried when another writer committed first. The scoring runs stay the source of
truth (exactly once, resumable); the table commit is the last step, a rerun republishes
every slice whose recorded attempt is not its run's committed one (`slice_state`), and
republishing a run gives the same table contents.
"""

from __future__ import annotations

import json
import threading
import warnings

import pyarrow as pa

from optirag import schema as S
from optirag.config import TableConfig


class TableCommitFailed(RuntimeError):
    """A table commit failed; the table is as it was before it."""


_COMMITS = threading.Lock()  # one table commit at a time from this process
COMMIT_RETRIES = 4  # commits retried after another writer's (the table refreshed first)
SLICE_PROPERTY = "optirag.slice"


def open_table(cfg: TableConfig, key: str, embedded: dict[str, str]):
    """The scores table (created on first use, partitioned by `key` and model_version) in
    the configured catalog, else in the `embedded` one (artifacts.embedded_catalog). An
    existing table is loaded, not created again (no orphan metadata file per start); a
    catalog that cannot be opened or written is named in the error."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import NoSuchTableError

    try:
        catalog = load_catalog(cfg.catalog_name, **(cfg.catalog or embedded))
        try:
            table = catalog.load_table(cfg.name)
        except NoSuchTableError:
            catalog.create_namespace_if_not_exists(cfg.name.split(".")[0])
            schema = pa.schema([*S.SCORE_COLUMNS, pa.field(key, pa.string(), nullable=False)])
            table = catalog.create_table_if_not_exists(cfg.name, schema=schema)
        if not table.spec().fields:
            with table.update_spec() as spec:
                spec.add_identity(key)
                spec.add_identity(S.MODEL_VERSION)
    except Exception as err:  # pyiceberg's and the catalog driver's errors share no base class
        raise TableCommitFailed(
            f"Iceberg catalog {cfg.catalog_name!r}, table {cfg.name}: cannot open or create it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        ) from err
    return table


def _slice(key: str, value: str, version: str):
    from pyiceberg.expressions import And, EqualTo

    return And(EqualTo(key, value), EqualTo(S.MODEL_VERSION, version))


def slice_schema(table, scores: pa.Schema, key: str) -> pa.Schema:
    """The Arrow schema a slice's data files are written in: the table's, then the run's
    pass-through columns the table lacks (as the commit's `union_by_name` adds them)."""
    current = [f.remove_metadata() for f in table.schema().as_arrow()]
    names = {f.name for f in current}
    return pa.schema([*current, *(f for f in scores if f.name not in names and f.name != key)])


def write_slice_file(
    scores: pa.Table,
    schema: pa.Schema,
    key: str,
    value: str,
    path: str,
    io_properties: dict,
) -> tuple[str, int]:
    """Write score rows as one of a slice's data files at `path`, under the table's location
    (artifacts.table_data_file), from any process (a task, in a backfill); returns its path
    and rows. A file whose publish never commits is not the table's (unreferenced)."""
    import pyarrow.parquet as pq
    from pyiceberg.io import load_file_io

    rows = scores.append_column(
        pa.field(key, pa.string(), nullable=False), pa.array([value] * len(scores), pa.string())
    )
    rows = _conform(rows, schema)
    with load_file_io(io_properties, path).new_output(path).create(overwrite=True) as out:
        pq.write_table(rows, out)
    return path, len(rows)


def publish_files(
    table,
    files: list[str],
    schema: pa.Schema,
    key: str,
    value: str,
    version: str,
    attempt: str | None,
    rows: int,
    written: int,
) -> int:
    """Replace the (key=value, model_version) slice by the data `files` (`write_slice_file`,
    `written` rows in all, which must be the run's `rows`) in one commit that also adds new
    pass-through columns to the schema and records the slice's `attempt` and row count
    (`slice_state`). No row passes through this process. Returns the snapshot id."""
    from pyiceberg.exceptions import CommitFailedException

    if written != rows:
        short = ValueError(f"its data files hold {written} rows, the run {rows}")
        raise _failed(table, key, value, version, "published", short)
    state = json.dumps({"attempt": attempt, "rows": rows})
    with _COMMITS:
        for retry in range(COMMIT_RETRIES + 1):
            try:
                table.refresh()
                with table.transaction() as tx, warnings.catch_warnings():
                    # the first publish of a slice deletes nothing
                    warnings.filterwarnings("ignore", "Delete operation did not match any")
                    with tx.update_schema() as update:
                        update.union_by_name(schema)
                    tx.delete(_slice(key, value, version))
                    tx.add_files(files)
                    tx.set_properties({_slice_property(key, value, version): state})
                break
            except CommitFailedException as err:  # another writer committed first
                if retry == COMMIT_RETRIES:
                    raise _failed(table, key, value, version, "published", err) from err
            except Exception as err:  # pyiceberg's errors share no base class
                raise _failed(table, key, value, version, "published", err) from err
    snapshot = table.current_snapshot()
    added = int(snapshot.summary.additional_properties.get("added-records", -1))
    if added != rows:
        short = ValueError(f"its snapshot added {added} rows, the run has {rows}")
        raise _failed(table, key, value, version, "published whole", short)
    return snapshot.snapshot_id


def _failed(table, key, value, version, what: str, err: Exception) -> TableCommitFailed:
    return TableCommitFailed(
        f"Iceberg table {table.name()}: {key}={value}, model_version={version} was not "
        f"{what} ({type(err).__name__}: {err}); the previous snapshot stays current"
    )


def _slice_property(key: str, value: str, version: str) -> str:
    return f"{SLICE_PROPERTY}.{key}={value}.model_version={version}"


def slice_state(table, key: str, value: str, version: str) -> dict | None:
    """What the slice holds, as its last publish recorded it: {"attempt", "rows"}, or None
    (never published, or published before slices were recorded)."""
    table.refresh()
    raw = table.properties.get(_slice_property(key, value, version))
    return None if raw is None else json.loads(raw)


def _conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """`rows` in the table's column order and types; columns it lacks are null."""
    columns = [
        rows[f.name].cast(f.type) if f.name in rows.column_names else pa.nulls(len(rows), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def slice_is_current(table, key: str, value: str, version: str, attempt: str, rows: int) -> bool:
    """Does the slice hold this committed attempt, whole? (False for a slice published by
    an older attempt, by a failed replace's run, or before slices were recorded.)"""
    return slice_state(table, key, value, version) == {"attempt": attempt, "rows": rows}


def slice_values(table, key: str, version: str) -> set[str]:
    """The partition values the table holds a slice of for this model version."""
    from pyiceberg.expressions import EqualTo

    table.refresh()
    rows = table.scan(row_filter=EqualTo(S.MODEL_VERSION, version), selected_fields=(key,))
    return set(rows.to_arrow()[key].to_pylist())


def drop_slice(table, key: str, value: str, version: str) -> int:
    """Delete the (key=value, model_version) slice and its record in one commit; returns the
    snapshot id."""
    with _COMMITS:
        try:
            table.refresh()
            with table.transaction() as tx:
                tx.delete(_slice(key, value, version))
                tx.remove_properties(_slice_property(key, value, version))
            return table.current_snapshot().snapshot_id
        except Exception as err:  # pyiceberg's errors share no base class
            raise _failed(table, key, value, version, "dropped", err) from err
