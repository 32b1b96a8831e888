"""A decoder split into the parts early exit needs: embed -> blocks of layers -> final norm.

The layers are the family's own transformers decoder layers, called by keyword; attention is
`optirag.backbones.attention` (the model is loaded with `attn_implementation="optirag"`), and
the `attention` argument of `run_layers` tells it what the engine adds (positions for windows,
or a packed launch). What happens outside the layers in the model's own forward comes from
the family (embedding multiplier, per-layer-type rotary tables, final logits' scale and
soft-cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optirag.backbones.families import Family

Rotary = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin), (B, T, D)
_ALL = "all"  # the layer type of families with one rotary table


@dataclass
class Backbone:
    """A causal LM of a registered family."""

    model: nn.Module  # a *ForCausalLM with .model.{embed_tokens,layers,norm,rotary_emb}, .lm_head
    tokenizer: Any
    version: str
    family: Family

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def norm_eps(self) -> float:
        norm = self.final_norm
        eps = getattr(norm, "variance_epsilon", None)
        return float(norm.eps if eps is None else eps)

    @property
    def logits_scale(self) -> float:
        """What the model multiplies its final logits by (1 / Granite's logits_scaling)."""
        divisor = self.family.value(self.config, self.family.logits_divisor)
        return 1.0 / divisor if divisor else 1.0

    @property
    def logits_softcap(self) -> float | None:
        return self.family.value(self.config, self.family.logits_softcap) or None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model.embed_tokens(ids)  # (..., T) -> (..., T, H)
        multiplier = self.family.value(self.config, self.family.embed_multiplier)
        return hidden if multiplier is None else hidden * multiplier

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        """The rotary tables of every layer type for positions (B, T)."""
        emb = self.model.model.rotary_emb
        if not self.family.rotary_per_layer_type:
            return {_ALL: emb(hidden, positions)}
        return {kind: emb(hidden, positions, kind) for kind in set(self.config.layer_types)}

    def layer_type(self, index: int) -> str:
        return self.config.layer_types[index] if self.family.rotary_per_layer_type else _ALL

    def run_layers(
        self,
        hidden: torch.Tensor,  # (B, T, H)
        start: int,
        end: int,
        rotary: Rotary,
        *,
        mask: torch.Tensor | None = None,  # (B, 1, T, K) bool, True = may attend
        cache: Any = None,
        attention: Any = None,  # see optirag.backbones.attention
    ) -> torch.Tensor:
        for i in range(start, end):
            hidden = self.model.model.layers[i](
                hidden,
                attention_mask=mask,
                position_embeddings=rotary[self.layer_type(i)],
                cache=cache,
                optirag=attention,
            )
        return hidden
