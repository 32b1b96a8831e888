"""The scoring job on Ray: candidates -> Ray Data -> token blocks -> an actor pool of
early-exit models -> scores and rejects as Parquet, committed exactly once per shard
(optirag.runs).

    stage by user (tasks)
    context tables (optirag.pipelines.context: built once per set of inputs, else reused)
    read shard + assemble tokens (tasks) ─► ScoreTokens (actor pool, one model replica each,
        nothing per user) ─► write shard (tasks)

A shard is a range of user hashes, so its users' context rows are one stretch of the users
table; assembling tokens is CPU work of its own tasks, apart from the model actors.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from optirag import runs, storage
from optirag import schema as S
from optirag.config import Config
from optirag.context_tables import TokenAssembler, score_block
from optirag.ids import hash_range
from optirag.pipelines import context

log = logging.getLogger(__name__)

TOKEN_COLUMNS = [S.PREFIX_IDS, S.SUFFIX_IDS, S.SIDE]
RUN = "_run"  # which of the runs scored together a row belongs to; dropped before writing
RUN_ERRORS = (ValueError, OSError, RuntimeError)  # what fails a run (RunFailed: RuntimeError)


class ScoreTokens:
    """Ray Data actor: one early-exit model replica (backbone and heads, nothing per user or
    item), scoring a whole shard's token block per call."""

    def __init__(
        self,
        cfg: Config,
        model_version: str,
        run_names: list[str] | None = None,
        run_files: list[RowFiles] | None = None,
    ) -> None:
        import torch

        from optirag import artifacts as A
        from optirag.backbones import load_backbone
        from optirag.model_files import local_backbone
        from optirag.pair_scorer import make_token_scorer

        if cfg.compute.torch_threads:
            torch.set_num_threads(cfg.compute.torch_threads)
        backbone = load_backbone(local_backbone(cfg))  # an s3:// model: once per node
        model = A.load_scoring_model(cfg, backbone, side_features=False)
        self.scorer = make_token_scorer(cfg, backbone, model)
        self.model_version = model_version
        self.run_names, self.run_files = run_names or [], run_files or []

    def __call__(self, batch: pa.Table) -> pa.Table:
        run = int(pc.min(batch[RUN]).as_py()) if RUN in batch.column_names and len(batch) else 0
        has_shard = runs.SHARD_ID in batch.column_names and len(batch)
        shard = batch[runs.SHARD_ID][0].as_py() if has_shard else None
        files = self.run_files[run] if run < len(self.run_files) else None
        rows = batch[runs.ROW].to_numpy() if runs.ROW in batch.column_names else None
        with naming_the_run(self.run_names, run, shard, files.of(rows) if files else None):
            return self._score(batch)

    def _score(self, batch: pa.Table) -> pa.Table:
        scores = np.full(len(batch), np.nan, dtype=np.float32)
        exits = np.zeros(len(batch), dtype=np.int16)
        if pc.any(pc.is_null(batch[S.REASON])).as_py():
            result, rows = score_block(self.scorer, batch)
            scores[rows], exits[rows] = result.scores, result.exit_layers
        batch = batch.drop_columns(TOKEN_COLUMNS)
        batch = batch.append_column(S.SCORE, pa.array(scores, pa.float32()))
        batch = batch.append_column(S.EXIT_LAYER, pa.array(exits, pa.int16()))
        return batch.append_column(
            S.MODEL_VERSION, pa.array([self.model_version] * len(batch), pa.string())
        )


@dataclass
class RowFiles:
    """Which input file a row came from: each part's first input row and its file."""

    starts: np.ndarray  # (parts,) first input row of each part, ascending
    paths: list[str]

    @classmethod
    def of_run(cls, run: runs.Run) -> RowFiles:
        return cls(
            np.array([p.first_row for p in run.parts], dtype=np.int64), [p.path for p in run.parts]
        )

    def of(self, rows: np.ndarray | None) -> list[str] | None:
        if rows is None or not len(self.paths):
            return None
        at = np.searchsorted(self.starts, rows, side="right") - 1
        return sorted({self.paths[i] for i in np.unique(at) if i >= 0})


@contextlib.contextmanager
def naming_the_run(names: list[str], run: int, shard: int | None, files: list[str] | None = None):
    """An error while scoring together several runs (a backfill's partitions) names the run,
    the shard and the input files its rows came from, not only the run whose commit it then
    fails."""
    try:
        yield
    except runs.RunFailed:
        raise
    except Exception as err:
        name = names[run] if 0 <= run < len(names) else f"#{run}"
        where = (
            f" (rows from {', '.join(files[:5])}{' ...' if len(files) > 5 else ''})"
            if files
            else ""
        )
        raise RuntimeError(
            f"run {name}, shard {shard}{where}: {type(err).__name__}: {err}"
        ) from err


_ASSEMBLERS: dict[str, TokenAssembler] = {}  # per worker process: the tokenizer loads once


def assemble_shard(
    table: pa.Table, shard_id: int, num_shards: int, tables: context.ContextTables, cfg: Config
) -> pa.Table:
    """A staged shard joined with its users' and items' context rows into a token block."""
    if tables.paths.root not in _ASSEMBLERS:
        _ASSEMBLERS[tables.paths.root] = tables.assembler(cfg)
    ok = pc.is_null(table[S.REASON])
    users = np.unique(pc.filter(table[S.USER_ID], ok).to_numpy().astype(np.int64))
    items = np.unique(pc.filter(table[S.ITEM_ID], ok).to_numpy().astype(np.int64))
    low, high = hash_range(shard_id, num_shards)
    user_rows = tables.read_users(users, low, high, cfg.storage)
    item_rows = tables.read_items(items, cfg.storage)
    return _ASSEMBLERS[tables.paths.root].assemble(table, user_rows, item_rows)


@dataclass
class Staged:
    """A run whose input is staged into shards: what is left to score, then commit."""

    cfg: Config
    run: runs.Run
    version: tuple[str, dict]
    lengths: dict[int, int]  # rows per shard
    pending: list[int]  # shards without a valid marker
    started: float

    def commit(self) -> dict:
        summary = runs.commit(self.run, self.lengths, self.cfg, self.version, self.started)
        return {**summary, "shards": len(self.lengths), "shards_run": len(self.pending)}


def run(cfg: Config, run_root: str | None = None) -> dict:
    """Score the candidates; returns the run summary. Needs ray.init() first. The run's
    folder is `<output>/<run_id>/` unless `run_root` names it (a backfill's partition)."""
    outcome = score_staged([stage(cfg, run_root)])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def stage(cfg: Config, run_root: str | None = None, *, restart_if_changed: bool = False) -> Staged:
    """Start (or resume) a run and stage its candidates by user: a Ray Data task per part
    (`restart_if_changed`: see runs.start)."""
    started = time.time()
    version = runs.model_version(cfg)
    run = runs.start(cfg, version[0], run_root, restart_if_changed=restart_if_changed)
    try:
        return _stage(cfg, run, version, started)
    except BaseException:
        run.release()
        raise


def _stage(cfg: Config, run: runs.Run, version: tuple, started: float) -> Staged:
    store = cfg.storage
    paths, inputs, num_shards = run.paths, run.inputs, run.num_shards  # not `run`: its lease
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

    parts = run.pending_parts(store)
    if parts:
        items = storage.read_table(inputs.items, store, columns=[S.ITEM_ID])
        known_items = ray.put(items[S.ITEM_ID].to_numpy())
        fs, _ = storage.resolve(inputs.candidates, store)

        def stage_one(batch: dict[str, np.ndarray]) -> pa.Table:
            part = parts[int(batch["id"][0])]
            table = runs.read_part(part, fs, ray.get(known_items))
            marker = runs.stage_part(part, table, num_shards, paths, cfg)
            return pa.table({"marker": [json.dumps(marker)]})

        ds = ray.data.range(len(parts), override_num_blocks=len(parts)).map_batches(
            stage_one, batch_size=1, batch_format="numpy"
        )
        _drive(ds, sum(p.length for p in parts), cfg, "staging by user")

    lengths = run.shard_lengths(store)
    return Staged(cfg, run, version, lengths, run.pending_shards(lengths, store), started)


OnDone = Callable[[int, "dict | Exception"], None]


def score_staged(staged: list[Staged], on_done: OnDone | None = None) -> list[dict | Exception]:
    """Score the pending shards of every staged run in one Ray Data graph (one actor pool,
    started once), committing each run as soon as its last shard is written. Returns each
    run's summary, or the exception that failed it; `on_done(i, outcome)` is called as each
    run finishes (an exception it raises is logged, not the run's). The runs must share their
    model, history, items and neighbours (a backfill's partitions do) and are scored with
    the first one's config; the graph's wall-clock limit is `scoring.timeout_s` times the
    number of runs it scores."""
    outcomes: dict[int, dict | Exception] = {}
    cfg = staged[0].cfg if staged else None

    def finish(i: int, error: Exception | None = None) -> None:
        if error is None:
            try:
                outcomes[i] = staged[i].commit()
            except RUN_ERRORS as err:
                outcomes[i] = err
        else:
            outcomes[i] = error
        if on_done is not None:
            try:
                on_done(i, outcomes[i])
            except Exception:  # a report's failure is not the run's
                log.exception("after run %s finished", staged[i].run.run_id)
        staged[i].run.release()  # the run is done with: another invocation may take it

    try:
        return _score_staged(staged, finish, outcomes, cfg)
    finally:
        for one in staged:
            one.run.release()


def _score_staged(staged: list[Staged], finish, outcomes: dict, cfg) -> list[dict | Exception]:
    for i, one in enumerate(staged):
        if not one.pending:
            finish(i)
    work = [(i, shard) for i, one in enumerate(staged) for shard in one.pending]
    if work:
        left = Counter(i for i, _ in work)
        shared = {(one.version[0], one.run.inputs.history, one.run.inputs.items,
                   one.run.inputs.neighbors) for one in staged}  # fmt: skip
        if len(shared) != 1:
            raise ValueError("runs scored together must share the model, history, items and "
                             "neighbours")  # fmt: skip

        def on_shard(marker: dict) -> None:
            left[marker[RUN]] -= 1
            if left[marker[RUN]] == 0:
                finish(marker[RUN])

        rows = sum(staged[i].lengths[shard] for i, shard in work)
        timeout = cfg.scoring.timeout_s * len(left)
        try:
            _drive(_scoring_graph(staged, work, cfg), rows, cfg, "scoring", on_shard, timeout)
        except RUN_ERRORS as err:
            for i in left:
                if i not in outcomes:
                    finish(i, err)
    return [outcomes[i] for i in range(len(staged))]


def _scoring_graph(staged: list[Staged], work: list[tuple[int, int]], cfg: Config):
    """read shard + assemble (tasks) -> ScoreTokens (actor pool) -> write shard (tasks)."""
    first = staged[0].run.inputs
    tables = context.build(cfg, first.history, first.items, first.neighbors)
    targets = [(one.cfg, one.run.paths, one.run.num_shards, one.lengths) for one in staged]
    store = cfg.storage

    names = [f"{one.run.run_id} (input {one.run.inputs.candidates})" for one in staged]

    def read(batch: dict[str, np.ndarray]) -> pa.Table:
        i, shard_id = work[int(batch["id"][0])]
        _, paths, num_shards, _ = targets[i]
        with naming_the_run(names, i, shard_id):
            table = runs.read_staged_shard(paths, shard_id, store)
            block = assemble_shard(table, shard_id, num_shards, tables, cfg)
        return block.append_column(RUN, pa.array(np.full(len(block), i, dtype=np.int32)))

    def write(batch: pa.Table) -> pa.Table:
        i = int(pc.min(batch[RUN]).as_py())
        if i != pc.max(batch[RUN]).as_py():
            raise runs.RunFailed("a batch must hold one run's shard")
        run_cfg, paths, _, lengths = targets[i]
        marker = runs.write_shard(batch.drop_columns([RUN]), run_cfg, paths, lengths)
        return pa.table({"marker": [json.dumps({**marker, RUN: i})]})

    compute = cfg.compute
    # Ray 2.60 has no named parameters for actor retries yet, only **ray_remote_args,
    # which it flags as deprecated; the bounds below are deliberate.
    return (
        ray.data.range(len(work), override_num_blocks=len(work))
        .map_batches(read, batch_size=1, batch_format="numpy")
        .map_batches(
            ScoreTokens,
            fn_constructor_kwargs={
                "cfg": cfg,
                "model_version": staged[0].version[0],
                "run_names": names,
                "run_files": [RowFiles.of_run(one.run) for one in staged],
            },
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
            num_gpus=compute.num_gpus_per_actor / compute.actors_per_gpu,
            num_cpus=compute.num_cpus_per_actor,
            max_restarts=cfg.scoring.max_actor_restarts,
            max_task_retries=cfg.scoring.max_task_retries,
        )
        .map_batches(write, batch_size=None, batch_format="pyarrow")
    )


def _drive(
    ds,
    pending_rows: int,
    cfg: Config,
    desc: str,
    on_marker: Callable[[dict], None] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Consume the dataset with a progress bar, a wall-clock limit (default
    `scoring.timeout_s`) and a stall watchdog; `on_marker` sees each marker as it arrives."""
    events: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for marker in batch["marker"].to_pylist():
                    events.put(("shard", json.loads(marker)))
            events.put(("done", None))
        except BaseException as err:  # surfaced in the driver thread below
            events.put(("error", err))

    consumer = threading.Thread(target=consume, daemon=True, name="optirag-consume")
    consumer.start()
    try:
        _watch(events, pending_rows, cfg, desc, on_marker, timeout_s)
    except BaseException:
        _stop_consumer(consumer)
        raise


class _GivenUp(BaseException):
    """Raised inside the consume thread when the driver has failed the graph."""


def _stop_consumer(consumer: threading.Thread) -> None:
    """Stop pulling from a graph the driver gave up on. Raising inside the consume thread
    makes Ray Data's iterator shut its executor down, which releases the actors' CPUs/GPUs;
    left alone, an abandoned graph keeps them and a rerun in the same cluster waits forever.
    (The thread blocks in Ray Data's polling loop, in Python, so the exception lands.)"""
    if not consumer.is_alive() or consumer.ident is None:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(consumer.ident), ctypes.py_object(_GivenUp)
    )
    consumer.join(timeout=60)
    if consumer.is_alive():
        log.warning("the abandoned scoring graph did not stop within 60 s")


def _watch(
    events: queue.Queue,
    pending_rows: int,
    cfg: Config,
    desc: str,
    on_marker: Callable[[dict], None] | None,
    timeout_s: float | None,
) -> None:
    """The driver's side of `_drive`: progress, limits, markers."""
    from tqdm.auto import tqdm

    timeout_s = timeout_s or cfg.scoring.timeout_s
    deadline = time.monotonic() + timeout_s
    timed_out = f"timed out after {timeout_s:.0f}s (scoring.timeout_s={cfg.scoring.timeout_s}s)"
    with tqdm(total=pending_rows, unit="pairs", desc=desc, smoothing=0.1) as bar:
        while True:
            wait = min(cfg.scoring.stall_timeout_s, deadline - time.monotonic())
            if wait <= 0:
                raise runs.RunFailed(timed_out)
            try:
                kind, payload = events.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise runs.RunFailed(timed_out) from None
                raise runs.RunFailed(
                    f"stalled: no shard finished in scoring.stall_timeout_s="
                    f"{cfg.scoring.stall_timeout_s}s"
                ) from None
            if kind == "done":
                return
            if kind == "error":
                raise runs.RunFailed(f"scoring failed: {payload}") from payload
            bar.update(payload["input_rows"])
            if on_marker is not None:
                on_marker(payload)
