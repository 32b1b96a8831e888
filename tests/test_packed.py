"""The packed engine (optirag.engine.packed) against the reference engine (optirag.early_exit).

The reference scores whole, unshared prompts (prefix + suffix, right-padded, dense mask); the
packed engine scores the same rows with each prefix once. Scores, exit layers and head
probabilities must agree within 1e-5 (fp32, CPU). A wrong rotary offset for suffix tokens,
a prefix attended by another prefix's rows, a missing key-length mask on a shorter prefix or a
wrong log-sum-exp merge each move P(Yes) of the tiny random model by far more than that.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from optirag.config import ComputeConfig
from optirag.early_exit import ExitHeads, ExitRule, default_exit_layers, prob_yes
from optirag.engine import LAUNCH_TOKENS, PackedEngine, ReferenceEngine, make_engine
from tests.conftest import default_answers

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heads(tiny_backbone):
    return ExitHeads.from_backbone(
        tiny_backbone,
        default_exit_layers(tiny_backbone.num_layers, 3),
        answers=default_answers(tiny_backbone),
    )


@pytest.fixture(scope="module")
def hybrid_heads(tiny_backbone):
    """Linear heads that really read two side features (from_backbone zeroes their weights)."""
    heads = ExitHeads.from_backbone(
        tiny_backbone,
        [2, 4, 6],
        side_names=["cf_a", "cf_b"],
        answers=default_answers(tiny_backbone),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for head in heads.heads:
            head.proj.weight[:, -2:].normal_(0, 2.0)
    return heads


def _tokens(backbone, n, lo, hi, rng):
    vocab = len(backbone.tokenizer)
    return [rng.integers(0, vocab, size=rng.integers(lo, hi + 1)).tolist() for _ in range(n)]


def _shared_batch(backbone, n_prefixes, n_rows, seed, prefix_len=(1, 60), suffix_len=(1, 20)):
    """Ragged prefixes and suffixes, rows of many users interleaved; with the whole prompts."""
    rng = np.random.default_rng(seed)
    prefixes = _tokens(backbone, n_prefixes, *prefix_len, rng)
    suffixes = _tokens(backbone, n_rows, *suffix_len, rng)
    prefix_of = rng.integers(0, n_prefixes, n_rows).tolist()
    plain = [prefixes[p] + s for p, s in zip(prefix_of, suffixes, strict=True)]
    return suffixes, prefixes, prefix_of, plain


def _assert_same(new, ref, atol=ATOL):
    torch.testing.assert_close(new.scores, ref.scores, atol=atol, rtol=0)
    assert torch.equal(new.exit_layers, ref.exit_layers)
    torch.testing.assert_close(new.head_probs, ref.head_probs, atol=atol, rtol=0, equal_nan=True)


def _mixed_rules(backbone, heads, plain, side=None):
    """Rules at which some rows exit early and others run on (so exits are exercised)."""
    probs = ReferenceEngine(backbone, heads, ExitRule("none")).score(plain, side=side).head_probs
    tau = float((probs[:, 1] - probs[:, 0]).abs().median()) + 1e-6
    conf = float(torch.maximum(probs[:, 0], 1 - probs[:, 0]).median()) + 1e-6
    return [ExitRule("none"), ExitRule("agreement", tau), ExitRule("confidence", conf)]


# Defaults (on CPU: the fused flash kernel's log-sum-exp); small launches, i.e. several
# launches per block, a prefix's rows split over launches (the prefix then runs once per piece)
# and its queries cut into several chunks; and the explicit softmax (what CUDA runs).
SMALL = {"max_tokens": 96, "group_tokens": 16}
ENGINE_SIZES = [{}, SMALL, {**SMALL, "attention": "explicit"}]


@pytest.mark.parametrize("sizes", ENGINE_SIZES)
def test_shared_prefixes_match_reference_every_rule(tiny_backbone, heads, sizes):
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 6, 36, seed=1)
    for rule in _mixed_rules(tiny_backbone, heads, plain):
        ref = ReferenceEngine(tiny_backbone, heads, rule).score(plain)
        new = PackedEngine(tiny_backbone, heads, rule, **sizes)
        _assert_same(new.score(suffixes, prefixes, prefix_of), ref)
        if rule.kind != "none":
            assert len(set(ref.exit_layers.tolist())) > 1  # rows really exit at several heads


@pytest.mark.parametrize("sizes", [{}, SMALL])  # plain prompts need no log-sum-exp merge
def test_plain_prompts_match_reference(tiny_backbone, heads, sizes):
    rows = _tokens(tiny_backbone, 30, 1, 50, np.random.default_rng(2))
    for rule in _mixed_rules(tiny_backbone, heads, rows):
        ref = ReferenceEngine(tiny_backbone, heads, rule).score(rows)
        new = PackedEngine(tiny_backbone, heads, rule, **sizes).score(rows)
        _assert_same(new, ref)
        assert new.layer_tokens == ref.layer_tokens  # both count each real token per layer


def test_rule_none_is_full_depth(tiny_backbone, heads):
    """With exits disabled every row runs every layer and the score is the model's own."""
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 3, 8, seed=3)
    result = PackedEngine(tiny_backbone, heads, ExitRule("none")).score(
        suffixes, prefixes, prefix_of
    )
    assert (result.exit_layers == tiny_backbone.num_layers).all()
    assert not result.head_probs.isnan().any()
    bb = tiny_backbone
    with torch.no_grad():
        full = [
            bb.model(torch.tensor([ids])).logits[0, -1, list(default_answers(bb))] for ids in plain
        ]
    expected = prob_yes(torch.stack(full))
    torch.testing.assert_close(result.scores, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "sizes", [{}, {"max_tokens": 1_000, "group_tokens": 128, "attention": "explicit"}]
)
def test_users_with_one_and_500_candidates(tiny_backbone, heads, sizes):
    rng = np.random.default_rng(4)
    prefixes = _tokens(tiny_backbone, 3, 20, 80, rng)
    prefix_of = [0] + [1] * 500 + [2] * 3
    rng.shuffle(prefix_of)
    suffixes = _tokens(tiny_backbone, len(prefix_of), 1, 12, rng)
    plain = [prefixes[p] + s for p, s in zip(prefix_of, suffixes, strict=True)]
    rule = _mixed_rules(tiny_backbone, heads, plain)[1]
    ref = ReferenceEngine(tiny_backbone, heads, rule).score(plain)
    new = PackedEngine(tiny_backbone, heads, rule, **sizes)
    _assert_same(new.score(suffixes, prefixes, prefix_of), ref)


def test_hybrid_heads_with_side_features(tiny_backbone, hybrid_heads):
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 5, 30, seed=5)
    side = torch.randn(len(suffixes), 2, generator=torch.Generator().manual_seed(5))
    for rule in _mixed_rules(tiny_backbone, hybrid_heads, plain, side)[1:]:
        ref = ReferenceEngine(tiny_backbone, hybrid_heads, rule).score(plain, side=side)
        new = PackedEngine(tiny_backbone, hybrid_heads, rule)
        _assert_same(new.score(suffixes, prefixes, prefix_of, side=side), ref)
        # the side features matter: zeroing them changes scores
        zero = new.score(suffixes, prefixes, prefix_of, side=torch.zeros_like(side))
        assert (zero.head_probs[:, 0] - ref.head_probs[:, 0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="side features"):
        PackedEngine(tiny_backbone, hybrid_heads, ExitRule("none")).score(suffixes)


def test_mlp_heads(tiny_backbone):
    torch.manual_seed(1)
    mlp_heads = ExitHeads.from_backbone(
        tiny_backbone, [3, 6], mlp_size=16, answers=default_answers(tiny_backbone)
    )
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 4, 20, seed=6)
    rule = _mixed_rules(tiny_backbone, mlp_heads, plain)[2]
    ref = ReferenceEngine(tiny_backbone, mlp_heads, rule).score(plain)
    _assert_same(
        PackedEngine(tiny_backbone, mlp_heads, rule).score(suffixes, prefixes, prefix_of), ref
    )


def test_keep_hidden(tiny_backbone, heads):
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 4, 12, seed=7)
    rule = ExitRule("none")
    ref = ReferenceEngine(tiny_backbone, heads, rule).score(plain, keep_hidden=True)
    new = PackedEngine(tiny_backbone, heads, rule).score(
        suffixes, prefixes, prefix_of, keep_hidden=True
    )
    assert new.hidden.shape == (12, 3, tiny_backbone.hidden_size)
    torch.testing.assert_close(new.hidden, ref.hidden, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="keep_hidden"):
        PackedEngine(tiny_backbone, heads, ExitRule("agreement")).score(plain, keep_hidden=True)


@pytest.mark.parametrize("sizes", [{}, SMALL])
def test_score_independent_of_batch_mates_and_order(tiny_backbone, heads, sizes):
    """A row's result is the same alone, among other users' rows, and in any order."""
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 6, 30, seed=8)
    rule = _mixed_rules(tiny_backbone, heads, plain)[1]
    engine = PackedEngine(tiny_backbone, heads, rule, **sizes)
    together = engine.score(suffixes, prefixes, prefix_of)

    perm = np.random.default_rng(9).permutation(len(suffixes))
    shuffled = engine.score([suffixes[i] for i in perm], prefixes, [prefix_of[i] for i in perm])
    _assert_same_rows(shuffled, together, perm)

    subset = [i for i in range(len(suffixes)) if prefix_of[i] in (1, 4)][::2]
    used = sorted({prefix_of[i] for i in subset})
    alone = engine.score(
        [suffixes[i] for i in subset],
        [prefixes[p] for p in used],
        [used.index(prefix_of[i]) for i in subset],
    )
    _assert_same_rows(alone, together, np.array(subset))
    for i in (0, 17):  # a row by itself
        one = engine.score([suffixes[i]], [prefixes[prefix_of[i]]], [0])
        _assert_same_rows(one, together, np.array([i]))


def _assert_same_rows(part, whole, index):
    torch.testing.assert_close(part.scores, whole.scores[index], atol=1e-6, rtol=0)
    assert torch.equal(part.exit_layers, whole.exit_layers[index])
    torch.testing.assert_close(
        part.head_probs, whole.head_probs[index], atol=1e-6, rtol=0, equal_nan=True
    )


def test_layer_tokens_count_each_prefix_once_per_block(tiny_backbone, heads):
    suffixes, prefixes, prefix_of, plain = _shared_batch(tiny_backbone, 5, 30, seed=10)
    for rule in _mixed_rules(tiny_backbone, heads, plain):
        ref_shared = ReferenceEngine(tiny_backbone, heads, rule).score(
            suffixes, prefixes, prefix_of
        )
        new = PackedEngine(tiny_backbone, heads, rule).score(suffixes, prefixes, prefix_of)
        assert new.layer_tokens == ref_shared.layer_tokens
        if rule.kind == "none":
            full = sum(len(prefixes[p]) for p in set(prefix_of)) + sum(map(len, suffixes))
            assert new.layer_tokens == full * tiny_backbone.num_layers


def test_inputs_and_factory(tiny_backbone, heads):
    engine = PackedEngine(tiny_backbone, heads, ExitRule("none"))
    with pytest.raises(ValueError, match="empty"):
        engine.score([[1, 2], []])
    with pytest.raises(ValueError, match="prefix_of"):
        engine.score([[1, 2]], [[3, 4]])
    empty = engine.score([])
    assert empty.scores.shape == (0,) and empty.head_probs.shape == (0, 3)
    rule = ExitRule("none")
    assert isinstance(make_engine("packed", tiny_backbone, heads, rule), PackedEngine)
    assert isinstance(make_engine("reference", tiny_backbone, heads, rule), ReferenceEngine)
    with pytest.raises(ValueError, match="attention"):
        PackedEngine(tiny_backbone, heads, rule, attention="flash")
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("fast", tiny_backbone, heads, rule)
    # the config (a leaf module, so it cannot import the engine) states the same default
    assert ComputeConfig().batch_tokens == LAUNCH_TOKENS == engine.max_tokens


@pytest.mark.slow
def test_smollm2_packed_matches_reference():
    """The real backbone (30 layers, GQA 9/3), fp32: ragged prefixes of up to 200 tokens."""
    from optirag.backbones import load_backbone
    from optirag.config import BackboneConfig

    cfg = BackboneConfig(
        source="smollm2", cache_dir=str(ROOT / "data/cache/models"), device="cpu", dtype="float32"
    )
    bb = load_backbone(cfg)
    heads = ExitHeads.from_backbone(
        bb, default_exit_layers(bb.num_layers, 6), answers=default_answers(bb)
    )
    suffixes, prefixes, prefix_of, plain = _shared_batch(
        bb, 4, 24, seed=11, prefix_len=(40, 200), suffix_len=(5, 40)
    )
    for rule in _mixed_rules(bb, heads, plain):
        ref = ReferenceEngine(bb, heads, rule).score(plain)
        for sizes in ({}, {"max_tokens": 400, "group_tokens": 64, "attention": "explicit"}):
            new = PackedEngine(bb, heads, rule, **sizes)
            _assert_same(new.score(suffixes, prefixes, prefix_of), ref)
