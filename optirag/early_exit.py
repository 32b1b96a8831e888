"""Multi-head early exit: exit heads, exit rules and batched scoring with compaction.

A batch runs block by block (the layers between two heads). After each head, rows whose exit
rule fired are removed from the batch, so compute falls with the exit rate. With shared
prefixes, each distinct prompt prefix (a user's context) runs once, block by block alongside
its candidates, and the candidates' suffix tokens attend to its keys and values; a prefix
stops running as soon as none of its candidates is still active.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from optirag.backbone import Backbone

RuleKind = Literal["agreement", "confidence", "none"]


def default_exit_layers(num_layers: int, num_heads: int) -> list[int]:
    """`num_heads` depths evenly spaced and ending at the last layer (paper: 5, 10, ..., 30)."""
    num_heads = min(num_heads, num_layers)
    return sorted({round(num_layers * (i + 1) / num_heads) for i in range(num_heads)})


class RMSNorm(nn.Module):
    """Llama's RMSNorm (computed in float32, cast back), owned by each exit head."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ExitHead(nn.Module):
    """Final norm + a map to (Yes, No) logits of the last-token state: linear, or one hidden
    layer (`mlp_size`). A hybrid head also reads `side_size` CF features concatenated to the
    normalised state."""

    def __init__(self, hidden_size: int, eps: float, side_size: int = 0, mlp_size: int = 0):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        inputs = hidden_size + side_size
        self.proj = (
            nn.Sequential(nn.Linear(inputs, mlp_size), nn.GELU(), nn.Linear(mlp_size, 2))
            if mlp_size
            else nn.Linear(inputs, 2)
        )

    def forward(self, hidden: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(hidden)  # (B, H)
        if side is not None:
            x = torch.cat([x, side.to(device=x.device, dtype=x.dtype)], dim=-1)  # (B, H + K)
        return self.proj(x)  # (B, 2): Yes, No logits


def prob_yes(logits: torch.Tensor) -> torch.Tensor:
    """P(Yes | Yes or No) from (B, 2) logits, in float32."""
    return torch.softmax(logits.float(), dim=-1)[..., 0]


@dataclass(frozen=True)
class HeadsSpec:
    """What shapes a set of exit heads: the one description training, evaluation and scoring
    build heads from, stored in the exit config beside the weights."""

    layers: tuple[int, ...]
    hidden_size: int
    eps: float
    side_features: tuple[str, ...] = ()  # CF features hybrid heads read (optirag.cf), in order
    mlp_size: int = 0  # hidden units of MLP heads; 0: linear heads

    @classmethod
    def from_dict(cls, d: dict) -> HeadsSpec:
        """From an exit config (older ones lack the hybrid/MLP keys)."""
        return cls(tuple(d["layers"]), d["hidden_size"], d["eps"],
                   tuple(d.get("side_features", ())), d.get("mlp_size", 0))  # fmt: skip

    @classmethod
    def for_backbone(cls, backbone: Backbone, layers, side_features=(), mlp_size: int = 0):
        eps = backbone.final_norm.variance_epsilon
        return cls(tuple(layers), backbone.hidden_size, eps, tuple(side_features), mlp_size)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {**d, "layers": list(self.layers), "side_features": list(self.side_features)}


class ExitHeads(nn.Module):
    """One ExitHead per exit layer. `from_backbone` starts each linear head as the model's own
    final norm and LM-head rows for Yes/No (side-feature weights zero), so the untrained last
    head gives exactly the model's P(Yes | Yes or No). Needs no backbone otherwise, so
    training workers stay light. `side_names` are the CF features hybrid heads read, in order
    (see optirag.cf)."""

    def __init__(
        self,
        layers: list[int],
        hidden_size: int,
        eps: float,
        side_names: list[str] | tuple[str, ...] = (),
        mlp_size: int = 0,
    ) -> None:
        super().__init__()
        if not layers or layers != sorted(set(layers)) or layers[0] <= 0:
            raise ValueError(f"exit layers must be increasing and positive, got {layers}")
        self.layers = list(layers)
        self.hidden_size, self.eps = hidden_size, eps
        self.side_names, self.mlp_size = list(side_names), mlp_size
        self.heads = nn.ModuleList(
            ExitHead(hidden_size, eps, len(self.side_names), mlp_size) for _ in layers
        )

    @classmethod
    def from_spec(cls, spec: HeadsSpec) -> ExitHeads:
        return cls(list(spec.layers), spec.hidden_size, spec.eps, spec.side_features,
                   spec.mlp_size)  # fmt: skip

    @property
    def spec(self) -> HeadsSpec:
        return HeadsSpec(tuple(self.layers), self.hidden_size, self.eps,
                         tuple(self.side_names), self.mlp_size)  # fmt: skip

    @classmethod
    def from_backbone(
        cls,
        backbone: Backbone,
        layers: list[int],
        side_names: list[str] | tuple[str, ...] = (),
        mlp_size: int = 0,
    ) -> ExitHeads:
        if layers[-1] != backbone.num_layers:
            raise ValueError(f"last exit layer must be {backbone.num_layers}, got {layers[-1]}")
        norm = backbone.final_norm
        heads = cls.from_spec(HeadsSpec.for_backbone(backbone, layers, side_names, mlp_size))
        rows = backbone.model.lm_head.weight[[backbone.yes_id, backbone.no_id]]  # (2, H)
        with torch.no_grad():
            for head in heads.heads:
                head.norm.weight.copy_(norm.weight)
                if not mlp_size:  # an MLP head has no zero-shot equivalent: random init
                    head.proj.weight.zero_()
                    head.proj.weight[:, : rows.shape[1]].copy_(rows)
                    head.proj.bias.zero_()
        return heads.to(device=backbone.device, dtype=backbone.dtype)

    def forward(self, states: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """(N, num_heads, H) last-token states [+ (N, K) side features] -> (N, num_heads)
        Yes-minus-No logits."""
        self.check_side(side)
        logits = [head(states[:, h], side) for h, head in enumerate(self.heads)]
        return torch.stack([lg[:, 0] - lg[:, 1] for lg in logits], dim=1).float()

    def check_side(self, side: torch.Tensor | None) -> None:
        expected = len(self.side_names)
        got = 0 if side is None else side.shape[-1]
        if got != expected:
            raise ValueError(f"heads read side features {self.side_names}, got {got} columns")

    def for_backbone(self, backbone: Backbone) -> ExitHeads:
        """These heads on the backbone's device and dtype; they must end at its last layer."""
        if self.layers[-1] != backbone.num_layers:
            raise ValueError("the heads were trained for another backbone depth")
        return self.to(device=backbone.device, dtype=backbone.dtype)


@dataclass(frozen=True)
class ExitRule:
    """When a row may stop: 'agreement' (paper: |p_n - p_(n-1)| < threshold), 'confidence'
    (max(p, 1 - p) >= threshold) or 'none' (full depth). The last head always ends a row."""

    kind: RuleKind = "agreement"
    threshold: float = 0.05

    def fires(self, p: torch.Tensor, p_prev: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "none":
            return torch.zeros_like(p, dtype=torch.bool)
        if self.kind == "confidence":
            return torch.maximum(p, 1 - p) >= self.threshold
        if p_prev is None:  # the first head has nothing to agree with
            return torch.zeros_like(p, dtype=torch.bool)
        return (p - p_prev).abs() < self.threshold


@dataclass
class ScoreResult:
    scores: torch.Tensor  # (N,) float32 P(Yes)
    exit_layers: torch.Tensor  # (N,) int16, layers run before the row exited
    head_probs: torch.Tensor  # (N, num_heads) float32, NaN for heads a row never reached
    layer_tokens: int = 0  # sum over layers of the tokens that went through it (compute)
    hidden: torch.Tensor | None = None  # (N, num_heads, H) float32 when asked for


class EarlyExitScorer:
    """Scores token sequences with early exit. Inputs are lists of token ids:

    - plain: `score(suffixes)`, each suffix a whole prompt;
    - shared prefixes: `score(suffixes, prefixes, prefix_of)`, row i's prompt being
      prefixes[prefix_of[i]] + suffixes[i].
    """

    def __init__(
        self, backbone: Backbone, heads: ExitHeads, rule: ExitRule, compaction: bool = True
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
        if keep_hidden and self.rule.kind != "none":
            raise ValueError("keep_hidden needs ExitRule('none')")
        self.heads.check_side(side)
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
            hidden = bb.run_layers(
                hidden, start, end, mask, bb.rotary(hidden, positions), ctx.cache if ctx else None
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
        self.hidden = self.backbone.run_layers(
            self.hidden, start, end, mask, self.backbone.rotary(self.hidden, positions), self.cache
        )
        self.cache.rows = self.row_prefix
        return int(self.lengths.sum()) * (end - start)

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


def causal_mask(b: int, t: int, dev) -> torch.Tensor:
    """(B, 1, T, T) bool: each token sees itself and earlier ones; right-padded rows need no
    key mask, pads come after every real token."""
    q = torch.arange(t, device=dev)
    return (q[None, :] <= q[:, None]).expand(b, t, t)[:, None]


def pad_tokens(seqs: list[list[int]], dev="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with 0 (never attended to); returns ids (B, T) and lengths (B,)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty token sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=dev)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths
