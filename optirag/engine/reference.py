"""The reference engine: padded batches through the family's own layers, the obviously
correct path the packed engine is tested against (tests/test_packed.py, tests/test_families.py).

A batch runs block by block (the layers between two heads). After each head, rows whose exit
rule fired are removed from the batch, so compute falls with the exit rate. With shared
prefixes, each distinct prompt prefix (a user's context) runs once, block by block alongside
its candidates, and the candidates' suffix tokens attend to its keys and values; a prefix
stops running as soon as none of its candidates is still active.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optirag.backbones import Backbone
from optirag.backbones.attention import Positions
from optirag.early_exit import (
    ExitHeads,
    ExitRule,
    ScoreResult,
    causal_mask,
    check_score_call,
    pad_tokens,
    prob_yes,
)


class ReferenceEngine:
    """Scores token sequences with early exit. Inputs are lists of token ids:

    - plain: `score(suffixes)`, each suffix a whole prompt;
    - shared prefixes: `score(suffixes, prefixes, prefix_of)`, row i's prompt being
      prefixes[prefix_of[i]] + suffixes[i].
    """

    def __init__(
        self, backbone: Backbone, heads: ExitHeads, rule: ExitRule, *, compaction: bool = True
    ) -> None:
        self.backbone = backbone
        self.heads = heads
        self.rule = rule
        self.compaction = compaction

    @torch.inference_mode()
    def score(
        self,
        suffixes: list[list[int]],
        prefixes: list[list[int]] | None = None,
        prefix_of: list[int] | None = None,
        keep_hidden: bool = False,
        side: torch.Tensor | None = None,
    ) -> ScoreResult:
        """`side`: (N, K) CF features for hybrid heads. `keep_hidden` also returns each
        head's input, the last-token state (N, heads, H), for head training; it needs the
        'none' rule so every row reaches every head."""
        check_score_call(self.rule, self.heads, keep_hidden, side)
        bb, dev = self.backbone, self.backbone.device
        n = len(suffixes)
        suffix_ids, suffix_len = pad_tokens(suffixes, dev)  # (N, S), (N,)
        rows = torch.arange(n, device=dev)  # original index of each active row
        if side is not None:
            side = side.to(dev)
        ctx = _PrefixContext.build(bb, prefixes, prefix_of, dev) if prefixes else None

        hidden = bb.embed(suffix_ids)  # (N, S, H)
        offset = (
            ctx.lengths[ctx.row_prefix] if ctx else torch.zeros(n, dtype=torch.long, device=dev)
        )
        positions = offset[:, None] + torch.arange(suffix_ids.shape[1], device=dev)  # (N, S)

        scores = torch.full((n,), float("nan"), device=dev)
        exit_layers = torch.zeros(n, dtype=torch.int16, device=dev)
        head_probs = torch.full((n, len(self.heads.layers)), float("nan"), device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        states = [] if keep_hidden else None
        p_prev: torch.Tensor | None = None
        layer_tokens, start = 0, 0

        for h, end in enumerate(self.heads.layers):
            if ctx is not None:
                layer_tokens += ctx.run_block(start, end)
            mask = _suffix_mask(suffix_ids.shape[1], offset, ctx, dev)  # (Na, 1, S, P + S)
            layer_tokens += int(suffix_len.sum()) * (end - start)
            keys = positions if ctx is None else torch.cat([ctx.key_positions(), positions], 1)
            hidden = bb.run_layers(
                hidden,
                start,
                end,
                bb.rotary(hidden, positions),
                mask=mask,
                cache=ctx.cache if ctx else None,
                attention=Positions(positions, keys),
            )
            start = end
            last = hidden[torch.arange(len(rows), device=dev), suffix_len - 1]  # (Na, H)
            if states is not None:
                states.append(last.float().cpu())
            p = prob_yes(self.heads.heads[h](last, None if side is None else side[rows]))
            head_probs[rows, h] = torch.where(done[rows], head_probs[rows, h], p)
            fire = self.rule.fires(p, p_prev) | (h == len(self.heads.layers) - 1)
            newly = fire & ~done[rows]
            scores[rows[newly]] = p[newly]
            exit_layers[rows[newly]] = end
            done[rows[newly]] = True
            if self.compaction:
                keep = ~fire
                rows, hidden, positions = rows[keep], hidden[keep], positions[keep]
                suffix_ids, suffix_len, offset = suffix_ids[keep], suffix_len[keep], offset[keep]
                p = p[keep]
                if ctx is not None:
                    ctx.keep_rows(keep)
            if bool(done.all()):
                break
            p_prev = p

        return ScoreResult(
            scores=scores.float().cpu(),
            exit_layers=exit_layers.cpu(),
            head_probs=head_probs.float().cpu(),
            layer_tokens=layer_tokens,
            hidden=torch.stack(states, dim=1) if states is not None else None,
        )


class _BlockKV:
    """A duck-typed transformers Cache for one block of layers.

    During the prefix pass (`rows is None`) it records each layer's keys/values; during the
    suffix pass it prepends the recorded prefix keys/values of each row's own prefix.
    """

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None  # (Na,) prefix index of each suffix row

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.rows is None:
            self.kv[layer_idx] = (key, value)  # (U, KVH, P, D)
            return key, value
        pk, pv = self.kv[layer_idx]
        return (
            torch.cat([pk[self.rows], key], dim=2),  # (Na, KVH, P + S, D)
            torch.cat([pv[self.rows], value], dim=2),
        )


@dataclass
class _PrefixContext:
    """The shared prefixes of a batch, advanced block by block with their candidates."""

    backbone: Backbone
    hidden: torch.Tensor  # (U, P, H) prefix states after the last block run
    lengths: torch.Tensor  # (U,) real tokens per prefix (right-padded)
    row_prefix: torch.Tensor  # (Na,) prefix of each active suffix row
    cache: _BlockKV

    @classmethod
    def build(cls, bb: Backbone, prefixes, prefix_of, dev) -> _PrefixContext:
        if prefix_of is None or len(prefix_of) == 0:
            raise ValueError("shared prefixes need prefix_of, one prefix index per row")
        ids, lengths = pad_tokens(prefixes, dev)
        row_prefix = torch.as_tensor(prefix_of, dtype=torch.long, device=dev)
        return cls(bb, bb.embed(ids), lengths, row_prefix, _BlockKV())

    def run_block(self, start: int, end: int) -> int:
        """Advance the prefixes through layers [start, end); returns tokens x layers run."""
        p = self.hidden.shape[1]
        positions = torch.arange(p, device=self.hidden.device).expand(len(self.lengths), p)
        keys = torch.arange(p, device=self.hidden.device)
        causal = keys[None, :] <= keys[:, None]  # (P, P)
        valid = keys[None, :] < self.lengths[:, None]  # (U, P)
        mask = (causal[None] & valid[:, None, :])[:, None]  # (U, 1, P, P)
        self.cache.kv.clear()
        self.cache.rows = None
        rotary = self.backbone.rotary(self.hidden, positions)
        self.hidden = self.backbone.run_layers(
            self.hidden,
            start,
            end,
            rotary,
            mask=mask,
            cache=self.cache,
            attention=Positions(positions, positions),
        )
        self.cache.rows = self.row_prefix
        return int(self.lengths.sum()) * (end - start)

    def key_positions(self) -> torch.Tensor:
        """(Na, P) positions of the prefix keys each active row reads."""
        p = self.hidden.shape[1]
        return torch.arange(p, device=self.hidden.device).expand(len(self.row_prefix), p)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop exited rows, then every prefix no remaining row uses."""
        used, self.row_prefix = torch.unique(self.row_prefix[keep], return_inverse=True)
        self.hidden, self.lengths = self.hidden[used], self.lengths[used]
        self.cache.rows = self.row_prefix


def _suffix_mask(s: int, offset, ctx: _PrefixContext | None, dev) -> torch.Tensor:
    """(Na, 1, S, P + S) bool: a suffix token sees its prefix's real tokens and earlier
    suffix tokens. Right padding needs no key mask: pads come after every real token."""
    causal = causal_mask(len(offset), s, dev)[:, 0]  # (Na, S, S)
    if ctx is None:
        return causal[:, None]
    p = ctx.hidden.shape[1]
    prefix_keys = torch.arange(p, device=dev)[None, :] < ctx.lengths[ctx.row_prefix][:, None]
    prefix = prefix_keys[:, None, :].expand(len(offset), s, p)  # (Na, S, P)
    return torch.cat([prefix, causal], dim=2)[:, None]
