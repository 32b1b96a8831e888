"""The context tables and token assembly: what a prompt needs of its user and of its item,
made once per night, and joined with the candidates into token blocks for the model.

    users table   user_id -> prefix token ids (instruction, history, similar users' items),
                  the items the user's neighbours rated with their ratings (for the rating
                  note of `prompts.target_ratings`), the user's side of the side features
    items table   item_id -> the target's token ids (its text, with the opening of the rating
                  note and its mean rating), the item's side of the side features

A token block is a candidates block with three more columns: the prefix ids on the first row
of each user (empty on the user's other rows), every row's suffix ids, and its side features.
The ids are the same as the in-process scorer's (`PairScorer`, from `ContextStore`): the same
`PromptBuilder` pieces make both, and a test holds the two paths to the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from optirag import schema as S
from optirag.cf import SideFeatures, combine_sides
from optirag.context import ContextStore
from optirag.ids import lookup, user_hash
from optirag.prompts import PromptBuilder, UserContext

_NONE = np.iinfo(np.int64).min


def _ids(values: list[list[int]]) -> pa.Array:
    return pa.array(values, pa.list_(pa.int32()))


def _lists(parts: list[np.ndarray], type_: pa.DataType) -> pa.ListArray:
    """A list column from per-row arrays, without a Python loop over their elements."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.empty(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))


def _side(values: np.ndarray | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.list_(pa.float32()))
    return pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1), pa.float32()), values.shape[1]
    ).cast(pa.list_(pa.float32()))


# Users per piece of `user_rows`: their token ids are Python lists until they are Arrow, a few
# KB per user, so a block of hundreds of thousands of users is made in pieces.
USER_PIECE = 8192


def user_rows(
    users: np.ndarray,
    contexts: ContextStore,
    prompts: PromptBuilder,
    side: SideFeatures | None,
) -> pa.Table:
    """The users table's rows of `users` (sorted by user hash), from contexts holding their
    histories, their neighbour lists and their neighbours' histories."""
    users = np.asarray(users, dtype=np.int64)
    hashes = user_hash(users)
    order = np.lexsort((users, hashes))
    users, hashes = users[order], hashes[order]
    pieces = [
        _user_piece(users[i : i + USER_PIECE], hashes[i : i + USER_PIECE], contexts, prompts, side)
        for i in range(0, len(users), USER_PIECE)
    ]
    return pa.concat_tables(pieces) if pieces else S.USER_CONTEXT.empty_table()


def _user_piece(users, hashes, contexts: ContextStore, prompts: PromptBuilder, side) -> pa.Table:
    prefixes = prompts.encode_prefixes([contexts.context(int(u)) for u in users])
    rated = [contexts.neighbor_rated(int(u)) for u in users]
    return pa.table(
        [
            pa.array(users, pa.int64()),
            pa.array(hashes, pa.int64()),
            _ids(prefixes),
            _lists([r[0] for r in rated], pa.int64()),
            _lists([r[1] for r in rated], pa.float32()),
            _side(side.user_side(users) if side else None, len(users)),
        ],
        schema=S.USER_CONTEXT,
    )


def item_rows(contexts: ContextStore, prompts: PromptBuilder, side: SideFeatures | None):
    """The items table: every item the contexts know, sorted by id."""
    items = np.array(sorted(contexts.item_texts), dtype=np.int64)
    targets = []
    for item in items.tolist():
        text, stats, _ = contexts.target_parts(-1, item)
        targets.append(prompts.encode_target(text, stats))
    return pa.table(
        [
            pa.array(items, pa.int64()),
            _ids(targets),
            _side(side.item_side(items) if side else None, len(items)),
        ],
        schema=S.ITEM_CONTEXT,
    )


@dataclass
class ColdStart:
    """What a user missing from the users table gets: the prefix of an empty history, no
    neighbour ratings, the cold-start side (stored in the context tables' manifest)."""

    prefix_ids: list[int]
    side: list[float] | None

    @classmethod
    def make(cls, prompts: PromptBuilder, side: SideFeatures | None) -> ColdStart:
        prefix = prompts.encode_prefix(UserContext())
        cold_side = None
        if side is not None:  # no id is below every real one: -2**63 stands for "unknown"
            cold_side = side.user_side(np.array([_NONE])).reshape(-1).tolist()
        return cls(prefix, cold_side)


@dataclass
class SideSpec:
    """How the side features are combined from the two sides (`cf.combine_sides`)."""

    names: list[str]
    mf_bias: float


class TokenAssembler:
    """Candidates + their users' and items' context rows -> a token block (CPU work only)."""

    def __init__(
        self,
        prompts: PromptBuilder,
        cold: ColdStart,
        side: SideSpec | None,
        max_neighbor_ratings: int,
    ) -> None:
        self.prompts = prompts
        self.cold = cold
        self.side = side
        self.max_neighbor_ratings = max_neighbor_ratings

    def assemble(self, batch: pa.Table, users: pa.Table, items: pa.Table) -> pa.Table:
        """`batch`: candidates with a `reason` column (rows with a reason are rejects and get
        empty ids); `users`/`items`: context rows covering the batch's users and items."""
        n = len(batch)
        ok = pc.is_null(batch[S.REASON]).to_numpy(zero_copy_only=False)
        row_users = batch[S.USER_ID].to_numpy(zero_copy_only=False).astype(np.int64)
        row_items = batch[S.ITEM_ID].to_numpy(zero_copy_only=False).astype(np.int64)
        users = users.sort_by(S.USER_ID)  # for the lookup; any order comes in
        items = items.sort_by(S.ITEM_ID)
        u_pos = lookup(users[S.USER_ID].to_numpy(), row_users)
        i_pos = lookup(items[S.ITEM_ID].to_numpy(), row_items)
        unknown = ok & (i_pos < 0)
        if unknown.any():  # an item the items table lacks: a reject
            reasons = np.asarray(batch[S.REASON].to_pylist(), dtype=object)
            reasons[unknown] = S.REJECT_UNKNOWN_ITEM
            at = batch.schema.get_field_index(S.REASON)
            batch = batch.set_column(at, S.REASON, pa.array(reasons, batch.schema.field(at).type))
            ok = ok & ~unknown

        prefix_lists = users[S.PREFIX_IDS].to_pylist()
        targets = items[S.TARGET_IDS].to_pylist()
        notes = None
        if self.prompts.cfg.target_ratings:
            notes = self._rating_notes(ok & (u_pos >= 0), u_pos, i_pos, users, items)
        tail = self.prompts.tail_ids
        first = np.zeros(n, dtype=bool)  # a user's first row carries the prefix
        first[np.unique(np.where(ok, row_users, _NONE), return_index=True)[1]] = True
        prefixes, suffixes = [], []
        for r in range(n):
            if not ok[r]:
                prefixes.append([])
                suffixes.append([])
                continue
            u = int(u_pos[r])
            prefixes.append(
                (prefix_lists[u] if u >= 0 else self.cold.prefix_ids) if first[r] else []
            )
            note = notes[r] if notes is not None else []
            suffixes.append(targets[int(i_pos[r])] + note + tail)
        out = batch.append_column(S.PREFIX_IDS, _ids(prefixes))
        out = out.append_column(S.SUFFIX_IDS, _ids(suffixes))
        return out.append_column(S.SIDE, _side(self._side(ok, u_pos, i_pos, users, items), n))

    def _rating_notes(self, rows, u_pos, i_pos, users: pa.Table, items: pa.Table):
        """Each row's rating-note ids: the first `max_neighbor_ratings` ratings of its item
        among its user's neighbours' ratings, found for all `rows` at once. A user's rated
        items are sorted by id, so (user's row, item's row) keys are sorted over the table."""
        lengths = pc.fill_null(pc.list_value_length(users[S.RATED_ITEMS]), 0).to_numpy()
        user_of = np.repeat(np.arange(len(users)), lengths)
        rated = pc.list_flatten(users[S.RATED_ITEMS]).to_numpy()
        item_of = lookup(items[S.ITEM_ID].to_numpy(), rated)
        values = pc.list_flatten(users[S.RATED_VALUES]).to_numpy()
        known = item_of >= 0  # items missing from the items table are never candidates
        width = len(items) + 1
        keys = user_of[known] * width + item_of[known]
        values = values[known]
        wanted = u_pos * width + i_pos
        start = np.searchsorted(keys, wanted, side="left")
        end = np.searchsorted(keys, wanted, side="right")
        end = np.minimum(end, start + self.max_neighbor_ratings)
        found = rows & (end > start)
        notes: list[list[int]] = [[] for _ in range(len(u_pos))]
        for r in np.flatnonzero(found):
            ratings = tuple(values[start[r] : end[r]].tolist())
            notes[r] = self.prompts.encode_neighbor_ratings(ratings)
        return notes

    def _side(self, ok, u_pos, i_pos, users: pa.Table, items: pa.Table) -> np.ndarray | None:
        if self.side is None or not ok.any():  # nothing to score: no side either
            return None
        cold = np.asarray(self.cold.side, dtype=np.float32)[None]
        u_side = np.repeat(cold, len(u_pos), axis=0)
        if len(users):
            known = u_pos >= 0
            u_side[known] = side_matrix(users[S.SIDE])[u_pos[known]]
        i_side = side_matrix(items[S.SIDE])[np.maximum(i_pos, 0)]
        out = combine_sides(self.side.names, self.side.mf_bias, u_side, i_side)
        out[~ok] = 0.0
        return out


def side_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column of equal-length rows as an (N, D) array."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1) if len(column) else flat.reshape(0, 0)


def score_block(
    scorer,
    block: pa.Table,
    keep_hidden: bool = False,
    desc: str | None = None,
    with_side: bool = True,
):
    """Score a token block's rows without a reason with a `TokenScorer`: each user's prefix
    from their first row, each row's suffix and (`with_side`, for hybrid heads) side
    features. Returns its `PairScores` (rows in the block's order, rejects left out) and the
    positions of the scored rows."""
    rows = np.flatnonzero(pc.is_null(block[S.REASON]).to_numpy(zero_copy_only=False))
    users = block[S.USER_ID].to_numpy(zero_copy_only=False)[rows]
    _, first, slots = np.unique(users, return_index=True, return_inverse=True)
    prefix_ids = block[S.PREFIX_IDS].to_pylist()
    prefixes = [prefix_ids[rows[f]] for f in first]
    suffixes = block[S.SUFFIX_IDS].to_pylist()
    side = None
    if with_side and block[S.SIDE].null_count == 0:
        side = side_matrix(block[S.SIDE])
    result = scorer.score(
        slots.reshape(-1),
        prefix=prefixes.__getitem__,
        suffix=lambda r: suffixes[rows[r]],
        side=(lambda r: side[rows[r]]) if side is not None else None,
        keep_hidden=keep_hidden,
        desc=desc,
    )
    return result, rows


def cut_block(block: pa.Table, budget: int) -> list[pa.Table]:
    """A token block in pieces of at most about `budget` bytes (Ray Data slices a block it
    finds too big, and a shard's rows must reach the writer whole), each a token block of its
    own: rows of a user stay together where they fit, and a user cut across pieces has their
    prefix on their first row to score in each piece. One piece when the block fits."""
    n = len(block)
    if n == 0 or block.nbytes <= budget:
        return [block]
    block = block.sort_by(S.USER_ID)  # a stable sort: input order within each user
    lengths = [pc.fill_null(pc.list_value_length(block[c]), 0).to_numpy() for c in TOKEN_LISTS]
    values = sum(lengths) * 4
    fixed = max(0.0, (block.nbytes - values.sum()) / n)
    row_bytes = values + fixed
    starts_at = np.cumsum(row_bytes) - row_bytes
    _, piece_of = np.unique((starts_at // budget).astype(np.int64), return_inverse=True)
    bounds = np.flatnonzero(np.diff(piece_of)) + 1
    ok = pc.is_null(block[S.REASON]).to_numpy(zero_copy_only=False)
    users = block[S.USER_ID].to_numpy(zero_copy_only=False)
    pieces = []
    for start, end in zip([0, *bounds], [*bounds, n], strict=True):
        piece = block.slice(start, end - start)
        if start and users[start] == users[start - 1]:  # a user cut here: repeat the prefix
            own = np.flatnonzero(ok & (users == users[start]))
            later = own[(own >= start) & (own < end)]
            if len(later) and own[0] < start:
                prefix = block[S.PREFIX_IDS][int(own[0])].as_py()
                piece = _set_row(piece, S.PREFIX_IDS, int(later[0] - start), prefix)
        pieces.append(piece)
    return pieces


TOKEN_LISTS = (S.PREFIX_IDS, S.SUFFIX_IDS, S.SIDE)


def _set_row(table: pa.Table, name: str, row: int, value) -> pa.Table:
    column = table[name].combine_chunks()
    new = pa.array([value], column.type)
    joined = pa.concat_arrays([column.slice(0, row), new, column.slice(row + 1)])
    return table.set_column(table.column_names.index(name), name, joined)
