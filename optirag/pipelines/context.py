"""The context stage on Ray: the per-user and per-item context tables (optirag.context_tables)
that the scoring job joins its candidates with, made once per set of inputs and reused.

    users of the history and the neighbour table, by user hash -> blocks of users
    history and neighbour files (tasks: a history row to its user's block and to the blocks
        of the users who list that user as a neighbour, a neighbour list to its user's
        block)  -> routed/{history,neighbors}/block-BBBBB/ (read once, removed after)
    blocks of users (tasks: their routed rows -> prefix ids, neighbours' ratings, the users'
        side)  -> users/part-NNNNN.parquet
    items (one task: texts and rating totals -> target ids, the items' side)
        -> items/part-00000.parquet
    _SUCCESS last (the key, the cold-start context, the side features' combination)

The tables live under a hash of everything they are made from: the history, neighbour and
item tables (each file's name, size and time), the prompt settings and wording, the
tokenizer (the backbone's files) and the side features. Changing any of them makes new
tables; an unchanged set is reused (a nightly job and every partition of a backfill).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import ray

from optirag import artifacts as A
from optirag import schema as S
from optirag import storage
from optirag.backbones import load_tokenizer
from optirag.cf import SideFeatures
from optirag.config import Config
from optirag.context import ContextStore, ItemRatings
from optirag.context_tables import (
    ColdStart,
    HistoryRoutes,
    SideSpec,
    TokenAssembler,
    item_rows,
    score_block,
    user_rows,
)
from optirag.ids import HASH_SPACE, user_hash
from optirag.model_files import local_backbone, model_digest
from optirag.pipelines.parallel import in_tasks
from optirag.prompts import PromptBuilder

log = logging.getLogger(__name__)

# Part of the tables' key: bump it when what a row holds or how it is made changes (the rows'
# schema, neighbour ranking, rating lists), so tables made by older code are not reused.
CONTEXT_FORMAT = 4

# A user's row holds hundreds of prefix ids and their neighbours' ratings: row groups of a few
# thousand users keep a shard's filtered read (row groups skipped by user_hash) small.
USER_ROW_GROUP = 2048


@dataclass
class ContextTables:
    """Built tables: where they are and what the manifest says."""

    paths: A.ContextPaths
    cold: ColdStart
    side: SideSpec | None
    users: int
    items: int
    part_hashes: list[list[int]]  # per part of the users table: its lowest and highest hash

    def files(self) -> list[str]:
        """Every file of the tables, as the manifest says they are."""
        return [self.paths.users_part(n) for n in range(len(self.part_hashes))] + [
            self.paths.items_file
        ]

    def assembler(self, cfg: Config) -> TokenAssembler:
        prompts = PromptBuilder(
            load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts
        )
        return TokenAssembler(prompts, self.cold, self.side, cfg.prompts.max_neighbor_ratings)

    def read_users(self, users: np.ndarray, low: int, high: int, store) -> pa.Table:
        """The rows of `users`, whose hashes lie in [low, high): only the parts whose hash
        range meets it are opened, and Parquet statistics on the hash skip every row group
        of other shards there."""
        parts = [n for n, (a, b) in enumerate(self.part_hashes) if a < high and b >= low]
        if not parts:
            return S.USER_CONTEXT.empty_table()
        fs, _ = storage.resolve(self.paths.users, store)
        files = [storage.resolve(self.paths.users_part(n), store)[1] for n in parts]
        field = pc.field(S.USER_HASH)
        rows = (field >= low) & (field < high) & pc.field(S.USER_ID).isin(pa.array(users))
        dataset = ds.dataset(files, schema=S.USER_CONTEXT, filesystem=fs, format="parquet")
        with self._rebuilt_if_corrupt(files, fs, store):
            return dataset.to_table(filter=rows)

    def read_items(self, items: np.ndarray, store) -> pa.Table:
        fs, path = storage.resolve(self.paths.items_file, store)
        with self._rebuilt_if_corrupt([path], fs, store):
            return storage.open_dataset(self.paths.items, store).to_table(
                filter=pc.field(S.ITEM_ID).isin(pa.array(items, pa.int64()))
            )

    @contextlib.contextmanager
    def _rebuilt_if_corrupt(self, files: list[str], fs, store):
        """A table file that cannot be read fails the read naming it, and this build stops
        being the one `_SUCCESS` names, so the next run builds the tables again."""
        try:
            yield
        except (pa.ArrowException, OSError, storage.StorageError) as err:
            try:
                storage.name_bad_file(files, fs)
                bad = storage.StorageError(f"context tables {self.paths.folder}: {err}")
            except storage.StorageError as named:
                bad = named
            self.paths.forget_build(store)
            raise storage.StorageError(
                f"{bad}; the context tables are rebuilt on the next run"
            ) from err


def context_key(cfg: Config, history: str, items: str, neighbors: str | None) -> dict:
    """Everything the tables are made from (see the module's docstring)."""
    store = cfg.storage
    prompts = PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)
    digests = A.stored_heads_digests(cfg)
    key = {
        "format": CONTEXT_FORMAT,
        "history": A.dataset_stamp(history, store, in_tasks),
        "items": A.dataset_stamp(items, store, in_tasks),
        "neighbors": A.dataset_stamp(neighbors, store, in_tasks),
        "prompts": cfg.prompts.model_dump(),
        "template": hashlib.sha256(prompts.template_sample().encode()).hexdigest(),
        "backbone": model_digest(cfg),
        "side_features": [digests.get("side_features"), digests.get("side_features_meta")],
    }
    return json.loads(json.dumps(key))  # as stored: lists, not tuples


def build(cfg: Config, history: str, items: str, neighbors: str | None) -> ContextTables:
    """The context tables of these inputs: reused when built before, else built now (in a
    folder of this build's own, named by `_SUCCESS` once done). Needs ray.init() first."""
    store = cfg.storage
    key = context_key(cfg, history, items, neighbors)
    paths = A.ContextPaths.for_key(store, key)
    if storage.exists(paths.success, store):
        manifest = storage.read_json(paths.success, store)
        tables = _tables(paths, manifest)
        missing = [f for f in tables.files() if not storage.exists(f, store)]
        if manifest["key"] == key and not missing:
            log.info("context tables %s: reused", paths.root)
            return tables
        if missing:
            log.warning(
                "context tables %s: %s missing; building them again",
                tables.paths.folder,
                ", ".join(missing),
            )
    started = time.time()
    paths = paths.new_build()
    side = A.load_side_features(cfg)
    prompts = PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)
    users = _all_users(history, neighbors, side, cfg)
    if len(users) == 0:
        raise ValueError(f"{history}: no users in the history, neighbour table or side features")
    try:
        part_hashes = _users_table(users, history, items, neighbors, side, paths, cfg)
    finally:  # the routed copies of the history are only for this build
        if storage.exists(paths.routed, store):
            storage.delete_folder(paths.routed, store)
    item_table = _item_table(cfg, history, items, prompts, side)
    storage.write_table(item_table, paths.items_file, store)
    cold = ColdStart.make(prompts, side)
    spec = SideSpec(side.names, float(side.mf.bias)) if side is not None else None
    manifest = {"key": key, "build": paths.build, "cold": asdict(cold),
                "side": asdict(spec) if spec else None, "users": len(users),
                "items": len(item_table), "part_hashes": part_hashes,
                "build_s": round(time.time() - started, 2)}  # fmt: skip
    storage.write_json(manifest, paths.success, store)
    log.info("context tables %s: %d users in %d parts, %d items, %.1f s", paths.folder,
             len(users), len(part_hashes), len(item_table), time.time() - started)  # fmt: skip
    return _tables(paths, manifest)


def _users_table(
    users: np.ndarray,
    history: str,
    items: str,
    neighbors: str | None,
    side: SideFeatures | None,
    paths: A.ContextPaths,
    cfg: Config,
) -> list[list[int]]:
    """Write the users table in blocks of `compute.context_users_per_task` users (in table
    order): route the history and neighbour lists to the blocks, then a task per block.
    Returns each part's lowest and highest user hash."""
    store = cfg.storage
    n_blocks = max(1, -(-len(users) // cfg.compute.context_users_per_task))
    size, extra = divmod(len(users), n_blocks)  # block b: users[bounds[b]:bounds[b + 1]]
    bounds = np.append(0, np.cumsum(np.full(n_blocks, size) + (np.arange(n_blocks) < extra)))
    routed = _route(history, neighbors, users, bounds[:-1], paths, cfg)
    users_ref, side_ref = ray.put(users), ray.put(side)

    def user_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        number = int(batch["id"][0])
        block = ray.get(users_ref)[bounds[number] : bounds[number + 1]]
        rows, lists = S.INTERACTIONS.empty_table(), None
        if number in routed["history"]:
            uri = paths.routed_block("history", number)
            rows = storage.read_own_table(uri, store, S.INTERACTIONS)
        if neighbors:
            lists = S.NEIGHBORS.empty_table()
            if number in routed["neighbors"]:
                uri = paths.routed_block("neighbors", number)
                lists = storage.read_own_table(uri, store, S.NEIGHBORS)
        table = _user_block(block, rows, lists, cfg, items, ray.get(side_ref))
        storage.write_table(table, paths.users_part(number), store, USER_ROW_GROUP)
        hashes = table[S.USER_HASH].to_numpy()  # sorted
        return {"part": np.array([number]), "low": hashes[:1], "high": hashes[-1:]}

    blocks = ray.data.range(n_blocks, override_num_blocks=n_blocks).map_batches(
        user_block, batch_size=1, batch_format="numpy"
    )
    parts = sorted(
        (int(b["part"][0]), int(b["low"][0]), int(b["high"][0]))
        for b in blocks.iter_batches(batch_size=1)
    )
    return [[low, high] for _, low, high in parts]


def _tables(paths: A.ContextPaths, manifest: dict) -> ContextTables:
    paths = A.ContextPaths(paths.root, manifest["build"])
    side = SideSpec(**manifest["side"]) if manifest["side"] else None
    return ContextTables(paths, ColdStart(**manifest["cold"]), side, manifest["users"],
                         manifest["items"], manifest["part_hashes"])  # fmt: skip


def _all_users(
    history: str, neighbors: str | None, side: SideFeatures | None, cfg: Config
) -> np.ndarray:
    """Every user with a history, a neighbour list or side features (a user known to the
    side features only must get their own, not the cold start's), sorted by user hash (then
    id), so a block of them is one stretch of the table's order."""
    ids = []
    for uri, schema in ((history, S.INTERACTIONS), (neighbors, S.NEIGHBORS)):
        if uri:  # one batch at a time: memory grows with users, not history rows
            for batch in storage.open_dataset(uri, cfg.storage, schema).to_batches(
                columns=[S.USER_ID]
            ):
                ids.append(np.unique(batch.column(0).to_numpy()))
    if side is not None:
        ids += [side.mf.user_ids, side.users.ids]
    users = np.unique(np.concatenate([np.asarray(c, dtype=np.int64) for c in ids]))
    return users[np.lexsort((users, user_hash(users)))]


# Rows a routing task holds before it writes them to the blocks' folders.
ROUTE_ROWS = 4_000_000
ROUTED = ("history", "neighbors")
# Routing tasks per table, at most: each writes a file per block it sends rows to.
ROUTE_TASKS = 64


def _route(
    history: str,
    neighbors: str | None,
    users: np.ndarray,
    starts: np.ndarray,
    paths: A.ContextPaths,
    cfg: Config,
) -> dict[str, set[int]]:
    """Read the history and the neighbour table once and send every row to the blocks that
    need it (`HistoryRoutes`): routed/<table>/block-BBBBB/from-TTTTT-CCCC.parquet. Returns
    the blocks that got rows, per table."""
    store = cfg.storage
    batches = ()
    if neighbors:
        batches = storage.open_dataset(neighbors, store, S.NEIGHBORS).to_batches(
            columns=[S.USER_ID, S.NEIGHBOR_IDS]
        )
    routes_ref = ray.put(HistoryRoutes(users, starts, batches))
    work = []  # (table, its files, its schema), a group of files per task
    for table, uri, schema in (("history", history, S.INTERACTIONS),
                               ("neighbors", neighbors, S.NEIGHBORS)):  # fmt: skip
        if uri:
            files = np.array(storage.checked_files(uri, store, schema, in_tasks), dtype=object)
            for group in np.array_split(files, min(len(files), len(starts), ROUTE_TASKS)):
                work.append((table, list(group), schema))

    def route(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        task, routes = int(batch["id"][0]), ray.get(routes_ref)
        table, files, schema = work[task]
        fs, _ = storage.resolve(paths.root, store)
        held: dict[int, list[pa.Table]] = {}
        blocks: set[int] = set()
        chunk = 0

        def flush() -> None:
            nonlocal chunk
            for block, parts in held.items():
                uri = paths.routed_part(table, block, task, chunk)
                storage.write_table(pa.concat_tables(parts), uri, store)
                blocks.add(block)
            held.clear()
            chunk += 1

        count = 0
        rows = ds.dataset(files, filesystem=fs, format="parquet")
        for part in rows.to_batches(columns=schema.names):
            split = routes.split(pa.Table.from_batches([part]), to_listers=table == "history")
            for block, routed in split.items():
                held.setdefault(block, []).append(routed)
                count += len(routed)
            if count >= ROUTE_ROWS:
                flush()
                count = 0
        flush()
        code = ROUTED.index(table)
        return {"table": np.full(len(blocks), code), "block": np.array(sorted(blocks), np.int64)}

    tasks = ray.data.range(len(work), override_num_blocks=len(work)).map_batches(
        route, batch_size=1, batch_format="numpy"
    )
    routed: dict[str, set[int]] = {table: set() for table in ROUTED}
    for batch in tasks.iter_batches(batch_size=None):
        for code, block in zip(batch["table"], batch["block"], strict=True):
            routed[ROUTED[int(code)]].add(int(block))
    return routed


def _user_block(
    users: np.ndarray,
    rows: pa.Table,
    lists: pa.Table | None,
    cfg: Config,
    items: str,
    side: SideFeatures | None,
) -> pa.Table:
    """The users table's rows of one block, from the history rows routed to it (its users'
    and their neighbours') and its users' neighbour lists: render and encode."""
    item_table = storage.read_table(items, cfg.storage, S.ITEMS)
    contexts = ContextStore(rows, item_table, lists, cfg.prompts)
    prompts = PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)
    return user_rows(users, contexts, prompts, side)


def _item_table(
    cfg: Config, history: str, items: str, prompts: PromptBuilder, side: SideFeatures | None
) -> pa.Table:
    """Every item's target ids, with its rating totals over the whole history."""
    store = cfg.storage
    ratings = None
    if cfg.prompts.target_ratings:
        ratings = ItemRatings.totals(storage.open_dataset(history, store, S.INTERACTIONS))
    item_table = storage.read_table(items, store, S.ITEMS)
    contexts = ContextStore(S.INTERACTIONS.empty_table(), item_table, None, cfg.prompts, ratings)
    return item_rows(contexts, prompts, side)


class TableScorer:
    """Pairs without a time cut (valid, test) scored from the context tables through a
    `TokenScorer`: the same ids as the nightly job's. Has `PairScorer`'s `score` and
    `prompt_ids`, so training and evaluation use it where they used the in-process one.
    `with_side`: feed the tables' side features (off for plain heads, e.g. states)."""

    def __init__(self, tokens, tables: ContextTables, cfg: Config, with_side: bool) -> None:
        self.tokens, self.tables, self.cfg, self.with_side = tokens, tables, cfg, with_side
        self.assembler = tables.assembler(cfg)

    @property
    def engine(self):
        return self.tokens.engine

    def block(self, users: np.ndarray, items: np.ndarray) -> pa.Table:
        store = self.cfg.storage
        batch = pa.table({S.USER_ID: pa.array(users, pa.int64()),
                          S.ITEM_ID: pa.array(items, pa.int64()),
                          S.REASON: pa.nulls(len(users), pa.string())})  # fmt: skip
        user_rows = self.tables.read_users(np.unique(users), 0, HASH_SPACE, store)
        item_rows = self.tables.read_items(np.unique(items), store)
        return self.assembler.assemble(batch, user_rows, item_rows)

    def score(self, users, items, before_ts=None, keep_hidden=False, desc=None):
        if before_ts is not None:
            raise ValueError("context tables hold whole histories: time-cut prompts go through "
                             "the in-process PairScorer")  # fmt: skip
        block = self.block(users, items)
        result, _ = score_block(self.tokens, block, keep_hidden, desc, self.with_side)
        return result

    def prompt_ids(self, users, items, before_ts=None) -> list[list[int]]:
        if before_ts is not None:
            raise ValueError("context tables hold whole histories")
        block = self.block(users, items)
        prefix_of: dict[int, list[int]] = {}
        for u, p in zip(block[S.USER_ID].to_pylist(), block[S.PREFIX_IDS].to_pylist(), strict=True):
            prefix_of.setdefault(u, p)
        return [
            prefix_of[u] + s
            for u, s in zip(
                block[S.USER_ID].to_pylist(), block[S.SUFFIX_IDS].to_pylist(), strict=True
            )
        ]
