"""The scoring job on Ray: candidates -> Ray Data -> token blocks -> an actor pool of
early-exit models -> scores and rejects as Parquet, committed exactly once per shard
(optirag.runs).

    context tables (optirag.pipelines.context: built once per set of inputs, else reused)
    read parts (tasks: ids checked, each row tagged with its user's shard; rows of shards
        already written are dropped)
    keyed shuffle by (run, shard) ─► per shard: duplicates rejected, tokens assembled, cut
        into pieces under the block size (tasks) ─► ScoreTokens (actor pool, one model
        replica each, nothing per user) ─► write pieces (tasks)

A shard is a range of user hashes, so its users' context rows are one stretch of the users
table; assembling tokens is CPU work of its own tasks, apart from the model actors. The
driver plans, lists what is done, watches and commits; its per-file work runs in tasks
(optirag.pipelines.parallel).
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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from optirag import runs, storage
from optirag import schema as S
from optirag.config import Config
from optirag.context_tables import TokenAssembler, cut_block, score_block
from optirag.ids import hash_range
from optirag.pipelines import context
from optirag.pipelines.parallel import ShuffleRoutes, in_tasks, releasing, task_ids

log = logging.getLogger(__name__)

TOKEN_COLUMNS = [S.PREFIX_IDS, S.SUFFIX_IDS, S.SIDE]
RUN = "_run"  # which of the runs scored together a row belongs to; dropped before writing
ROUTE = "_route"  # its (run, shard)'s key in the staging shuffle (`ShuffleRoutes`); dropped
RUN_ERRORS = (ValueError, OSError, RuntimeError)  # what fails a run (RunFailed: RuntimeError)
WRITES_PER_ACTOR = 2  # write tasks at once per scoring actor (they hold no CPU)
COUNTER_TIMEOUT_S = 5.0  # the progress counter's answer, from a task or the driver


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


# Per worker process, by context build: the tokenizer loads once, the item table is read once
# (not once per shard: a shard's items are most of them at scale).
_ASSEMBLERS: dict[str, TokenAssembler] = {}
_ITEM_TABLES: dict[str, pa.Table] = {}


def assemble_shard(
    table: pa.Table, shard_id: int, num_shards: int, tables: context.ContextTables, cfg: Config
) -> pa.Table:
    """A staged shard joined with its users' and items' context rows into a token block."""
    build = tables.paths.folder
    if build not in _ASSEMBLERS:
        _ASSEMBLERS[build] = tables.assembler(cfg)
    if build not in _ITEM_TABLES:
        _ITEM_TABLES[build] = tables.read_items(None, cfg.storage)
    ok = pc.is_null(table[S.REASON])
    users = np.unique(pc.filter(table[S.USER_ID], ok).to_numpy().astype(np.int64))
    low, high = hash_range(shard_id, num_shards)
    user_rows = tables.read_users(users, low, high, cfg.storage)
    return _ASSEMBLERS[build].assemble(table, user_rows, _ITEM_TABLES[build])


@dataclass
class Planned:
    """A run planned and checked against what an earlier invocation wrote: the rows left
    to score (those of shards without every piece written), then the commit."""

    cfg: Config
    run: runs.Run
    version: tuple[str, dict]
    done: dict[int, list[runs.Piece]]  # shards written before this invocation
    started: float

    @property
    def pending_rows(self) -> int:
        return self.run.total_rows - sum(p.rows for found in self.done.values() for p in found)

    def commit(self) -> dict:
        summary = runs.commit(self.run, self.cfg, self.version, self.started, in_tasks)
        return {**summary, "shards_run": summary["shards"] - len(self.done)}


def run(cfg: Config, run_root: str | None = None) -> dict:
    """Score the candidates; returns the run summary. Needs ray.init() first. The run's
    folder is `<output>/<run_id>/` unless `run_root` names it (a backfill's partition)."""
    outcome = score_planned([plan(cfg, run_root)])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def plan(cfg: Config, run_root: str | None = None, *, restart_if_changed: bool = False) -> Planned:
    """Start (or resume) a run: plan its input and list the shards an earlier invocation
    wrote (`restart_if_changed`: see runs.start)."""
    started = time.time()
    version = runs.model_version(cfg)
    run = runs.start(
        cfg, version[0], run_root, restart_if_changed=restart_if_changed, map_files=in_tasks
    )
    try:
        return Planned(cfg, run, version, run.done(cfg.storage), started)
    except BaseException:
        run.release()
        raise


OnDone = Callable[[int, "dict | Exception"], None]


def score_planned(planned: list[Planned], on_done: OnDone | None = None) -> list[dict | Exception]:
    """Score the pending rows of every planned run in one Ray Data graph (one actor pool,
    started once), committing each run as soon as its last shard is written. Returns each
    run's summary, or the exception that failed it; `on_done(i, outcome)` is called as each
    run finishes (an exception it raises is logged, not the run's). The runs must share their
    model, history, items and neighbours (a backfill's partitions do) and are scored with
    the first one's config; the graph's wall-clock limit is `scoring.timeout_s` times the
    number of runs it scores."""
    outcomes: dict[int, dict | Exception] = {}
    cfg = planned[0].cfg if planned else None

    def finish(i: int, error: Exception | None = None) -> None:
        if error is None:
            try:
                outcomes[i] = planned[i].commit()
            except RUN_ERRORS as err:
                outcomes[i] = err
        else:
            outcomes[i] = error
        if on_done is not None:
            try:
                on_done(i, outcomes[i])
            except Exception:  # a report's failure is not the run's
                log.exception("after run %s finished", planned[i].run.run_id)
        planned[i].run.release()  # the run is done with: another invocation may take it

    try:
        return _score_planned(planned, finish, outcomes, cfg)
    finally:
        for one in planned:
            one.run.release()


def _score_planned(planned: list[Planned], finish, outcomes: dict, cfg) -> list[dict | Exception]:
    left = {i: one.pending_rows for i, one in enumerate(planned)}
    for i, rows in left.items():
        if not rows:
            finish(i)
    left = {i: rows for i, rows in left.items() if rows}
    if left:
        shared = {
            (one.version[0], one.run.inputs.history, one.run.inputs.items, one.run.inputs.neighbors)
            for one in planned
        }
        if len(shared) != 1:
            raise ValueError(
                "runs scored together must share the model, history, items and neighbours"
            )

        def on_piece(marker: dict) -> None:
            left[marker[RUN]] -= marker["input_rows"]
            if left[marker[RUN]] == 0:
                finish(marker[RUN])

        rows = sum(left.values())
        timeout = cfg.scoring.timeout_s * len(left)
        try:
            graph, progress = _scoring_graph(planned, sorted(left), cfg)
            _drive(graph, rows, cfg, "scoring", on_piece, timeout, progress)
        except RUN_ERRORS as err:
            for i in left:
                if i not in outcomes:
                    finish(i, err)
    return [outcomes[i] for i in range(len(planned))]


@ray.remote(num_cpus=0)
class StagingProgress:
    """Input rows read, then staged (gathered into their shard's token block), so far, told
    by the tasks: the driver's progress and stall watch before shards are written (no shard
    finishes before the shuffle has gathered all its rows)."""

    def __init__(self) -> None:
        self.rows = {"read": 0, "staged": 0}

    def add(self, stage: str, rows: int) -> None:
        self.rows[stage] += rows

    def get(self) -> dict[str, int]:
        return self.rows


def _tell(progress, stage: str, rows: int) -> None:
    """Count rows on the driver's bars, waiting for the count to land (so the bars end at
    every row), but never failing the task: a lost count costs a bar, not a run."""
    try:
        ray.get(progress.add.remote(stage, rows), timeout=COUNTER_TIMEOUT_S)
    except ray.exceptions.RayError:
        log.debug("a %s count of %d rows was not told", stage, rows, exc_info=True)


def _scoring_graph(planned: list[Planned], pending: list[int], cfg: Config):
    """read parts (tasks) -> keyed shuffle by (run, shard) -> mark duplicates, assemble
    tokens, cut by bytes (tasks) -> ScoreTokens (actor pool) -> write pieces (tasks)."""
    first = planned[0].run.inputs
    tables = context.build(cfg, first.history, first.items, first.neighbors)
    store = cfg.storage
    fs, _ = storage.resolve(first.candidates, store)
    targets = [(one.cfg, one.run.paths, one.run.num_shards, set(one.done)) for one in planned]
    work = [(i, part) for i in pending for part in planned[i].run.parts]
    names = [f"{one.run.run_id} (input {one.run.inputs.candidates})" for one in planned]
    # beside the driver: a counter on a node that fails would fail the run with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = StagingProgress.options(scheduling_strategy=here).remote()
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    # Ray Data's output buffer emits a block once it holds the block size and slices one
    # over 1.5 times it. Pieces of an eighth (plus a row: rows are far smaller) never reach
    # that, so Ray never slices a piece and a shard of any size is written whole, in pieces
    # (runs.write_pieces).
    # A small input (`scoring.shuffle_min_rows`) is read and grouped in one task: Ray Data's
    # shuffle costs seconds to start, more than such a run takes to score on a GPU.
    small = sum(planned[i].pending_rows for i in pending) < cfg.scoring.shuffle_min_rows
    tasks = 1 if small else len(work)
    source = task_ids(tasks, cfg.compute)
    if cfg.scoring.max_block_mib:
        source.context.target_max_block_size = int(cfg.scoring.max_block_mib * 2**20)
    budget = max(1, source.context.target_max_block_size // 8)
    # each pending (run, shard) a partition of its own, up to MAX_PARTITIONS: numbered across
    # the runs scored together, a resumed run's written shards left out
    group_of, groups = {}, 0
    for i in pending:
        _, _, num_shards, done = targets[i]
        todo = np.ones(num_shards, dtype=bool)
        todo[sorted(done)] = False
        group_of[i] = np.cumsum(todo) - 1 + groups  # read for the shards to do only
        groups += int(todo.sum())
    routes = ShuffleRoutes(groups, ROUTE)

    def read(batch: dict[str, np.ndarray]) -> pa.Table:
        i, part = work[int(batch["id"][0])]
        _, _, num_shards, done = targets[i]
        with naming_the_run(names, i, None, [part.path]):
            table = runs.with_shards(runs.read_part(part, fs), num_shards)
        if done:
            table = table.filter(pc.invert(pc.is_in(table[runs.SHARD_ID], pa.array(sorted(done)))))
        _tell(progress, "read", len(table))  # a resumed run's written shards not counted
        routed = routes.key(group_of[i][table[runs.SHARD_ID].to_numpy()])
        table = table.append_column(ROUTE, pa.array(routed, pa.int64()))
        return table.append_column(RUN, pa.array(np.full(len(table), i, dtype=np.int64)))

    def read_all(batch: dict[str, np.ndarray]):
        """Every pending part, then each (run, shard) group: the shuffle in one task."""
        rows = pa.concat_tables([read({"id": [k]}) for k in range(len(work))])
        keys = np.stack([rows[RUN].to_numpy(), rows[runs.SHARD_ID].to_numpy()], 1)
        for key in np.unique(keys, axis=0):
            yield from assemble(rows.filter(pa.array((keys == key).all(axis=1))))

    def assemble(group: pa.Table):
        i, shard = int(group[RUN][0].as_py()), int(group[runs.SHARD_ID][0].as_py())
        _, _, num_shards, _ = targets[i]
        with naming_the_run(names, i, shard):
            table = runs.mark_duplicates(group.drop_columns([RUN, ROUTE, runs.SHARD_ID]))
            block = assemble_shard(table, shard, num_shards, tables, cfg)
        _tell(progress, "staged", len(group))
        for piece in runs.label_pieces(cut_block(block, budget), shard):
            yield piece.append_column(RUN, pa.array(np.full(len(piece), i, dtype=np.int64)))

    def write(batch: pa.Table) -> pa.Table:
        markers = []
        for i in np.unique(batch[RUN].to_numpy()).tolist():
            run_cfg, paths, _, _ = targets[i]
            one = batch.filter(pc.equal(batch[RUN], i)).drop_columns([RUN])
            markers += [{**m, RUN: i} for m in runs.write_pieces(one, run_cfg, paths)]
        return pa.table({"marker": [json.dumps(m) for m in markers]})

    compute = cfg.compute
    _warn_if_actors_leave_no_cpu(compute)
    # Ray 2.60 has no named parameters for actor retries yet, only **ray_remote_args,
    # which it flags as deprecated; the bounds below are deliberate.
    if small:
        staged = source.map_batches(read_all, batch_size=1, batch_format="numpy")
    else:
        read_rows = source.map_batches(read, batch_size=1, batch_format="numpy")
        staged = routes.groupby(read_rows).map_groups(releasing(assemble), batch_format="pyarrow")
    graph = staged.map_batches(
        ScoreTokens,
        fn_constructor_kwargs={
            "cfg": cfg,
            "model_version": planned[0].version[0],
            "run_names": names,
            "run_files": [RowFiles.of_run(one.run) for one in planned],
        },
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
        num_gpus=compute.num_gpus_per_actor / compute.actors_per_gpu,
        num_cpus=compute.num_cpus_per_actor,
        max_restarts=cfg.scoring.max_actor_restarts,
        max_task_retries=cfg.scoring.max_task_retries,
    ).map_batches(
        write,
        batch_size=None,
        batch_format="pyarrow",
        # Writing takes no CPU of its own: Ray Data reserves CPUs for the upstream ops first
        # and splits what is left among all the ops, so a write needing a CPU took a share
        # of the one the actor left on a small cluster and so did the staging reduce: neither
        # could start a task, the scored pieces filled the actors' output budget and the
        # run stalled. An op needing no CPU gets no share (docs/design.md).
        num_cpus=0,
        compute=TaskPoolStrategy(size=WRITES_PER_ACTOR * compute.max_actors),
    )
    return graph, progress


def _warn_if_actors_leave_no_cpu(compute) -> None:
    """The staging tasks need a CPU beside the actors: a cluster whose actors can hold every
    CPU but one scores a task at a time, and one they fill may stall."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    held = compute.max_actors * compute.num_cpus_per_actor
    if cpus < held + 1:
        log.warning(
            "the scoring actors may hold %g of the cluster's %g CPUs (compute.max_actors x "
            "compute.num_cpus_per_actor), leaving less than the one CPU a staging task needs: "
            "the run may stall unless the cluster grows",
            held,
            cpus,
        )


def _drive(
    ds,
    pending_rows: int,
    cfg: Config,
    desc: str,
    on_marker: Callable[[dict], None] | None = None,
    timeout_s: float | None = None,
    progress=None,
) -> None:
    """Consume the dataset with progress bars, a wall-clock limit (default
    `scoring.timeout_s`) and a stall watchdog; `on_marker` sees each marker as it arrives;
    `progress` (a StagingProgress) counts the rows read and staged, which also keeps the
    watchdog quiet while the shuffle gathers the shards."""
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
        _watch(events, pending_rows, cfg, desc, on_marker, timeout_s, progress)
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


WATCH_TICK_S = 5.0


def _watch(
    events: queue.Queue,
    pending_rows: int,
    cfg: Config,
    desc: str,
    on_marker: Callable[[dict], None] | None,
    timeout_s: float | None,
    progress=None,
) -> None:
    """The driver's side of `_drive`: progress, limits, markers."""
    from tqdm.auto import tqdm

    timeout_s = timeout_s or cfg.scoring.timeout_s
    stall_s = cfg.scoring.stall_timeout_s
    deadline = time.monotonic() + timeout_s
    timed_out = f"timed out after {timeout_s:.0f}s (scoring.timeout_s={cfg.scoring.timeout_s}s)"
    stages = ("read", "staged") if progress is not None else ()
    bars = {
        stage: tqdm(total=pending_rows, unit="pairs", desc=stage, smoothing=0.1)
        for stage in (*stages, desc)
    }

    def staging_moved() -> bool:
        """Bring the read and staged bars up to the tasks' counts; whether one moved. A
        counter that does not answer costs the bars, not the run: it is asked no more."""
        nonlocal progress
        if progress is None:
            return False
        try:
            counts = ray.get(progress.get.remote(), timeout=COUNTER_TIMEOUT_S)
        except ray.exceptions.RayError as err:
            log.warning("the read and staged counts stop here (%s: %s)", type(err).__name__, err)
            progress = None
            return False
        grew = False
        for stage, rows in counts.items():
            rows = min(rows, pending_rows)  # a retried task counts twice
            if rows > bars[stage].n:
                bars[stage].update(rows - bars[stage].n)
                grew = True
        return grew

    tick = min(WATCH_TICK_S, stall_s / 2)
    moved = polled = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise runs.RunFailed(timed_out)
            if now - polled >= tick:
                polled = now
                moved = now if staging_moved() else moved
            if now - moved >= stall_s:
                raise runs.RunFailed(
                    f"stalled: no shard finished and no input was read or staged in "
                    f"scoring.stall_timeout_s={stall_s}s"
                )
            try:
                kind, payload = events.get(timeout=min(tick, deadline - now))
            except queue.Empty:
                continue
            if kind == "done":
                staging_moved()
                return
            if kind == "error":
                raise runs.RunFailed(f"scoring failed: {payload}") from payload
            moved = time.monotonic()
            bars[desc].update(payload["input_rows"])
            if on_marker is not None:
                on_marker(payload)
    finally:
        for bar in bars.values():
            bar.close()
