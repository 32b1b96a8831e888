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

from optirag import schema as S
from optirag.config import PromptConfig
from optirag.prompts import UserContext, item_text


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


def user_filter(users: np.ndarray) -> pc.Expression:
    """Rows of these users. The min/max bounds let Parquet statistics skip whole row groups
    of a table sorted by user, so a shard reads about its own users' rows only."""
    field = pc.field(S.USER_ID)
    if len(users) == 0:
        return pc.scalar(False)
    bounds = (field >= int(users.min())) & (field <= int(users.max()))
    return bounds & field.isin(pa.array(users, pa.int64()))


class ContextStore:
    def __init__(
        self,
        interactions: pa.Table,
        items: pa.Table,
        neighbors: pa.Table | None,
        cfg: PromptConfig,
    ) -> None:
        self.cfg = cfg
        self.texts = ItemTexts(items, cfg)
        self.item_texts = self.texts.target
        self.load_users(interactions, neighbors)

    def load_users(self, interactions: pa.Table, neighbors: pa.Table | None) -> None:
        """Replace the user-side tables; the scoring job loads one shard's users at a time so
        that an actor's memory does not grow with the number of users in a night."""
        order = pc.sort_indices(
            interactions, [(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")]
        )
        table = interactions.select([S.USER_ID, S.ITEM_ID, S.LABEL, S.TS]).take(order)
        self._users = table[S.USER_ID].to_numpy()
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

    def has_item(self, item: int) -> bool:
        return item in self.item_texts

    @property
    def users(self) -> set[int]:
        """The users whose history is loaded."""
        return set(self._span)

    def knows_user(self, user: int) -> bool:
        return user in self._span

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
