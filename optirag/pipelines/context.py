"""The context stage on Ray: the per-user and per-item context tables (optirag.context_tables)
that the scoring job joins its candidates with, made once per set of inputs and reused.

    history rows, neighbour lists, neighbour edges (read tasks; each row keyed by the block
        of its user: blocks are equal ranges of the user hash, so no process lists the users)
      -> keyed shuffle: per block, its rows, and its users' history rows copied to every
         block that lists one of them as a neighbour (a join with the edges)
      -> keyed shuffle: per block, its users' rows rendered (prefix ids, neighbours'
         ratings, side)  -> users/part-BBBBB.parquet
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
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from optirag import artifacts as A
from optirag import schema as S
from optirag import storage
from optirag.backbones import load_tokenizer
from optirag.cf import SideFeatures
from optirag.config import Config
from optirag.context import ContextStore, ItemRatings
from optirag.context_tables import (
    ColdStart,
    SideSpec,
    TokenAssembler,
    item_rows,
    score_block,
    user_rows,
)
from optirag.ids import HASH_SPACE, range_of, user_hash
from optirag.model_files import local_backbone, model_digest
from optirag.pipelines.parallel import (
    ShuffleRoutes,
    combined_in_tasks,
    in_tasks,
    releasing,
    task_ids,
)
from optirag.prompts import PromptBuilder

log = logging.getLogger(__name__)

# Part of the tables' key: bump it when what a row holds or how it is made changes (the rows'
# schema, neighbour ranking, rating lists), so tables made by older code are not reused.
CONTEXT_FORMAT = 6  # 6: a neighbour's rows copied once per lister block (a71e670)

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
    parts: list[list[int]]  # per part of the users table: its block, lowest and highest hash
    item_parts: list[int]  # the blocks of the items table

    def files(self) -> list[str]:
        """Every file of the tables, as the manifest says they are."""
        users = [self.paths.users_part(block) for block, _, _ in self.parts]
        return [*users, *self.item_files()]

    def item_files(self) -> list[str]:
        return [self.paths.items_part(block) for block in self.item_parts]

    def assembler(self, cfg: Config) -> TokenAssembler:
        prompts = PromptBuilder(
            load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts
        )
        return TokenAssembler(prompts, self.cold, self.side, cfg.prompts.max_neighbor_ratings)

    def read_users(self, users: np.ndarray, low: int, high: int, store) -> pa.Table:
        """The rows of `users`, whose hashes lie in [low, high): only the parts whose hash
        range meets it are opened, and Parquet statistics on the hash skip every row group
        of other shards there."""
        parts = [n for n, a, b in self.parts if a < high and b >= low]
        if not parts:
            return S.USER_CONTEXT.empty_table()
        fs, _ = storage.resolve(self.paths.users, store)
        files = [storage.resolve(self.paths.users_part(n), store)[1] for n in parts]
        field = pc.field(S.USER_HASH)
        rows = (field >= low) & (field < high) & pc.field(S.USER_ID).isin(pa.array(users))
        dataset = ds.dataset(files, schema=S.USER_CONTEXT, filesystem=fs, format="parquet")
        with self._rebuilt_if_corrupt(files, fs, store):
            return dataset.to_table(filter=rows)

    def read_items(self, items: np.ndarray | None, store) -> pa.Table:
        """The rows of `items` (None: every item)."""
        fs, _ = storage.resolve(self.paths.items, store)
        files = [storage.resolve(f, store)[1] for f in self.item_files()]
        wanted = None if items is None else pc.field(S.ITEM_ID).isin(pa.array(items, pa.int64()))
        with self._rebuilt_if_corrupt(files, fs, store):
            return storage.open_dataset(self.paths.items, store).to_table(filter=wanted)

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
    side = A.stored_side_features(cfg)
    prompts = PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)
    # the history's files, checked once for both tables
    history_files = storage.checked_files(history, store, S.INTERACTIONS, in_tasks)
    users, parts = _users_table(history, history_files, items, neighbors, side, paths, cfg)
    n_items, item_parts = _item_table(cfg, history, history_files, items, side, paths)
    cold = ColdStart.make(prompts, side.features() if side else None)
    spec = SideSpec(side.meta["names"], float(side.meta["bias"])) if side else None
    manifest = {
        "key": key,
        "build": paths.build,
        "cold": asdict(cold),
        "side": asdict(spec) if spec else None,
        "users": users,
        "items": n_items,
        "parts": parts,
        "item_parts": item_parts,
        "build_s": round(time.time() - started, 2),
    }
    storage.write_json(manifest, paths.success, store)
    log.info(
        "context tables %s: %d users in %d parts, %d items, %.1f s",
        paths.folder,
        users,
        len(parts),
        n_items,
        time.time() - started,
    )
    return _tables(paths, manifest)


def _users_table(
    history: str,
    history_files: list[str],
    items: str,
    neighbors: str | None,
    side: A.StoredSideFeatures | None,
    paths: A.ContextPaths,
    cfg: Config,
) -> tuple[int, list[list[int]]]:
    """Write the users table in blocks: equal ranges of the user hash, as many as keep a
    block's rows near those of `compute.context_users_per_task` users with every neighbour's
    rows copied (`context_blocks`; the users and neighbour-list entries counted in parallel
    tasks). Every row knows its block from its user id, so rows reach their blocks
    through two keyed shuffles and no process holds every user or neighbour edge:

        history rows, neighbour lists and side-feature rows (keyed by their user's block),
        and each neighbour edge (keyed by the neighbour's block, naming the block of the
        user who lists them)
        -> per block: its rows, and its users' history rows copied to every block that
           lists one of them (a join with the edges)
        -> per block: render its users (histories, neighbours' histories, lists, side)

    Returns the users written and each part's [block, lowest hash, highest hash]."""
    store = cfg.storage
    history_fs = storage.resolve(history, store)[0]
    sources = [(HISTORY, (history_fs, path)) for path in history_files]
    if neighbors:
        lists_fs = storage.resolve(neighbors, store)[0]
        lists = storage.checked_files(neighbors, store, S.NEIGHBORS, in_tasks)
        sources += [(LISTS, (lists_fs, path)) for path in lists]
    sources += _side_sources(side)
    sketch, listed = combined_in_tasks(_census, sources, merge_censuses)
    users = estimate_distinct([sketch])
    if users == 0:
        raise ValueError(f"{history}: no users in the history, neighbour table or side features")
    n_blocks = context_blocks(users, listed, cfg.compute.context_users_per_task)
    routes = ShuffleRoutes(n_blocks, KEY)
    batch_rows = ROUTE_BATCH  # read here: tasks run in other processes

    def read(batch: dict[str, np.ndarray]):
        kind, where = sources[int(batch["id"][0])]
        for table in _source_tables(kind, where, batch_rows=batch_rows):
            blocks = range_of(table[S.USER_ID].to_numpy(), n_blocks)
            yield _keyed(table, kind, routes.key(blocks))
            if kind == LISTS:
                yield _edges(table, routes)

    def render(group: pa.Table) -> pa.Table:
        block = int(routes.group(group[KEY][0].as_py()))
        kinds = group[KIND].to_numpy()
        ids = group[S.USER_ID].to_numpy()
        own = np.unique(ids[(kinds != HISTORY) | (range_of(ids, n_blocks) == block)])
        rows = group.filter(pa.array(kinds == HISTORY)).select(S.INTERACTIONS.names)
        rows = rows.cast(S.INTERACTIONS)
        lists = None
        if neighbors:
            lists = group.filter(pa.array(kinds == LISTS)).select(S.NEIGHBORS.names)
            lists = lists.cast(S.NEIGHBORS)
        block_side = _block_side(group, kinds, side) if side else None
        table = _user_block(own, rows, lists, cfg, items, block_side, paths.folder)
        storage.write_table(table, paths.users_part(block), store, USER_ROW_GROUP)
        hashes = table[S.USER_HASH].to_numpy()  # sorted
        return pa.table(
            {"part": [block], "low": hashes[:1], "high": hashes[-1:], "users": [len(table)]}
        )

    read_rows = task_ids(len(sources), cfg.compute).map_batches(
        read, batch_size=1, batch_format="numpy"
    )
    fanned_out = routes.groupby(read_rows).map_groups(releasing(_fan_out), batch_format="pyarrow")
    written = routes.groupby(fanned_out).map_groups(releasing(render), batch_format="pyarrow")
    parts, count = [], 0
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        columns = (batch[c].to_numpy() for c in ("part", "low", "high", "users"))
        for block, low, high, n in zip(*columns, strict=True):
            parts.append([int(block), int(low), int(high)])
            count += int(n)
    return count, sorted(parts)


# How the context stage's rows travel to their blocks: the key of the block a row goes to
# (`ShuffleRoutes`: a partition of its own), what it is.
KEY, KIND, LISTER, SIDE = "_route", "_kind", "_lister_route", "_side"
HISTORY, LISTS, EDGE, SIDE_MF, SIDE_STATS = 0, 1, 2, 3, 4
# a side row's values: the user's stored arrays (beside the ids) side by side, as float64
SIDE_ARRAYS = {SIDE_MF: A.StoredSideFeatures.USERS, SIDE_STATS: A.StoredSideFeatures.USER_STATS}
ROUTED = pa.schema(
    [pa.field(KEY, pa.int64()), pa.field(KIND, pa.int8())]
    + [f.with_nullable(True) for f in S.INTERACTIONS]
    + [f.with_nullable(True) for f in S.NEIGHBORS if f.name not in S.INTERACTIONS.names]
    + [pa.field(LISTER, pa.int64()), pa.field(SIDE, pa.list_(pa.float64()))]
)
ROUTE_BATCH = 1 << 20  # rows read at a time
# side-feature users per task: a read block of 35 MB at most (33 float64 MF values a user)
SIDE_CHUNK = 1 << 17
SKETCH = 4096  # smallest distinct user hashes kept per file: the users counted to about 2%


def _keyed(table: pa.Table, kind: int, keys: np.ndarray, schema: pa.Schema = ROUTED) -> pa.Table:
    """Rows of one kind in a routed `schema` (the users' ROUTED or ITEM_ROUTED; columns the
    kind lacks are null), with their blocks' keys."""
    n = len(table)
    given = {KEY: pa.array(keys, pa.int64()), KIND: pa.array(np.full(n, kind, np.int8))}
    given |= {name: table[name] for name in table.column_names if name in schema.names}
    columns = [
        given[f.name].cast(f.type) if f.name in given else pa.nulls(n, f.type) for f in schema
    ]
    return pa.table(columns, schema=schema)


def _edges(lists: pa.Table, routes: ShuffleRoutes) -> pa.Table:
    """Each (neighbour, block of a user listing them) once in this batch (other batches may
    repeat it: `_fan_out` dedupes per block), keyed by the neighbour's block, where the
    neighbour's history rows are: they are copied from there to the lister's (LISTER: the
    lister block's key)."""
    n_blocks = routes.groups
    listed = lists[S.NEIGHBOR_IDS]
    lengths = pc.fill_null(pc.list_value_length(listed), 0).to_numpy()
    neighbours = pc.list_flatten(listed).to_numpy().astype(np.int64)
    listers = np.repeat(range_of(lists[S.USER_ID].to_numpy(), n_blocks), lengths)
    away = listers != range_of(neighbours, n_blocks)  # a block has its own users' rows
    pairs = np.unique(np.stack([neighbours[away], listers[away]], 1), axis=0)
    table = pa.table({S.USER_ID: pairs[:, 0], LISTER: routes.key(pairs[:, 1])})
    return _keyed(table, EDGE, routes.key(range_of(pairs[:, 0], n_blocks)))


def _fan_out(group: pa.Table) -> pa.Table:
    """A block's own rows, and its users' history rows copied to every block that lists one
    of them as a neighbour."""
    kinds = group[KIND].to_numpy()
    # each (neighbour, lister block) once: read batches dedupe only their own edges, and a
    # second copy of a neighbour's rows would count their ratings twice
    edges = group.filter(pa.array(kinds == EDGE)).select([S.USER_ID, LISTER])
    edges = edges.group_by([S.USER_ID, LISTER], use_threads=False).aggregate([])
    rows = group.filter(pa.array(kinds != EDGE))
    history = rows.filter(pc.equal(rows[KIND], HISTORY))
    if not len(edges) or not len(history):
        return rows
    history = history.select(S.INTERACTIONS.names)
    copies = history.join(edges, S.USER_ID, join_type="inner", use_threads=False)
    copies = _keyed(copies.drop_columns([LISTER]), HISTORY, copies[LISTER].to_numpy())
    return pa.concat_tables([rows, copies])


def _side_sources(side: A.StoredSideFeatures | None) -> list[tuple[int, tuple]]:
    """Ranges of the side features' users, SIDE_CHUNK each (MF arrays, then statistics:
    each has its own users), read by tasks like the history's files."""
    if side is None:
        return []
    return [
        (kind, (side, start, start + SIDE_CHUNK))
        for kind, names in SIDE_ARRAYS.items()
        for start in range(0, side.length(names[0]), SIDE_CHUNK)
    ]


def _source_tables(
    kind: int, where: tuple, users_only: bool = False, batch_rows: int = ROUTE_BATCH
) -> Iterator[pa.Table]:
    """A source's rows in batches: a history or neighbour-list file's, or a range of the
    side features' users (their ids and SIDE values)."""
    if kind not in SIDE_ARRAYS:
        fs, path = where
        columns = [S.USER_ID] if users_only else None
        yield from _file_tables(pq.ParquetFile(path, filesystem=fs), columns, batch_rows)
        return
    side, start, stop = where
    ids, *arrays = SIDE_ARRAYS[kind]
    users = side.rows(ids, start, stop)
    if users_only:
        yield pa.table({S.USER_ID: users})
        return
    values = [side.rows(name, start, stop).reshape(len(users), -1) for name in arrays]
    values = np.concatenate(values, axis=1, dtype=np.float64)
    lists = pa.FixedSizeListArray.from_arrays(values.reshape(-1), values.shape[1])
    yield pa.table({S.USER_ID: users, SIDE: lists.cast(pa.list_(pa.float64()))})


def _block_side(group: pa.Table, kinds: np.ndarray, side: A.StoredSideFeatures) -> SideFeatures:
    """A block's users' side features, from the side rows routed to it (the other users'
    and the items' arrays empty)."""
    given = {}
    for kind, (ids, *arrays) in SIDE_ARRAYS.items():
        rows = group.filter(pa.array(kinds == kind))
        users = rows[S.USER_ID].to_numpy()
        order = np.argsort(users)
        given[ids] = users[order]
        likes = [side.empty(name) for name in arrays]
        widths = [int(np.prod(like.shape[1:])) for like in likes]
        values = pc.list_flatten(rows[SIDE]).to_numpy().reshape(len(users), sum(widths))[order]
        for name, like, end, width in zip(arrays, likes, np.cumsum(widths), widths, strict=True):
            part = values[:, end - width : end].reshape(len(users), *like.shape[1:])
            given[name] = part.astype(like.dtype)
    return side.features(given)


def _file_tables(file: pq.ParquetFile, columns: list[str] | None, batch_rows: int):
    """A Parquet file's rows in tables of `batch_rows`."""
    for part in file.iter_batches(batch_rows, columns=columns):
        yield pa.Table.from_batches([part])


def _census(source: tuple) -> tuple[np.ndarray, int]:
    """A source's sketch (its SKETCH smallest distinct user hashes: a k-minimum-values
    sketch) and, for a neighbour-list file, its list entries (from the footer its users are
    read with)."""
    kind, where = source
    if kind == LISTS:
        file = pq.ParquetFile(where[1], filesystem=where[0])
        tables, entries = _file_tables(file, [S.USER_ID], ROUTE_BATCH), _list_entries(file)
    else:
        tables, entries = _source_tables(kind, where, users_only=True), 0
    users = [t[S.USER_ID].to_numpy() for t in tables]
    sketch = np.unique(user_hash(np.concatenate([np.empty(0, np.int64), *users])))[:SKETCH]
    return sketch, entries


def _list_entries(file: pq.ParquetFile) -> int:
    """The neighbour ids a neighbour-list file holds, from its footer's value counts (an
    empty or null list counts as one: a sizing estimate)."""
    meta = file.metadata
    leaf = f"{S.NEIGHBOR_IDS}."
    return sum(
        column.num_values
        for group in range(meta.num_row_groups)
        for column in map(meta.row_group(group).column, range(meta.num_columns))
        if column.path_in_schema.startswith(leaf)
    )


def merge_censuses(censuses: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """One census of the sources behind several: their merged sketch, their entries."""
    return merge_sketches([c[0] for c in censuses]), sum(c[1] for c in censuses)


def context_blocks(users: int, listed: int, users_per_task: int) -> int:
    """The users table's blocks: the fewest that keep a block's history rows (its users' and
    the copies of their neighbours') at most those of `users_per_task` users each copying all
    of their K = listed / users neighbours, the most a block can hold.

    A neighbour listed K times is copied once to each distinct block of its listers but its
    own, about (B - 1)(1 - e^(-K/B)) of B blocks, so a block holds about
    users / B + users (1 - 1/B)(1 - e^(-K/B)) users' rows: few blocks share copies, many do
    not (+8% a user from 50 to 500 blocks at K = 10). Sized by rows, a block's memory stays
    flat as the users grow; without neighbours this is ceil(users / users_per_task)."""
    k = listed / users

    def rows(blocks: int) -> float:
        return users / blocks - users * (1 - 1 / blocks) * math.expm1(-k / blocks)

    low, high = 1, max(1, -(-users // users_per_task))  # rows(high) <= the budget
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if rows(mid) <= users_per_task * (1 + k) else (mid + 1, high)
    return low


def merge_sketches(sketches: list[np.ndarray]) -> np.ndarray:
    """One sketch of the users behind several: their SKETCH smallest distinct hashes."""
    return np.unique(np.concatenate([np.empty(0, np.int64), *sketches]).astype(np.int64))[:SKETCH]


def estimate_distinct(sketches: list[np.ndarray]) -> int:
    """The number of distinct users behind per-file sketches: exact below SKETCH, else the
    k-minimum-values estimate (k - 1) / (k-th smallest hash / 2**32)."""
    smallest = merge_sketches(sketches)
    if len(smallest) < SKETCH:
        return len(smallest)
    return int((SKETCH - 1) * HASH_SPACE / (smallest[SKETCH - 1] + 1))


def _tables(paths: A.ContextPaths, manifest: dict) -> ContextTables:
    paths = A.ContextPaths(paths.root, manifest["build"])
    side = SideSpec(**manifest["side"]) if manifest["side"] else None
    cold = ColdStart(**manifest["cold"])
    return ContextTables(
        paths,
        cold,
        side,
        manifest["users"],
        manifest["items"],
        manifest["parts"],
        manifest["item_parts"],
    )


# Per worker process: what the current build's tasks share (the items table and tokenizer,
# the items' side features), made once per process, not per block. A task of another build
# drops them: a long-lived worker holds one build's, not every build's it has served.
_PER_BUILD: dict[str, object] = {}


def _once_per_build(build: str, name: str, make: Callable[[], object]):
    if _PER_BUILD.get("build") != build:
        _PER_BUILD.clear()
        _PER_BUILD["build"] = build
    if name not in _PER_BUILD:
        _PER_BUILD[name] = make()
    return _PER_BUILD[name]


def _user_block(
    users: np.ndarray,
    rows: pa.Table,
    lists: pa.Table | None,
    cfg: Config,
    items: str,
    side: SideFeatures | None,
    build: str,
) -> pa.Table:
    """The users table's rows of one block, from the history rows routed to it (its users'
    and their neighbours') and its users' neighbour lists: render and encode."""
    item_table = _once_per_build(
        build, "items", lambda: storage.read_table(items, cfg.storage, S.ITEMS)
    )
    contexts = ContextStore(rows, item_table, lists, cfg.prompts)
    return user_rows(users, contexts, _prompts(cfg, build), side)


def _prompts(cfg: Config, build: str) -> PromptBuilder:
    """The build's prompt builder (its tokenizer loaded once per worker process)."""

    def make() -> PromptBuilder:
        return PromptBuilder(load_tokenizer(local_backbone(cfg, tokenizer_only=True)), cfg.prompts)

    return _once_per_build(build, "prompts", make)


def _item_table(
    cfg: Config,
    history: str,
    history_files: list[str],
    items: str,
    side: A.StoredSideFeatures | None,
    paths: A.ContextPaths,
) -> tuple[int, list[int]]:
    """Write the items table in blocks (equal ranges of the item hash, about ITEMS_PER_TASK
    items each): read tasks emit the items' rows and, for the rating note, each history
    batch's per-item rating totals, keyed by the item's block; a keyed shuffle gives each
    block its items and their partial totals, which it adds up and encodes. No process holds
    more than a block's items. Returns the items written and the blocks written."""
    store = cfg.storage
    files = [(ITEM, path) for path in storage.checked_files(items, store, S.ITEMS, in_tasks)]
    if cfg.prompts.target_ratings:
        files += [(TOTALS, path) for path in history_files]
    fs = {ITEM: storage.resolve(items, store)[0], TOTALS: storage.resolve(history, store)[0]}
    counted = in_tasks(partial(_rows_of, fs[ITEM]), [p for kind, p in files if kind == ITEM])
    n_blocks = max(1, -(-sum(counted) // ITEMS_PER_TASK))
    routes = ShuffleRoutes(n_blocks, KEY)

    def read(batch: dict[str, np.ndarray]):
        kind, path = files[int(batch["id"][0])]
        columns = ITEM_COLUMNS[kind]
        for part in pq.ParquetFile(path, filesystem=fs[kind]).iter_batches(columns=columns):
            table = pa.Table.from_batches([part])
            if kind == TOTALS:
                rated = table.filter(pc.is_valid(table[S.RATING]))
                table = rated.group_by(S.ITEM_ID).aggregate(
                    [(S.RATING, "sum"), (S.RATING, "count")]
                )
            blocks = range_of(table[S.ITEM_ID].to_numpy(), n_blocks)
            yield _keyed(table, kind, routes.key(blocks), ITEM_ROUTED)

    def encode(group: pa.Table) -> pa.Table:
        block = int(routes.group(group[KEY][0].as_py()))
        kinds = group[KIND].to_numpy()
        texts = group.filter(pa.array(kinds == ITEM)).select(S.ITEMS.names).cast(S.ITEMS)
        ratings = None
        if cfg.prompts.target_ratings:
            totals = group.filter(pa.array(kinds == TOTALS)).group_by(S.ITEM_ID)
            totals = totals.aggregate([("rating_sum", "sum"), ("rating_count", "sum")])
            ids = totals[S.ITEM_ID].to_numpy()
            ratings = ItemRatings(
                ids,
                np.full(len(ids), np.iinfo(np.int64).min),
                totals["rating_sum_sum"].to_numpy(),
                totals["rating_count_sum"].to_numpy(),
            )
        contexts = ContextStore(S.INTERACTIONS.empty_table(), texts, None, cfg.prompts, ratings)
        item_side = _once_per_build(paths.folder, "item side", side.item_features) if side else None
        table = item_rows(contexts, _prompts(cfg, paths.folder), item_side)
        storage.write_table(table, paths.items_part(block), store)
        return pa.table({"part": [block], "items": [len(table)]})

    read_rows = task_ids(len(files), cfg.compute).map_batches(
        read, batch_size=1, batch_format="numpy"
    )
    written = routes.groupby(read_rows).map_groups(releasing(encode), batch_format="pyarrow")
    parts, count = [], 0
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts += batch["part"].to_pylist()
        count += sum(batch["items"].to_pylist())
    return count, sorted(parts)


ITEM, TOTALS = 0, 1  # an item's row; one batch's rating totals of an item
ITEMS_PER_TASK = 100_000
ITEM_COLUMNS = {ITEM: S.ITEMS.names, TOTALS: [S.ITEM_ID, S.RATING]}
ITEM_ROUTED = pa.schema(
    [pa.field(KEY, pa.int64()), pa.field(KIND, pa.int8())]
    + [f.with_nullable(True) for f in S.ITEMS]
    + [pa.field("rating_sum", pa.float64()), pa.field("rating_count", pa.int64())]
)


def _rows_of(fs, path: str) -> int:
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows


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
        batch = pa.table(
            {
                S.USER_ID: pa.array(users, pa.int64()),
                S.ITEM_ID: pa.array(items, pa.int64()),
                S.REASON: pa.nulls(len(users), pa.string()),
            }
        )
        user_rows = self.tables.read_users(np.unique(users), 0, HASH_SPACE, store)
        item_rows = self.tables.read_items(np.unique(items), store)
        return self.assembler.assemble(batch, user_rows, item_rows)

    def score(self, users, items, before_ts=None, keep_hidden=False, desc=None):
        if before_ts is not None:
            raise ValueError(
                "context tables hold whole histories: time-cut prompts go through "
                "the in-process PairScorer"
            )
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
