"""The scoring run protocol without Ray: input listing, staging by user, write retries, the
model version, and where a run may write."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optirag import artifacts as A
from optirag import runs, storage
from optirag import schema as S
from optirag.config import Config


def _cfg(store, tiny_llama_dir=None, **scoring) -> Config:
    raw = {"storage": store.model_dump(mode="json"), "scoring": {"run_id": "r1", **scoring}}
    if tiny_llama_dir is not None:
        raw["backbone"] = {"source": "path", "path": str(tiny_llama_dir), "device": "cpu"}
    return Config.model_validate(raw)


def _cands(users, items, **columns) -> pa.Table:
    return pa.table({S.USER_ID: users, S.ITEM_ID: items, **columns})


def test_parquet_found_whatever_the_extension_case_and_other_files_refused(local_storage, caplog):
    folder = storage.join(local_storage.root, "cands")
    for name in ("a.parquet", "b.PARQUET", "c.parq"):
        storage.write_table(_cands([1], [2]), storage.join(folder, name), local_storage)
    cfg = _cfg(local_storage)
    assert [p.rsplit("/", 1)[1] for p in runs.candidate_files(folder, cfg)] == [
        "a.parquet",
        "b.PARQUET",
        "c.parq",
    ]
    storage.write_bytes(b"x,y\n", storage.join(folder, "d.csv"), local_storage)
    with pytest.raises(storage.StorageError, match=r"d\.csv"):
        runs.candidate_files(folder, cfg)
    with caplog.at_level(logging.WARNING):
        files = runs.candidate_files(folder, _cfg(local_storage, ignore_other_files=True))
    assert len(files) == 3 and "d.csv" in caplog.text


def test_empty_input_refused_unless_allowed(local_storage, tiny_llama_dir):
    folder = storage.join(local_storage.root, "candidates", "test")
    empty = _cands(pa.array([], pa.int64()), pa.array([], pa.int64()))
    storage.write_table(empty, storage.join(folder, "a.parquet"), local_storage)
    storage.write_table(
        pa.table({S.ITEM_ID: [1], S.TITLE: ["t"], S.TEXT: [None]}, schema=S.ITEMS),
        A.items_uri(local_storage.root),
        local_storage,
    )
    history = A.interactions_uri(local_storage.root, "train")
    storage.write_table(S.INTERACTIONS.empty_table(), history, local_storage)
    with pytest.raises(storage.StorageError, match="no rows"):
        runs.start(_cfg(local_storage, candidates_uri=folder), "v1")
    run = runs.start(_cfg(local_storage, candidates_uri=folder, allow_empty=True), "v1")
    assert run.total_rows == 0


def test_ids_outside_int64_are_rejects_and_ids_become_int64(local_storage):
    users = pa.array([1, 2**63 + 5, 3], pa.uint64())
    items = pa.array([7, 7, 2**64 - 1], pa.uint64())
    path = storage.join(local_storage.root, "c.parquet")
    storage.write_table(_cands(users, items), path, local_storage)
    fs, inner = storage.resolve(path, local_storage)
    part = runs.Part(0, inner, 0, 0, 3, 100)
    table = runs.read_part(part, fs, known_items=np.array([7]))
    assert table.schema.field(S.USER_ID).type == pa.int64()
    assert table[S.REASON].to_pylist() == [None, "id_out_of_range", "id_out_of_range"]
    assert table[S.USER_ID].to_pylist()[0] == 1 and table[runs.ROW].to_pylist() == [100, 101, 102]


def test_every_row_of_a_user_is_in_one_shard_and_the_first_copy_wins(local_storage):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 50, 400), rng.integers(0, 20, 400)
    users[-1], items[-1] = users[0], items[0]  # the same pair again, far away in the input
    path = storage.join(local_storage.root, "c.parquet")
    storage.write_table(_cands(users, items), path, local_storage)
    fs, inner = storage.resolve(path, local_storage)
    parts = [runs.Part(i, inner, 0, i * 100, 100, i * 100) for i in range(4)]
    rows = pa.concat_tables(
        [runs.with_shards(runs.read_part(p, fs, np.arange(20)), 7) for p in parts]
    )
    seen = {}
    for user, shard in zip(
        rows[S.USER_ID].to_pylist(), rows[runs.SHARD_ID].to_pylist(), strict=True
    ):
        assert seen.setdefault(user, shard) == shard
    assert len(seen) == len(np.unique(users))
    # the shard of a user does not depend on the process or the batch it is computed in
    assert np.array_equal(runs.shard_of(users, 7), runs.shard_of(users.copy()[::-1], 7)[::-1])
    # a shard arrives in any order (a shuffle keeps none): the first copy in the input wins
    shard = rows.filter(pa.compute.equal(rows[runs.SHARD_ID], int(runs.shard_of(users[:1], 7)[0])))
    marked = runs.mark_duplicates(shard.take(np.random.default_rng(1).permutation(len(shard))))
    assert marked[runs.ROW].to_pylist() == sorted(shard[runs.ROW].to_pylist())
    dup = marked.filter(pa.compute.equal(marked[S.REASON], S.REJECT_DUPLICATE_PAIR))
    pairs = list(zip(users.tolist(), items.tolist(), strict=True))
    firsts = {p: i for i, p in reversed(list(enumerate(pairs)))}
    expected = [i for i in shard[runs.ROW].to_pylist() if firsts[pairs[i]] != i]
    assert sorted(dup[runs.ROW].to_pylist()) == expected and 399 in expected
    with pytest.raises(runs.RunFailed, match="reached its shard twice"):
        runs.mark_duplicates(pa.concat_tables([shard, shard.slice(2, 1)]))


def _scored_batch(users, items, rows, shard=3):
    n = len(users)
    batch = _cands(users, items)
    reasons = [S.REJECT_DUPLICATE_PAIR if r == 1 else None for r in rows]
    batch = batch.append_column(S.REASON, pa.array(reasons, pa.string()))
    batch = batch.append_column(runs.ROW, pa.array(rows))
    batch = batch.append_column(S.SCORE, pa.array(np.linspace(0.1, 0.3, n), pa.float32()))
    batch = batch.append_column(S.EXIT_LAYER, pa.array([6] * n, pa.int16()))
    return batch.append_column(S.MODEL_VERSION, pa.array(["v"] * n))


def test_a_write_that_fails_once_is_retried(local_storage, monkeypatch):
    cfg = _cfg(local_storage, max_write_retries=2)
    attempt = A.RunPaths(storage.join(local_storage.root, "out", "r1")).attempt(1)
    [batch] = runs.label_pieces([_scored_batch([1, 1, 2], [5, 5, 6], [0, 1, 2])], 3)
    real, calls = storage.write_table, []

    def flaky(table, uri, store):
        calls.append(uri)
        if len(calls) == 1:
            raise OSError("connection reset by peer")
        real(table, uri, store)

    monkeypatch.setattr(storage, "write_table", flaky)
    monkeypatch.setattr(runs.time, "sleep", lambda s: None)
    [marker] = runs.write_pieces(batch, cfg, attempt)
    assert marker["scored"] == 2 and marker["rejected"] == {"duplicate_pair": 1}
    assert runs.done_pieces(attempt, local_storage) == {3: [runs.Piece(3, 0, 1, 3)]}
    fs, path = storage.resolve(attempt.scores(3), local_storage)
    assert pq.read_table(path, filesystem=fs)[S.SCORE].to_pylist() == pytest.approx([0.1, 0.3])


def test_a_shard_is_written_in_pieces_and_done_only_when_all_are(local_storage):
    """Pieces arrive in any batches, several per batch; a shard is done when every piece of
    one cut is; a piece that arrives short is refused, never written."""
    cfg = _cfg(local_storage)
    attempt = A.RunPaths(storage.join(local_storage.root, "out", "r1")).attempt(1)
    whole = _scored_batch([1, 2, 3, 4, 5], [9, 9, 9, 9, 9], [0, 2, 3, 4, 5])
    pieces = runs.label_pieces([whole.slice(0, 2), whole.slice(2, 2), whole.slice(4)], 5)
    other = runs.label_pieces([_scored_batch([7], [9], [6])], 6)
    runs.write_pieces(pa.concat_tables([pieces[2], other[0]]), cfg, attempt)
    assert set(runs.done_pieces(attempt, local_storage)) == {6}  # shard 5 has 1 piece of 3
    with pytest.raises(runs.RunFailed, match="shard 5 piece 0: got 1 of its 2 rows"):
        runs.write_pieces(pieces[0].slice(0, 1), cfg, attempt)
    runs.write_pieces(pa.concat_tables(pieces[:2]), cfg, attempt)
    done = runs.done_pieces(attempt, local_storage)
    assert [p.rows for p in done[5]] == [2, 2, 1] and done[6] == [runs.Piece(6, 0, 1, 1)]
    Path(attempt.rejects(5, 1, 3)).unlink()  # a piece's file missing: the shard is not done
    assert set(runs.done_pieces(attempt, local_storage)) == {6}


def test_run_folder_is_checked_against_every_input():
    inputs = runs.Inputs("/d/cands", "/d/hist", "/d/items.parquet", None, "/d/out")
    runs.check_output_location(inputs, "/d/out/r1")
    for bad_root in ("/d/cands/r1", "/d/hist/x", "/d/out/../cands"):
        with pytest.raises(runs.RunRefused):
            runs.check_output_location(inputs, bad_root)
    with pytest.raises(runs.RunRefused, match="inside the run folder"):
        runs.check_output_location(replace(inputs, candidates="/d/out/r1/c"), "/d/out/r1")


def _publish_heads(cfg, tensors_scale=1.0, threshold=0.1, adapter=False, side=False):
    import torch

    exit_config = {
        "layers": [3, 6],
        "hidden_size": 8,
        "eps": 1e-6,
        "rule": "agreement",
        "threshold": threshold,
        "side_features": ["mf"] if side else [],
    }
    if adapter:
        exit_config["lora"] = {"rank": 8}
    arrays = ({"x": np.ones(2) * tensors_scale}, {"bias": 0.0}) if side else None
    A.save_heads(
        A.StoredHeads(
            {"w": torch.ones(2) * tensors_scale},
            exit_config,
            {"a": torch.ones(1)} if adapter else None,
            arrays,
        ),
        cfg,
    )


def test_model_version_changes_with_everything_that_decides_a_score(local_storage, tiny_llama_dir):
    cfg = _cfg(local_storage, tiny_llama_dir)
    versions = {"zero-shot": runs.model_version(cfg)[0]}
    _publish_heads(cfg)
    versions["trained heads"] = runs.model_version(cfg)[0]
    _publish_heads(cfg, tensors_scale=2.0)
    versions["other weights"] = runs.model_version(cfg)[0]
    _publish_heads(cfg, tensors_scale=2.0, threshold=0.2)
    versions["trained tau"] = runs.model_version(cfg)[0]
    tau = cfg.model_copy(update={"exits": cfg.exits.model_copy(update={"threshold": 0.3})})
    versions["configured tau"] = runs.model_version(tau)[0]
    _publish_heads(cfg, tensors_scale=2.0, threshold=0.2, adapter=True)
    versions["adapter"] = runs.model_version(cfg)[0]
    _publish_heads(cfg, tensors_scale=2.0, threshold=0.2, adapter=True, side=True)
    versions["side features"] = runs.model_version(cfg)[0]
    prompts = cfg.model_copy(update={"prompts": cfg.prompts.model_copy(update={"max_history": 3})})
    versions["prompt"] = runs.model_version(prompts)[0]
    assert len(set(versions.values())) == len(versions), versions
    assert runs.model_version(cfg)[0] == versions["side features"]  # stable
    parts = runs.model_version(cfg)[1]
    assert set(parts) >= {"backbone", "heads", "exits", "adapter", "side_features", "prompts"}


def _start_inputs(store, folder) -> None:
    n = 29
    items = pa.table({S.ITEM_ID: range(1, n + 1), S.TITLE: ["t"] * n, S.TEXT: [None] * n}, S.ITEMS)
    storage.write_table(items, A.items_uri(store.root), store)
    storage.write_table(
        S.INTERACTIONS.empty_table(), A.interactions_uri(store.root, "train"), store
    )
    storage.write_table(_cands([1, 2, 3], [4, 5, 6]), storage.join(folder, "a.parquet"), store)


def test_inputs_are_pinned_by_content_not_by_touch_or_copy(local_storage, tmp_path):
    import os
    import shutil

    folder = storage.join(local_storage.root, "cands")
    _start_inputs(local_storage, folder)
    path = storage.join(folder, "a.parquet")
    before = storage.content_fingerprints(folder, local_storage)[0][1:]
    os.utime(path, (1, 1))  # touched
    shutil.copy(path, tmp_path / "copy.parquet")  # copied elsewhere
    assert storage.content_fingerprints(folder, local_storage)[0][1:] == before
    assert storage.content_fingerprints(str(tmp_path / "copy.parquet"), local_storage)[0][1:] == (
        before
    )
    # other pairs, same name, same row count and size
    storage.write_table(_cands([1, 2, 3], [6, 5, 4]), path, local_storage)
    assert storage.content_fingerprints(folder, local_storage)[0][1:] != before


def test_a_changed_input_starts_a_new_attempt_instead_of_resuming_the_old_one(local_storage):
    folder = storage.join(local_storage.root, "cands")
    _start_inputs(local_storage, folder)
    cfg = _cfg(local_storage, candidates_uri=folder)
    first = runs.start(cfg, "v1")
    assert runs.start(cfg, "v1").paths.name == first.paths.name  # unchanged: resumed
    changed = _cands([1, 2, 3], [6, 5, 4])
    storage.write_table(changed, storage.join(folder, "a.parquet"), local_storage)
    with pytest.raises(runs.RunRefused, match="input or the model changed"):
        runs.start(cfg, "v1")  # the nightly job: refused, as before
    again = runs.start(cfg, "v1", restart_if_changed=True)  # a backfill's partition
    assert again.paths.name != first.paths.name
    assert runs.changed_inputs(
        storage.read_json(first.paths.plan, local_storage)["files"], again.files
    ) == [storage.resolve(storage.join(folder, "a.parquet"), local_storage)[1]]


def test_an_unpublished_attempt_of_the_older_layout_is_replaced_not_refused(local_storage):
    """Issue 30: attempts staged before the keyed shuffle (`_staged/`, sharding 1) cannot be
    resumed; a rerun starts a new attempt instead of refusing as if the input had changed."""
    folder = storage.join(local_storage.root, "cands")
    _start_inputs(local_storage, folder)
    cfg = _cfg(local_storage, candidates_uri=folder)
    first = runs.start(cfg, "v1")
    first.release()
    plan = storage.read_json(first.paths.plan, local_storage)
    storage.write_json({**plan, "sharding": "user-hash-ranges-1"}, first.paths.plan, local_storage)
    again = runs.start(cfg, "v1")
    assert again.paths.number == first.paths.number + 1


def test_input_columns_that_collide_with_the_output_are_refused_when_planned(local_storage):
    """Issue 29: an input with a `score` column passed staging, then every partition of the
    shared scoring graph died with "Field score exists 2 times", naming no file."""
    folder = storage.join(local_storage.root, "cands")
    _start_inputs(local_storage, folder)
    bad = storage.join(folder, "a.parquet")
    storage.write_table(_cands([1], [4], score=[0.5]), bad, local_storage)
    cfg = _cfg(local_storage, candidates_uri=folder)
    with pytest.raises(storage.StorageError, match=r"a\.parquet: column\(s\) score collide"):
        runs.start(cfg, "v1")
    storage.write_table(_cands([1], [4], date=["x"], segment=["s"]), bad, local_storage)
    assert runs.start(cfg, "v1").total_rows == 1  # `date` passes through a plain run
    with pytest.raises(storage.StorageError, match="column\\(s\\) date collide"):
        runs.start(cfg, "v1", storage.join(local_storage.root, "scores", "date=d", "model=v1"))
