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


class ContextStore:
    def __init__(
        self,
        interactions: pa.Table,
        items: pa.Table,
        neighbors: pa.Table | None,
        cfg: PromptConfig,
    ) -> None:
        self.cfg = cfg
        ids, titles, texts = (items[c].to_pylist() for c in (S.ITEM_ID, S.TITLE, S.TEXT))
        # The target item is shown with its text; history items by title only unless asked,
        # which keeps the per-user prefix short.
        self.item_texts = {
            int(i): item_text(t, x, cfg.max_item_chars)
            for i, t, x in zip(ids, titles, texts, strict=True)
        }
        self.history_texts = (
            self.item_texts
            if cfg.history_item_text
            else {
                int(i): item_text(t, None, cfg.max_item_chars)
                for i, t in zip(ids, titles, strict=True)
            }
        )
        order = pc.sort_indices(
            interactions, [(S.USER_ID, "ascending"), (S.TS, "ascending"), (S.ITEM_ID, "ascending")]
        )
        table = interactions.take(order)
        self._users = table[S.USER_ID].to_numpy()
        self._items = table[S.ITEM_ID].to_numpy()
        self._labels = table[S.LABEL].to_numpy().astype(bool)
        self._ts = table[S.TS].to_numpy()
        starts = np.flatnonzero(np.r_[True, self._users[1:] != self._users[:-1]])
        ends = np.r_[starts[1:], len(self._users)]
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
            (self.history_texts.get(int(i), "(unknown item)"), bool(y))
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
        return [self.history_texts[i] for i, _ in ranked[: self.cfg.max_neighbor_items]]
