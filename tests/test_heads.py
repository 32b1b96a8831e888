"""Exit-head training and calibration (tiny model, tiny data)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from optirag import artifacts
from optirag import metrics as M
from optirag import pairs as F
from optirag import schema as S
from optirag.config import ComputeConfig, Config, HeadTrainingConfig, PromptConfig, StorageConfig
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule
from optirag.engine import ReferenceEngine
from optirag.head_training import depth_decayed_lrs, head_optimizer
from optirag.pair_scorer import PairScorer
from optirag.pipelines.ray_train import fit
from optirag.pipelines.train_exits import heads_loop
from optirag.prompts import PromptBuilder
from tests.conftest import default_answers


def test_depth_decayed_learning_rates_on_optimizer():
    heads = ExitHeads([2, 4, 6], 8, 1e-6)
    opt = head_optimizer(heads, num_layers=6, lr0=0.01, beta=1.5, weight_decay=0.0)
    expected = [0.01 * math.exp(-1.5 * d / 6) for d in (2, 4, 6)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
    assert depth_decayed_lrs([2, 4, 6], 6, 0.01, 1.5) == pytest.approx(expected)
    # each group holds exactly its head's parameters
    for group, head in zip(opt.param_groups, heads.heads, strict=True):
        assert {id(p) for p in group["params"]} == {id(p) for p in head.parameters()}


def test_training_pairs_never_see_their_future(movie_tables):
    interactions, items, neighbors = movie_tables
    pairs = F.training_pairs(interactions, None, 0.5, 3, seed=0)
    cfg = PromptConfig(max_history=50)
    store = ContextStore(interactions, items, neighbors, cfg)
    rows = sorted(
        zip(
            interactions[S.USER_ID].to_pylist(),
            interactions[S.TS].to_pylist(),
            interactions[S.ITEM_ID].to_pylist(),
            strict=True,
        )
    )
    assert len(pairs) == 18  # 6 users x 3 targets
    for user, item, cut in zip(pairs.users, pairs.items, pairs.cutoff, strict=True):
        assert any(u == user and i == item and t >= cut for u, t, i in rows)
        shown = [t for t, _ in store.context(int(user), int(cut)).history]
        before = [store.texts.history[i] for u, t, i in rows if u == user and t < cut]
        assert shown == before  # exactly the interactions before the cut, nothing later
        assert len(before) < sum(u == user for u, _, _ in rows)


def _constructed_probs():
    """Heads that agree early for half the rows; the early answer is worse for the rest."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    good = np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.05, 400)
    probs = np.stack([good, good, good], axis=1)
    noisy = rng.random(400) < 0.5  # these rows start with noise, then become good
    probs[noisy, 0] = rng.random(noisy.sum())
    probs[noisy, 1] = probs[noisy, 0] + rng.choice([-0.3, 0.3], noisy.sum())
    return np.clip(probs, 0, 1), labels


def test_calibration_picks_most_aggressive_tau_within_budget():
    probs, labels = _constructed_probs()
    rows = M.sweep(probs, labels, [2, 4, 6], 6, [0.001, 0.01, 0.1, 0.5], [])
    full = rows[0].auc
    chosen = M.calibrate(rows, budget=0.005)
    by_tau = {r.threshold: r for r in rows if r.rule == "agreement"}
    ok = [t for t, r in by_tau.items() if full - r.auc <= 0.005]
    assert chosen.threshold == max(ok)
    assert by_tau[0.5].auc < full - 0.005  # the aggressive one is really too lossy
    assert chosen.compute < 1.0
    assert M.calibrate(rows, budget=-1.0).threshold == 0.0  # nothing fits: full depth


def test_simulated_exits_equal_the_engine(tiny_backbone):
    heads = ExitHeads.from_backbone(
        tiny_backbone, [2, 4, 6], answers=default_answers(tiny_backbone)
    )
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 300, size=rng.integers(3, 15)).tolist() for _ in range(30)]
    full = ReferenceEngine(tiny_backbone, heads, ExitRule("none")).score(rows)
    tau = float(np.median(np.abs(np.diff(full.head_probs.numpy(), axis=1)[:, 0])))
    for rule in (ExitRule("agreement", tau), ExitRule("confidence", 0.505)):
        engine = ReferenceEngine(tiny_backbone, heads, rule).score(rows)
        scores, exits = M.simulate_exits(full.head_probs.numpy(), heads.layers, rule)
        np.testing.assert_allclose(engine.scores.numpy(), scores, atol=1e-6)
        assert np.array_equal(engine.exit_layers.numpy(), exits)


def test_heads_read_the_extracted_states(tiny_backbone, movie_tables):
    heads = ExitHeads.from_backbone(
        tiny_backbone, [2, 4, 6], answers=default_answers(tiny_backbone)
    )
    cfg = PromptConfig()
    scorer = PairScorer(
        tiny_backbone,
        heads,
        ExitRule("none"),
        ContextStore(*movie_tables, cfg),
        PromptBuilder(tiny_backbone.tokenizer, cfg),
        batch_rows=4,
        batch_tokens=100,  # small calls: a user's rows are cut across them
    )
    pairs = F.training_pairs(movie_tables[0], None, 0.5, 2, seed=0)
    feats = F.extract_states(scorer, pairs, "test")
    assert feats["states"].shape == (len(pairs), 3, tiny_backbone.hidden_size)
    direct = scorer.score(pairs.users, pairs.items, pairs.cutoff)
    with torch.no_grad():
        from_states = torch.sigmoid(heads.float()(feats["states"])).numpy()
    np.testing.assert_allclose(from_states, direct.head_probs, atol=1e-5)


def cfg_for(root):
    return Config.model_validate({"storage": {"root": str(root)}})


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_ray_train_lowers_head_loss_and_checkpoints(ray_session, tmp_path):
    store = StorageConfig(root=str(tmp_path))
    torch.manual_seed(0)
    n, hidden, layers = 256, 16, [1, 2]
    direction = torch.randn(hidden)
    for split in ("train", "valid"):  # valid drawn apart from train: AUC on unseen rows
        labels = (torch.rand(n) < 0.5).float()
        states = torch.randn(n, 2, hidden) + labels[:, None, None] * direction  # learnable
        uri = f"{tmp_path}/{split}.st"
        artifacts.save_cached_states({"states": states, "labels": labels}, uri, {}, store)
    init = ExitHeads(layers, hidden, 1e-6)
    init_uri = artifacts.save_init_heads(init.state_dict(), cfg_for(tmp_path))
    cfg = HeadTrainingConfig(epochs=8, lr=0.05, batch_size=64, patience=20, run_name="t")
    state, meta = fit(
        heads_loop,
        {
            "heads": cfg,
            "storage": store,
            "spec": init.spec,
            "num_layers": 2,
            "train_uri": f"{tmp_path}/train.st",
            "valid_uri": f"{tmp_path}/valid.st",
            "init_uri": init_uri,
            "train_rows": None,
            "train_side": None,
            "valid_side": None,
        },
        "t",
        "exits",
        ComputeConfig(train_workers=2),
        store,
        1,
    )
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] * 0.8
    assert meta["history"][-1]["valid_auc_mean"] > 0.9
    saved = sorted(Path(tmp_path, "exits", "ray", "t").glob("checkpoint_2*"))
    assert saved
    trained = ExitHeads(layers, hidden, 1e-6)
    trained.load_state_dict(state)
    assert set(load_file(saved[-1] / "best.safetensors")) == set(state)
    exit_config = {**trained.spec.as_dict(), "rule": "agreement", "threshold": 0.02}
    artifacts.save_heads(
        artifacts.StoredHeads(trained.state_dict(), exit_config), cfg_for(tmp_path)
    )
    again = artifacts.load_heads(cfg_for(tmp_path))
    assert again.exit_config["threshold"] == 0.02
    for k, v in trained.state_dict().items():
        assert torch.equal(v, again.tensors[k])
