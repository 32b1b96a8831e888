"""Scores as an Iceberg table (embedded SQLite catalog): whole slices, atomic replaces."""

import numpy as np
import pyarrow as pa
import pytest

from optirag import artifacts as A
from optirag import schema as S
from optirag import score_table
from optirag.config import TableConfig


def _scores(n, version, score, extra=None):
    table = pa.table(
        {
            S.USER_ID: pa.array(np.arange(n), pa.int64()),
            S.ITEM_ID: pa.array(np.arange(n) + 100, pa.int64()),
            S.SCORE: pa.array(np.full(n, score), pa.float32()),
            S.EXIT_LAYER: pa.array(np.full(n, 2), pa.int16()),
            S.MODEL_VERSION: pa.array([version] * n, pa.string()),
        },
        schema=S.SCORE_COLUMNS,
    )
    return table.append_column("segment", pa.array([extra] * n)) if extra else table


def _publish(table, scores, key, value, version, attempt=None):
    """A slice published from one data file (a backfill writes one per score file)."""
    schema = score_table.slice_schema(table, scores.schema, key)
    path = A.table_data_file(table.location(), key, value, version)
    where = dict(table.io.properties)
    _, rows = score_table.write_slice_file(scores, schema, key, value, path, where)
    return score_table.publish_files(
        table, [path], schema, key, value, version, attempt, rows, rows
    )


def _slices(table):
    rows = table.scan().to_arrow()
    out = {}
    for date, version, score in zip(
        rows["date"].to_pylist(),
        rows[S.MODEL_VERSION].to_pylist(),
        rows[S.SCORE].to_pylist(),
        strict=True,
    ):
        out.setdefault((date, version), []).append(round(score, 3))
    return out


def test_publish_replaces_one_slice_and_keeps_the_others(local_storage):
    table = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    _publish(table, _scores(3, "m1", 0.1), "date", "2026-11-01", "m1")
    _publish(table, _scores(2, "m1", 0.2), "date", "2026-11-02", "m1", "attempt-0001")
    _publish(table, _scores(4, "m2", 0.3, extra="s"), "date", "2026-11-01", "m2")
    assert score_table.slice_is_current(table, "date", "2026-11-02", "m1", "attempt-0001", 2)
    assert not score_table.slice_is_current(table, "date", "2026-11-02", "m1", "attempt-0002", 2)
    assert score_table.slice_state(table, "date", "2026-11-03", "m1") is None
    # A replace of one slice: the new rows only, the other slices untouched.
    _publish(table, _scores(5, "m1", 0.9), "date", "2026-11-01", "m1")
    assert _slices(table) == {
        ("2026-11-01", "m1"): [0.9] * 5,
        ("2026-11-02", "m1"): [0.2] * 2,
        ("2026-11-01", "m2"): [0.3] * 4,
    }
    # A pass-through column one run had is in the schema; the others read it as null.
    rows = table.scan().to_arrow()
    assert set(rows.filter(pa.compute.field(S.MODEL_VERSION) == "m2")["segment"].to_pylist()) == {
        "s"
    }
    # Reopening (a new process) sees the same table.
    again = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    assert _slices(again) == _slices(table)


def test_a_failed_replace_leaves_the_previous_snapshot_current(local_storage, monkeypatch):
    from pyiceberg.table import Transaction

    table = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    _publish(table, _scores(3, "m1", 0.1), "date", "2026-11-01", "m1", "attempt-0001")
    before = table.current_snapshot().snapshot_id

    def fail(self, *args, **kwargs):
        raise OSError("connection to the catalog lost")

    monkeypatch.setattr(Transaction, "commit_transaction", fail)
    with pytest.raises(score_table.TableCommitFailed, match="date=2026-11-01, model_version=m1"):
        _publish(table, _scores(5, "m1", 0.9), "date", "2026-11-01", "m1", "attempt-0002")
    monkeypatch.undo()
    reader = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    assert reader.current_snapshot().snapshot_id == before
    assert _slices(reader) == {("2026-11-01", "m1"): [0.1] * 3}
    # the slice still says it holds attempt 1: a rerun of the committed attempt 2 republishes
    assert score_table.slice_state(reader, "date", "2026-11-01", "m1")["attempt"] == "attempt-0001"
    assert not score_table.slice_is_current(reader, "date", "2026-11-01", "m1", "attempt-0002", 5)


def test_two_publishers_both_commit_and_a_restart_writes_no_metadata(local_storage):
    """Issue 29: a second publisher's commits all failed ("current schema id has changed"),
    and every start left an orphan metadata file."""
    from pathlib import Path

    cfg, catalog = TableConfig(enabled=True), A.embedded_catalog(local_storage)
    first = score_table.open_table(cfg, "date", catalog)
    second = score_table.open_table(cfg, "date", catalog)  # opened before first publishes
    metadata = sorted(Path(local_storage.root).rglob("*.metadata.json"))
    assert score_table.open_table(cfg, "date", catalog) is not None
    assert sorted(Path(local_storage.root).rglob("*.metadata.json")) == metadata
    _publish(first, _scores(3, "m1", 0.1, extra="a"), "date", "2026-11-01", "m1", "a1")
    metadata = sorted(Path(local_storage.root).rglob("*.metadata.json"))
    _publish(second, _scores(2, "m1", 0.2), "date", "2026-11-02", "m1", "a1")
    assert _slices(first.refresh()) == {
        ("2026-11-01", "m1"): [0.1] * 3,
        ("2026-11-02", "m1"): [0.2] * 2,
    }
    # schema update, overwrite and slice record in one commit: one new metadata file
    assert len(sorted(Path(local_storage.root).rglob("*.metadata.json"))) == len(metadata) + 1


def test_embedded_catalog_needs_a_local_root(s3_storage):
    with pytest.raises(Exception, match="needs a local storage.root"):
        A.embedded_catalog(s3_storage)


def test_a_slice_is_dropped_only_when_asked_and_whole(local_storage):
    table = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    for day in ("2026-11-01", "2026-11-02"):
        _publish(table, _scores(3, "m1", 0.1), "date", day, "m1", "attempt-0001")
    _publish(table, _scores(2, "m2", 0.2), "date", "2026-11-02", "m2", "attempt-0001")
    assert score_table.slice_values(table, "date", "m1") == {"2026-11-01", "2026-11-02"}
    score_table.drop_slice(table, "date", "2026-11-02", "m1")
    assert _slices(table) == {("2026-11-01", "m1"): [0.1] * 3, ("2026-11-02", "m2"): [0.2] * 2}
    assert score_table.slice_state(table, "date", "2026-11-02", "m1") is None
    assert score_table.slice_values(table, "date", "m2") == {"2026-11-02"}


def test_a_catalog_that_cannot_be_opened_is_named(tmp_path):
    """Issue 29: a catalog that could not be written gave a raw sqlalchemy traceback (root
    ignores file modes, so the test's catalog lies in a folder that does not exist)."""
    missing = tmp_path / "no" / "such" / "folder"
    catalog = {
        "type": "sql",
        "uri": f"sqlite:///{missing}/catalog.db",
        "warehouse": f"file://{missing}",
    }
    with pytest.raises(score_table.TableCommitFailed, match="Iceberg catalog 'optirag'.*cannot"):
        score_table.open_table(TableConfig(enabled=True, catalog=catalog), "date", {})


def test_a_slice_is_published_from_data_files_with_its_rows_checked(local_storage):
    """Issue 30: the backfill published a partition by reading all its scores into one
    process. Tasks now write the slice's data files (`write_slice_file`) and the commit
    only adds them; a short set of files is refused, the previous snapshot kept."""
    table = score_table.open_table(
        TableConfig(enabled=True), "date", A.embedded_catalog(local_storage)
    )
    _publish(table, _scores(3, "m1", 0.1), "date", "2026-11-01", "m1")
    before = table.current_snapshot().snapshot_id
    parts = [
        _scores(4, "m1", 0.5, extra="s").slice(0, 3),
        _scores(4, "m1", 0.5, extra="s").slice(3),
    ]
    schema = score_table.slice_schema(table, parts[0].schema, "date")
    io = dict(table.io.properties)
    files = [
        score_table.write_slice_file(
            p,
            schema,
            "date",
            "2026-11-01",
            A.table_data_file(table.location(), "date", "2026-11-01", "m1"),
            io,
        )
        for p in parts
    ]
    paths = [path for path, _ in files]
    with pytest.raises(score_table.TableCommitFailed, match="hold 3 rows, the run 4"):
        score_table.publish_files(table, paths[:1], schema, "date", "2026-11-01", "m1", "a2", 4, 3)
    table.refresh()
    assert table.current_snapshot().snapshot_id == before
    score_table.publish_files(table, paths, schema, "date", "2026-11-01", "m1", "a2", 4, 4)
    assert _slices(table) == {("2026-11-01", "m1"): [0.5] * 4}
    assert score_table.slice_is_current(table, "date", "2026-11-01", "m1", "a2", 4)
    assert set(table.scan().to_arrow()["segment"].to_pylist()) == {"s"}
