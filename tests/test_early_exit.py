import numpy as np
import pytest
import torch

from optirag import artifacts
from optirag.config import Config
from optirag.early_exit import (
    ExitHeads,
    ExitRule,
    default_exit_layers,
    prob_yes,
)
from optirag.engine import ReferenceEngine
from tests.conftest import default_answers

PROMPTS = [
    "The user liked: Toy Story (1995). Will the user like Heat? Answer Yes or No.",
    "Similar users liked: Fargo.",
    "You are a movie recommender. The user disliked: Heat (1995), GoldenEye. Comedy? Answer",
    "Yes",
]


@pytest.fixture(scope="module")
def heads(tiny_backbone):
    return ExitHeads.from_backbone(
        tiny_backbone,
        default_exit_layers(tiny_backbone.num_layers, 3),
        answers=default_answers(tiny_backbone),
    )


def _ids(backbone, texts):
    return [backbone.tokenizer.encode(t) for t in texts]


def _full_model_p_yes(backbone, ids):
    with torch.no_grad():
        logits = backbone.model(torch.tensor([ids])).logits[0, -1]
    return prob_yes(logits[list(default_answers(backbone))][None])[0].item()


def _tau_for_mixed_exits(engine_none, rows):
    """A threshold at which some rows exit at the middle head and some run on."""
    probs = engine_none.score(rows).head_probs
    return float((probs[:, 1] - probs[:, 0]).abs().median()) + 1e-6


def test_default_exit_layers():
    assert default_exit_layers(30, 6) == [5, 10, 15, 20, 25, 30]
    assert default_exit_layers(6, 3) == [2, 4, 6]
    assert default_exit_layers(2, 6) == [1, 2]


def test_exits_disabled_equals_full_model(tiny_backbone, heads):
    ids = _ids(tiny_backbone, PROMPTS)
    result = ReferenceEngine(tiny_backbone, heads, ExitRule("none")).score(ids)
    expected = [_full_model_p_yes(tiny_backbone, x) for x in ids]
    np.testing.assert_allclose(result.scores.numpy(), expected, atol=1e-5)
    assert (result.exit_layers == tiny_backbone.num_layers).all()


def test_score_independent_of_batch_mates_and_padding(tiny_backbone, heads):
    ids = _ids(tiny_backbone, PROMPTS)
    engine = ReferenceEngine(tiny_backbone, heads, ExitRule("none"))
    together = engine.score(ids).scores
    alone = torch.cat([engine.score([x]).scores for x in ids])
    reversed_ = engine.score(ids[::-1]).scores.flip(0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together, reversed_, atol=1e-5, rtol=0)


def _random_rows(backbone, n, seed):
    rng = np.random.default_rng(seed)
    vocab = len(backbone.tokenizer)
    return [rng.integers(0, vocab, size=rng.integers(3, 20)).tolist() for _ in range(n)]


def test_compaction_gives_identical_results(tiny_backbone, heads):
    rows = _random_rows(tiny_backbone, 24, seed=1)
    tau = _tau_for_mixed_exits(ReferenceEngine(tiny_backbone, heads, ExitRule("none")), rows)
    rule = ExitRule("agreement", tau)
    on = ReferenceEngine(tiny_backbone, heads, rule, compaction=True).score(rows)
    off = ReferenceEngine(tiny_backbone, heads, rule, compaction=False).score(rows)
    assert set(on.exit_layers.tolist()) == {4, 6}  # the test exercises real exits
    assert torch.equal(on.exit_layers, off.exit_layers)
    torch.testing.assert_close(on.scores, off.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(on.head_probs, off.head_probs, atol=1e-6, rtol=0, equal_nan=True)
    assert on.layer_tokens < off.layer_tokens  # compaction really skips work


def test_shared_prefix_equals_plain(tiny_backbone, heads):
    prefixes = _random_rows(tiny_backbone, 3, seed=2)
    suffixes = _random_rows(tiny_backbone, 10, seed=3)
    prefix_of = [0, 0, 1, 2, 2, 2, 0, 1, 1, 2]
    plain_rows = [prefixes[p] + s for p, s in zip(prefix_of, suffixes, strict=True)]
    tau = _tau_for_mixed_exits(ReferenceEngine(tiny_backbone, heads, ExitRule("none")), plain_rows)
    for rule in (ExitRule("none"), ExitRule("agreement", tau)):
        engine = ReferenceEngine(tiny_backbone, heads, rule)
        shared = engine.score(suffixes, prefixes, prefix_of)
        plain = engine.score(plain_rows)
        torch.testing.assert_close(shared.scores, plain.scores, atol=1e-4, rtol=0)
        assert torch.equal(shared.exit_layers, plain.exit_layers)
        assert shared.layer_tokens < plain.layer_tokens


def test_exit_rules_on_constructed_probabilities():
    p_prev = torch.tensor([0.50, 0.50, 0.90, 0.10])
    p = torch.tensor([0.52, 0.70, 0.91, 0.40])
    assert ExitRule("agreement", 0.05).fires(p, p_prev).tolist() == [True, False, True, False]
    assert ExitRule("agreement", 0.05).fires(p, None).tolist() == [False] * 4
    assert ExitRule("confidence", 0.9).fires(p, p_prev).tolist() == [False, False, True, False]
    assert ExitRule("confidence", 0.6).fires(torch.tensor([0.3]), None).tolist() == [True]
    assert not ExitRule("none").fires(p, p_prev).any()


def test_heads_roundtrip_and_validation(tiny_backbone, heads, tmp_path):
    with torch.no_grad():
        heads.heads[0].proj.bias.fill_(0.25)
    cfg = Config.model_validate({"storage": {"root": str(tmp_path)}})
    exit_config = {**heads.spec.as_dict(), "rule": "agreement", "threshold": 0.1}
    artifacts.save_heads(artifacts.StoredHeads(heads.state_dict(), exit_config), cfg)
    loaded = artifacts.load_scoring_model(cfg, tiny_backbone)
    assert loaded.exit_config["threshold"] == 0.1 and loaded.heads.spec == heads.spec
    loaded = loaded.heads
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        heads.heads[0].proj.bias.zero_()
    with pytest.raises(ValueError, match="last exit layer"):
        ExitHeads.from_backbone(tiny_backbone, [2, 4], answers=default_answers(tiny_backbone))
    with pytest.raises(ValueError, match="increasing"):
        ExitHeads([4, 2, 6], 32, 1e-6)
