"""Backfills: one scoring run per Hive partition, on real local Ray with the tiny model."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from optirag import artifacts as A
from optirag import runs, score_table, storage
from optirag import schema as S
from optirag.config import Config
from optirag.pipelines import backfill
from tests.conftest import LEASE_S, SLOW_JOB_S
from tests.test_scoring import _candidates

ROOT = Path(__file__).resolve().parents[1]
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]


def _write_partitioned(store, movie_tables, days=DAYS, per_user=6):
    interactions, items, neighbors = movie_tables
    storage.write_table(interactions, A.interactions_uri(store.root, "train"), store)
    storage.write_table(items, A.items_uri(store.root), store)
    storage.write_table(neighbors, storage.join(store.root, "neighbors", "gcn.parquet"), store)
    folder = storage.join(store.root, "candidates", "daily")
    tables = {}
    for i, day in enumerate(days):
        tables[day] = _candidates(n_users=6, per_user=per_user, seed=i)
        uri = storage.join(folder, f"date={day}", "part-0.parquet")
        storage.write_table(tables[day], uri, store)
    return folder, tables


def _config(store, tiny_llama_dir, folder, threshold=0.002, scoring=None, **backfill_cfg) -> Config:
    return Config.model_validate(
        {
            "storage": store.model_dump(mode="json"),
            "backbone": {"source": "path", "path": str(tiny_llama_dir), "device": "cpu"},
            "exits": {"rule": "agreement", "threshold": threshold},
            "compute": {"batch_rows": 16},
            "scoring": {"rows_per_shard": 12, **(scoring or {})},
            "backfill": {"candidates_uri": folder, **backfill_cfg},
        }
    )


def _manifest(cfg):
    version = runs.model_version(cfg)[0]
    out = A.BackfillPaths(A.scores_location(cfg))
    return storage.read_json(out.manifest(version), cfg.storage)


def test_partition_selection(local_storage, tiny_llama_dir, movie_tables):
    folder, _ = _write_partitioned(local_storage, movie_tables, days=["2026-11-01", "2026-11-03"])
    Path(folder, "_tmp").mkdir()  # not a partition
    cfg = _config(local_storage, tiny_llama_dir, folder)

    def chosen(spec):
        part = cfg.model_copy(update={"backfill": cfg.backfill.model_copy(update=spec)})
        return backfill.selected_partitions(part)

    assert list(chosen({})[0]) == ["2026-11-01", "2026-11-03"]
    picked, missing = chosen({"partitions": "2026-10-30..2026-11-02"})
    assert list(picked) == ["2026-11-01"] and missing == ["2026-10-30", "2026-10-31", "2026-11-02"]
    assert list(chosen({"partitions": ["2026-11-03"]})[0]) == ["2026-11-03"]
    with pytest.raises(storage.StorageError, match="no partition date=2026-11-02"):
        chosen({"partitions": ["2026-11-02"]})
    with pytest.raises(storage.StorageError, match="no day=<value> partition folders"):
        chosen({"partition_key": "day"})


def test_test_candidates_partitioned_by_month_and_a_user_sample(local_storage):
    """jobs/partition_candidates.py: every test pair lands in its month's partition; the
    sample's partitions keep `sample_users` of the test sample's users, and a rerun leaves no
    stale partition behind."""
    from optirag import data
    from optirag.pipelines import prepare

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, 11), 6)
    month_starts = [1_000_000_000 + 30 * 86_400 * m for m in range(3)]  # Sep-Nov 2001
    test = pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: np.tile(np.arange(1, 7), 10),
            S.LABEL: (rng.random(len(users)) < 0.5).astype(np.int8),
            S.TS: np.array(month_starts * 20) + rng.integers(0, 86_400, len(users)),
            S.RATING: np.full(len(users), 4.0, np.float32),
        },
        schema=S.INTERACTIONS,
    )
    root = local_storage.root
    storage.write_table(test, A.interactions_uri(root, "test"), local_storage)
    sample = data.candidates_from(test.filter(pa.compute.less_equal(test[S.USER_ID], 5)))
    storage.write_table(sample, A.candidates_uri(root, "test_sample"), local_storage)

    def read(split):
        folder = A.partitioned_candidates_uri(root, split, "month")
        months = [
            name.removeprefix("month=") for name in storage.list_folders(folder, local_storage)
        ]
        return {
            m: storage.read_table(A.partition_file(folder, "month", m), local_storage)
            for m in months
        }

    prepare.partition_candidates("month", local_storage)
    parts = read("test")
    assert sorted(parts) == ["2001-09", "2001-10", "2001-11"]
    assert sum(t.num_rows for t in parts.values()) == test.num_rows
    assert sum(t.num_rows for t in read("test_sample").values()) == sample.num_rows

    # the test split loses its last month: a rerun must not keep that partition
    early = test.filter(pa.compute.less(test[S.TS], month_starts[2]))
    storage.write_table(early, A.interactions_uri(root, "test"), local_storage)
    prepare.partition_candidates("month", local_storage, sample_users=2)
    assert sorted(read("test")) == ["2001-09", "2001-10"]
    assert sum(t.num_rows for t in read("test").values()) == early.num_rows
    sampled = pa.concat_tables(read("test_sample").values())
    kept = set(sampled[S.USER_ID].to_pylist())
    assert len(kept) == 2 and kept <= set(sample[S.USER_ID].to_pylist())
    assert sampled.num_rows == 2 * 4  # every remaining pair of the kept users


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_backfill_commits_each_partition_and_two_variants_read_as_one_dataset(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    folder, tables = _write_partitioned(local_storage, movie_tables)
    table = {"enabled": True}  # the runs are published into an Iceberg table too
    # the partitions through one keyed shuffle, their shards numbered across the runs
    shuffled = {"shuffle_min_rows": 0}
    variant_a = _config(local_storage, tiny_llama_dir, folder, scoring=shuffled, table=table)
    variant_b = _config(local_storage, tiny_llama_dir, folder, 0.2, table=table)
    first = backfill.run(variant_a)
    assert first["counts"] == {"committed": 3, "skipped": 0, "failed": 0, backfill.NOT_RUN: 0}
    assert first == _manifest(variant_a)
    version_a = first["model_version"]
    for day in DAYS:
        entry = first["partitions"][day]
        assert entry["status"] == "committed" and entry["scored"] == tables[day].num_rows
        assert entry["run"] == f"date={day}/model={version_a}"  # relative: copies read theirs
        run_root = A.resolve_under(entry["run"], A.scores_location(variant_a))
        assert A.published_attempt(run_root, local_storage) is not None

    iceberg = score_table.open_table(
        variant_a.backfill.table, "date", A.embedded_catalog(local_storage)
    )
    snapshot = iceberg.current_snapshot().snapshot_id
    again = backfill.run(variant_a)  # nothing changed: every partition is skipped
    assert again["counts"] == {"committed": 0, "skipped": 3, "failed": 0, backfill.NOT_RUN: 0}
    assert iceberg.refresh().current_snapshot().snapshot_id == snapshot  # nothing republished
    # variant B (a looser tau) on one day only: each run costs minutes of Ray on 2 cores
    variant_b = variant_b.model_copy(
        update={"backfill": variant_b.backfill.model_copy(update={"partitions": [DAYS[0]]})}
    )
    second = backfill.run(variant_b)
    version_b = second["model_version"]
    assert version_b != version_a and second["counts"]["committed"] == 1

    scores = A.read_committed_scores(A.scores_location(variant_a), local_storage)
    assert set(scores.column_names) >= {"date", "model", S.SCORE, S.EXIT_LAYER}
    expected = [(day, version_a) for day in DAYS] + [(DAYS[0], version_b)]
    slices = zip(scores["date"].to_pylist(), scores["model"].to_pylist(), strict=True)
    assert set(slices) == set(expected)
    for day, version in expected:
        rows = scores.filter(
            (pa.compute.field("date") == day) & (pa.compute.field("model") == version)
        )
        assert rows.num_rows == tables[day].num_rows  # each pair exactly once
        assert set(rows[S.MODEL_VERSION].to_pylist()) == {version}
        assert _pairs(rows) == _pairs(tables[day])
    # The Iceberg table holds the same rows, each (date, model) slice whole.
    in_table = iceberg.refresh().scan().to_arrow()
    for day, version in expected:
        rows = in_table.filter(
            (pa.compute.field("date") == day) & (pa.compute.field(S.MODEL_VERSION) == version)
        )
        assert _pairs(rows) == _pairs(tables[day])
    # A tighter tau exits later: the variants really are different models.
    day0 = scores.filter(pa.compute.field("date") == DAYS[0])
    exits = {
        v: np.mean(day0.filter(pa.compute.field("model") == v)[S.EXIT_LAYER].to_numpy())
        for v in (version_a, version_b)
    }
    assert exits[version_a] >= exits[version_b]

    # A partition folder removed: its slice stays unless asked, then it is dropped whole.
    import shutil

    shutil.rmtree(Path(folder, f"date={DAYS[2]}"))
    two_days = variant_a.backfill.model_copy(update={"partitions": DAYS[:2]})
    backfill.run(variant_a.model_copy(update={"backfill": two_days}))
    assert DAYS[2] in score_table.slice_values(iceberg, "date", version_a)
    drop_table = two_days.table.model_copy(update={"drop_missing": True})
    drop = two_days.model_copy(update={"table": drop_table})
    dropped = backfill.run(variant_a.model_copy(update={"backfill": drop}))
    assert dropped["dropped_slices"] == [DAYS[2]]
    assert score_table.slice_values(iceberg, "date", version_a) == set(DAYS[:2])


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_failed_partition_is_named_and_the_others_commit(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    folder, _ = _write_partitioned(local_storage, movie_tables)
    bad = storage.join(folder, f"date={DAYS[1]}", "part-0.parquet")
    table = storage.read_table(bad, local_storage)
    storage.write_table(table.drop_columns([S.ITEM_ID]), bad, local_storage)
    cfg = _config(local_storage, tiny_llama_dir, folder)
    with pytest.raises(backfill.BackfillFailed, match=f"date={DAYS[1]}"):
        backfill.run(cfg)
    manifest = _manifest(cfg)
    statuses = {day: e["status"] for day, e in manifest["partitions"].items()}
    assert statuses == {DAYS[0]: "committed", DAYS[1]: "failed", DAYS[2]: "committed"}
    assert "item_id" in manifest["partitions"][DAYS[1]]["error"]

    fail_fast = _config(local_storage, tiny_llama_dir, folder, fail_fast=True)
    runs_root = A.BackfillPaths(A.scores_location(cfg))
    version = manifest["model_version"]
    storage.delete_folder(runs_root.run_root("date", DAYS[2], version), local_storage)
    with pytest.raises(backfill.BackfillFailed):
        backfill.run(fail_fast)
    statuses = {day: e["status"] for day, e in _manifest(cfg)["partitions"].items()}
    assert statuses == {DAYS[0]: "skipped", DAYS[1]: "failed", DAYS[2]: "not run (fail_fast)"}
    # the first invocation's errors are kept in the manifest's history
    history = _manifest(cfg)["history"]
    assert len(history) == 1 and "item_id" in history[0]["failed"][DAYS[1]]
    assert history[0]["counts"]["failed"] == 1


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
# a small backfill is grouped in one task; a big one goes through Ray Data's keyed shuffle
# (shuffle_min_rows 0), where the rerun sends the partitions left, one of them partly
# written, through it together
@pytest.mark.parametrize("grouping", [{}, {"shuffle_min_rows": 0}], ids=["in_one_task", "shuffled"])
def test_backfill_killed_mid_way_then_rerun(
    local_storage, tiny_llama_dir, movie_tables, tmp_path, grouping
):
    folder, tables = _write_partitioned(local_storage, movie_tables, per_user=12)
    cfg = _config(local_storage, tiny_llama_dir, folder, scoring={"lease_s": LEASE_S, **grouping})
    conf = tmp_path / "backfill.yaml"
    conf.write_text(yaml.safe_dump(cfg.redacted()))
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "backfill.py"),
        "--config",
        str(conf),
        "ray.num_cpus=2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    scores = Path(A.scores_location(cfg))
    out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, **out)
    deadline = time.time() + SLOW_JOB_S
    # Killed once the first shard is written: the partitions share one keyed shuffle, so
    # they all finish near its end, and the kill leaves each one committed or half written.
    while not list(scores.glob("date=*/model=*/attempt-*/_markers/*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(LEASE_S + 0.5)  # the killed driver's leases expire; the rerun takes them over
    committed = scores.glob("date=*/model=*/_SUCCESS")
    done = [p.parent.parent.name.removeprefix("date=") for p in committed]
    assert len(done) < len(DAYS), "the backfill was not killed mid-way"
    before = {d: _published_manifest(cfg, d) for d in done}
    written = {p.parents[3].name.removeprefix("date=") for p in scores.glob("*/*/*/_markers/*")}

    rerun = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SLOW_JOB_S
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    manifest = json.loads(rerun.stdout[rerun.stdout.index("{") :])
    for day in DAYS:
        status = manifest["partitions"][day]["status"]
        assert status == ("skipped" if day in done else "committed"), (day, status)
        assert _published_manifest(cfg, day)["scored"] == tables[day].num_rows
        if day in written and day not in done:  # its written shards were resumed
            assert _published_manifest(cfg, day)["attempt"] == "attempt-0001"
    assert {d: _published_manifest(cfg, d) for d in done} == before  # untouched


def _published_manifest(cfg, day):
    version = runs.model_version(cfg)[0]
    run_root = A.BackfillPaths(A.scores_location(cfg)).run_root("date", day, version)
    return storage.read_json(A.published_attempt(run_root, cfg.storage).manifest, cfg.storage)


def _pairs(table):
    return sorted(zip(table[S.USER_ID].to_pylist(), table[S.ITEM_ID].to_pylist(), strict=True))


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_a_changed_input_is_rescored_and_another_shard_size_is_skipped(
    ray_session, local_storage, tiny_llama_dir, movie_tables, caplog
):
    """Issue 29: a committed partition's file rewritten with other pairs (same name, same
    row count) was skipped and its stale scores stayed published; a rerun with another
    rows_per_shard failed every committed partition and said so in the manifest."""
    days = DAYS[:2]
    folder, tables = _write_partitioned(local_storage, movie_tables, days=days)
    cfg = _config(local_storage, tiny_llama_dir, folder)
    assert backfill.run(cfg)["counts"]["committed"] == 2

    changed = _candidates(n_users=6, per_user=6, seed=10)
    assert changed.num_rows == tables[days[0]].num_rows and _pairs(changed) != _pairs(
        tables[days[0]]
    )
    day0 = storage.join(folder, f"date={days[0]}", "part-0.parquet")
    storage.write_table(changed, day0, local_storage)
    other_shards = cfg.model_copy(
        update={"scoring": cfg.scoring.model_copy(update={"rows_per_shard": 7})}
    )
    with caplog.at_level("WARNING"):
        again = backfill.run(other_shards)
    statuses = {d: e["status"] for d, e in again["partitions"].items()}
    assert statuses == {days[0]: "committed", days[1]: "skipped"}
    assert "part-0.parquet" in caplog.text and "input changed" in caplog.text
    run_root = A.resolve_under(again["partitions"][days[0]]["run"], A.scores_location(cfg))
    assert _pairs(A.read_committed_scores(run_root, local_storage)) == _pairs(changed)
    assert again["partitions"][days[0]]["attempt"] != "attempt-0001"


def test_partition_values_are_checked_and_date_ranges_compared_as_dates(
    local_storage, tiny_llama_dir, movie_tables, caplog
):
    """Issue 29: folders `backfill.partitions` refuses were scored and published; `_old` and
    `.bak` folders fell inside a date range compared as text; a reversed range or [] selected
    nothing with exit 0; `2026-13-45` failed naming neither key nor value."""
    folder, _ = _write_partitioned(
        local_storage, movie_tables, days=["2026-11-01", "2026-11-05_old", "2026-11-05.bak"]
    )
    for odd in ("", "..", "a b", "é"):
        Path(folder, f"date={odd}").mkdir()
    cfg = _config(local_storage, tiny_llama_dir, folder)

    def chosen(partitions):
        update = {"backfill": cfg.backfill.model_copy(update={"partitions": partitions})}
        return backfill.selected_partitions(cfg.model_copy(update=update))

    with caplog.at_level("WARNING"):
        assert list(chosen("all")[0]) == ["2026-11-01", "2026-11-05.bak", "2026-11-05_old"]
    assert "'date='" in caplog.text and "'date=a b'" in caplog.text and "'date=é'" in caplog.text
    picked, missing = chosen("2026-11-01..2026-11-05")
    assert list(picked) == ["2026-11-01"] and missing[-1] == "2026-11-05"
    for nothing in ("2026-11-05..2026-11-01", []):
        with pytest.raises(storage.StorageError, match="selects no date=<value> partition"):
            chosen(nothing)
    with pytest.raises(ValueError, match="date=2026-13-45 is not a real day"):
        chosen("2026-13-45..2026-12-01")


def test_config_dates_stay_text_and_a_yaml_error_never_quotes_its_line(tmp_path):
    from optirag.config import ConfigError, load_config

    conf = tmp_path / "c.yaml"
    conf.write_text("backfill:\n  partitions: 2026-13-45\n")
    assert load_config(conf).backfill.partitions == "2026-13-45"
    assert load_config(conf, ["backfill.partitions=2026-11-01"]).backfill.partitions == (
        "2026-11-01"
    )
    conf.write_text("storage:\n  s3:\n    secret_access_key: hunter2-very-secret\n   bad: [\n")
    with pytest.raises(ConfigError, match="line") as err:
        load_config(conf)
    assert "hunter2" not in str(err.value)
