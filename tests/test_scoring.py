"""The scoring job on real local Ray, real Parquet and moto's S3 server, with the tiny model."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from optirag import artifacts as A
from optirag import runs, storage
from optirag import schema as S
from optirag.backbones import load_backbone
from optirag.config import Config
from optirag.context import ContextStore
from optirag.pair_scorer import make_pair_scorer
from optirag.pipelines import scoring
from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, LEASE_S, SLOW_JOB_S

ROOT = Path(__file__).resolve().parents[1]


def _candidates(n_users=6, per_user=10, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, n_users + 1), per_user)
    items = np.concatenate(
        [rng.choice(np.arange(1, 21), per_user, replace=False) for _ in range(n_users)]
    )
    return pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.LABEL: (rng.random(len(users)) < 0.5).astype(np.int8),
            "segment": [f"s{i % 3}" for i in range(len(users))],
        }
    )


def _write_inputs(store, movie_tables, candidates):
    interactions, items, neighbors = movie_tables
    storage.write_table(interactions, A.interactions_uri(store.root, "train"), store)
    storage.write_table(items, A.items_uri(store.root), store)
    storage.write_table(neighbors, storage.join(store.root, "neighbors", "gcn.parquet"), store)
    half = candidates.num_rows // 2
    folder = storage.join(store.root, "candidates", "test")
    storage.write_table(candidates.slice(0, half), storage.join(folder, "a.parquet"), store)
    storage.write_table(candidates.slice(half), storage.join(folder, "b.parquet"), store)
    return folder


def _config(store, tiny_llama_dir, **scoring) -> Config:
    return Config.model_validate(
        {
            "storage": store.model_dump(mode="json") | {"s3": _s3_dump(store)},
            "backbone": {"source": "path", "path": str(tiny_llama_dir), "device": "cpu"},
            "exits": {"rule": "agreement", "threshold": 0.002},
            "compute": {"batch_rows": 16},
            "scoring": {
                "candidates_uri": storage.join(store.root, "candidates", "test"),
                "run_id": "r1",
                "rows_per_shard": 10,
                **scoring,
            },
        }
    )


def _stored_scorer(cfg, contexts, backbone=None):
    """The in-process scorer of what the job would load (heads, rule, side features)."""
    backbone = backbone or load_backbone(cfg.backbone)
    return make_pair_scorer(cfg, backbone, A.load_scoring_model(cfg, backbone), contexts)


def _s3_dump(store):
    return {k: v for k, v in store.s3.model_dump().items() if v is not None}


def _read_all(uri, store) -> pa.Table:
    """Every parquet file under a folder, empty files included."""
    fs, _ = storage.resolve(uri, store)
    return pa.concat_tables(
        [pq.read_table(p, filesystem=fs) for p in storage.list_files(uri, store)]
    )


def _read_run(cfg, run_id="r1"):
    """The published attempt's folder, scores and rejects."""
    attempt = A.published_attempt(storage.join(cfg.storage.root, "scores", run_id), cfg.storage)
    return (
        attempt.root,
        _read_all(attempt.scores_folder, cfg.storage),
        _read_all(attempt.rejects_folder, cfg.storage),
    )


def _assert_exactly_once(scores, rejects, candidates):
    assert scores.num_rows + rejects.num_rows == candidates.num_rows
    pairs = list(zip(scores[S.USER_ID].to_pylist(), scores[S.ITEM_ID].to_pylist(), strict=True))
    assert len(set(pairs)) == len(pairs)


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_end_to_end_on_s3(
    ray_session, s3_storage, tiny_llama_dir, movie_tables, tmp_path, caplog, capsys
):
    cands = _candidates()
    extra = pa.table(
        {
            S.USER_ID: [999, 1, None],
            S.ITEM_ID: [3, 99, 4],
            S.LABEL: [1, 0, 1],
            "segment": ["x", "y", "z"],
        },
        schema=pa.schema(
            [
                pa.field(S.USER_ID, pa.int64()),
                pa.field(S.ITEM_ID, pa.int64()),
                pa.field(S.LABEL, pa.int8()),
                pa.field("segment", pa.string()),
            ]
        ),
    )
    cands = pa.concat_tables([cands.cast(extra.schema), extra])
    _write_inputs(s3_storage, movie_tables, cands)
    cfg = _config(s3_storage, tiny_llama_dir)
    # The job's command line; its logs never hold the credentials: they come from the
    # environment (conftest sets fake ones), never the config.
    from optirag import cli

    conf = tmp_path / "score.yaml"
    conf.write_text(yaml.safe_dump(cfg.redacted()))
    with caplog.at_level("DEBUG"):
        assert cli.score(["--config", str(conf)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    for text in (caplog.text, printed):
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    assert FAKE_SECRET not in conf.read_text() and FAKE_KEY_ID not in conf.read_text()

    out, scores, rejects = _read_run(cfg)
    success = storage.read_json(
        storage.join(cfg.storage.root, "scores", "r1", "_SUCCESS"), cfg.storage
    )
    assert success["attempt"] == "attempt-0001" and out.endswith("attempt-0001")
    manifest = storage.read_json(storage.join(out, "_manifest.json"), cfg.storage)
    assert manifest["scored"] == summary["scored"] == len(cands) - 2
    assert summary["shards_run"] == summary["shards"]
    assert manifest["rejected"] == {"null_id": 1, "unknown_item": 1}
    assert sorted(rejects[S.REASON].to_pylist()) == ["null_id", "unknown_item"]
    assert "segment" in rejects.column_names
    _assert_exactly_once(scores, rejects, cands)
    assert scores.column_names == [*S.SCORE_COLUMNS.names, S.LABEL, "segment"]
    assert 999 in scores[S.USER_ID].to_pylist()  # unknown user: cold-start path

    # The same rows through the in-process scorer give the same scores.
    interactions, items, neighbors = movie_tables
    scorer = _stored_scorer(cfg, ContextStore(interactions, items, neighbors, cfg.prompts))
    local = scorer.score(scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy())
    np.testing.assert_allclose(scores[S.SCORE].to_numpy(), local.scores, atol=1e-4)
    assert np.array_equal(scores[S.EXIT_LAYER].to_numpy(), local.exit_layers)
    assert (local.exit_layers < 6).any()  # early exit really happened (tiny model: 6 layers)

    # A published run is refused unless replacing is asked for (test_failed_replace_keeps_the_
    # published_run replaces one).
    with pytest.raises(runs.RunRefused, match="already committed"):
        scoring.run(cfg)


def test_job_matches_the_in_process_scorer_and_a_rerun_skips_finished_shards(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """The driver's item rating totals reach every actor through Ray Data; a rerun of an
    unfinished run resumes its attempt and scores only the shards without a marker."""
    cands = _candidates()
    _write_inputs(local_storage, movie_tables, cands)
    cfg = _config(local_storage, tiny_llama_dir)
    prompts = cfg.prompts.model_copy(update={"target_ratings": True})
    cfg = cfg.model_copy(update={"prompts": prompts})
    first = scoring.run(cfg)
    _, scores, rejects = _read_run(cfg)
    _assert_exactly_once(scores, rejects, cands)
    scorer = _stored_scorer(cfg, ContextStore(*movie_tables, prompts))
    local = scorer.score(scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy())
    np.testing.assert_allclose(scores[S.SCORE].to_numpy(), local.scores, atol=1e-4)

    out = Path(cfg.storage.root, "scores", "r1")
    (out / "_SUCCESS").unlink()
    for marker in sorted((out / "attempt-0001" / "_markers").iterdir())[:2]:
        marker.unlink()
    second = scoring.run(cfg)
    assert first["shards_run"] == first["shards"] > 2 and second["shards_run"] == 2
    assert second["attempt"] == "attempt-0001"  # resumed, not restarted
    _, again, rejects = _read_run(cfg)
    _assert_exactly_once(again, rejects, cands)
    order = [(S.USER_ID, "ascending"), (S.ITEM_ID, "ascending")]
    np.testing.assert_allclose(
        again.sort_by(order)[S.SCORE].to_numpy(),
        scores.sort_by(order)[S.SCORE].to_numpy(),
        atol=1e-4,
    )


def test_a_shard_larger_than_ray_datas_block_limit_is_written_in_pieces(
    ray_session, local_storage, tiny_llama_dir, movie_tables, capsys
):
    """Issue 30: Ray Data slices a block over 1.5x its target size, and a shard's token
    block that big failed the run ("a batch must hold one whole shard"). A shard is now cut
    into pieces under the limit, each written whole, and scores as one would."""
    cands = _candidates()
    _write_inputs(local_storage, movie_tables, cands)
    cfg = _config(
        local_storage,
        tiny_llama_dir,
        rows_per_shard=cands.num_rows,  # one shard
        max_block_mib=8 / 1024,  # Ray Data's block size, for the test: 8 KiB
        shuffle_min_rows=0,  # through Ray Data's shuffle, as a big run
    )
    summary = scoring.run(cfg)
    bars = capsys.readouterr().err  # the driver's progress: every row read, staged, scored
    for stage in ("read", "staged", "scoring"):
        done = rf"{stage}: 100%\|[^|\n]*\| {cands.num_rows}/{cands.num_rows} "
        assert re.search(done, bars), (stage, bars[-2000:])
    default = ray.data.DataContext.get_current().target_max_block_size
    assert default == 128 << 20  # the process's own is left as it was
    assert summary["shards"] == 1
    root, scores, rejects = _read_run(cfg)
    _assert_exactly_once(scores, rejects, cands)
    files = json.loads(Path(root, "_manifest.json").read_text())["files"]["scores"]
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files)}.parquet") for f in files)
    scorer = _stored_scorer(cfg, ContextStore(*movie_tables, cfg.prompts))
    local = scorer.score(scores[S.USER_ID].to_numpy(), scores[S.ITEM_ID].to_numpy())
    np.testing.assert_allclose(scores[S.SCORE].to_numpy(), local.scores, atol=1e-4)


def _kill_when(predicate, match, timeout=SLOW_JOB_S):
    """SIGKILL the first process of this test session's own Ray cluster (a descendant of
    this process) whose command line contains `match`, once predicate() holds."""
    killed = threading.Event()
    me = psutil.Process()

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed.is_set():
            if predicate():
                for proc in me.children(recursive=True):
                    try:
                        text = " ".join(proc.cmdline()) + proc.name()
                    except psutil.Error:
                        continue
                    if match in text:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.set()
                        return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def _markers(cfg):
    """The shards written whole so far (every piece's marker) in the run's first attempt."""
    attempt = A.RunPaths(str(Path(cfg.storage.root, "scores", "r1"))).attempt(1)
    return list(runs.done_pieces(attempt, cfg.storage))


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_actor_killed_mid_run(ray_session, local_storage, tiny_llama_dir, movie_tables):
    cands = _candidates(n_users=12, per_user=10)  # a shard per user, about
    _write_inputs(local_storage, movie_tables, cands)
    # As in the driver kill test: 8 KiB blocks through the shuffle, so the actor scores the
    # shards a few at a time and is killed with some written and some not.
    small_blocks = {"max_block_mib": 8 / 1024, "shuffle_min_rows": 0}
    cfg = _config(local_storage, tiny_llama_dir, rows_per_shard=8, **small_blocks)
    killed = _kill_when(lambda: len(_markers(cfg)) >= 2, "ScoreTokens")
    summary = scoring.run(cfg)
    assert killed.is_set(), "the test did not manage to kill a scoring actor"
    _, scores, rejects = _read_run(cfg)
    _assert_exactly_once(scores, rejects, cands)
    assert summary["scored"] == cands.num_rows


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_driver_killed_then_resumed(local_storage, tiny_llama_dir, movie_tables, tmp_path):
    cands = _candidates(n_users=12, per_user=10)  # a shard per user, about
    _write_inputs(local_storage, movie_tables, cands)
    # Blocks of 8 KiB: shards reach the actors and the writer a few at a time (the shuffle
    # gathers them all first), so the kill finds some written and some not.
    cfg = _config(
        local_storage,
        tiny_llama_dir,
        rows_per_shard=8,
        lease_s=LEASE_S,
        max_block_mib=8 / 1024,
        shuffle_min_rows=0,
    )
    conf = tmp_path / "score.yaml"
    conf.write_text(yaml.safe_dump(cfg.redacted()))
    cmd = [sys.executable, str(ROOT / "jobs" / "score.py"), "--config", str(conf), "ray.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    # Ray's start and the model load take minutes on a loaded CI machine: wait for two
    # committed shards however long that takes (bounded), and never kill before them, or the
    # rerun has nothing to resume and the test says so instead of failing later on a count.
    deadline = time.time() + SLOW_JOB_S
    while len(_markers(cfg)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read()}"
    assert len(_markers(cfg)) >= 2, f"no two shards committed within {SLOW_JOB_S} s"
    proc.kill()
    proc.wait()
    time.sleep(LEASE_S + 0.5)  # the killed driver's lease expires; the rerun takes it over
    rerun = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SLOW_JOB_S
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads(rerun.stdout[rerun.stdout.index("{") :])
    assert 0 < summary["shards_run"] < summary["shards"]
    assert summary["attempt"] == "attempt-0001"  # resumed, not restarted
    _, scores, rejects = _read_run(cfg)
    _assert_exactly_once(scores, rejects, cands)
    logs = rerun.stdout + rerun.stderr
    assert FAKE_SECRET not in logs and FAKE_KEY_ID not in logs


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.drop_columns([S.ITEM_ID]), "missing column 'item_id'"),
        (
            lambda t: t.set_column(
                0, S.USER_ID, pa.array([str(u) for u in t[S.USER_ID].to_pylist()])
            ),
            "column 'user_id' has type string",
        ),
    ],
    ids=["missing-column", "wrong-type"],
)
def test_bad_candidates_fail_before_scoring(
    ray_session, local_storage, tiny_llama_dir, movie_tables, mutate, message
):
    _write_inputs(local_storage, movie_tables, mutate(_candidates()))
    cfg = _config(local_storage, tiny_llama_dir)
    with pytest.raises(S.SchemaError, match=message):
        scoring.run(cfg)
    assert not Path(cfg.storage.root, "scores").exists()


def test_unreadable_candidates_named(ray_session, local_storage, tiny_llama_dir, movie_tables):
    folder = _write_inputs(local_storage, movie_tables, _candidates())
    Path(folder, "b.parquet").write_bytes(b"garbage")
    with pytest.raises(storage.StorageError, match=r"b\.parquet: not a readable parquet"):
        scoring.run(_config(local_storage, tiny_llama_dir))


def test_output_inside_input_prefix_refused(local_storage, tiny_llama_dir, movie_tables):
    folder = _write_inputs(local_storage, movie_tables, _candidates())
    for output in (storage.join(folder, "out"), "s3://bucket/x/../scores"):
        with pytest.raises(runs.RunRefused):
            scoring.run(_config(local_storage, tiny_llama_dir, output_uri=output))


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_failed_replace_keeps_the_published_run(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """A replace writes a new attempt beside the published one; while it has not committed,
    _SUCCESS keeps naming the old attempt, whose files stay readable."""
    cands = _candidates()
    _write_inputs(local_storage, movie_tables, cands)
    scoring.run(_config(local_storage, tiny_llama_dir))
    old_root, old_scores, _ = _read_run(_config(local_storage, tiny_llama_dir))
    # a second attempt that fails after it has started writing (timed out mid-run)
    failing = _config(local_storage, tiny_llama_dir, replace=True, timeout_s=0.5)
    with pytest.raises(runs.RunFailed, match="timed out"):
        scoring.run(failing)
    run_root = Path(local_storage.root, "scores", "r1")
    assert (run_root / "attempt-0002" / "_plan.json").exists()
    root, scores, rejects = _read_run(failing)
    assert root == old_root and scores.equals(old_scores)
    _assert_exactly_once(scores, rejects, cands)
    done_before = len(list((run_root / "attempt-0002" / "_markers").glob("*.json")))
    # the replace, run again, resumes its attempt, publishes it, then drops the old one
    summary = scoring.run(_config(local_storage, tiny_llama_dir, replace=True))
    assert summary["attempt"] == "attempt-0002"
    assert sorted(p.name for p in run_root.iterdir()) == ["_SUCCESS", "attempt-0002"]
    # the replace scores every shard in its own attempt, none taken from the published one
    assert summary["shards_run"] == summary["shards"] - done_before
    _, scores, rejects = _read_run(failing)
    _assert_exactly_once(scores, rejects, cands)


def test_duplicates_across_files_and_one_output_schema(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """Every row of a user meets in one shard, however small the shards: a pair repeated in
    another file is a reject; ids come out int64 whatever width each file had."""
    interactions, items, neighbors = movie_tables
    _write_inputs(local_storage, movie_tables, _candidates().slice(0, 0))
    folder = Path(local_storage.root, "candidates", "test")
    for f in folder.iterdir():
        f.unlink()
    pq.write_table(
        pa.table(
            {S.USER_ID: pa.array([1, 2, 3], pa.int16()), S.ITEM_ID: pa.array([4, 5, 6], pa.int16())}
        ),
        folder / "a.PARQUET",
    )
    pq.write_table(
        pa.table(
            {
                S.USER_ID: pa.array([3, 1, 2**63 + 1, 2], pa.uint64()),
                S.ITEM_ID: pa.array([7, 4, 4, 9], pa.uint64()),
            }
        ),
        folder / "b.parq",
    )
    for shuffle_min_rows in (0, 100):  # through Ray Data's shuffle, then in one task
        shuffle = {"replace": True, "shuffle_min_rows": shuffle_min_rows}
        cfg = _config(local_storage, tiny_llama_dir, rows_per_shard=2, **shuffle)
        summary = scoring.run(cfg)
        assert summary["rejected"] == {"duplicate_pair": 1, "id_out_of_range": 1}
    _, scores, rejects = _read_run(cfg)
    assert scores.num_rows == 5 and scores.schema.field(S.USER_ID).type == pa.int64()
    dup = rejects.filter(pa.compute.equal(rejects[S.REASON], "duplicate_pair"))
    assert dup.to_pylist()[0][S.USER_ID] == 1 and dup.to_pylist()[0][S.ITEM_ID] == 4
    attempt = A.published_attempt(str(Path(local_storage.root, "scores", "r1")), cfg.storage)
    assert sorted(p.name for p in Path(attempt.root).iterdir()) == [
        "_manifest.json",
        "_markers",
        "_plan.json",
        "rejects",
        "scores",
    ]
    for path in Path(attempt.scores_folder).iterdir():
        schema = pq.read_schema(path)
        assert schema.field(S.USER_ID).type == schema.field(S.ITEM_ID).type == pa.int64()
    # Issue 29: published metadata held absolute paths, so a copy read the original's files.
    # A copy of the run, the original gone, reads its own files.
    import shutil

    copy = Path(local_storage.root, "elsewhere", "r1")
    shutil.copytree(Path(local_storage.root, "scores", "r1"), copy)
    shutil.rmtree(Path(local_storage.root, "scores", "r1"))
    copied = A.read_committed_scores(str(copy), cfg.storage)
    assert sorted(copied[S.ITEM_ID].to_pylist()) == sorted(scores[S.ITEM_ID].to_pylist())
    pointer = json.loads((copy / "_SUCCESS").read_text())["manifest"]
    assert pointer == f"{attempt.name}/_manifest.json"


def test_runs_scored_together_commit_as_their_last_shard_arrives(monkeypatch):
    """score_planned's bookkeeping, without Ray: a run commits when the markers of all its
    pending rows have arrived, a run with nothing pending commits before the graph, a graph
    failure fails only the runs not committed by then, and a failing on_done callback is not
    a run's failure."""
    inputs = runs.Inputs(candidates="c", history="h", items="i", neighbors=None, output="o")

    def planned(name: str, rows: int, done: dict) -> scoring.Planned:
        parts = [runs.Part(0, "p", 0, 0, rows, 0)]
        run = runs.Run(name, inputs, A.RunPaths(name), A.RunPaths(name).attempt(1), parts, 1)
        return scoring.Planned(Config(), run, ("v", {}), done, 0.0)

    together = [
        planned("a", 5, {}),
        planned("b", 4, {0: [runs.Piece(0, 0, 1, 4)]}),
        planned("c", 3, {1: [runs.Piece(1, 0, 1, 1)]}),
    ]
    committed = []
    monkeypatch.setattr(
        runs,
        "commit",
        lambda run, *_: committed.append(run.run_id) or {"run_id": run.run_id, "shards": 1},
    )
    monkeypatch.setattr(scoring, "_scoring_graph", lambda *_: ("graph", "progress"))

    def drive(ds, rows, cfg, desc, on_marker, timeout_s, progress):
        assert (ds, rows, timeout_s, progress) == (
            "graph",
            7,
            2 * cfg.scoring.timeout_s,
            "progress",
        )
        assert committed == ["b"]  # nothing pending: committed before the graph
        on_marker({"_run": 0, "shard_id": 1, "input_rows": 2})
        on_marker({"_run": 2, "shard_id": 0, "input_rows": 1})
        assert committed == ["b"]  # a and c each have rows to go
        on_marker({"_run": 0, "shard_id": 0, "input_rows": 3})
        assert committed == ["b", "a"]
        raise runs.RunFailed("stalled")

    monkeypatch.setattr(scoring, "_drive", drive)
    done = []

    def on_done(i, outcome):
        done.append(i)
        if i == 1:
            raise OSError("the manifest could not be written")

    outcomes = scoring.score_planned(together, on_done)
    assert committed == ["b", "a"] and done == [1, 0, 2]
    assert outcomes[0]["run_id"] == "a" and outcomes[1]["shards_run"] == 0  # b: 1 of 1 before
    assert isinstance(outcomes[2], runs.RunFailed) and "stalled" in str(outcomes[2])


def test_an_error_while_runs_are_scored_together_names_the_run_and_shard():
    """Issue 29: an actor's error failed every partition scored together, naming none."""
    names = ["date=d1/model=v", "date=d2/model=v"]
    with (
        pytest.raises(RuntimeError, match=r"run date=d2/model=v, shard 7: KeyError: .*score"),
        scoring.naming_the_run(names, 1, 7),
    ):
        raise KeyError('Field "score" exists 2 times in schema')
    with pytest.raises(runs.RunFailed), scoring.naming_the_run(names, 0, 1):
        raise runs.RunFailed("stalled")  # the protocol's own errors pass as they are
    # the actor names the input files its batch's rows came from
    files = scoring.RowFiles(
        np.array([0, 10, 25]), ["d2/a.parquet", "d2/b.parquet", "d2/c.parquet"]
    )
    assert files.of(np.array([12, 11, 30])) == ["d2/b.parquet", "d2/c.parquet"]
    with (
        pytest.raises(RuntimeError, match=r"shard 7 \(rows from d2/b\.parquet\): ValueError"),
        scoring.naming_the_run(names, 1, 7, files.of(np.array([12]))),
    ):
        raise ValueError("bad row")


def test_a_progress_counter_that_does_not_answer_costs_the_bars_not_the_run(ray_session):
    """The driver asks the read/staged counter for its bars; a counter that died (its node,
    the memory monitor) must not fail runs whose shards are all written."""
    progress = scoring.StagingProgress.remote()
    ray.get(progress.add.remote("read", 3))
    ray.kill(progress)
    events = queue.Queue()
    for event in (("shard", {"input_rows": 2}), ("shard", {"input_rows": 1}), ("done", None)):
        events.put(event)
    seen = []
    cfg = Config.model_validate({"scoring": {"stall_timeout_s": 0.5}})  # polled each 0.25 s
    scoring._watch(events, 3, cfg, "scoring", seen.append, 60, progress)
    assert [m["input_rows"] for m in seen] == [2, 1]
