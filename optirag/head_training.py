"""What exit-head training is made of, free of Ray: depth-decayed learning rates (paper:
lr_n = lr_0 * exp(-beta * d_n)), the optimizers of frozen-backbone and LoRA training, the
summed per-head loss, and optimizer state as flat tensors (checkpoints are safetensors)."""

from __future__ import annotations

import math
from typing import Any

import torch


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors + JSON-able scalars (safetensors, not pickle)."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{name}"] = value.contiguous()
            else:
                scalars[f"{pid}.{name}"] = float(value)
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(value)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def depth_decayed_lrs(layers: list[int], num_layers: int, lr0: float, beta: float) -> list[float]:
    """lr_n = lr_0 * exp(-beta * d_n), with d_n = layer_n / num_layers the head's relative
    depth in (0, 1]: deeper heads, whose inputs are already more task-shaped, move slower."""
    return [lr0 * math.exp(-beta * layer / num_layers) for layer in layers]


def _depth_groups(params_by_layer: dict[int, list], num_layers: int, lr0: float, beta: float):
    """One optimizer group per depth, each at its depth-decayed learning rate."""
    layers = list(params_by_layer)
    lrs = depth_decayed_lrs(layers, num_layers, lr0, beta)
    return [
        {"params": params_by_layer[layer], "lr": lr, "layer": layer}
        for layer, lr in zip(layers, lrs, strict=True)
    ]


def _head_groups(heads, num_layers: int, lr0: float, beta: float) -> list[dict]:
    by_layer = {
        layer: list(h.parameters()) for layer, h in zip(heads.layers, heads.heads, strict=True)
    }
    return _depth_groups(by_layer, num_layers, lr0, beta)


def head_optimizer(heads, num_layers: int, lr0: float, beta: float, weight_decay: float):
    groups = _head_groups(heads, num_layers, lr0, beta)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def lora_optimizer(
    parts, num_layers: int, lora_lr: float, head_lr: float, beta: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW with one group per adapted layer and per head, each at its depth-decayed rate."""
    groups = _depth_groups(parts.layer_groups(), num_layers, lora_lr, beta)
    groups += _head_groups(parts.heads, num_layers, head_lr, beta)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def summed_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every head's (B, num_heads) logit, summed over heads."""
    targets = labels[:, None].expand_as(logits).to(logits.device)
    per_head = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"
    ).mean(0)
    return per_head.sum()


def head_losses(
    heads, states: torch.Tensor, labels: torch.Tensor, side: torch.Tensor | None = None
) -> torch.Tensor:
    return summed_bce(heads(states, side), labels)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
