"""Accuracy levers: CF side features, hybrid and MLP heads, shared-prefix extraction, slices
and bootstrap intervals, and the head-training and evaluation stages end to end (tiny model)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from optirag import artifacts as A
from optirag import cf, storage
from optirag import metrics as M
from optirag import pairs as F
from optirag import schema as S
from optirag.backbone import load_backbone
from optirag.config import Config, PromptConfig
from optirag.context import ContextStore
from optirag.early_exit import EarlyExitScorer, ExitHeads, ExitRule
from optirag.pair_scorer import PairScorer, make_pair_scorer
from optirag.pipelines import evaluation, train_exits
from optirag.prompts import PromptBuilder


def test_side_features_are_exactly_the_configured_columns(movie_tables):
    train = movie_tables[0]
    users, items = np.array([1, 2, 99, 3]), np.array([5, 7, 5, 999])  # 99, 999 unseen
    side = cf.SideFeatures.fit(["item_count", "mf"], train)(users, items)
    assert side.shape == (4, 2) and side.dtype == np.float32
    counts = {i: int((train[S.ITEM_ID].to_numpy() == i).sum()) for i in (5, 7)}
    assert side[:, 0] == pytest.approx(np.log1p([counts[5], counts[7], counts[5], 0]))
    mf = cf.MatrixFactorisation.fit(train)
    assert side[:, 1] == pytest.approx(mf.logits(users, items), abs=1e-6)
    assert side[3, 1] == pytest.approx(mf.bias + mf.user_bias[2], abs=1e-6)  # cold item
    with pytest.raises(ValueError, match="unknown side features"):
        cf.SideFeatures.fit(["mf", "age"], train)


def test_side_features_round_trip(movie_tables, local_storage):
    fitted = cf.SideFeatures.fit(list(cf.SIDE_FEATURES), movie_tables[0])
    uri = storage.join(local_storage.root, "side.safetensors")
    A.save_side_features(*fitted.arrays(), uri, local_storage)
    again = cf.SideFeatures.from_arrays(*A.load_side_features(uri, local_storage))
    users, items = np.array([1, 4, 50]), np.array([3, 9, 2])
    np.testing.assert_array_equal(fitted(users, items), again(users, items))


@pytest.mark.parametrize("mlp_size", [0, 8])
def test_hybrid_heads_read_the_side_features(tiny_backbone, mlp_size):
    names = ["mf", "item_rate"]
    heads = ExitHeads.from_backbone(tiny_backbone, [3, 6], names, mlp_size)
    states = torch.randn(5, 2, tiny_backbone.hidden_size)
    side = torch.randn(5, 2)
    with torch.no_grad():
        for head in heads.heads:  # make every side weight matter
            last = head.proj if not mlp_size else head.proj[0]
            last.weight[:, -2:] = torch.randn(last.weight.shape[0], 2)
        out = heads(states, side)
        moved = side.clone()
        moved[:, 1] += 1.0
        assert not torch.allclose(out, heads(states, moved))
    with pytest.raises(ValueError, match="side features"):
        heads(states)
    with pytest.raises(ValueError, match="side features"):
        heads(states, torch.randn(5, 3))


def test_untrained_hybrid_linear_heads_are_the_zero_shot_model(tiny_backbone):
    plain = ExitHeads.from_backbone(tiny_backbone, [3, 6])
    hybrid = ExitHeads.from_backbone(tiny_backbone, [3, 6], ["mf", "user_count"])
    states = torch.randn(4, 2, tiny_backbone.hidden_size)
    with torch.no_grad():
        assert torch.allclose(plain(states), hybrid(states, torch.randn(4, 2)), atol=1e-6)


def test_engine_feeds_each_row_its_own_side_features_through_compaction(tiny_backbone):
    heads = ExitHeads.from_backbone(tiny_backbone, [2, 4, 6], ["mf"])
    with torch.no_grad():
        for head in heads.heads:
            head.proj.weight[0, -1] = 3.0
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 300, size=rng.integers(3, 12)).tolist() for _ in range(12)]
    side = torch.linspace(-2, 2, 12)[:, None]
    full = EarlyExitScorer(tiny_backbone, heads, ExitRule("none")).score(rows, side=side)
    early = EarlyExitScorer(tiny_backbone, heads, ExitRule("confidence", 0.7)).score(
        rows, side=side
    )
    assert len(set(early.exit_layers.tolist())) > 1  # some rows left early
    scores, _ = M.simulate_exits(full.head_probs.numpy(), heads.layers, ExitRule("confidence", 0.7))
    np.testing.assert_allclose(early.scores.numpy(), scores, atol=1e-6)


@pytest.mark.parametrize("target_ratings", [False, True], ids=["plain", "target-ratings"])
def test_shared_prefix_extraction_equals_plain_extraction(
    tiny_backbone, movie_tables, target_ratings
):
    cfg = PromptConfig(target_ratings=target_ratings)
    heads = ExitHeads.from_backbone(tiny_backbone, [2, 4, 6])
    pairs = F.training_pairs(movie_tables[0], None, 0.4, 4, seed=0)
    feats = {}
    for shared in (True, False):
        contexts = ContextStore(*movie_tables, cfg)
        scorer = PairScorer(tiny_backbone, heads, ExitRule("none"), contexts,
                            PromptBuilder(tiny_backbone.tokenizer, cfg), share_prefixes=shared,
                            batch_rows=7)  # fmt: skip
        feats[shared] = F.extract_states(scorer, pairs, None)
    torch.testing.assert_close(feats[True]["states"], feats[False]["states"], atol=1e-5, rtol=1e-4)
    assert torch.equal(feats[True]["cutoff"], torch.from_numpy(pairs.cutoff))


def test_prefix_batches_keep_a_prefix_together():
    from optirag.pair_scorer import prefix_batches

    users = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4])
    cuts = np.zeros_like(users)
    batches = prefix_batches(users, cuts, 4)
    covered = np.concatenate([np.arange(len(users))[b] for b in batches])
    assert np.array_equal(covered, np.arange(len(users)))
    assert all(b.stop - b.start <= 4 for b in batches)
    assert [users[b].tolist() for b in batches][:2] == [[1, 1, 1], [2, 2]]  # not [1,1,1,2]


def test_before_cutoffs_hides_each_users_targets(movie_tables):
    train = movie_tables[0]
    pairs = F.training_pairs(train, None, 0.5, 3, seed=0)
    known = F.before_cutoffs(train, pairs.users, pairs.cutoff)
    cut = dict(zip(pairs.users.tolist(), pairs.cutoff.tolist(), strict=True))
    for u, t in zip(known[S.USER_ID].to_pylist(), known[S.TS].to_pylist(), strict=True):
        assert t < cut[u]
    assert 0 < known.num_rows < train.num_rows


def test_slices_and_bootstrap_intervals():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    good = labels + rng.normal(0, 0.8, 2000)
    bad = labels + rng.normal(0, 3.0, 2000)
    d, lo, hi = M.auc_difference(labels, good, bad, n_resamples=300)
    assert lo < d < hi and lo > 0  # clearly better: the interval excludes 0
    d, lo, hi = M.auc_difference(labels, good, good + rng.normal(0, 1e-3, 2000), n_resamples=300)
    assert lo < 0 < hi
    train = pa.table({S.USER_ID: [1] * 25 + [2] * 3, S.ITEM_ID: list(range(28))})
    masks = M.slice_masks(train, np.array([1, 2, 3]), np.array([0, 0, 100]))
    cold, light = list(masks)[1:]
    assert masks[cold].tolist() == [True, True, True]  # item 0 has 1 rating, 100 none
    assert masks[light].tolist() == [False, True, True]
    scores = {"a": np.array([0.1, 0.9, 0.5]), "b": np.array([0.2, 0.8, 0.4])}
    empty = {"all": np.ones(3, bool), "none": np.zeros(3, bool)}
    table = M.model_table(scores, np.array([0, 1, 1]), empty, "a", {"a", "b"}, 50)
    assert table[1]["slices"]["none"]["pairs"] == 0
    assert "logloss" in table[1]["slices"]["all"]


def _write_tables(store, movie_tables):
    interactions, items, neighbors = movie_tables
    root = store.root
    storage.write_table(interactions, A.interactions_uri(root, "train"), store)
    storage.write_table(items, A.items_uri(root), store)
    storage.write_table(neighbors, storage.join(root, "neighbors", "gcn.parquet"), store)
    rng = np.random.default_rng(1)
    for split in ("valid", "test"):
        users = np.repeat(np.arange(1, 7), 5)
        cands = pa.table({S.USER_ID: users, S.ITEM_ID: rng.integers(1, 21, len(users)),
                          S.LABEL: (np.arange(len(users)) % 2).astype(np.int8)})  # fmt: skip
        storage.write_table(cands, A.candidates_uri(root, split), store)


def test_hybrid_mlp_heads_with_cf_prompt_train_evaluate_and_score(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    _write_tables(local_storage, movie_tables)
    cfg = Config.model_validate({
        "storage": {"root": local_storage.root},
        "backbone": {"source": "path", "path": str(tiny_llama_dir), "device": "cpu"},
        "exits": {"layers": [3, 6]},
        "heads": {"train_users": None, "targets_per_user": 3, "valid_users": None, "epochs": 3,
                  "side_features": ["mf", "item_rate"], "mlp_size": 8, "max_train_pairs": 10},
        "evaluation": {"test_users": None, "speed_pairs": 6, "speed_taus": [0.0]},
        "compute": {"batch_rows": 8, "train_workers": 1},
        "prompts": {"target_ratings": True},
    })  # fmt: skip
    trained = train_exits.run(cfg)
    assert trained["train_pairs"] == 10
    summary = evaluation.run(cfg)
    assert summary["test_pairs"] == 30
    metrics = storage.read_json(storage.join(local_storage.root, "evaluation", "metrics.json"),
                                local_storage)  # fmt: skip
    assert metrics["side_features"] == ["mf", "item_rate"] and metrics["mlp_size"] == 8
    full = next(m for m in metrics["models"] if m["model"] == "trained heads, full depth")
    assert set(full["slices"]) == set(M.slice_masks(movie_tables[0], [], []))
    assert "diff_ci" in full["slices"]["all"]
    # the scoring path loads the same heads and side features
    backbone = load_backbone(cfg.backbone)
    model = A.load_scoring_model(cfg, backbone)
    scorer = make_pair_scorer(cfg, backbone, model, ContextStore(*movie_tables, cfg.prompts))
    assert scorer.side_features.names == ["mf", "item_rate"]
    out = scorer.score(np.array([1, 2, 77]), np.array([3, 4, 5]))
    assert np.isfinite(out.scores).all()
    # evaluation honours the configured rule and compaction, as scoring does
    exits = cfg.exits.model_copy(update={"rule": "confidence", "threshold": 0.6,
                                         "compaction": False})  # fmt: skip
    evaluation.run(cfg.model_copy(update={"exits": exits}))
    metrics = A.load_evaluation(cfg)
    assert (metrics["rule"], metrics["calibrated_tau"]) == ("confidence", 0.6)
    assert [(s["rule"], s["compaction"]) for s in metrics["speed"]] == [
        ("none", False),
        ("confidence", False),
    ]
    assert any(m["model"] == "early exit (calibrated confidence 0.6)" for m in metrics["models"])
