"""The in-process pair scorer: (user, item) pairs -> prompts -> early-exit scores.

This is what one Ray actor holds. Rows of the same user (and the same history cut-off) share
a prompt prefix; with `share_prefixes` each prefix runs once per model batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from optirag.backbones import Backbone
from optirag.cf import SideFeatures
from optirag.config import Config, ExitConfig
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule, ScoreResult
from optirag.engine import LAUNCH_TOKENS, EngineKind, make_engine
from optirag.prompts import PromptBuilder

NO_CUTOFF = -1  # a row whose prompt may see the whole history (scoring, evaluation)


def cutoff_array(before_ts: np.ndarray | None, n: int) -> np.ndarray:
    """Per-row history cut-offs as int64, NO_CUTOFF where none is given."""
    if before_ts is None:
        return np.full(n, NO_CUTOFF, dtype=np.int64)
    return before_ts.astype(np.int64)


def _before(cutoff: int) -> int | None:
    return None if cutoff == NO_CUTOFF else cutoff


@dataclass
class PairScores:
    scores: np.ndarray  # (N,) float32
    exit_layers: np.ndarray  # (N,) int16
    head_probs: np.ndarray  # (N, num_heads) float32, NaN where a row never got
    layer_tokens: int
    hidden: np.ndarray | None = None  # (N, num_heads, H) float32 when asked for


class TokenScorer:
    """The model side of scoring: token ids in, early-exit scores out. This is all that a
    scoring actor of the job holds (its rows come assembled by the context stage); the
    in-process `PairScorer` feeds it from a `ContextStore`.

    Rows name their prefix by a slot; rows of one slot run next to each other, and with
    `share_prefixes` each prefix runs once per engine call. Calls hold at most `batch_rows`
    rows (reference engine) or `CALL_LAUNCHES` x `batch_tokens` prompt tokens (packed engine:
    one launch is at most `batch_tokens`, and the rows that survive a block refill the next
    block's launches from the whole call)."""

    CALL_LAUNCHES = 4

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        rule: ExitRule,
        share_prefixes: bool = True,
        compaction: bool = True,
        batch_rows: int = 64,
        engine: EngineKind = "packed",
        batch_tokens: int = LAUNCH_TOKENS,
    ) -> None:
        self.engine = make_engine(
            engine, backbone, heads, rule, compaction=compaction, max_tokens=batch_tokens
        )
        self.share_prefixes = share_prefixes
        self.by_tokens = engine == "packed"
        self.call_limit = self.CALL_LAUNCHES * batch_tokens if self.by_tokens else batch_rows

    def _no_rows(self, keep_hidden: bool) -> PairScores:
        heads, hidden = len(self.engine.heads.layers), self.engine.backbone.hidden_size
        return PairScores(
            scores=np.zeros(0, np.float32),
            exit_layers=np.zeros(0, np.int16),
            head_probs=np.zeros((0, heads), np.float32),
            layer_tokens=0,
            hidden=np.zeros((0, heads, hidden), np.float32) if keep_hidden else None,
        )

    def _cost(self, prefix: list[int], suffixes: list[list[int]]) -> tuple[int, list[int]]:
        """What a prefix group takes of a call: (once for its prefix, per row)."""
        if not self.by_tokens:
            return 0, [1] * len(suffixes)
        if self.share_prefixes:
            return len(prefix), [len(s) for s in suffixes]
        return 0, [len(prefix) + len(s) for s in suffixes]

    def score(
        self,
        slots: np.ndarray,
        prefix: Callable[[int], list[int]],
        suffix: Callable[[int], list[int]],
        side: Callable[[np.ndarray], np.ndarray] | None = None,
        keep_hidden: bool = False,
        desc: str | None = None,
    ) -> PairScores:
        """Scores of rows 0..N-1 in that order. `slots[r]`: row r's prefix; `prefix(slot)`,
        `suffix(row)`: token ids, asked for group by group as the calls fill; `side(rows)`:
        their side features. Rows run in slot order (a stable sort keeps it deterministic)."""
        n = len(slots)
        if n == 0:
            return self._no_rows(keep_hidden)
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
        groups: list = []  # (rows, prefix ids, suffix ids) of each slot, freed once scored

        def costs():
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                rows = order[a:b]
                ids = prefix(int(ordered[a])), [suffix(int(r)) for r in rows]
                groups.append((rows, *ids))
                yield self._cost(*ids)

        result_parts: list[ScoreResult] = []
        bar = tqdm(total=n, desc=desc, disable=desc is None, unit="pair")
        for call in pack_calls(costs(), self.call_limit):
            rows, prefixes, prefix_of, suffixes = [], [], [], []
            for g, a, b in call:
                group_rows, pre, sufs = groups[g]
                rows.append(group_rows[a:b])
                prefix_of += [len(prefixes)] * (b - a)
                prefixes.append(pre)
                suffixes += sufs[a:b]
                if b == len(group_rows):
                    groups[g] = None
            chunk = np.concatenate(rows)
            features = torch.from_numpy(side(chunk)) if side is not None else None
            if self.share_prefixes:
                result = self.engine.score(suffixes, prefixes, prefix_of, keep_hidden, features)
            else:
                result = self.engine.score(
                    [prefixes[j] + s for j, s in zip(prefix_of, suffixes, strict=True)],
                    keep_hidden=keep_hidden,
                    side=features,
                )
            result_parts.append(result)
            bar.update(len(chunk))
        bar.close()
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)

        def in_input_order(name: str) -> np.ndarray:
            return torch.cat([getattr(r, name) for r in result_parts]).numpy()[inverse]

        return PairScores(
            scores=in_input_order("scores"),
            exit_layers=in_input_order("exit_layers"),
            head_probs=in_input_order("head_probs"),
            hidden=in_input_order("hidden") if keep_hidden else None,
            layer_tokens=sum(r.layer_tokens for r in result_parts),
        )


class PairScorer:
    """(user, item) pairs -> prompts from a `ContextStore` -> a `TokenScorer`: training,
    evaluation and the benches score pairs this way; the scoring job assembles the same ids
    from the context tables instead."""

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        rule: ExitRule,
        contexts: ContextStore,
        prompts: PromptBuilder,
        share_prefixes: bool = True,
        compaction: bool = True,
        batch_rows: int = 64,
        side_features: SideFeatures | None = None,
        engine: EngineKind = "packed",
        batch_tokens: int = LAUNCH_TOKENS,
    ) -> None:
        self.tokens = TokenScorer(
            backbone, heads, rule, share_prefixes, compaction, batch_rows, engine, batch_tokens
        )
        self.contexts = contexts
        self.prompts = prompts
        self.side_features = side_features

    @property
    def engine(self):
        return self.tokens.engine

    @engine.setter
    def engine(self, engine) -> None:  # bench/engine.py records the engine's calls
        self.tokens.engine = engine

    def _suffix(self, user: int, cutoff: int, item: int) -> list[int]:
        return self.prompts.encode_suffix(*self.contexts.target_parts(user, item, _before(cutoff)))

    def _encode_prefix(self, user: int, cutoff: int) -> list[int]:
        ctx = self.contexts.context(user, _before(cutoff))
        return self.prompts.encode_prefix(ctx)

    def prompt_ids(
        self, users: np.ndarray, items: np.ndarray, before_ts: np.ndarray | None = None
    ) -> list[list[int]]:
        """Each pair's whole prompt, prefix + suffix (what training on prompts reads)."""
        cutoffs = cutoff_array(before_ts, len(users))
        return [
            self._encode_prefix(int(u), int(c)) + self._suffix(int(u), int(c), int(i))
            for u, i, c in zip(users, items, cutoffs, strict=True)
        ]

    def score(
        self,
        users: np.ndarray,
        items: np.ndarray,
        before_ts: np.ndarray | None = None,
        keep_hidden: bool = False,
        desc: str | None = None,
    ) -> PairScores:
        """Scores in input order. `before_ts` limits each row's history to interactions
        before it (training prompts); `keep_hidden` also returns the heads' inputs; `desc`
        shows a progress bar."""
        cutoffs = cutoff_array(before_ts, len(users))
        # One slot per (user, cut-off), numbered in that order.
        keys, slots = np.unique(np.stack([users, cutoffs]), axis=1, return_inverse=True)
        side = None
        if self.side_features is not None:
            side = lambda rows: self.side_features(users[rows], items[rows])  # noqa: E731
        return self.tokens.score(
            slots.reshape(-1),
            prefix=lambda k: self._encode_prefix(int(keys[0, k]), int(keys[1, k])),
            suffix=lambda r: self._suffix(int(users[r]), int(cutoffs[r]), int(items[r])),
            side=side,
            keep_hidden=keep_hidden,
            desc=desc,
        )


def pack_calls(
    groups: Iterable[tuple[int, list[int]]], limit: int
) -> Iterator[list[tuple[int, int, int]]]:
    """Cuts consecutive groups of rows that share a prefix into calls of at most `limit`.
    `groups` yields (cost of the group's prefix, cost of each row) and is read lazily: a call
    is yielded as soon as the next group does not fit in it. Each call is a list of
    (group index, first row, end row). A group is cut only when it alone exceeds a call
    (each piece pays its prefix again); a row over the limit gets a call of its own."""
    call: list[tuple[int, int, int]] = []
    used = 0
    for g, (pre, rows) in enumerate(groups):
        if call and used + pre + sum(rows) > limit:
            yield call
            call, used = [], 0
        start = 0
        while start < len(rows):
            end, take = start, pre
            while end < len(rows) and (end == start or used + take + rows[end] <= limit):
                take += rows[end]
                end += 1
            call.append((g, start, end))
            used += take
            start = end
            if start < len(rows):  # the group goes on in the next call
                yield call
                call, used = [], 0
    if call:
        yield call


def resolve_rule(cfg: ExitConfig, trained: dict) -> ExitRule:
    """The scoring config overrides the rule the head training calibrated."""
    kind = cfg.rule or trained.get("rule", "agreement")
    threshold = cfg.threshold if cfg.threshold is not None else trained.get("threshold", 0.05)
    return ExitRule(kind, float(threshold))


@dataclass
class ScoringModel:
    """What decides a score besides the backbone and the prompt: the heads, their exit config
    (the trained rule and tau; empty for untrained zero-shot heads) and the CF side features
    hybrid heads read."""

    heads: ExitHeads
    exit_config: dict = field(default_factory=dict)
    side_features: SideFeatures | None = None


def make_token_scorer(
    cfg: Config, backbone: Backbone, model: ScoringModel, rule: ExitRule | None = None
) -> TokenScorer:
    """The scoring job's model side, configured as `make_pair_scorer` configures its own."""
    return TokenScorer(
        backbone,
        model.heads,
        rule or resolve_rule(cfg.exits, model.exit_config),
        share_prefixes=cfg.compute.share_prefixes,
        compaction=cfg.exits.compaction,
        batch_rows=cfg.compute.batch_rows,
        engine=cfg.exits.engine,
        batch_tokens=cfg.compute.batch_tokens,
    )


def make_pair_scorer(
    cfg: Config,
    backbone: Backbone,
    model: ScoringModel,
    contexts: ContextStore,
    rule: ExitRule | None = None,
) -> PairScorer:
    """The one place a PairScorer is configured, for training, evaluation, the benches and
    scoring alike: the exit rule is `rule` when given, else the config's over the trained
    one; compaction, batching and prefix sharing come from the config."""
    return PairScorer(
        backbone,
        model.heads,
        rule or resolve_rule(cfg.exits, model.exit_config),
        contexts,
        PromptBuilder(backbone.tokenizer, cfg.prompts),
        share_prefixes=cfg.compute.share_prefixes,
        compaction=cfg.exits.compaction,
        batch_rows=cfg.compute.batch_rows,
        side_features=model.side_features,
        engine=cfg.exits.engine,
        batch_tokens=cfg.compute.batch_tokens,
    )
