"""The in-process pair scorer: (user, item) pairs -> prompts -> early-exit scores.

This is what one Ray actor holds. Rows of the same user (and the same history cut-off) share
a prompt prefix; with `share_prefixes` each prefix runs once per model batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from optirag.backbone import Backbone
from optirag.cf import SideFeatures
from optirag.config import Config, ExitConfig
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule, ScoreResult
from optirag.packed import EngineKind, make_engine
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
    `share_prefixes` each prefix runs once per model batch."""

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        rule: ExitRule,
        share_prefixes: bool = True,
        compaction: bool = True,
        batch_rows: int = 64,
        engine: EngineKind = "packed",
    ) -> None:
        self.engine = make_engine(engine, backbone, heads, rule, compaction=compaction)
        self.share_prefixes = share_prefixes
        self.batch_rows = batch_rows

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
        `suffix(row)`: token ids, asked for batch by batch; `side(rows)`: their side
        features. Rows run in slot order (a stable sort keeps it deterministic)."""
        n = len(slots)
        order = np.argsort(slots, kind="stable")
        result_parts: list[ScoreResult] = []
        chunks = prefix_batches(slots[order], np.zeros(n, np.int64), self.batch_rows)
        for chunk in tqdm(
            [order[c] for c in chunks], desc=desc, disable=desc is None, unit="batch"
        ):
            keys = slots[chunk].tolist()
            unique = list(dict.fromkeys(keys))  # rows are sorted: a prefix never comes back
            prefixes = [prefix(k) for k in unique]
            suffixes = [suffix(int(r)) for r in chunk]
            features = torch.from_numpy(side(chunk)) if side is not None else None
            at = {k: j for j, k in enumerate(unique)}
            if self.share_prefixes:
                result = self.engine.score(
                    suffixes, prefixes, [at[k] for k in keys], keep_hidden, features
                )
            else:
                result = self.engine.score(
                    [prefixes[at[k]] + s for k, s in zip(keys, suffixes, strict=True)],
                    keep_hidden=keep_hidden,
                    side=features,
                )
            result_parts.append(result)
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
    ) -> None:
        self.tokens = TokenScorer(
            backbone, heads, rule, share_prefixes, compaction, batch_rows, engine
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
        return [self._encode_prefix(int(u), int(c)) + self._suffix(int(u), int(c), int(i))
                for u, i, c in zip(users, items, cutoffs, strict=True)]  # fmt: skip

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


def prefix_batches(users: np.ndarray, cutoffs: np.ndarray, batch_rows: int) -> list[slice]:
    """Slices of rows (sorted by prefix) of at most `batch_rows`, never cutting a prefix's
    rows in two unless they alone exceed a batch: a prefix split across batches runs twice."""
    n = len(users)
    starts = np.flatnonzero(np.r_[True, (users[1:] != users[:-1]) | (cutoffs[1:] != cutoffs[:-1])])
    bounds = np.r_[starts, n]
    batches, begin = [], 0
    for g in range(len(starts)):
        end = int(bounds[g + 1])
        if end - begin > batch_rows and int(starts[g]) > begin:
            batches.append(slice(begin, int(starts[g])))  # close before this group
            begin = int(starts[g])
        while end - begin > batch_rows:  # a group larger than a batch
            batches.append(slice(begin, begin + batch_rows))
            begin += batch_rows
    if begin < n:
        batches.append(slice(begin, n))
    return batches


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
    )
