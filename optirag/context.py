"""Per-user prompt context looked up from the interactions, items and neighbour tables.

A user's history is their own interactions (optionally only those before a timestamp, so a
training prompt never sees the target or anything later). The similar-user block ranks the
items liked by the user's neighbours by the summed similarity of the neighbours who liked
them, skipping items the user has already seen.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from optirag import schema as S
from optirag.config import PromptConfig
from optirag.ids import lookup
from optirag.prompts import UserContext, item_text, rating_note


class ItemTexts:
    """Item id -> prompt text. The target item is shown with its text; history items by title
    only unless asked, which keeps the per-user prefix short."""

    def __init__(self, items: pa.Table, cfg: PromptConfig) -> None:
        ids, titles, texts = (items[c].to_pylist() for c in (S.ITEM_ID, S.TITLE, S.TEXT))
        self.target = {
            int(i): item_text(t, x, cfg.max_item_chars)
            for i, t, x in zip(ids, titles, texts, strict=True)
        }
        self.history = (
            self.target
            if cfg.history_item_text
            else {
                int(i): item_text(t, None, cfg.max_item_chars)
                for i, t in zip(ids, titles, strict=True)
            }
        )


class ItemRatings:
    """Each item's mean rating and rating count, optionally over ratings before a time only
    (a training prompt must not see its target's own rating).

    Entries are (item, ts, rating sum, count): one per rating, or one per item holding its
    totals when the history is too big to keep (`totals`, no time cut then)."""

    def __init__(self, items: np.ndarray, ts: np.ndarray, sums: np.ndarray, counts: np.ndarray):
        order = np.lexsort((ts, items))
        self._ts = ts[order]
        self._sum = np.cumsum(sums[order], dtype=np.float64)
        self._count = np.cumsum(counts[order], dtype=np.int64)
        self._ids, self._starts = np.unique(items[order], return_index=True)
        self._ends = np.append(self._starts[1:], len(order))

    @classmethod
    def from_interactions(cls, interactions: pa.Table) -> ItemRatings:
        rated = interactions.filter(pc.is_valid(interactions[S.RATING]))
        items = rated[S.ITEM_ID].to_numpy()
        return cls(items, rated[S.TS].to_numpy(), rated[S.RATING].to_numpy(), np.ones_like(items))

    @classmethod
    def totals(cls, history: ds.Dataset) -> ItemRatings:
        """Totals per item, read one batch at a time: memory grows with items, not ratings."""
        parts = [_EMPTY_TOTALS]
        for batch in history.to_batches(columns=[S.ITEM_ID, S.RATING]):
            parts.append(
                pa.Table.from_batches([batch])
                .group_by(S.ITEM_ID)
                .aggregate([(S.RATING, "sum"), (S.RATING, "count")])
            )
            if len(parts) >= 64:  # fold the partial totals so they stay O(items)
                parts = [_fold(parts)]
        table = _fold(parts)
        items = table[S.ITEM_ID].to_numpy()
        return cls(
            items,
            np.full(len(items), np.iinfo(np.int64).min),
            table["rating_sum"].to_numpy(),
            table["rating_count"].to_numpy(),
        )

    def lookup(self, item: int, before_ts: int | None = None) -> tuple[float, int]:
        """(mean rating, count); (nan, 0) for an item without ratings."""
        pos = int(lookup(self._ids, np.asarray([item]))[0])
        if pos < 0:
            return float("nan"), 0
        start, end = int(self._starts[pos]), int(self._ends[pos])
        if before_ts is not None:
            end = start + int(np.searchsorted(self._ts[start:end], before_ts, side="left"))
        if end == start:
            return float("nan"), 0
        before = (self._sum[start - 1], self._count[start - 1]) if start else (0.0, 0)
        count = int(self._count[end - 1] - before[1])
        return float(self._sum[end - 1] - before[0]) / count, count


_EMPTY_TOTALS = pa.table(
    {
        S.ITEM_ID: pa.array([], pa.int64()),
        "rating_sum": pa.array([], pa.float64()),
        "rating_count": pa.array([], pa.int64()),
    }
)


def _fold(parts: list[pa.Table]) -> pa.Table:
    """Sum per-batch (item, rating_sum, rating_count) aggregates into one row per item."""
    table = pa.concat_tables(parts, promote_options="permissive")
    folded = table.group_by(S.ITEM_ID).aggregate([("rating_sum", "sum"), ("rating_count", "sum")])
    return pa.table(
        {
            S.ITEM_ID: folded[S.ITEM_ID],
            "rating_sum": folded["rating_sum_sum"],
            "rating_count": folded["rating_count_sum"],
        }
    )


class ContextStore:
    def __init__(
        self,
        interactions: pa.Table,
        items: pa.Table,
        neighbors: pa.Table | None,
        cfg: PromptConfig,
        item_ratings: ItemRatings | None = None,
    ) -> None:
        """`item_ratings` (for `cfg.target_ratings`): default, from `interactions`."""
        self.cfg = cfg
        self.texts = ItemTexts(items, cfg)
        self.item_texts = self.texts.target
        if cfg.target_ratings and item_ratings is None:
            item_ratings = ItemRatings.from_interactions(interactions)
        self.item_ratings = item_ratings
        self.load_users(interactions, neighbors)

    def load_users(self, interactions: pa.Table, neighbors: pa.Table | None) -> None:
        """Replace the user-side tables; the scoring job loads one shard's users at a time so
        that an actor's memory does not grow with the number of users in a night."""
        order = pc.sort_indices(
            interactions, [(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")]
        )
        table = interactions.select([S.USER_ID, S.ITEM_ID, S.LABEL, S.TS, S.RATING]).take(order)
        self._users = table[S.USER_ID].to_numpy()
        self._ratings = table[S.RATING].to_numpy(zero_copy_only=False)
        self._items = table[S.ITEM_ID].to_numpy()
        self._labels = table[S.LABEL].to_numpy().astype(bool)
        self._ts = table[S.TS].to_numpy()
        first_of_user = np.ones(len(self._users), dtype=bool)
        first_of_user[1:] = self._users[1:] != self._users[:-1]
        starts = np.flatnonzero(first_of_user)
        ends = np.append(starts[1:], len(self._users))[: len(starts)]
        self._span = {
            int(u): (int(a), int(b))
            for u, a, b in zip(self._users[starts], starts, ends, strict=True)
        }
        self._neighbors: dict[int, tuple[list[int], list[float]]] = {}
        if neighbors is not None:
            for u, ids, sims in zip(
                neighbors[S.USER_ID].to_pylist(),
                neighbors[S.NEIGHBOR_IDS].to_pylist(),
                neighbors[S.SIMILARITIES].to_pylist(),
                strict=True,
            ):
                self._neighbors[int(u)] = (ids, sims)

    @property
    def users(self) -> set[int]:
        """The users whose history is loaded."""
        return set(self._span)

    def _slice(self, user: int, before_ts: int | None) -> slice:
        start, end = self._span.get(user, (0, 0))
        if before_ts is not None:
            end = start + int(np.searchsorted(self._ts[start:end], before_ts, side="left"))
        return slice(start, end)

    def context(self, user: int, before_ts: int | None = None) -> UserContext:
        own = self._slice(user, before_ts)
        recent = slice(max(own.start, own.stop - self.cfg.max_history), own.stop)
        history = [
            (self.texts.history.get(int(i), "(unknown item)"), bool(y))
            for i, y in zip(self._items[recent], self._labels[recent], strict=True)
        ]
        seen = set(self._items[own].tolist())
        return UserContext(history, self._neighbor_items(user, seen, before_ts))

    def _neighbor_items(self, user: int, seen: set[int], before_ts: int | None) -> list[str]:
        if not self.cfg.use_neighbors or self.cfg.max_neighbor_items == 0:
            return []
        ids, sims = self._neighbors.get(user, ([], []))
        weight: dict[int, float] = defaultdict(float)
        for neighbor, sim in zip(ids, sims, strict=True):
            span = self._slice(int(neighbor), before_ts)
            for item in self._items[span][self._labels[span]].tolist():
                if item not in seen:
                    weight[item] += sim
        ranked = sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))
        return [self.texts.history[i] for i, _ in ranked[: self.cfg.max_neighbor_items]]

    def target_text(self, user: int, item: int, before_ts: int | None = None) -> str:
        """The target item as the prompt shows it; with `target_ratings`, followed by its
        mean rating and count and similar users' ratings of it (all before `before_ts`)."""
        text = self.item_texts[item]
        if not self.cfg.target_ratings:
            return text
        return f"{text} {rating_note(*self.target_ratings(user, item, before_ts))}"

    def target_parts(
        self, user: int, item: int, before_ts: int | None = None
    ) -> tuple[str, tuple[float, int] | None, tuple[float, ...]]:
        """What `PromptBuilder.encode_suffix` takes: the item's text, and with
        `target_ratings` its (mean rating, count) and the neighbours' ratings of it."""
        text = self.item_texts[item]
        if not self.cfg.target_ratings:
            return text, None, ()
        mean, count, ratings = self.target_ratings(user, item, before_ts)
        return text, (mean, count), tuple(ratings)

    def target_ratings(
        self, user: int, item: int, before_ts: int | None = None
    ) -> tuple[float, int, list[float]]:
        """What `target_text` shows with `target_ratings`: the item's mean rating (nan when
        unrated) and count, and the neighbours' ratings of it, all before `before_ts`."""
        mean, count = self.item_ratings.lookup(item, before_ts)
        return mean, count, self._neighbor_ratings(user, item, before_ts)

    def neighbor_rated(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """Every rating by the user's neighbours (no time cut) as (items, ratings), sorted by
        item and, within an item, in the order `_neighbor_ratings` reads them: what the
        context stage stores so that the rating note needs no neighbour histories."""
        if not self.cfg.target_ratings:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        items, ratings = [np.empty(0, np.int64)], [np.empty(0, np.float32)]
        for neighbor in self._neighbors.get(user, ([], []))[0]:
            span = self._slice(int(neighbor), None)
            rated = ~np.isnan(self._ratings[span])
            items.append(self._items[span][rated])
            ratings.append(self._ratings[span][rated])
        items, ratings = np.concatenate(items), np.concatenate(ratings)
        order = np.argsort(items, kind="stable")
        return items[order].astype(np.int64), ratings[order].astype(np.float32)

    def _neighbor_ratings(self, user: int, item: int, before_ts: int | None) -> list[float]:
        """Ratings of `item` by the user's neighbours, most similar first."""
        ratings = []
        for neighbor in self._neighbors.get(user, ([], []))[0]:
            span = self._slice(int(neighbor), before_ts)
            rated = self._ratings[span][self._items[span] == item]
            ratings += [float(r) for r in rated if r == r]  # r != r: a missing rating
            if len(ratings) >= self.cfg.max_neighbor_ratings:
                return ratings[: self.cfg.max_neighbor_ratings]
        return ratings
