"""The head-training job: exit heads trained with Ray Train on cached frozen-backbone states
(or jointly with a LoRA adapter on whole prompts, heads.lora.enabled), every head's loss
summed, learning rates decayed with depth; tau calibrated on valid; the heads, their exit
config, the adapter and the side features published together."""

from __future__ import annotations

import logging
import time

import numpy as np
import ray.train
import torch
from ray.train.torch import prepare_model

from optirag import artifacts as A
from optirag import lora, storage
from optirag import metrics as M
from optirag import pairs as P
from optirag.backbones import load_backbone
from optirag.cf import SideFeatures
from optirag.config import Config
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, default_exit_layers, pad_tokens
from optirag.head_training import (
    head_losses,
    head_optimizer,
    lora_optimizer,
    optimizer_step,
    summed_bce,
)
from optirag.model_files import local_backbone
from optirag.pipelines.ray_train import close_epoch, fit, my_batches, restore
from optirag.pipelines.states import (
    cached_states,
    feature_key,
    head_probs,
    state_scorer,
    table_state_scorer,
)
from optirag.prompts import PromptBuilder

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Train the exit heads, calibrate tau on valid, publish; returns a summary."""
    hc = cfg.heads
    train, items, neighbors = A.read_prompt_tables(cfg)
    backbone = load_backbone(local_backbone(cfg))
    layers = cfg.exits.layers or default_exit_layers(backbone.num_layers, cfg.exits.num_heads)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    pairs = P.training_pairs(
        train, hc.train_users, hc.history_fraction, hc.targets_per_user, hc.seed
    )
    valid_cands = storage.read_table(A.candidates_uri(cfg.storage.root, "valid"), cfg.storage)
    valid_pairs = P.candidate_pairs(valid_cands, hc.valid_users, hc.seed)
    log.info("%d train pairs, %d valid pairs", len(pairs), len(valid_pairs))
    side_features, train_side, valid_side = _side_features(
        hc.side_features, hc.seed, train, pairs, valid_pairs
    )
    answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
    init = ExitHeads.from_backbone(backbone, layers, hc.side_features, hc.mlp_size, answers=answers)
    rows = None
    if hc.max_train_pairs is not None and hc.max_train_pairs < len(pairs):
        rng = np.random.default_rng(hc.seed)
        rows = torch.from_numpy(np.sort(rng.choice(len(pairs), hc.max_train_pairs, False)))
    fit_heads = _fit_lora_heads if hc.lora.enabled else _fit_frozen_heads
    started = time.perf_counter()
    heads, adapter, valid_states, meta = fit_heads(
        cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side, valid_side
    )
    train_s = time.perf_counter() - started

    probs = head_probs(heads, valid_states, valid_side)
    calibration = M.sweep(
        probs, valid_pairs.labels, layers, backbone.num_layers, hc.tau_grid, hc.confidence_grid
    )
    chosen = M.calibrate(calibration, hc.auc_budget)
    n_train = len(rows) if rows is not None else len(pairs)
    exit_config = {
        **heads.spec.as_dict(),
        "rule": "agreement",
        "threshold": chosen.threshold,
        "auc_budget": hc.auc_budget,
        "backbone": backbone.version,
        "calibration": [r.as_dict() for r in calibration],
        "training": {k: v for k, v in meta.items() if k != "history"},
        "history": meta["history"],
        "train_pairs": n_train,
        "valid_pairs": len(valid_pairs),
        "training_s": round(train_s, 1),
    }
    if adapter is not None:
        exit_config["lora"] = hc.lora.model_dump()
    side = side_features.arrays() if side_features is not None else None
    A.save_heads(A.StoredHeads(heads.state_dict(), exit_config, adapter, side), cfg)
    return {
        "train_pairs": n_train,
        "valid_pairs": len(valid_pairs),
        "best_epoch": meta.get("best_epoch"),
        "valid_auc_per_head": meta["history"][meta.get("best_epoch", -1)]["valid_auc_per_head"],
        "calibrated": chosen.as_dict(),
        "heads_uri": A.heads_location(cfg),
        "training_s": round(train_s, 1),
    }


def _fit_frozen_heads(
    cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side, valid_side
):
    """Extract (or reuse) the frozen backbone's states, then train the heads on them."""
    hc = cfg.heads
    scorer = state_scorer(cfg, backbone, init.layers, contexts)  # shared by all head variants
    key = feature_key(cfg, backbone, init.layers)
    train_key = {**key, "pairs": [hc.train_users, hc.history_fraction, hc.targets_per_user]}
    valid_key = {**key, "pairs": [hc.valid_users]}
    cached_states(scorer, pairs, "train", train_key, cfg, "train features")
    valid_scorer = table_state_scorer(cfg, backbone, init.layers)  # the job's prompts
    valid = cached_states(valid_scorer, valid_pairs, "valid", valid_key, cfg, "valid features")
    loop_config = {
        "heads": hc,
        "storage": cfg.storage,
        "spec": init.spec,
        "num_layers": backbone.num_layers,
        "train_uri": A.features_uri(cfg, "train", train_key),
        "valid_uri": A.features_uri(cfg, "valid", valid_key),
        "train_rows": rows,
        "train_side": train_side,
        "valid_side": valid_side,
        "init_uri": A.save_init_heads(init.state_dict(), cfg),
    }
    # The run name carries the config hash: an identical rerun resumes, a changed one doesn't.
    state, meta = fit(
        heads_loop,
        loop_config,
        f"{hc.run_name}-{cfg.fingerprint()}",
        "exits",
        cfg.compute,
        cfg.storage,
        hc.max_failures,
    )
    heads = ExitHeads.from_spec(init.spec)
    heads.load_state_dict(state)
    return heads, None, valid["states"], meta


def _fit_lora_heads(
    cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side, valid_side
):
    """Train LoRA + heads on whole prompts; valid states come from the merged backbone."""
    hc = cfg.heads
    scorer = state_scorer(cfg, backbone, init.layers, contexts)  # encodes the prompts
    if rows is not None:
        pairs = pairs.take(rows.numpy())
        train_side = train_side[rows] if train_side is not None else None

    valid_scorer = table_state_scorer(cfg, backbone, init.layers)  # the job's prompts

    def split(p: P.Pairs, side, prompts) -> dict:
        return {
            "prompts": prompts.prompt_ids(p.users, p.items, p.cutoff),
            "labels": torch.from_numpy(p.labels.astype(np.float32)),
            "side": side,
        }

    loop_config = {
        "heads": hc,
        "config": cfg,  # each worker fetches an s3:// model on its own node
        "spec": init.spec,
        "init_heads": {k: v.float().cpu() for k, v in init.state_dict().items()},
        "train": split(pairs, train_side, scorer),
        "valid": split(valid_pairs, valid_side, valid_scorer),
    }
    state, meta = fit(
        lora_loop,
        loop_config,
        f"{hc.run_name}-lora-{cfg.fingerprint()}",
        "exits",
        cfg.compute,
        cfg.storage,
        hc.max_failures,
    )
    heads = ExitHeads.from_spec(init.spec)
    heads_state, adapter = lora.TrainableParts.split(state)
    heads.load_state_dict(heads_state)
    lora.load_lora(backbone, hc.lora, adapter)
    merged = table_state_scorer(cfg, backbone, init.layers)  # the merged backbone's states
    valid = P.extract_states(merged, valid_pairs, "valid features (LoRA)")
    return heads, adapter, valid["states"], meta


def _side_features(names: list[str], seed: int, train, pairs: P.Pairs, other: P.Pairs):
    """The hybrid heads' CF features: for training pairs fitted only on what their prompts
    may know (before each user's cut), for other pairs (valid; later test and scoring) on
    the whole train split, which is what is published beside the heads."""
    if not names:
        return None, None, None
    train_side = P.training_side_features(names, seed, train, pairs)
    full = SideFeatures.fit(names, train, seed)
    return full, torch.from_numpy(train_side), torch.from_numpy(full(other.users, other.items))


# ----------------------------------------------------------------------------- Ray Train loops


def heads_loop(config: dict) -> None:
    """Ray Train worker loop: DDP over this worker's shard of the cached features."""
    cfg = config["heads"]
    store = config["storage"]
    # Side features (hybrid heads) come in the config, row-aligned with the cached features.
    train = {**A.load_tensors(config["train_uri"], store), "side": config["train_side"]}
    valid = {**A.load_tensors(config["valid_uri"], store), "side": config["valid_side"]}
    if config["train_rows"] is not None:
        train = {k: v[config["train_rows"]] if v is not None else None for k, v in train.items()}
    world = ray.train.get_context().get_world_size()

    heads = ExitHeads.from_spec(config["spec"])
    heads.load_state_dict(A.load_tensors(config["init_uri"], store))
    opt = head_optimizer(heads, config["num_layers"], cfg.lr, cfg.beta, cfg.weight_decay)
    meta, best_state = restore(heads, opt)
    model = prepare_model(heads)
    n = len(train["labels"])
    per_worker = max(1, cfg.batch_size // world)

    for epoch in range(meta["epoch"], cfg.epochs):
        model.train()
        losses = []
        for batch in my_batches(n, cfg.seed, epoch, per_worker):
            side = train["side"][batch] if train["side"] is not None else None
            loss = head_losses(model, train["states"][batch], train["labels"][batch], side)
            losses.append(optimizer_step(opt, loss))
        model.eval()
        with torch.no_grad():
            valid_logits = heads(valid["states"], valid["side"]).numpy()
        metrics = _epoch_metrics(epoch, losses, valid["labels"].numpy(), valid_logits)
        best_state, stop = close_epoch(
            meta, metrics, metrics["valid_auc_mean"], heads, best_state, opt, cfg.patience
        )
        if stop:
            break


def _epoch_metrics(epoch: int, losses: list[float], labels: np.ndarray, logits: np.ndarray):
    """Mean train loss and every head's valid AUC (model selection: the mean over heads)."""
    from sklearn.metrics import roc_auc_score

    aucs = [float(roc_auc_score(labels, logits[:, h])) for h in range(logits.shape[1])]
    return {
        "epoch": epoch,
        "loss": sum(losses) / max(len(losses), 1),
        "valid_auc_mean": float(np.mean(aucs)),
        "valid_auc_last": aucs[-1],
        "valid_auc_per_head": aucs,
    }


def lora_loop(config: dict) -> None:
    """Ray Train worker loop: LoRA + exit heads on whole prompts (each worker one replica),
    every head's loss summed, depth-decayed learning rates."""
    cfg, lcfg = config["heads"], config["heads"].lora
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(local_backbone(config["config"]))
    lora.add_lora(backbone, lcfg)
    heads = ExitHeads.from_spec(config["spec"])
    heads.load_state_dict(config["init_heads"])
    heads.to(backbone.device)
    parts = lora.TrainableParts(backbone, heads)
    opt = lora_optimizer(parts, backbone.num_layers, lcfg.lr, cfg.lr, cfg.beta, cfg.weight_decay)
    meta, best_state = restore(parts, opt)
    model = prepare_model(lora.LoraExitModel(backbone, heads))
    train, valid = config["train"], config["valid"]
    per_worker = max(1, lcfg.batch_size // world)

    def logits_of(split: dict, rows: torch.Tensor) -> torch.Tensor:
        ids, lengths = pad_tokens([split["prompts"][i] for i in rows.tolist()])
        side = split["side"][rows] if split["side"] is not None else None
        return model(ids.to(backbone.device), lengths.to(backbone.device), side)

    for epoch in range(meta["epoch"], lcfg.epochs):
        model.train()
        losses = []
        for rows in my_batches(len(train["labels"]), cfg.seed, epoch, per_worker):
            loss = summed_bce(logits_of(train, rows), train["labels"][rows])
            losses.append(optimizer_step(opt, loss))
        model.eval()
        with torch.no_grad():
            batches = torch.arange(len(valid["labels"])).split(per_worker)
            valid_logits = torch.cat([logits_of(valid, b).cpu() for b in batches]).numpy()
        metrics = _epoch_metrics(epoch, losses, valid["labels"].numpy(), valid_logits)
        best_state, stop = close_epoch(
            meta, metrics, metrics["valid_auc_mean"], parts, best_state, opt, cfg.patience
        )
        if stop:
            break
