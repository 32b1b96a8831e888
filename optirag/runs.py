"""The scoring run protocol, free of Ray: exactly once on storage without rename or
transactions.

A run splits its input into deterministic shards (listed in `_plan.json` at the start); each
shard's scores and rejects go to files named by the shard id, then a marker; a rerun of the
same run_id skips every shard whose marker verifies; the run commits by validating every
marker and writing `_manifest.json`, then `_SUCCESS`. Layout: optirag.artifacts.RunPaths.
The Ray graph that drives it is optirag.pipelines.scoring.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from optirag import artifacts as A
from optirag import schema as S
from optirag import storage
from optirag.artifacts import RunPaths
from optirag.backbone import config_digest
from optirag.config import Config

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
        return cls(
            candidates=sc.candidates_uri or A.candidates_uri(root, "test"),
            history=sc.history_uri or A.interactions_uri(root, "train"),
            items=sc.items_uri or A.items_uri(root),
            neighbors=A.prompt_neighbors_uri(cfg),
            output=A.scores_location(cfg),
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


# ----------------------------------------------------------------------------- shards


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
    name, digest = config_digest(cfg.backbone)
    if cfg.exits.heads_uri:
        digest = hashlib.sha256((digest + (A.heads_digest(cfg) or "")).encode()).hexdigest()
    return f"{name}-{digest[:10]}"


def default_run_id(cfg: Config, version: str) -> str:
    return f"{dt.date.today():%Y%m%d}-{version[-10:]}-{cfg.fingerprint()}"


@dataclass
class Run:
    """A scoring run once planned: where it writes, its shards and those still to do."""

    run_id: str
    inputs: Inputs
    paths: RunPaths
    shards: list[Shard]
    pending: list[Shard]

    @property
    def plan(self) -> dict[int, Shard]:
        return {s.shard_id: s for s in self.shards}


def start(cfg: Config, version: str) -> Run:
    """Check the locations, plan the shards (or check them against the plan of the run being
    resumed) and find the shards whose marker does not verify yet."""
    inputs = Inputs.from_config(cfg)
    check_output_location(inputs)
    run_id = cfg.scoring.run_id or default_run_id(cfg, version)
    paths = RunPaths(storage.join(inputs.output, run_id))
    if storage.exists(paths.success, cfg.storage):
        if not cfg.scoring.replace:
            raise RunRefused(f"{paths.root} already holds _SUCCESS; set scoring.replace=true")
        fs, path = storage.resolve(paths.root, cfg.storage)
        fs.delete_dir(path)

    shards = plan_shards(inputs.candidates, cfg)
    # Fail here, naming the file, rather than in every actor.
    for uri, required in (
        (inputs.history, S.INTERACTIONS),
        (inputs.items, S.ITEMS),
        (inputs.neighbors, S.NEIGHBORS),
    ):
        if uri:
            storage.checked_files(uri, cfg.storage, required)
    load_or_write_plan(paths, shards, cfg, inputs)
    pending = [s for s in shards if marker_ok(paths, s, cfg) is None]
    total_rows = sum(s.length for s in shards)
    log.info("run %s: %d shards (%d pending), %d candidate rows",
             run_id, len(shards), len(pending), total_rows)  # fmt: skip
    return Run(run_id, inputs, paths, shards, pending)


def load_or_write_plan(paths: RunPaths, shards: list[Shard], cfg: Config, inputs: Inputs):
    plan = {"candidates": inputs.candidates, "shards": [dataclasses.asdict(s) for s in shards]}
    if storage.exists(paths.plan, cfg.storage):
        previous = storage.read_json(paths.plan, cfg.storage)
        if previous != plan:
            raise RunRefused(
                f"{paths.root}: the input changed since this run started; use a new run_id"
            )
        return
    storage.write_json(plan, paths.plan, cfg.storage)


def marker_ok(paths: RunPaths, shard: Shard, cfg: Config) -> dict | None:
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


def commit(run: Run, cfg: Config, version: str, started: float) -> dict:
    """Validate every shard's marker, then write _manifest.json and _SUCCESS."""
    paths, shards, inputs, run_id = run.paths, run.shards, run.inputs, run.run_id
    markers = []
    for shard in shards:
        marker = marker_ok(paths, shard, cfg)
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
