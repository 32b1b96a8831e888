"""The distributed scoring job: candidates -> Ray Data -> an actor pool of early-exit scorers ->
scores and rejects as Parquet, committed exactly once per shard.

    read shard (task) ─► ScoreShard (actor pool, one model replica each) ─► write shard (task)

Output of a run under `<output>/<run_id>/` (object storage has no rename, so every file name
is fixed by its shard id and a retry rewrites the same object):
    _plan.json                   the input split into shards, written once at the start
    scores/shard-NNNNNN.parquet  user_id, item_id, score, exit_layer, model_version, pass-through
    rejects/shard-NNNNNN.parquet the input row's columns + reason
    _markers/shard-NNNNNN.json   written after both files: the shard is done
    _manifest.json, _SUCCESS     written last, after validation

Rerunning the same run_id skips every shard whose marker verifies.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import queue
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from optirag import schema as S
from optirag import storage
from optirag.config import Config
from optirag.context import ContextStore, ItemRatings, user_filter
from optirag.data import table_uri

log = logging.getLogger(__name__)

SHARD_ID = "_shard_id"  # internal column, dropped before writing


class RunRefused(RuntimeError):
    """The run would overwrite a published run or write where it must not."""


class RunFailed(RuntimeError):
    """The run timed out, stalled or failed validation; nothing is published."""


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Shard:
    shard_id: int
    path: str  # inside the candidates filesystem
    row_group: int
    start: int  # first row inside the row group
    length: int


@dataclass(frozen=True)
class Inputs:
    candidates: str
    history: str
    items: str
    neighbors: str | None
    output: str

    @classmethod
    def from_config(cls, cfg: Config) -> Inputs:
        sc, root = cfg.scoring, cfg.storage.root
        neighbors = sc.neighbors_uri
        default_neighbors = storage.join(root, "neighbors", "gcn.parquet")
        if neighbors is None and storage.exists(default_neighbors, cfg.storage):
            neighbors = default_neighbors
        return cls(
            candidates=sc.candidates_uri or table_uri(root, "candidates", "test"),
            history=sc.history_uri or table_uri(root, "interactions", "train"),
            items=sc.items_uri or table_uri(root, "items"),
            neighbors=neighbors,
            output=sc.output_uri or storage.join(root, "scores"),
        )


def plan_shards(uri: str, cfg: Config) -> list[Shard]:
    """Split the candidates into shards of at most rows_per_shard rows, by file and row
    group; fails naming the file when one is unreadable or lacks a column."""
    fs, _ = storage.resolve(uri, cfg.storage)
    files = storage.list_files(uri, cfg.storage)
    if not files:
        raise storage.StorageError(f"{uri}: no parquet files")
    step = cfg.scoring.rows_per_shard
    shards: list[Shard] = []
    for path in files:
        try:
            meta = pq.ParquetFile(path, filesystem=fs).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise storage.StorageError(f"{path}: not a readable parquet file ({err})") from None
        S.check_columns(meta.schema.to_arrow_schema(), S.CANDIDATE_KEYS, source=path)
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            for start in range(0, rows, step):
                shards.append(Shard(len(shards), path, rg, start, min(step, rows - start)))
    return shards


@dataclass(frozen=True)
class RunPaths:
    root: str

    def _shard(self, folder: str, shard_id: int, ext: str) -> str:
        return storage.join(self.root, folder, f"shard-{shard_id:06d}.{ext}")

    def scores(self, shard_id: int) -> str:
        return self._shard("scores", shard_id, "parquet")

    def rejects(self, shard_id: int) -> str:
        return self._shard("rejects", shard_id, "parquet")

    def marker(self, shard_id: int) -> str:
        return self._shard("_markers", shard_id, "json")

    @property
    def plan(self) -> str:
        return storage.join(self.root, "_plan.json")

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "_manifest.json")

    @property
    def success(self) -> str:
        return storage.join(self.root, "_SUCCESS")


def check_output_location(inputs: Inputs) -> None:
    """Refuse '..' in the output and an output inside an input folder (a later read of that
    folder would pick the scores up as input)."""
    out = inputs.output.rstrip("/")
    if ".." in out.split("/"):
        raise RunRefused(f"output {out}: '..' is not allowed in an output path")
    for source in (inputs.candidates, inputs.history, inputs.items, inputs.neighbors):
        source = (source or "").rstrip("/")
        if source and (out == source or out.startswith(source + "/")):
            raise RunRefused(f"output {out} lies inside the input {source}")


# ----------------------------------------------------------------------------- stages


def read_shard(shard: Shard, fs: pafs.FileSystem, known_items: np.ndarray) -> pa.Table:
    """One shard's rows, with the reject reason (null = to be scored) and the shard id."""
    table = pq.ParquetFile(shard.path, filesystem=fs).read_row_group(shard.row_group)
    table = table.slice(shard.start, shard.length)
    users, items = table[S.USER_ID], table[S.ITEM_ID]
    null_id = pc.or_(pc.is_null(users), pc.is_null(items))
    unknown = pc.invert(pc.is_in(items, value_set=pa.array(known_items)))
    reason = pc.if_else(
        null_id,
        S.REJECT_NULL_ID,
        pc.if_else(
            pc.fill_null(unknown, False), S.REJECT_UNKNOWN_ITEM, pa.scalar(None, pa.string())
        ),
    )
    table = table.append_column(S.REASON, reason)
    return table.append_column(SHARD_ID, pa.array(np.full(len(table), shard.shard_id)))


class ScoreShard:
    """Ray Data actor: one early-exit model replica, scoring a whole shard per call."""

    def __init__(
        self,
        cfg: Config,
        inputs: Inputs,
        model_version: str,
        item_ratings: ItemRatings | None = None,
    ) -> None:
        """`item_ratings`: the history's per-item totals (prompts.target_ratings), computed
        once by the driver rather than by every actor."""
        import torch

        from optirag.backbone import load_backbone
        from optirag.scorer import build_pair_scorer

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
        self.scorer = build_pair_scorer(cfg, self.contexts, load_backbone(cfg.backbone))
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


def write_shard(batch: pa.Table, cfg: Config, paths: RunPaths, plan: dict[int, Shard]) -> pa.Table:
    """Split a scored shard into scores and rejects, validate, write both, then the marker."""
    shard_ids = np.unique(batch[SHARD_ID].to_numpy())
    if len(shard_ids) != 1 or len(batch) != plan[int(shard_ids[0])].length:
        raise RunFailed(f"a batch must hold one whole shard, got shards {shard_ids.tolist()}")
    shard_id = int(shard_ids[0])
    batch = batch.drop_columns([SHARD_ID])
    # An all-null column may arrive typed `null` after Ray Data's block handling.
    reason_at = batch.column_names.index(S.REASON)
    batch = batch.set_column(reason_at, S.REASON, batch[S.REASON].cast(pa.string()))
    passthrough = [c for c in batch.column_names if c not in (*S.SCORE_COLUMNS.names, S.REASON)]

    rejected = pc.is_valid(batch[S.REASON])
    scored = batch.filter(pc.invert(rejected))
    scored, duplicates = _split_duplicates(scored)
    rejects = pa.concat_tables([batch.filter(rejected), duplicates])
    rejects = rejects.select([S.USER_ID, S.ITEM_ID, *passthrough, S.REASON])
    scores = scored.select([*S.SCORE_COLUMNS.names, *passthrough])
    score_values = scores[S.SCORE].to_numpy()
    if not np.all(np.isfinite(score_values) & (score_values >= 0) & (score_values <= 1)):
        raise RunFailed(f"shard {shard_id}: scores not finite in [0, 1]")

    storage.write_table(scores, paths.scores(shard_id), cfg.storage)
    storage.write_table(rejects, paths.rejects(shard_id), cfg.storage)
    exit_hist = Counter(scores[S.EXIT_LAYER].to_numpy().tolist())
    marker = {
        "shard_id": shard_id,
        "input_rows": len(batch),
        "scored": len(scores),
        "rejected": dict(Counter(rejects[S.REASON].to_pylist())),
        "exit_histogram": {str(k): v for k, v in sorted(exit_hist.items())},
    }
    storage.write_json(marker, paths.marker(shard_id), cfg.storage)
    return pa.table({"marker": [json.dumps(marker)]})


def _split_duplicates(scored: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keep the first row of each (user, item) pair; later copies become rejects."""
    users = scored[S.USER_ID].to_numpy()
    items = scored[S.ITEM_ID].to_numpy()
    _, first = np.unique(np.stack([users, items], axis=1), axis=0, return_index=True)
    is_first = np.zeros(len(scored), dtype=bool)
    is_first[first] = True
    dup = scored.filter(pa.array(~is_first))
    dup = dup.set_column(
        dup.column_names.index(S.REASON),
        S.REASON,
        pa.array(["duplicate_pair"] * len(dup), pa.string()),
    )
    return scored.filter(pa.array(is_first)), dup


# ----------------------------------------------------------------------------- driver


def model_version(cfg: Config) -> str:
    """Backbone identity plus the trained heads' hash: the scores' model_version column."""
    import hashlib

    from optirag.backbone import model_dir

    path = model_dir(cfg.backbone)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    if cfg.exits.heads_uri:
        digest.update(
            storage.read_bytes(storage.join(cfg.exits.heads_uri, "heads.safetensors"), cfg.storage)
        )
    return f"{path.name}-{digest.hexdigest()[:10]}"


def default_run_id(cfg: Config, version: str) -> str:
    return f"{dt.date.today():%Y%m%d}-{version[-10:]}-{cfg.fingerprint()}"


def _load_or_write_plan(paths: RunPaths, shards: list[Shard], cfg: Config, inputs: Inputs):
    plan = {"candidates": inputs.candidates, "shards": [dataclasses.asdict(s) for s in shards]}
    if storage.exists(paths.plan, cfg.storage):
        previous = storage.read_json(paths.plan, cfg.storage)
        if previous != plan:
            raise RunRefused(
                f"{paths.root}: the input changed since this run started; use a new run_id"
            )
        return
    storage.write_json(plan, paths.plan, cfg.storage)


def _marker_ok(paths: RunPaths, shard: Shard, cfg: Config) -> dict | None:
    """The shard's marker when it verifies (counts match the plan, both files present)."""
    try:
        marker = storage.read_json(paths.marker(shard.shard_id), cfg.storage)
    except (OSError, ValueError):
        return None
    complete = marker.get("scored", -1) + sum(marker.get("rejected", {}).values())
    files = (paths.scores(shard.shard_id), paths.rejects(shard.shard_id))
    if complete != shard.length or not all(storage.exists(f, cfg.storage) for f in files):
        return None
    return marker


def run(cfg: Config) -> dict:
    """Score the candidates; returns the run summary. Needs ray.init() first."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    inputs = Inputs.from_config(cfg)
    check_output_location(inputs)
    version = model_version(cfg)
    run_id = cfg.scoring.run_id or default_run_id(cfg, version)
    paths = RunPaths(storage.join(inputs.output, run_id))
    if storage.exists(paths.success, cfg.storage):
        if not cfg.scoring.replace:
            raise RunRefused(f"{paths.root} already holds _SUCCESS; set scoring.replace=true")
        fs, path = storage.resolve(paths.root, cfg.storage)
        fs.delete_dir(path)

    shards = plan_shards(inputs.candidates, cfg)
    # Fail here, naming the file, rather than in every actor.
    history = storage.open_dataset(inputs.history, cfg.storage, S.INTERACTIONS)
    for uri, required in ((inputs.items, S.ITEMS), (inputs.neighbors, S.NEIGHBORS)):
        if uri:
            storage.checked_files(uri, cfg.storage, required)
    _load_or_write_plan(paths, shards, cfg, inputs)
    plan = {s.shard_id: s for s in shards}
    pending = [s for s in shards if _marker_ok(paths, s, cfg) is None]
    total_rows = sum(s.length for s in shards)
    log.info(
        "run %s: %d shards (%d pending), %d candidate rows",
        run_id,
        len(shards),
        len(pending),
        total_rows,
    )

    if pending:
        known_items = ray.put(
            storage.read_table(inputs.items, cfg.storage, columns=[S.ITEM_ID])[S.ITEM_ID].to_numpy()
        )
        fs, _ = storage.resolve(inputs.candidates, cfg.storage)
        # One pass over the history, batch by batch, for every actor.
        item_ratings = ItemRatings.totals(history) if cfg.prompts.target_ratings else None

        def read(batch: dict[str, np.ndarray]) -> pa.Table:
            return read_shard(pending[int(batch["id"][0])], fs, ray.get(known_items))

        compute = cfg.compute
        # Ray 2.60 has no named parameters for actor retries yet, only **ray_remote_args,
        # which it flags as deprecated; the bounds below are deliberate.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = (
            ray.data.range(len(pending), override_num_blocks=len(pending))
            .map_batches(read, batch_size=1, batch_format="numpy")
            .map_batches(
                ScoreShard,
                fn_constructor_kwargs={
                    "cfg": cfg,
                    "inputs": inputs,
                    "model_version": version,
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
                write_shard,
                fn_kwargs={"cfg": cfg, "paths": paths, "plan": plan},
                batch_size=None,
                batch_format="pyarrow",
            )
        )
        _drive(ds, sum(s.length for s in pending), cfg)

    summary = _commit(paths, shards, cfg, inputs, version, run_id, started)
    return {**summary, "shards": len(shards), "shards_run": len(pending)}


def _drive(ds, pending_rows: int, cfg: Config) -> None:
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
    with tqdm(total=pending_rows, unit="pairs", desc="scoring", smoothing=0.1) as bar:
        while True:
            wait = min(cfg.scoring.stall_timeout_s, deadline - time.monotonic())
            if wait <= 0:
                raise RunFailed(f"timed out after scoring.timeout_s={cfg.scoring.timeout_s}s")
            try:
                kind, payload = events.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise RunFailed(
                        f"timed out after scoring.timeout_s={cfg.scoring.timeout_s}s"
                    ) from None
                raise RunFailed(
                    f"stalled: no shard finished in scoring.stall_timeout_s="
                    f"{cfg.scoring.stall_timeout_s}s"
                ) from None
            if kind == "done":
                return
            if kind == "error":
                raise RunFailed(f"scoring failed: {payload}") from payload
            bar.update(payload["input_rows"])


def _commit(paths, shards, cfg, inputs, version, run_id, started) -> dict:
    """Validate every shard's marker, then write _manifest.json and _SUCCESS."""
    markers = []
    for shard in shards:
        marker = _marker_ok(paths, shard, cfg)
        if marker is None:
            raise RunFailed(f"shard {shard.shard_id} has no valid marker; rerun to resume")
        markers.append(marker)
    scored = sum(m["scored"] for m in markers)
    rejected: Counter = Counter()
    exit_hist: Counter = Counter()
    for m in markers:
        rejected.update(m["rejected"])
        exit_hist.update({int(k): v for k, v in m["exit_histogram"].items()})
    total = sum(s.length for s in shards)
    if scored + sum(rejected.values()) != total:
        raise RunFailed(f"row count mismatch: {scored} + {sum(rejected.values())} != {total}")
    wall = time.time() - started
    mean_exit = sum(k * v for k, v in exit_hist.items()) / scored if scored else None
    summary = {
        "run_id": run_id,
        "output": paths.root,
        "candidates": total,
        "scored": scored,
        "rejected": dict(rejected),
        "exit_histogram": {str(k): v for k, v in sorted(exit_hist.items())},
        "mean_exit_layer": mean_exit,
        "model_version": version,
        "wall_s": round(wall, 2),
        "pairs_per_s": round(total / wall, 2) if wall else None,
    }
    manifest = {
        **summary,
        "inputs": dataclasses.asdict(inputs),
        "files": {
            "scores": [paths.scores(s.shard_id) for s in shards],
            "rejects": [paths.rejects(s.shard_id) for s in shards],
        },
        "config": cfg.redacted(),
        "config_fingerprint": cfg.fingerprint(),
    }
    storage.write_json(manifest, paths.manifest, cfg.storage)
    storage.write_bytes(b"", paths.success, cfg.storage)
    log.info("run %s committed: %s", run_id, json.dumps(summary))
    return summary
