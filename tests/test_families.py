"""Every registered family scores as Hugging Face's own forward, in both engines.

For each family a tiny random checkpoint is built here from transformers' own config class
(fp32, CPU), with every norm weight, bias, soft-cap, multiplier and window set so that the
family's own operations move P(Yes): norm weights far from 1 (so w vs 1 + w and q/k norms
matter), attention and final logit soft-caps of 1 to 2, Granite's real multipliers, a sliding
window of 16 tokens on prompts of 40 to 130 (checked to move the score), partial rotary for
Phi-4-mini. The golden value is `softmax(model(ids).logits[-1, [yes, no]])` from the
checkpoint loaded as transformers loads it by default (sdpa, or eager where sdpa is refused).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optirag.backbones import FAMILIES, family_of, load_backbone
from optirag.config import BackboneConfig
from optirag.early_exit import ExitHeads, ExitRule, default_exit_layers, prob_yes
from optirag.engine import PackedEngine, ReferenceEngine
from tests.conftest import default_answers

ATOL = 1e-5
WINDOW = 16
SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _config(name: str, vocab: int):
    import transformers as T

    base = dict(SHAPE, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    window = dict(sliding_window=WINDOW)
    gemma = dict(head_dim=16, query_pre_attn_scalar=12, final_logit_softcapping=2.0, **window)
    configs = {
        "llama": lambda: T.LlamaConfig(
            **base,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
        "mistral": lambda: T.MistralConfig(**base, head_dim=16, **window),
        "ministral": lambda: T.MinistralConfig(**base, head_dim=8, **window),
        "qwen2": lambda: T.Qwen2Config(
            **base, use_sliding_window=True, max_window_layers=1, **window
        ),
        "qwen3": lambda: T.Qwen3Config(
            **base, head_dim=16, use_sliding_window=True, max_window_layers=1, **window
        ),
        "smollm3": lambda: T.SmolLM3Config(
            **base, no_rope_layer_interval=2, use_sliding_window=True, **window
        ),
        "gemma": lambda: T.GemmaConfig(**base, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**base, attn_logit_softcapping=1.0, **gemma),
        "gemma3": lambda: T.Gemma3TextConfig(
            **base, attn_logit_softcapping=1.0, sliding_window_pattern=2, **gemma
        ),
        "phi3": lambda: T.Phi3Config(**base, partial_rotary_factor=0.75, **window),
        "olmo2": lambda: T.Olmo2Config(**base),
        "granite": lambda: T.GraniteConfig(
            **base,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0078125,
            logits_scaling=8.0,
        ),
    }
    return configs[name]()


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.15)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tiny_llama_dir):
    """name -> a saved tiny random checkpoint of that family with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    made = {}

    def build(name: str):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model = AutoModelForCausalLM.from_config(_config(name, len(tokenizer)))
            _randomise(model, seed=len(made))
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            made[name] = path
        return made[name]

    return build


def _prompts(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(2, vocab, n).tolist() for n in (27, 60, 88)]
    suffixes = [rng.integers(2, vocab, n).tolist() for n in (24, 45, 30, 40, 26, 33, 41, 29)]
    prefix_of = [0, 0, 1, 1, 1, 2, 2, 0]
    plain = [prefixes[p] + s for p, s in zip(prefix_of, suffixes, strict=True)]
    return suffixes, prefixes, prefix_of, plain


def _hf_p_yes(path, prompts, yes, no, **overrides) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0, -1, [yes, no]] for ids in prompts]
    return prob_yes(torch.stack(logits))


NAMES = [f.name for f in FAMILIES]


@pytest.mark.parametrize("name", NAMES)
def test_both_engines_equal_hugging_face_for_every_family(family_dir, name):
    path = family_dir(name)
    bb = load_backbone(BackboneConfig(source="path", path=str(path), device="cpu", dtype="float32"))
    assert bb.family.name == name
    suffixes, prefixes, prefix_of, plain = _prompts(len(bb.tokenizer))
    heads_answers = default_answers(bb)
    golden = _hf_p_yes(path, plain, *heads_answers)
    assert float(golden.max() - golden.min()) > 0.01, "too little spread: the check lacks power"
    if getattr(bb.config, "sliding_window", None):  # the window must matter on these prompts
        unwindowed = _hf_p_yes(path, plain, *heads_answers, sliding_window=4096)
        assert float((unwindowed - golden).abs().max()) > 1e-3

    heads = ExitHeads.from_backbone(
        bb, default_exit_layers(bb.num_layers, 2), answers=default_answers(bb)
    )
    full = ExitRule("none")
    engines = {
        "reference": ReferenceEngine(bb, heads, full),
        "packed": PackedEngine(bb, heads, full),
        "packed-explicit-launches": PackedEngine(
            bb, heads, full, attention="explicit", max_tokens=64, group_tokens=8
        ),
    }
    for label, engine in engines.items():
        got_plain = engine.score(plain).scores
        got_prefix = engine.score(suffixes, prefixes, prefix_of).scores
        torch.testing.assert_close(got_plain, golden, atol=ATOL, rtol=0, msg=f"{label} plain")
        torch.testing.assert_close(got_prefix, golden, atol=ATOL, rtol=0, msg=f"{label} prefix")

    early = ExitRule("agreement", 0.05)
    ref = ReferenceEngine(bb, heads, early).score(suffixes, prefixes, prefix_of)
    explicit = PackedEngine(bb, heads, early, attention="explicit", max_tokens=64)
    for packed in (PackedEngine(bb, heads, early), explicit):
        got = packed.score(suffixes, prefixes, prefix_of)
        torch.testing.assert_close(got.scores, ref.scores, atol=ATOL, rtol=0)
        assert torch.equal(got.exit_layers, ref.exit_layers)


def test_an_unregistered_architecture_is_refused_at_load_naming_the_families(tmp_path):
    import transformers as T

    config = T.StableLmConfig(**SHAPE, vocab_size=300)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'stablelm'.*Supported families: llama") as err:
        load_backbone(BackboneConfig(source="path", path=str(tmp_path), device="cpu"))
    assert all(f.name in str(err.value) for f in FAMILIES)
    with pytest.raises(ValueError, match="linear-attention"):
        family_of(T.Qwen3_5TextConfig())
    with pytest.raises(ValueError, match="bidirectional"):
        family_of(T.Gemma3TextConfig(use_bidirectional_attention=True))


def test_heads_of_another_family_are_refused(family_dir):
    def backbone(name):
        return load_backbone(
            BackboneConfig(source="path", path=str(family_dir(name)), device="cpu", dtype="float32")
        )

    llama, gemma = backbone("llama"), backbone("gemma2")
    heads = ExitHeads.from_backbone(llama, [2, 4], answers=default_answers(llama))
    assert heads.for_backbone(llama) is heads
    with pytest.raises(ValueError, match="gemma2 family's"):
        heads.for_backbone(gemma)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_lora_trains_on_the_computation_it_is_scored_with(family_dir, name):
    """Non-zero A and B on the family's own target modules (Phi-3's fused qkv_proj): the
    adapter moves the scores, and the training forward (padded prompts through the layers)
    equals the packed engine on the merged weights."""
    from optirag import lora
    from optirag.config import LoraConfig
    from optirag.early_exit import pad_tokens

    cfg = BackboneConfig(source="path", path=str(family_dir(name)), device="cpu", dtype="float32")
    bb = load_backbone(cfg)
    heads = ExitHeads.from_backbone(
        bb, default_exit_layers(bb.num_layers, 2), answers=default_answers(bb)
    )
    _, _, _, prompts = _prompts(len(bb.tokenizer), seed=1)
    base = PackedEngine(bb, heads, ExitRule("none")).score(prompts).head_probs

    lora_cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0)
    lora.add_lora(bb, lora_cfg)
    names = [n for n, _ in bb.model.named_parameters() if "lora_A" in n]
    targets = {n.split(".lora_A")[0].split(".")[-1] for n in names}
    assert targets == set(bb.family.lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    model = lora.LoraExitModel(bb, heads).eval()
    with torch.no_grad():
        trained = torch.sigmoid(model(*pad_tokens(prompts)))
    adapter = {n: p.detach().clone() for n, p in bb.model.named_parameters() if "lora_" in n}

    merged = load_backbone(cfg)
    lora.load_lora(merged, lora_cfg, adapter)
    scored = PackedEngine(merged, heads, ExitRule("none")).score(prompts).head_probs
    assert float((scored - base).abs().max()) >= 1e-2
    torch.testing.assert_close(scored, trained, atol=ATOL, rtol=0)
