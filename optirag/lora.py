"""Fine-tuning the backbone with LoRA (peft) jointly with the exit heads, as the paper does.

Every head's loss is summed; the learning rate decays with depth for the heads and for the
LoRA weights of each layer alike (lr = lr_0 * exp(-beta * depth / layers)). Only the LoRA
weights and the heads train and are checkpointed; for scoring the adapter is merged into the
backbone, so the batched early-exit engine runs unchanged.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from optirag.backbones import Backbone
from optirag.backbones.attention import Positions
from optirag.config import LoraConfig
from optirag.early_exit import ExitHeads, causal_mask

_LAYER = re.compile(r"layers\.(\d+)\.")


def add_lora(backbone: Backbone, cfg: LoraConfig) -> None:
    """Inject trainable LoRA weights into the backbone's `target_modules` (default: its
    family's, the attention's q and v projections or Phi-3's fused qkv_proj), in place;
    everything else stays frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules or backbone.family.lora_targets),
    )
    inject_adapter_in_model(peft_cfg, backbone.model)
    for name, param in backbone.model.named_parameters():
        param.requires_grad_("lora_" in name)
    backbone.version = f"{backbone.version}+lora-r{cfg.rank}"


def load_lora(backbone: Backbone, cfg: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Inject the adapter, load its weights and merge them into the base weights (scoring)."""
    from peft.tuners.lora import LoraLayer

    add_lora(backbone, cfg)
    params = dict(backbone.model.named_parameters())
    missing = sorted({n for n in params if "lora_" in n} - set(state))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    for module in backbone.model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    backbone.model.requires_grad_(False)
    digest = hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state)))
    backbone.version = f"{backbone.version}-{digest.hexdigest()[:8]}"


class LoraExitModel(nn.Module):
    """The backbone (with LoRA) and the exit heads as one module for Ray Train's DDP:
    prompts -> the last-token state at every exit layer -> every head's logit."""

    def __init__(self, backbone: Backbone, heads: ExitHeads) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # registered, so DDP sees the LoRA parameters
        self.heads = heads

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) [, side (B, K)] -> (B, num_heads) logits."""
        bb = self.backbone
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        mask = causal_mask(b, t, ids.device)
        hidden = bb.embed(ids)
        rotary = bb.rotary(hidden, positions)
        where = Positions(positions, positions)  # the window, where the family has one
        states, start = [], 0
        for end in self.heads.layers:
            hidden = bb.run_layers(hidden, start, end, rotary, mask=mask, attention=where)
            states.append(hidden[torch.arange(b, device=ids.device), lengths - 1])
            start = end
        return self.heads(torch.stack(states, dim=1).float(), side)


class TrainableParts(nn.Module):
    """Views of just the trainable tensors (LoRA weights + heads) for checkpoints: a few MB
    instead of the whole backbone. Loading copies into the very parameters the model uses."""

    def __init__(self, backbone: Backbone, heads: ExitHeads) -> None:
        super().__init__()
        # ParameterDict keys may not contain dots
        self.lora = nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in backbone.model.named_parameters() if "lora_" in n}
        )
        self.heads = heads

    def layer_groups(self) -> dict[int, list[nn.Parameter]]:
        """The LoRA parameters by the (1-based) backbone layer they adapt."""
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, param in self.lora.items():
            layer = int(_LAYER.search(name.replace("/", ".")).group(1)) + 1  # type: ignore[union-attr]
            by_layer.setdefault(layer, []).append(param)
        return dict(sorted(by_layer.items()))

    @staticmethod
    def split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """A TrainableParts state dict -> (heads state, adapter under the backbone's names)."""
        heads = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
        adapter = {
            k.removeprefix("lora.").replace("/", "."): v
            for k, v in state.items()
            if k.startswith("lora.")
        }
        return heads, adapter
