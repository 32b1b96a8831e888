"""The scoring run protocol, free of Ray: exactly once on storage without rename or
transactions, and a replace that never unpublishes the run it replaces.

A run (`<output>/<run_id>/`) is tried in attempt folders. An attempt

1. plans the input into *parts* (file, row group, row range; `_plan.json`, with the shard
   count, the model version and each file's content fingerprint, so a resumed attempt can
   tell a changed input or model);
2. reads each part: its rows, checked (null ids and ids outside int64 become rejects) and
   cast to int64 ids, tagged with the *shard* of their user (a range of the user hash);
3. gathers each shard's rows (a keyed shuffle, in the job) and, with the whole shard at
   hand, rejects later copies of a pair (`mark_duplicates`): all rows of a user meet in one
   shard, so a duplicate is caught wherever it appears in the input, and a user's
   candidates share one prompt prefix;
4. scores each shard and writes it in one or more pieces: scores and rejects files named by
   shard and piece, then a marker naming the piece's rows (`write_pieces`);
5. commits: the done pieces (one listing) must hold the plan's rows, `_manifest.json` is
   written, then the run's `_SUCCESS` (one small JSON object) is pointed at the attempt;
   older attempts are deleted after.

A rerun of the same run_id resumes the newest unpublished attempt (shards whose pieces are
all written are skipped; the rest of the input is read and gathered again). With
`scoring.replace=true` a committed run gets a new attempt; until it commits, `_SUCCESS` keeps
naming the old one. Layout: optirag.artifacts.AttemptPaths. The Ray graph that drives this is
optirag.pipelines.scoring.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from optirag import artifacts as A
from optirag import schema as S
from optirag import storage
from optirag.artifacts import AttemptPaths, RunPaths
from optirag.config import Config, StorageConfig
from optirag.ids import range_of
from optirag.leases import Lease, LeaseHeld

log = logging.getLogger(__name__)

SHARD_ID = "_shard_id"  # internal columns, dropped before writing
ROW = "_row"  # the row's position in the whole input: keeps the first copy of a duplicate
PIECE, PIECES, PIECE_ROWS = "_piece", "_pieces", "_piece_rows"  # a shard cut by bytes
PIECE_COLUMNS = (PIECE, PIECES, PIECE_ROWS)
INT64_MAX = 2**63 - 1


class RunRefused(RuntimeError):
    """The run would overwrite a published run or write where it must not."""


class RunFailed(RuntimeError):
    """The run timed out, stalled or failed validation; nothing is published."""


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Part:
    part_id: int
    path: str  # inside the candidates filesystem
    row_group: int
    start: int  # first row inside the row group
    length: int
    first_row: int  # position of the part's first row in the whole input


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


def candidate_files(uri: str, cfg: Config) -> list[str]:
    """The candidates' parquet files (.parquet / .parq, any case). Any other file in the folder
    is an error naming it, or skipped with a warning when scoring.ignore_other_files."""
    files = storage.list_all_files(uri, cfg.storage)
    if files == [storage.resolve(uri, cfg.storage)[1]]:
        return files  # a single file named by the user
    others = [f for f in files if not storage.is_parquet(f)]
    if others and not cfg.scoring.ignore_other_files:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise storage.StorageError(
            f"{uri}: not parquet files: {shown} (remove them, or set "
            "scoring.ignore_other_files=true to skip them)"
        )
    if others:
        log.warning("%s: skipping %d non-parquet files, e.g. %s", uri, len(others), others[0])
    parquet = [f for f in files if storage.is_parquet(f)]
    if not parquet:
        raise storage.StorageError(f"{uri}: no parquet files")
    return parquet


# Columns the job adds to what it reads (the score columns, the reject reason, its internal
# ones, the token columns of the context stage): an input column of one of these names would
# collide with them, so such an input is refused when the run is planned. Every other input
# column is passed through to the scores and rejects.
RESERVED_COLUMNS = (
    S.SCORE,
    S.EXIT_LAYER,
    S.MODEL_VERSION,
    S.REASON,
    ROW,
    SHARD_ID,
    *PIECE_COLUMNS,
    S.USER_HASH,
    S.PREFIX_IDS,
    S.SUFFIX_IDS,
    S.SIDE,
)


def plan_parts(
    uri: str,
    cfg: Config,
    reserved: tuple[str, ...] = RESERVED_COLUMNS,
    map_files: storage.FileMap = storage.serially,
) -> tuple[list[Part], dict[str, list]]:
    """Split the candidates into parts of at most rows_per_shard rows, by file and row
    group, and pin each file by its content (storage.fingerprint); fails naming the file
    when one is unreadable or lacks a column. The files are listed once; each file's footer
    and fingerprint are read by `map_files` (parallel tasks in the job)."""
    fs, _ = storage.resolve(uri, cfg.storage)
    paths = candidate_files(uri, cfg)
    described = map_files(partial(describe_candidates, fs, storage.is_remote(uri), reserved), paths)
    step = cfg.scoring.rows_per_shard
    parts: list[Part] = []
    files: dict[str, list] = {}
    first_row = 0
    for path, (pin, row_groups) in zip(paths, described, strict=True):
        files[path] = pin
        for rg, rows in enumerate(row_groups):
            for start in range(0, rows, step):
                length = min(step, rows - start)
                parts.append(Part(len(parts), path, rg, start, length, first_row))
                first_row += length
    return parts, files


def describe_candidates(
    fs: pafs.FileSystem, remote: bool, reserved: tuple[str, ...], path: str
) -> tuple[list, list[int]]:
    """A candidates file's content fingerprint and rows per row group, its columns checked."""
    try:
        pin = storage.fingerprint(fs, path, remote=remote)
        meta = pq.ParquetFile(path, filesystem=fs).metadata
    except (pa.ArrowInvalid, OSError) as err:
        raise storage.StorageError(f"{path}: not a readable parquet file ({err})") from None
    schema = meta.schema.to_arrow_schema()
    S.check_columns(schema, S.CANDIDATE_KEYS, source=path)
    if clash := [c for c in schema.names if c in reserved]:
        raise storage.StorageError(
            f"{path}: column(s) {', '.join(clash)} collide with the columns the job writes "
            f"({', '.join(reserved)}): rename or drop them"
        )
    return pin, [meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)]


def changed_inputs(before: dict[str, list], now: dict[str, list]) -> list[str]:
    """The candidate files (paths in the input's filesystem) whose content fingerprint
    differs between two plans' `files`: changed, added or removed."""
    return sorted(p for p in set(before) | set(now) if before.get(p) != now.get(p))


# How rows go to shards and shards to files; in every plan, so that a run is never resumed
# with another rule. 2: staged by Ray Data's keyed shuffle, shards written in pieces.
SHARDING = "user-hash-ranges-2"


def shard_of(users: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of each user id: shards are equal ranges of the user hash (ids.user_hash),
    so a shard's users are one stretch of the context stage's users table."""
    return range_of(users, num_shards)


def check_output_location(inputs: Inputs, run_root: str) -> None:
    """Refuse '..' in the output, and a run folder inside an input or an input inside it (a
    later read of that folder would pick the scores up as input)."""
    out = run_root.rstrip("/")
    if ".." in out.split("/"):
        raise RunRefused(f"output {out}: '..' is not allowed in an output path")
    for source in (inputs.candidates, inputs.history, inputs.items, inputs.neighbors):
        source = (source or "").rstrip("/")
        if not source:
            continue
        if out == source or out.startswith(source + "/"):
            raise RunRefused(f"run folder {out} lies inside the input {source}")
        if source.startswith(out + "/"):
            raise RunRefused(f"input {source} lies inside the run folder {out}")


# ----------------------------------------------------------------------------- parts


def with_retries(write: Callable[[], Any], what: str, retries: int) -> Any:
    """Run a storage write, retrying (bounded, with backoff) on transient OSErrors. Every
    write here targets fixed object names, so a retry rewrites the same objects."""
    for attempt in range(retries + 1):
        try:
            return write()
        except OSError as err:
            if attempt == retries:
                raise
            log.warning("%s failed (%s); retry %d of %d", what, err, attempt + 1, retries)
            time.sleep(min(0.5 * 2**attempt, 10.0))
    return None


def _checked_ids(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(ids as int64 with out-of-range ones nulled, whether each was out of int64's range)."""
    if pa.types.is_uint64(column.type):
        too_big = pc.fill_null(pc.greater(column, pa.scalar(INT64_MAX, pa.uint64())), False)
        column = pc.if_else(too_big, pa.scalar(None, column.type), column)
    else:
        too_big = pa.chunked_array([pa.array(np.zeros(len(column), dtype=bool))])
    return column.cast(pa.int64()), too_big


def read_part(part: Part, fs: pafs.FileSystem, known_items: np.ndarray | None = None) -> pa.Table:
    """A part's rows with int64 ids, the reject reason (null = to be scored) and ROW. Items
    not in `known_items` are rejects; None leaves them to the token assembly, which rejects
    an item missing from the context tables' items (the job: no process reads every item
    id per part)."""
    table = pq.ParquetFile(part.path, filesystem=fs).read_row_group(part.row_group)
    table = table.slice(part.start, part.length)
    users, user_too_big = _checked_ids(table[S.USER_ID])
    items, item_too_big = _checked_ids(table[S.ITEM_ID])
    too_big = pc.or_(user_too_big, item_too_big)
    null_id = pc.and_(pc.invert(too_big), pc.or_(pc.is_null(users), pc.is_null(items)))
    unknown = pa.scalar(False)
    if known_items is not None:
        unknown = pc.fill_null(pc.invert(pc.is_in(items, value_set=pa.array(known_items))), False)
    no_reason = pa.scalar(None, pa.string())
    reason = pc.if_else(
        too_big,
        S.REJECT_ID_OUT_OF_RANGE,
        pc.if_else(
            null_id, S.REJECT_NULL_ID, pc.if_else(unknown, S.REJECT_UNKNOWN_ITEM, no_reason)
        ),
    )
    table = table.set_column(table.column_names.index(S.USER_ID), S.USER_ID, users)
    table = table.set_column(table.column_names.index(S.ITEM_ID), S.ITEM_ID, items)
    table = table.append_column(S.REASON, reason)
    rows = np.arange(part.first_row, part.first_row + len(table), dtype=np.int64)
    return table.append_column(ROW, pa.array(rows))


def with_shards(table: pa.Table, num_shards: int) -> pa.Table:
    """A part's rows with the shard of their user (SHARD_ID)."""
    users = table[S.USER_ID].fill_null(0).to_numpy()
    return table.append_column(SHARD_ID, pa.array(shard_of(users, num_shards)))


def mark_duplicates(shard: pa.Table) -> pa.Table:
    """A whole shard (every row of its users, any order) sorted by ROW, with every later copy
    of a (user, item) pair among the rows still to be scored rejected as a duplicate: the
    first copy in the input wins, wherever the copies sat in the input. An input row that
    arrives twice (its part read twice) fails the run: the commit's row sum assumes none."""
    shard = shard.sort_by(ROW)
    rows = shard[ROW].to_numpy()
    if len(rows) > 1 and (twice := rows[1:][rows[1:] == rows[:-1]]).size:
        raise RunFailed(f"input row {int(twice[0])} reached its shard twice")
    ok = pc.is_null(shard[S.REASON]).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok)
    keys = np.stack([shard[S.USER_ID].to_numpy()[rows], shard[S.ITEM_ID].to_numpy()[rows]], 1)
    _, first = np.unique(keys, axis=0, return_index=True)
    later = np.ones(len(rows), dtype=bool)
    later[first] = False
    if not later.any():
        return shard
    reasons = np.asarray(shard[S.REASON].to_pylist(), dtype=object)
    reasons[rows[later]] = S.REJECT_DUPLICATE_PAIR
    at = shard.column_names.index(S.REASON)
    return shard.set_column(at, S.REASON, pa.array(reasons, pa.string()))


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Piece:
    """Piece `piece` of `pieces` of a shard, holding `rows` input rows."""

    shard: int
    piece: int
    pieces: int
    rows: int


def label_pieces(pieces: list[pa.Table], shard: int) -> list[pa.Table]:
    """A shard's pieces (a whole shard, cut in order) with the shard and piece columns."""
    labelled = []
    for j, piece in enumerate(pieces):
        n = len(piece)
        for name, value in ((SHARD_ID, shard), (PIECE, j), (PIECES, len(pieces)), (PIECE_ROWS, n)):
            piece = piece.append_column(name, pa.array(np.full(n, value, dtype=np.int64)))
        labelled.append(piece)
    return labelled


def write_pieces(batch: pa.Table, cfg: Config, paths: AttemptPaths) -> list[dict]:
    """Write every piece a scored batch holds (see `write_piece`); returns their markers.
    Ray Data may hand over several pieces in one batch, never part of one: a piece that
    arrives incomplete fails the run rather than be written short."""
    keys = np.stack([batch[c].to_numpy() for c in (SHARD_ID, PIECE, PIECES, PIECE_ROWS)], 1)
    markers = []
    for key in np.unique(keys, axis=0):
        shard, piece, pieces, rows = (int(k) for k in key)
        one = batch.filter(pa.array((keys == key).all(axis=1)))
        if len(one) != rows:
            raise RunFailed(f"shard {shard} piece {piece}: got {len(one)} of its {rows} rows")
        markers.append(write_piece(one, cfg, paths, Piece(shard, piece, pieces, rows)))
    return markers


def write_piece(batch: pa.Table, cfg: Config, paths: AttemptPaths, piece: Piece) -> dict:
    """Split a scored piece into scores and rejects (duplicates are already rejects:
    `mark_duplicates`), validate, write both, then the marker; returns the marker."""
    batch = batch.sort_by(ROW).drop_columns([SHARD_ID, ROW, *PIECE_COLUMNS])
    # An all-null column may arrive typed `null` after Ray Data's block handling.
    reason_at = batch.column_names.index(S.REASON)
    batch = batch.set_column(reason_at, S.REASON, batch[S.REASON].cast(pa.string()))
    for name in (S.USER_ID, S.ITEM_ID):
        batch = batch.set_column(batch.column_names.index(name), name, batch[name].cast(pa.int64()))
    passthrough = [c for c in batch.column_names if c not in (*S.SCORE_COLUMNS.names, S.REASON)]

    rejected = pc.is_valid(batch[S.REASON])
    rejects = batch.filter(rejected).select([S.USER_ID, S.ITEM_ID, *passthrough, S.REASON])
    scores = batch.filter(pc.invert(rejected)).select([*S.SCORE_COLUMNS.names, *passthrough])
    score_values = scores[S.SCORE].to_numpy()
    if not np.all(np.isfinite(score_values) & (score_values >= 0) & (score_values <= 1)):
        raise RunFailed(f"shard {piece.shard}: scores not finite in [0, 1]")

    exit_hist = Counter(scores[S.EXIT_LAYER].to_numpy().tolist())
    marker = {
        "shard_id": piece.shard,
        "piece": piece.piece,
        "pieces": piece.pieces,
        "input_rows": len(batch),
        "scored": len(scores),
        "rejected": dict(Counter(rejects[S.REASON].to_pylist())),
        "exit_histogram": {str(k): v for k, v in sorted(exit_hist.items())},
    }
    at = (piece.shard, piece.piece, piece.pieces)

    def write() -> None:  # the marker last: a retried write never leaves a marked mixed piece
        storage.write_table(scores, paths.scores(*at), cfg.storage)
        storage.write_table(rejects, paths.rejects(*at), cfg.storage)
        storage.write_json(marker, paths.marker(*at, len(batch)), cfg.storage)

    with_retries(write, f"writing shard {piece.shard}", cfg.scoring.max_write_retries)
    return marker


def listed(paths: AttemptPaths, store: StorageConfig, with_files: bool = True) -> dict:
    """{folder: its file names} of the attempt's markers folder and (`with_files`) its
    scores and rejects folders: one listing each, no request per shard."""
    folders = [paths.markers_folder]
    if with_files:
        folders += [paths.scores_folder, paths.rejects_folder]
    return {folder: storage.list_file_names(folder, store) for folder in folders}


def done_pieces(
    paths: AttemptPaths, store: StorageConfig, names: dict | None = None
) -> dict[int, list[Piece]]:
    """The attempt's done shards and their pieces: a shard is done when every piece of one
    cut has its marker (and, when the listings of `names` include the output folders, both
    files). Lists the folders unless `names` (`listed`) are given."""
    names = names if names is not None else listed(paths, store)
    scores, rejects = names.get(paths.scores_folder), names.get(paths.rejects_folder)
    cuts: dict[tuple[int, int], dict[int, Piece]] = {}
    for name in names[paths.markers_folder]:
        parsed = AttemptPaths.parse_marker(name)
        if parsed is None:
            continue
        piece = Piece(*parsed)
        data = AttemptPaths.piece_file(piece.shard, piece.piece, piece.pieces)
        files = scores is None or (data in scores and data in rejects)
        if files and piece.piece < piece.pieces:
            cuts.setdefault((piece.shard, piece.pieces), {})[piece.piece] = piece
    done: dict[int, list[Piece]] = {}
    for (shard, pieces), found in sorted(cuts.items()):
        if len(found) == pieces and shard not in done:
            done[shard] = [found[j] for j in range(pieces)]
    return done


# ----------------------------------------------------------------------------- model version


def model_version(cfg: Config) -> tuple[str, dict[str, Any]]:
    """What decides a score, hashed: the backbone's weights, the heads, the exit rule as it
    will run (config over trained), the adapter, the side features and the prompt settings.
    Returns (`<backbone>-<hash>` for the scores' model_version column, the parts)."""
    from optirag.backbones import ENGINE_FORMAT  # torch: the driver's, not every task's
    from optirag.model_files import model_digest
    from optirag.pair_scorer import resolve_rule
    from optirag.prompts import PromptBuilder

    name, weights = model_digest(cfg)
    stored = A.stored_heads_digests(cfg)
    trained = A.load_exit_config(cfg) if stored else {}
    rule = resolve_rule(cfg.exits, trained)
    layers = trained.get("layers") or cfg.exits.layers or f"{cfg.exits.num_heads} evenly"
    parts = {
        "backbone": weights,
        "engine_format": ENGINE_FORMAT,  # scores of an engine that got a family wrong: stale
        "heads": stored.get("heads", "untrained (zero-shot)"),
        "exits": {
            "rule": rule.kind,
            "threshold": rule.threshold,
            "layers": layers,
            "engine": cfg.exits.engine,
        },
        "adapter": stored.get("adapter"),
        "side_features": stored.get("side_features"),
        "prompts": cfg.prompts.model_dump(),
        "prompt_template": hashlib.sha256(
            PromptBuilder(None, cfg.prompts).template_sample().encode()
        ).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:12]}", parts


def default_run_id(cfg: Config, version: str) -> str:
    return f"{dt.date.today():%Y%m%d}-{version[-12:]}-{cfg.fingerprint()}"


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """A scoring run once planned: where it writes and what its input is."""

    run_id: str
    inputs: Inputs
    run: RunPaths
    paths: AttemptPaths  # the attempt this invocation works on
    parts: list[Part]
    num_shards: int
    # candidate file -> its content fingerprint (storage.fingerprint)
    files: dict[str, list] = dataclasses.field(default_factory=dict)
    lease: Lease | None = None  # this invocation's hold on the run (optirag.leases)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def total_rows(self) -> int:
        return sum(p.length for p in self.parts)

    def done(self, store: StorageConfig) -> dict[int, list[Piece]]:
        """The shards already written (a resumed attempt's), from one listing of the
        markers (the commit checks their files)."""
        return done_pieces(self.paths, store, listed(self.paths, store, with_files=False))


def _attempt_numbers(run: RunPaths, store: StorageConfig) -> list[int]:
    numbers = (RunPaths.attempt_number(n) for n in storage.list_folders(run.root, store))
    return sorted(n for n in numbers if n is not None)


def start(
    cfg: Config,
    version: str,
    run_root: str | None = None,
    *,
    restart_if_changed: bool = False,
    map_files: storage.FileMap = storage.serially,
) -> Run:
    """Check the locations and the inputs, take the run's lease (one invocation per run:
    optirag.leases), choose the attempt (resume the newest unpublished one whose plan
    matches; a new one otherwise) and plan it. The run's folder is `<output>/<run_id>/`
    unless `run_root` names it (a backfill's partition). An unpublished attempt planned for
    other inputs or another model is refused, or with `restart_if_changed` (a backfill) left
    for a new attempt: its staged copies are never resumed. The plan pins every candidate
    file by content (storage.fingerprint). Bad input fails before anything is written."""
    store = cfg.storage
    inputs = Inputs.from_config(cfg)
    # a backfill's partition: its key and `model` become columns when its runs are read
    reserved = RESERVED_COLUMNS + ((cfg.backfill.partition_key, "model") if run_root else ())
    if run_root is None:
        run_id = cfg.scoring.run_id or default_run_id(cfg, version)
        run_root = storage.join(inputs.output, run_id)
    else:
        run_id = "/".join(run_root.rstrip("/").split("/")[-2:])  # e.g. date=D/model=V
    run = RunPaths(run_root)
    check_output_location(inputs, run.root)
    if A.published_attempt(run.root, store) is not None and not cfg.scoring.replace:
        raise RunRefused(f"{run.root} is already committed; set scoring.replace=true")

    parts, files = plan_parts(inputs.candidates, cfg, reserved, map_files)
    total = sum(p.length for p in parts)
    if total == 0 and not cfg.scoring.allow_empty:
        raise storage.StorageError(
            f"{inputs.candidates}: the input has no rows (set scoring.allow_empty=true to "
            "commit an empty run)"
        )
    # Fail here, naming the file, rather than in every actor.
    for uri, required in (
        (inputs.history, S.INTERACTIONS),
        (inputs.items, S.ITEMS),
        (inputs.neighbors, S.NEIGHBORS),
    ):
        if uri:
            storage.checked_files(uri, store, required, map_files)
    num_shards = max(1, math.ceil(total / cfg.scoring.rows_per_shard))
    plan = {
        "candidates": inputs.candidates,
        "model_version": version,
        "num_shards": num_shards,
        "sharding": SHARDING,
        "parts": [dataclasses.asdict(p) for p in parts],
        "files": files,
    }
    try:
        lease = Lease.take(run.lease, store, cfg.scoring.lease_s, f"run {run.root}")
    except LeaseHeld as err:
        raise RunRefused(str(err)) from None
    try:
        paths = _attempt(cfg, run, plan, restart_if_changed)
    except BaseException:
        lease.release()
        raise
    log.info(
        "run %s, %s: %d parts, %d shards, %d candidate rows",
        run_id,
        paths.name,
        len(parts),
        num_shards,
        total,
    )
    return Run(run_id, inputs, run, paths, parts, num_shards, files, lease)


def _attempt(cfg: Config, run: RunPaths, plan: dict, restart_if_changed: bool) -> AttemptPaths:
    """The attempt this invocation works on, its plan written (under the run's lease)."""
    store = cfg.storage
    published = A.published_attempt(run.root, store)  # again: now under the lease
    if published is not None and not cfg.scoring.replace:
        raise RunRefused(f"{run.root} is already committed; set scoring.replace=true")
    numbers = _attempt_numbers(run, store)
    newest = numbers[-1] if numbers else 0
    paths = run.attempt(newest + 1)
    if newest and (published is None or newest > published.number):
        unpublished = run.attempt(newest)
        previous = (
            storage.read_json(unpublished.plan, store)
            if storage.exists(unpublished.plan, store)
            else plan
        )
        if previous == plan:
            paths = unpublished  # resume it
        elif restart_if_changed or previous.get("sharding") != plan["sharding"]:
            log.warning(
                "%s: planned for other inputs, another model or an older layout; a new attempt",
                unpublished.root,
            )
        elif not cfg.scoring.replace:
            raise RunRefused(
                f"{unpublished.root}: the input or the model changed since this run started; "
                "use a new run_id (or scoring.replace=true to start a new attempt)"
            )
    if not storage.exists(paths.plan, store):
        storage.write_json(plan, paths.plan, store)
    return paths


def committed_state(
    cfg: Config, version: str, run_root: str, map_files: storage.FileMap = storage.serially
) -> tuple[dict | None, list[str]]:
    """Is the run at `run_root` committed for these inputs? (Its manifest when it was made
    by this model version from candidate files whose content is what is there now, whatever
    `scoring.rows_per_shard` says now, else None; and the files that changed since it was
    committed, [] when none was.) Runs planned before inputs were pinned by content compare
    their row groups instead."""
    store = cfg.storage
    attempt = A.published_attempt(run_root, store)
    if attempt is None or not storage.exists(attempt.plan, store):
        return None, []
    plan = storage.read_json(attempt.plan, store)
    uri = Inputs.from_config(cfg).candidates
    if (plan["model_version"], plan["candidates"]) != (version, uri):
        return None, []
    parts, files = plan_parts(uri, cfg, map_files=map_files)
    if "files" in plan:
        changed = changed_inputs(plan["files"], files)
    else:
        now = [dataclasses.asdict(p) for p in parts]
        changed = [] if plan["parts"] == now else sorted({p["path"] for p in plan["parts"]})
    if changed:
        return None, changed
    return A.read_manifest(attempt, store), []


def commit(
    run: Run,
    cfg: Config,
    version: tuple[str, dict],
    started: float,
    map_files: storage.FileMap = storage.serially,
) -> dict:
    """Check that the done pieces hold every input row once, write the attempt's
    _manifest.json, point the run's _SUCCESS at the attempt, then delete the other attempts.
    Pieces are found by listing; `map_files` reads their markers (in parallel tasks in the
    job: no request per shard in the driver)."""
    store, paths = cfg.storage, run.paths
    if run.lease is not None:
        run.lease.check()  # taken over by another invocation: it commits, not this one
    names = listed(paths, store)
    done = done_pieces(paths, store, names)
    pieces = [p for found in done.values() for p in found]
    total = run.total_rows
    # Shards partition the users and a piece's rows are unique, so equal sums mean no input
    # row is lost or written twice.
    if (rows := sum(p.rows for p in pieces)) != total:
        raise RunFailed(f"the written shards hold {rows} input rows, the plan {total}; rerun")
    uris = [paths.marker(p.shard, p.piece, p.pieces, p.rows) for p in pieces]
    markers = map_files(partial(storage.read_json, storage=store), uris)
    if bad := [p for p, m in zip(pieces, markers, strict=True) if m["input_rows"] != p.rows]:
        raise RunFailed(f"shard {bad[0].shard}: its marker's rows differ from its name; rerun")
    scored = sum(m["scored"] for m in markers)
    rejected: Counter = Counter()
    exit_hist: Counter = Counter()
    for m in markers:
        rejected.update(m["rejected"])
        exit_hist.update({int(k): v for k, v in m["exit_histogram"].items()})
    if scored + sum(rejected.values()) != total:
        raise RunFailed(f"row count mismatch: {scored} + {sum(rejected.values())} != {total}")
    stems = [(p.shard, p.piece, p.pieces) for p in pieces]
    wall = time.time() - started
    mean_exit = sum(k * v for k, v in exit_hist.items()) / scored if scored else None
    summary = {
        "run_id": run.run_id,
        "output": run.run.root,
        "attempt": paths.name,
        "candidates": total,
        "shards": len(done),
        "scored": scored,
        "rejected": dict(rejected),
        "exit_histogram": {str(k): v for k, v in sorted(exit_hist.items())},
        "mean_exit_layer": mean_exit,
        "model_version": version[0],
        "wall_s": round(wall, 2),
        "pairs_per_s": round(total / wall, 2) if wall else None,
        # runs scored together (a backfill's partitions) overlap: a reader of several runs
        # takes the union of these spans, not the sum of wall_s
        "started_at": round(started, 3),
        "committed_at": round(started + wall, 3),
    }
    manifest = {
        **summary,
        "model_version_parts": version[1],
        "inputs": dataclasses.asdict(run.inputs),
        "files": {  # relative to the attempt's folder: a copied output reads its own
            "scores": [A.relative_to(paths.scores(*at), paths.root) for at in stems],
            "rejects": [A.relative_to(paths.rejects(*at), paths.root) for at in stems],
        },
        "config": cfg.redacted(),
        "config_fingerprint": cfg.fingerprint(),
    }
    storage.write_json(manifest, paths.manifest, store)
    pointer = {
        "attempt": paths.name,
        "manifest": A.relative_to(paths.manifest, run.run.root),
        "run_id": run.run_id,
        "model_version": version[0],
    }
    storage.write_json(pointer, run.run.success, store)  # one PUT: the run switches here
    # The other attempts, and pieces of another cut of a shard, are read by nothing now.
    leftovers = [
        run.run.attempt(n).root for n in _attempt_numbers(run.run, store) if n != paths.number
    ]
    for folder in leftovers:
        try:
            if storage.exists(folder, store):
                storage.delete_folder(folder, store)
        except OSError as err:  # the run is committed; a leftover folder is harmless
            log.warning("could not delete %s: %s", folder, err)
    _delete_other_cuts(paths, pieces, names, store)
    log.info("run %s committed: %s", run.run_id, json.dumps(summary))
    return summary


def _delete_other_cuts(
    paths: AttemptPaths, kept: list[Piece], names: dict, store: StorageConfig
) -> None:
    """Delete the files of a shard's other cuts (a resume under another block size), so that
    a reader of the folders, not only of the manifest, sees each row once."""
    stems = {AttemptPaths.piece_stem(p.shard, p.piece, p.pieces) for p in kept}
    for folder, files in names.items():
        for name in files:
            if name.split(".", 1)[0] not in stems:
                try:
                    storage.delete_file(storage.join(folder, name), store)
                except OSError as err:
                    log.warning("could not delete %s: %s", name, err)
