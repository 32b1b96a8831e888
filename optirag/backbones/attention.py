"""How every family's layers attend: one attention implementation with knobs (scale, logit
soft-cap, sliding window), registered with transformers as `attn_implementation="optirag"`.

Each family's attention module computes its queries, keys and values its own way (q/k norms,
interleaved or partial rotary, fused projections) and hands them here with its scale,
`softcap` and `sliding_window`. What the engines add travels in the `optirag` keyword, which
transformers passes from the decoder layer down to this function:

- a `Positions` (the reference engine, LoRA training): dense attention under the caller's
  boolean mask, the window applied from the query and key positions;
- a packed launch (`optirag.engine.packed`): anything with `attend(q, k, v, scale=, softcap=,
  window=)`, which runs the cascade over its packed stream with the kernels below;
- nothing (Hugging Face's own forward with this implementation): dense under transformers'
  mask, which already holds the window.

Windows follow transformers' masks: a query at position i sees keys at positions j with
i - window < j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "optirag"


@dataclass
class Positions:
    """Absolute positions of the queries (B, Q) and keys (B, K) of a dense call."""

    query: torch.Tensor
    key: torch.Tensor

    def window_mask(self, window: int) -> torch.Tensor:  # (B, 1, Q, K) bool
        return (self.query[:, None, :, None] - self.key[:, None, None, :]) < window


def attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    optirag=None,
    **kwargs,
):
    """The transformers attention interface: query (B, Hq, Q, D), key/value (B, KVH, K, D)
    -> ((B, Q, Hq, D), None)."""
    if optirag is not None and not isinstance(optirag, Positions):
        return optirag.attend(
            query, key, value, scale=scaling, softcap=softcap, window=sliding_window
        ), None
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError("optirag attention takes boolean masks (True: may attend)")
    if sliding_window is not None and optirag is not None:
        window = optirag.window_mask(sliding_window)
        mask = window if mask is None else mask & window
    out = dense_attention(query, key, value, mask, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation="optirag"` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# ----------------------------------------------------------------------------- kernels


def dense_attention(q, k, v, mask, scale, softcap=None) -> torch.Tensor:
    """q (B, Hq, Q, D), k/v (B, KVH, K, D), bool mask broadcastable to (B, Hq, Q, K) or None
    (causal) -> (B, Hq, Q, D). With a soft-cap the logits are cap * tanh(logits / cap) before
    the mask, as the families that use one do. A query that may see no key (a pad row past
    a window) gets zeros, as SDPA gives it, never NaN."""
    causal = mask is None and q.shape[2] > 1
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        return out if mask is None else out.nan_to_num(0.0)  # a kernel may give NaN there
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    logits = cap_logits(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).nan_to_num(0.0)  # no key: 0
    return torch.matmul(weights.to(v.dtype), v)


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def attention_with_lse(q, k, v, bias, scale, softcap=None):
    """Softmax attention written out, with its log-sum-exp; any device. q (B, KVH, Q, D),
    k/v (B, KVH, K, D), additive float32 bias broadcastable to (B, KVH, Q, K) -> out
    (B, KVH, Q, D) float32, normalised, and lse (B, KVH, Q, 1) float32. A query that may see
    no key gets out 0 and lse -inf (it adds nothing when merged)."""
    logits = cap_logits(torch.matmul(q, k.transpose(-1, -2)).float() * scale, softcap) + bias
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e.to(v.dtype), v).float() / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out, top + torch.log(total)


def flash_cpu(q, k, v, scale, mask=None):
    """The CPU flash kernel, which also returns the log-sum-exp (no soft-cap; every query
    must see at least one key)."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return o.float(), lse[..., None]


def has_flash_cpu() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def merge(o_a, lse_a, o_b, lse_b) -> torch.Tensor:
    """Two normalised partial attentions over disjoint key sets -> the attention over both."""
    lse = torch.logaddexp(lse_a, lse_b)
    return o_a * torch.exp(lse_a - lse) + o_b * torch.exp(lse_b - lse)
