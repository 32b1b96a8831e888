"""The scoring job on Ray: candidates -> Ray Data -> an actor pool of early-exit scorers ->
scores and rejects as Parquet, committed exactly once per shard (optirag.runs).

    read shard (task) ─► ScoreShard (actor pool, one model replica each) ─► write shard (task)
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

from optirag import artifacts as A
from optirag import runs, storage
from optirag import schema as S
from optirag.config import Config
from optirag.context import ContextStore, ItemRatings, user_filter

log = logging.getLogger(__name__)


class ScoreShard:
    """Ray Data actor: one early-exit model replica, scoring a whole shard per call."""

    def __init__(
        self,
        cfg: Config,
        inputs: runs.Inputs,
        model_version: str,
        item_ratings: ItemRatings | None = None,
    ) -> None:
        """`item_ratings`: the history's per-item totals (prompts.target_ratings), computed
        once by the driver rather than by every actor."""
        import torch

        from optirag.backbone import load_backbone
        from optirag.pair_scorer import make_pair_scorer

        if cfg.compute.torch_threads:
            torch.set_num_threads(cfg.compute.torch_threads)
        self.history = storage.open_dataset(inputs.history, cfg.storage, S.INTERACTIONS)
        self.neighbors = (
            storage.open_dataset(inputs.neighbors, cfg.storage, S.NEIGHBORS)
            if inputs.neighbors
            else None
        )
        items = storage.read_table(inputs.items, cfg.storage, S.ITEMS)
        if cfg.prompts.target_ratings and item_ratings is None:
            raise ValueError("prompts.target_ratings needs the history's item_ratings")
        # User-side tables are loaded per shard (_load_users); only item-side ones stay resident.
        self.contexts = ContextStore(
            S.INTERACTIONS.empty_table(), items, None, cfg.prompts, item_ratings=item_ratings
        )
        backbone = load_backbone(cfg.backbone)
        model = A.load_scoring_model(cfg, backbone)
        self.scorer = make_pair_scorer(cfg, backbone, model, self.contexts)
        self.model_version = model_version

    def _load_users(self, users: np.ndarray) -> None:
        """This shard's users' histories and neighbour lists, and their neighbours' histories."""
        neighbors, wanted = None, users
        if self.neighbors is not None:
            neighbors = self.neighbors.to_table(filter=user_filter(users))
            neighbor_ids = pc.list_flatten(neighbors[S.NEIGHBOR_IDS]).to_numpy()
            wanted = np.union1d(users, neighbor_ids)
        history = self.history.to_table(columns=S.INTERACTIONS.names, filter=user_filter(wanted))
        self.contexts.load_users(history, neighbors)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch[S.REASON]).to_numpy(zero_copy_only=False)
        scores = np.full(len(batch), np.nan, dtype=np.float32)
        exits = np.zeros(len(batch), dtype=np.int16)
        if ok.any():
            users = batch[S.USER_ID].to_numpy(zero_copy_only=False)[ok].astype(np.int64)
            self._load_users(np.unique(users))
            result = self.scorer.score(
                users, batch[S.ITEM_ID].to_numpy(zero_copy_only=False)[ok].astype(np.int64)
            )
            scores[ok], exits[ok] = result.scores, result.exit_layers
        batch = batch.append_column(S.SCORE, pa.array(scores, pa.float32()))
        batch = batch.append_column(S.EXIT_LAYER, pa.array(exits, pa.int16()))
        return batch.append_column(
            S.MODEL_VERSION, pa.array([self.model_version] * len(batch), pa.string())
        )


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
        # One pass over the history, batch by batch, for every actor.
        item_ratings = None
        if cfg.prompts.target_ratings:
            history = storage.open_dataset(inputs.history, store, S.INTERACTIONS)
            item_ratings = ItemRatings.totals(history)

        def read(batch: dict[str, np.ndarray]) -> pa.Table:
            return runs.read_staged_shard(paths, pending[int(batch["id"][0])], store)

        compute = cfg.compute
        # Ray 2.60 has no named parameters for actor retries yet, only **ray_remote_args,
        # which it flags as deprecated; the bounds below are deliberate.
        ds = (
            ray.data.range(len(pending), override_num_blocks=len(pending))
            .map_batches(read, batch_size=1, batch_format="numpy")
            .map_batches(
                ScoreShard,
                fn_constructor_kwargs={
                    "cfg": cfg,
                    "inputs": inputs,
                    "model_version": version[0],
                    "item_ratings": item_ratings,
                },  # fmt: skip
                batch_size=None,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
                num_gpus=compute.num_gpus_per_actor,
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
