"""The decoder families optirag scores exactly, and what each one needs beyond its own layers.

Both engines run the family's own transformers decoder layers (norms, q/k norms, rotary
variants, fused projections, sandwich or post norms, residual multipliers), with attention
done by `optirag.backbones.attention` (one implementation; the layer hands it its scale,
logit soft-cap and sliding window). What a layer does not do itself is stated here, read
once from the checkpoint's config: an embedding multiplier applied in the model's forward,
the final norm's kind (for the exit heads), the final logits' scaling and soft-cap, rotary
tables per layer type, and LoRA's target modules. A family is registered only once a test
holds both engines equal to Hugging Face's own forward for it (tests/test_families.py);
anything else is refused at load, naming what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# w * x / rms(x), cast back before the weight (Llama) or after it (OLMo 2), or Gemma's
# (1 + w) * x / rms(x): equal in fp32, a bf16 step apart otherwise.
NormKind = Literal["rms", "rms_f32", "rms_1p"]

# Bumped whenever a family's computation changes in either engine: part of every model
# version and cached-states key, so scores made by an older engine are never reused.
ENGINE_FORMAT = 2


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values
    examples: str  # checkpoints of this family, for docs and errors
    head_norm: NormKind = "rms"
    embed_multiplier: str | None = None  # config key the model's forward scales embeddings by
    logits_divisor: str | None = None  # config key the final logits are divided by
    logits_softcap: str | None = None  # config key of the final logits' tanh soft-cap
    rotary_per_layer_type: bool = False  # rotary tables per config.layer_types entry
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def value(self, config: Any, key: str | None) -> float | None:
        return None if key is None else getattr(config, key, None)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "Llama 1/2/3.x, Vicuna, TinyLlama, SmolLM2"),
    Family("mistral", ("mistral",), "Mistral 7B, Mistral-Nemo"),
    Family("ministral", ("ministral",), "Ministral"),
    Family("qwen2", ("qwen2",), "Qwen2, Qwen2.5"),
    Family("qwen3", ("qwen3",), "Qwen3, Qwen3-Reranker, jina-reranker-v3"),
    Family("smollm3", ("smollm3",), "SmolLM3"),
    Family("gemma", ("gemma",), "Gemma 1", head_norm="rms_1p"),
    Family(
        "gemma2",
        ("gemma2",),
        "Gemma 2",
        head_norm="rms_1p",
        logits_softcap="final_logit_softcapping",
    ),
    Family(
        "gemma3",
        ("gemma3_text",),
        "Gemma 3 (text: Gemma3ForCausalLM)",
        head_norm="rms_1p",
        logits_softcap="final_logit_softcapping",
        rotary_per_layer_type=True,
    ),
    Family("phi3", ("phi3",), "Phi-3, Phi-3.5, Phi-4-mini", lora_targets=("qkv_proj",)),
    Family("olmo2", ("olmo2",), "OLMo 2", head_norm="rms_f32"),
    Family(
        "granite",
        ("granite",),
        "Granite 3.x",
        embed_multiplier="embedding_multiplier",
        logits_divisor="logits_scaling",
    ),
)

# Known and refused on purpose: their layers are not attention layers this engine can run.
REFUSED = {
    "qwen3_5": "Qwen3.5 mixes linear-attention (Gated DeltaNet) layers with attention",
    "qwen3_5_text": "Qwen3.5 mixes linear-attention (Gated DeltaNet) layers with attention",
    "gemma4": "Gemma 4 layers take per-layer inputs and shared key/value states",
    "gemma4_text": "Gemma 4 layers take per-layer inputs and shared key/value states",
    "gemma3": "a Gemma 3 image-text checkpoint: give its text model (Gemma3ForCausalLM)",
}


def supported() -> str:
    return "; ".join(f"{f.name} ({f.examples})" for f in FAMILIES)


def family_of(config: Any) -> Family:
    """The registered family of a transformers config, or a ValueError naming the
    supported families."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"model_type {model_type!r} with use_bidirectional_attention (an embedding model) "
            "is not a causal LM: it cannot be scored causally"
        )
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    why = REFUSED.get(model_type, "not a registered family")
    raise ValueError(
        f"model_type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])})"
        f" is not supported: {why}. Supported families: {supported()}"
    )
