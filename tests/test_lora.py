"""LoRA fine-tuning jointly with the exit heads (tiny model, real Ray Train)."""

import math

import numpy as np
import pytest
import torch

from optirag import artifacts, lora, storage
from optirag.backbones import load_backbone
from optirag.config import BackboneConfig, ComputeConfig, Config, HeadTrainingConfig, LoraConfig
from optirag.early_exit import ExitHeads, ExitRule, pad_tokens
from optirag.engine import ReferenceEngine
from optirag.head_training import lora_optimizer
from optirag.pipelines import evaluation, train_exits
from optirag.pipelines.ray_train import fit
from optirag.pipelines.train_exits import lora_loop
from tests.conftest import default_answers
from tests.test_accuracy import _write_tables


def _backbone(tiny_llama_dir):
    return load_backbone(BackboneConfig(source="path", path=str(tiny_llama_dir), device="cpu"))


def test_untrained_adapter_forward_equals_the_scoring_engine(tiny_llama_dir):
    backbone = _backbone(tiny_llama_dir)
    heads = ExitHeads.from_backbone(backbone, [2, 4, 6], answers=default_answers(backbone))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, size=rng.integers(3, 12)).tolist() for _ in range(8)]
    engine = ReferenceEngine(backbone, heads, ExitRule("none")).score(prompts)
    lora.add_lora(backbone, LoraConfig(enabled=True))  # B = 0: the adapter starts as a no-op
    model = lora.LoraExitModel(backbone, heads).eval()
    with torch.no_grad():
        logits = model(*pad_tokens(prompts))
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), engine.head_probs, atol=1e-5)


def test_lora_learning_rates_decay_with_depth(tiny_llama_dir):
    backbone = _backbone(tiny_llama_dir)
    lora.add_lora(backbone, LoraConfig(enabled=True))
    heads = ExitHeads.from_backbone(backbone, [3, 6], answers=default_answers(backbone))
    parts = lora.TrainableParts(backbone, heads)
    opt = lora_optimizer(parts, 6, lora_lr=1e-3, head_lr=1e-2, beta=2.0, weight_decay=0)
    lora_groups = opt.param_groups[:-2]
    assert [g["layer"] for g in lora_groups] == [1, 2, 3, 4, 5, 6]
    assert [g["lr"] for g in lora_groups] == pytest.approx(
        [1e-3 * math.exp(-2.0 * d / 6) for d in range(1, 7)]
    )
    assert [g["lr"] for g in opt.param_groups[-2:]] == pytest.approx(
        [1e-2 * math.exp(-1.0), 1e-2 * math.exp(-2.0)]
    )
    trainable = {id(p) for p in backbone.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in lora_groups for p in g["params"]}


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_lora_training_lowers_the_loss_and_the_checkpoint_round_trips(
    ray_session, tiny_llama_dir, tmp_path
):
    from optirag.config import StorageConfig

    backbone = _backbone(tiny_llama_dir)
    layers = [3, 6]
    init = ExitHeads.from_backbone(backbone, layers, answers=default_answers(backbone))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 96)
    # learnable: a positive prompt ends in token 7, a negative one in token 9
    prompts = [rng.integers(20, 300, 6).tolist() + [7 if y else 9] for y in labels]

    def split(idx):
        y = torch.as_tensor(labels[idx], dtype=torch.float32)
        return {"prompts": [prompts[i] for i in idx], "labels": y, "side": None}

    lcfg = LoraConfig(enabled=True, lr=5e-3, epochs=5, batch_size=16)
    hc = HeadTrainingConfig(lr=0.05, patience=10, run_name="lora-t", lora=lcfg)
    bcfg = BackboneConfig(source="path", path=str(tiny_llama_dir), device="cpu")
    store = StorageConfig(root=str(tmp_path))
    config = {
        "heads": hc,
        "config": Config(storage=store, backbone=bcfg),
        "spec": init.spec,
        "init_heads": dict(init.state_dict()),
        "train": split(np.arange(64)),
        "valid": split(np.arange(64, 96)),
    }
    state, meta = fit(
        lora_loop, config, "lora-t", "exits", ComputeConfig(train_workers=1), store, 0
    )
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] * 0.7
    assert meta["history"][-1]["valid_auc_mean"] > 0.9

    # checkpoint -> adapter + heads -> merged backbone scores what the trained model scored
    heads = ExitHeads(layers, init.hidden_size, init.eps)
    heads_state, adapter = lora.TrainableParts.split(state)
    heads.load_state_dict(heads_state)
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    unmerged = _backbone(tiny_llama_dir)
    lora.add_lora(unmerged, hc.lora)
    with torch.no_grad():
        params = dict(unmerged.model.named_parameters())
        for k, v in adapter.items():
            params[k].copy_(v)
        expected = torch.sigmoid(
            lora.LoraExitModel(unmerged, heads).eval()(*pad_tokens(prompts[64:]))
        )
    merged = _backbone(tiny_llama_dir)
    lora.load_lora(merged, hc.lora, adapter)
    got = ReferenceEngine(merged, heads, ExitRule("none")).score(prompts[64:]).head_probs
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    assert merged.version != _backbone(tiny_llama_dir).version  # features are not shared


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_lora_stage_publishes_an_adapter_that_scoring_merges(
    ray_session, local_storage, study_config, tiny_llama_dir, movie_tables
):
    _write_tables(local_storage, movie_tables)
    cfg = study_config(  # every lever of the accuracy study at once
        local_storage.root,
        heads={"side_features": ["mf"], "mlp_size": 8, "lora": {"enabled": True, "epochs": 1}},
        evaluation={"speed_pairs": 4, "speed_taus": [0.0]},
        prompts={"target_ratings": True},
    )
    train_exits.run(cfg)
    exits = storage.join(local_storage.root, "exits")
    meta = storage.read_json(storage.join(exits, "exit_config.json"), local_storage)
    assert meta["lora"]["rank"] == 8 and meta["side_features"] == ["mf"]
    assert storage.exists(storage.join(exits, "adapter.safetensors"), local_storage)
    summary = evaluation.run(cfg)
    assert summary["test_pairs"] == 30
    backbone = _backbone(tiny_llama_dir)
    artifacts.load_scoring_model(cfg, backbone)
    assert "+lora-r8-" in backbone.version
