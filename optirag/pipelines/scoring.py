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

import json
import logging
import queue
import threading
import time
import warnings

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


class ScoreTokens:
    """Ray Data actor: one early-exit model replica (backbone and heads, nothing per user or
    item), scoring a whole shard's token block per call."""

    def __init__(self, cfg: Config, model_version: str) -> None:
        import torch

        from optirag import artifacts as A
        from optirag.backbone import load_backbone
        from optirag.pair_scorer import make_token_scorer

        if cfg.compute.torch_threads:
            torch.set_num_threads(cfg.compute.torch_threads)
        backbone = load_backbone(cfg.backbone)
        model = A.load_scoring_model(cfg, backbone, side_features=False)
        self.scorer = make_token_scorer(cfg, backbone, model)
        self.model_version = model_version

    def __call__(self, batch: pa.Table) -> pa.Table:
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


def run(cfg: Config, run_root: str | None = None) -> dict:
    """Score the candidates; returns the run summary. Needs ray.init() first. The run's
    folder is `<output>/<run_id>/` unless `run_root` names it (a backfill's partition)."""
    started = time.time()
    store = cfg.storage
    version = runs.model_version(cfg)
    run = runs.start(cfg, version[0], run_root)
    paths, inputs = run.paths, run.inputs
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

    parts = run.pending_parts(store)
    if parts:
        items = storage.read_table(inputs.items, store, columns=[S.ITEM_ID])
        known_items = ray.put(items[S.ITEM_ID].to_numpy())
        fs, _ = storage.resolve(inputs.candidates, store)

        def stage(batch: dict[str, np.ndarray]) -> pa.Table:
            part = parts[int(batch["id"][0])]
            table = runs.read_part(part, fs, ray.get(known_items))
            marker = runs.stage_part(part, table, run.num_shards, paths, cfg)
            return pa.table({"marker": [json.dumps(marker)]})

        ds = ray.data.range(len(parts), override_num_blocks=len(parts)).map_batches(
            stage, batch_size=1, batch_format="numpy"
        )
        _drive(ds, sum(p.length for p in parts), cfg, "staging by user")

    lengths = run.shard_lengths(store)
    pending = run.pending_shards(lengths, store)
    if pending:
        tables = context.build(cfg, inputs.history, inputs.items, inputs.neighbors)
        num_shards = run.num_shards

        def read(batch: dict[str, np.ndarray]) -> pa.Table:
            shard_id = pending[int(batch["id"][0])]
            table = runs.read_staged_shard(paths, shard_id, store)
            return assemble_shard(table, shard_id, num_shards, tables, cfg)

        compute = cfg.compute
        # Ray 2.60 has no named parameters for actor retries yet, only **ray_remote_args,
        # which it flags as deprecated; the bounds below are deliberate.
        ds = (
            ray.data.range(len(pending), override_num_blocks=len(pending))
            .map_batches(read, batch_size=1, batch_format="numpy")
            .map_batches(
                ScoreTokens,
                fn_constructor_kwargs={"cfg": cfg, "model_version": version[0]},
                batch_size=None,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
                num_gpus=compute.num_gpus_per_actor / compute.actors_per_gpu,
                num_cpus=compute.num_cpus_per_actor,
                max_restarts=cfg.scoring.max_actor_restarts,
                max_task_retries=cfg.scoring.max_task_retries,
            )
            .map_batches(
                runs.write_shard,
                fn_kwargs={"cfg": cfg, "paths": paths, "lengths": lengths},
                batch_size=None,
                batch_format="pyarrow",
            )
        )
        _drive(ds, sum(lengths[s] for s in pending), cfg, "scoring")

    summary = runs.commit(run, lengths, cfg, version, started)
    return {**summary, "shards": len(lengths), "shards_run": len(pending)}


def _drive(ds, pending_rows: int, cfg: Config, desc: str) -> None:
    """Consume the dataset with a progress bar, a wall-clock limit and a stall watchdog."""
    from tqdm.auto import tqdm

    events: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for marker in batch["marker"].to_pylist():
                    events.put(("shard", json.loads(marker)))
            events.put(("done", None))
        except BaseException as err:  # surfaced in the driver thread below
            events.put(("error", err))

    threading.Thread(target=consume, daemon=True, name="optirag-consume").start()
    deadline = time.monotonic() + cfg.scoring.timeout_s
    with tqdm(total=pending_rows, unit="pairs", desc=desc, smoothing=0.1) as bar:
        while True:
            wait = min(cfg.scoring.stall_timeout_s, deadline - time.monotonic())
            if wait <= 0:
                raise runs.RunFailed(f"timed out after scoring.timeout_s={cfg.scoring.timeout_s}s")
            try:
                kind, payload = events.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise runs.RunFailed(
                        f"timed out after scoring.timeout_s={cfg.scoring.timeout_s}s"
                    ) from None
                raise runs.RunFailed(
                    f"stalled: no shard finished in scoring.stall_timeout_s="
                    f"{cfg.scoring.stall_timeout_s}s"
                ) from None
            if kind == "done":
                return
            if kind == "error":
                raise runs.RunFailed(f"scoring failed: {payload}") from payload
            bar.update(payload["input_rows"])
