"""Multi-head early exit: exit heads, exit rules and what the engines return.

An untrained head is the model's own answer: the family's final norm (its kind and eps),
the Yes/No rows of the LM head with the family's logit scale and bias folded in, and the
family's final logit soft-cap, so the last head at full depth gives exactly the model's
P(Yes | Yes or No). The engines that run them are in optirag.engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from optirag.backbones import Backbone
from optirag.backbones.families import NormKind

RuleKind = Literal["agreement", "confidence", "none"]


def default_exit_layers(num_layers: int, num_heads: int) -> list[int]:
    """`num_heads` depths evenly spaced and ending at the last layer (paper: 5, 10, ..., 30)."""
    num_heads = min(num_heads, num_layers)
    return sorted({round(num_layers * (i + 1) / num_heads) for i in range(num_heads)})


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, owned by each exit head: Llama's `w * x` ('rms', cast
    back before the weight) or Gemma's `(1 + w) * x` ('rms_1p', cast back after it)."""

    def __init__(self, hidden_size: int, eps: float, kind: NormKind = "rms") -> None:
        super().__init__()
        if kind not in ("rms", "rms_f32", "rms_1p"):
            raise ValueError(f"norm kind {kind!r}: rms, rms_f32 or rms_1p")
        self.weight = nn.Parameter(
            torch.ones(hidden_size) if kind == "rms" else torch.zeros(hidden_size)
        )
        self.eps, self.kind = eps, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms_1p":
            return (x * (1.0 + self.weight.float())).to(dtype)
        if self.kind == "rms_f32":
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


class ExitHead(nn.Module):
    """Final norm + a map to (Yes, No) logits of the last-token state: linear, or one hidden
    layer (`mlp_size`), then the family's logit soft-cap if it has one. A hybrid head also
    reads `side_size` CF features concatenated to the normalised state."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        side_size: int = 0,
        mlp_size: int = 0,
        norm: NormKind = "rms",
        softcap: float | None = None,
    ):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps, norm)
        self.softcap = softcap
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
        logits = self.proj(x)  # (B, 2): Yes, No logits
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


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
    norm: NormKind = "rms"  # the family's final norm kind
    softcap: float | None = None  # the family's final logit soft-cap

    @classmethod
    def from_dict(cls, d: dict) -> HeadsSpec:
        """From an exit config (older ones lack the hybrid/MLP and family keys)."""
        return cls(
            tuple(d["layers"]),
            d["hidden_size"],
            d["eps"],
            tuple(d.get("side_features", ())),
            d.get("mlp_size", 0),
            d.get("norm", "rms"),
            d.get("softcap"),
        )

    @classmethod
    def for_backbone(cls, backbone: Backbone, layers, side_features=(), mlp_size: int = 0):
        return cls(
            tuple(layers),
            backbone.hidden_size,
            backbone.norm_eps,
            tuple(side_features),
            mlp_size,
            backbone.family.head_norm,
            backbone.logits_softcap,
        )

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
        norm: NormKind = "rms",
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        if not layers or layers != sorted(set(layers)) or layers[0] <= 0:
            raise ValueError(f"exit layers must be increasing and positive, got {layers}")
        self.layers = list(layers)
        self.hidden_size, self.eps = hidden_size, eps
        self.side_names, self.mlp_size = list(side_names), mlp_size
        self.norm, self.softcap = norm, softcap
        self.heads = nn.ModuleList(
            ExitHead(hidden_size, eps, len(self.side_names), mlp_size, norm, softcap)
            for _ in layers
        )

    @classmethod
    def from_spec(cls, spec: HeadsSpec) -> ExitHeads:
        return cls(
            list(spec.layers),
            spec.hidden_size,
            spec.eps,
            spec.side_features,
            spec.mlp_size,
            spec.norm,
            spec.softcap,
        )

    @property
    def spec(self) -> HeadsSpec:
        return HeadsSpec(
            tuple(self.layers),
            self.hidden_size,
            self.eps,
            tuple(self.side_names),
            self.mlp_size,
            self.norm,
            self.softcap,
        )

    @classmethod
    def from_backbone(
        cls,
        backbone: Backbone,
        layers: list[int],
        side_names: list[str] | tuple[str, ...] = (),
        mlp_size: int = 0,
        *,
        answers: tuple[int, int],
    ) -> ExitHeads:
        """`answers`: the (positive, negative) token ids, as the prompts end
        (optirag.prompts.PromptBuilder.answer_ids)."""
        if layers[-1] != backbone.num_layers:
            raise ValueError(f"last exit layer must be {backbone.num_layers}, got {layers[-1]}")
        norm = backbone.final_norm
        heads = cls.from_spec(HeadsSpec.for_backbone(backbone, layers, side_names, mlp_size))
        answers = list(answers)
        lm_head = backbone.model.lm_head
        rows = lm_head.weight[answers] * backbone.logits_scale  # (2, H)
        bias = None if lm_head.bias is None else lm_head.bias[answers] * backbone.logits_scale
        with torch.no_grad():
            for head in heads.heads:
                head.norm.weight.copy_(norm.weight)
                if not mlp_size:  # an MLP head has no zero-shot equivalent: random init
                    head.proj.weight.zero_()
                    head.proj.weight[:, : rows.shape[1]].copy_(rows)
                    head.proj.bias.zero_() if bias is None else head.proj.bias.copy_(bias)
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
        want = (backbone.family.head_norm, backbone.logits_softcap)
        if (self.norm, self.softcap) != want:
            raise ValueError(
                f"the heads' norm and soft-cap {(self.norm, self.softcap)} are not the "
                f"{backbone.family.name} family's {want}: trained for another backbone"
            )
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


def check_score_call(rule: ExitRule, heads: ExitHeads, keep_hidden: bool, side) -> None:
    """What both engines' `score` require: `keep_hidden` only at full depth (every row
    reaches every head), and the side features the heads read."""
    if keep_hidden and rule.kind != "none":
        raise ValueError("keep_hidden needs ExitRule('none')")
    heads.check_side(side)


@dataclass
class ScoreResult:
    scores: torch.Tensor  # (N,) float32 P(Yes)
    exit_layers: torch.Tensor  # (N,) int16, layers run before the row exited
    head_probs: torch.Tensor  # (N, num_heads) float32, NaN for heads a row never reached
    layer_tokens: int = 0  # sum over layers of the tokens that went through it (compute)
    hidden: torch.Tensor | None = None  # (N, num_heads, H) float32 when asked for


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
