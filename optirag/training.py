"""Ray Train loops: the LightGCN retriever (DDP over edge shards), exit heads on cached
features, and LoRA + exit heads on whole prompts. They share one epoch skeleton: a seeded
per-epoch shuffle sharded by rank (_my_batches) and _close_epoch.

Every loop checkpoints to the configured storage each epoch (safetensors + JSON, never
pickle), resumes from `ray.train.get_checkpoint()` after a worker failure, and a rerun with
the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file

from optirag import storage
from optirag.config import ComputeConfig, RetrieverConfig, StorageConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIM_FILE = "optimizer.safetensors"
META_FILE = "meta.json"


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


def run_config(name: str, subdir: str, store: StorageConfig, max_failures: int):
    """RunConfig writing checkpoints under <storage.root>/<subdir>/<name> (local or s3)."""
    import ray.train

    fs, path = storage.resolve(storage.join(store.root, subdir), store)
    fs.create_dir(path, recursive=True)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


# ----------------------------------------------------------------------------- retriever


def retriever_loop(config: dict) -> None:
    """Ray Train worker loop: BPR on this worker's shard of the liked edges."""
    import ray.train
    from ray.train.torch import prepare_model

    from optirag import retriever as R

    cfg: RetrieverConfig = config["retriever"]
    graph: R.Graph = config["graph"]
    valid = config["valid"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model = R.new_model(graph, cfg.embedding_dim, cfg.num_layers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    meta, best_state = _restore(model, opt)
    model = prepare_model(model)
    edge_index = graph.edge_index()
    edges = torch.as_tensor(graph.edges)
    per_worker = max(1, cfg.batch_size // world)

    for epoch in range(meta["epoch"], cfg.epochs):
        neg_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + rank)
        losses = []
        model.train()
        for rows in _my_batches(edges.shape[1], cfg.seed, epoch, per_worker):
            loss = R.bpr_step(model, edge_index, edges[:, rows], graph.num_users,
                              graph.num_items, cfg.weight_decay, neg_gen)  # fmt: skip
            losses.append(_step(opt, loss))
        inner = model.module if hasattr(model, "module") else model
        metrics = R.ranking_metrics(
            R.final_embeddings(inner, edge_index), graph, valid, cfg.eval_k, cfg.block_size
        )
        metrics.update(epoch=epoch, loss=sum(losses) / max(len(losses), 1))
        score = metrics[f"ndcg@{cfg.eval_k}"]
        best_state, stop = _close_epoch(meta, metrics, score, inner, best_state, opt, cfg.patience)
        if stop:
            break


def train_retriever(
    graph, valid, cfg: RetrieverConfig, compute: ComputeConfig, store: StorageConfig
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit LightGCN with Ray Train; returns the best state dict and the run's meta."""
    config = {"retriever": cfg, "graph": graph, "valid": valid}
    # The run name carries the config hash: an identical rerun resumes, a changed one doesn't.
    digest = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()
    name = f"{cfg.run_name}-{digest[:8]}"
    return fit(retriever_loop, config, name, "retriever/ray", compute, store, cfg.max_failures)


# ----------------------------------------------------------------------------- exit heads


def depth_decayed_lrs(layers: list[int], num_layers: int, lr0: float, beta: float) -> list[float]:
    """lr_n = lr_0 * exp(-beta * d_n), with d_n = layer_n / num_layers the head's relative
    depth in (0, 1]: deeper heads, whose inputs are already more task-shaped, move slower."""
    return [lr0 * math.exp(-beta * layer / num_layers) for layer in layers]


def _depth_groups(params_by_layer: dict[int, list], num_layers: int, lr0: float, beta: float):
    """One optimizer group per depth, each at its depth-decayed learning rate."""
    layers = list(params_by_layer)
    lrs = depth_decayed_lrs(layers, num_layers, lr0, beta)
    return [{"params": params_by_layer[layer], "lr": lr, "layer": layer}
            for layer, lr in zip(layers, lrs, strict=True)]  # fmt: skip


def _head_groups(heads, num_layers: int, lr0: float, beta: float) -> list[dict]:
    by_layer = {layer: list(h.parameters()) for layer, h in zip(heads.layers, heads.heads,
                                                                 strict=True)}  # fmt: skip
    return _depth_groups(by_layer, num_layers, lr0, beta)


def head_optimizer(heads, num_layers: int, lr0: float, beta: float, weight_decay: float):
    groups = _head_groups(heads, num_layers, lr0, beta)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def lora_optimizer(parts, num_layers: int, lora_lr: float, head_lr: float, beta: float,
                   weight_decay: float) -> torch.optim.Optimizer:  # fmt: skip
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


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def heads_loop(config: dict) -> None:
    """Ray Train worker loop: DDP over this worker's shard of the cached features."""
    import ray.train
    from ray.train.torch import prepare_model

    from optirag.early_exit import ExitHeads
    from optirag.features import load_features

    cfg = config["heads"]
    store = config["storage"]
    # Side features (hybrid heads) come in the config, row-aligned with the cached features.
    train = {**load_features(config["train_uri"], store), "side": config["train_side"]}
    valid = {**load_features(config["valid_uri"], store), "side": config["valid_side"]}
    if config["train_rows"] is not None:
        train = {k: v[config["train_rows"]] if v is not None else None for k, v in train.items()}
    world = ray.train.get_context().get_world_size()

    heads = ExitHeads(config["layers"], config["hidden_size"], config["eps"],
                      cfg.side_features, cfg.mlp_size)  # fmt: skip
    heads.load_state_dict(load(storage.read_bytes(config["init_uri"], store)))
    opt = head_optimizer(heads, config["num_layers"], cfg.lr, cfg.beta, cfg.weight_decay)
    meta, best_state = _restore(heads, opt)
    model = prepare_model(heads)
    n = len(train["labels"])
    per_worker = max(1, cfg.batch_size // world)

    for epoch in range(meta["epoch"], cfg.epochs):
        model.train()
        losses = []
        for batch in _my_batches(n, cfg.seed, epoch, per_worker):
            side = train["side"][batch] if train["side"] is not None else None
            loss = head_losses(model, train["states"][batch], train["labels"][batch], side)
            losses.append(_step(opt, loss))
        model.eval()
        with torch.no_grad():
            valid_logits = heads(valid["states"], valid["side"]).numpy()
        metrics = _epoch_metrics(epoch, losses, valid["labels"].numpy(), valid_logits)
        best_state, stop = _close_epoch(meta, metrics, metrics["valid_auc_mean"], heads,
                                        best_state, opt, cfg.patience)  # fmt: skip
        if stop:
            break


def _epoch_metrics(epoch: int, losses: list[float], labels: np.ndarray, logits: np.ndarray):
    """Mean train loss and every head's valid AUC (model selection: the mean over heads)."""
    from sklearn.metrics import roc_auc_score

    aucs = [float(roc_auc_score(labels, logits[:, h])) for h in range(logits.shape[1])]
    return {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1),
            "valid_auc_mean": float(np.mean(aucs)), "valid_auc_last": aucs[-1],
            "valid_auc_per_head": aucs}  # fmt: skip


# ----------------------------------------------------------------------------- LoRA + heads


def lora_loop(config: dict) -> None:
    """Ray Train worker loop: LoRA + exit heads on whole prompts (each worker one replica),
    every head's loss summed, depth-decayed learning rates."""
    import ray.train
    from ray.train.torch import prepare_model

    from optirag import lora
    from optirag.backbone import load_backbone
    from optirag.early_exit import ExitHeads, pad_tokens

    cfg, lcfg = config["heads"], config["heads"].lora
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(config["backbone"])
    lora.add_lora(backbone, lcfg)
    heads = ExitHeads(config["layers"], backbone.hidden_size, config["eps"], cfg.side_features,
                      cfg.mlp_size)  # fmt: skip
    heads.load_state_dict(config["init_heads"])
    heads.to(backbone.device)
    parts = lora.TrainableParts(backbone, heads)
    opt = lora_optimizer(parts, backbone.num_layers, lcfg.lr, cfg.lr, cfg.beta,
                         cfg.weight_decay)  # fmt: skip
    meta, best_state = _restore(parts, opt)
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
        for rows in _my_batches(len(train["labels"]), cfg.seed, epoch, per_worker):
            loss = summed_bce(logits_of(train, rows), train["labels"][rows])
            losses.append(_step(opt, loss))
        model.eval()
        with torch.no_grad():
            batches = torch.arange(len(valid["labels"])).split(per_worker)
            valid_logits = torch.cat([logits_of(valid, b).cpu() for b in batches]).numpy()
        metrics = _epoch_metrics(epoch, losses, valid["labels"].numpy(), valid_logits)
        best_state, stop = _close_epoch(meta, metrics, metrics["valid_auc_mean"], parts,
                                        best_state, opt, cfg.patience)  # fmt: skip
        if stop:
            break


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Resume from Ray Train's latest checkpoint when there is one: (meta, best state)."""
    import ray.train

    meta = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": [], "resumes": 0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            meta = json.loads(Path(d, META_FILE).read_text())
            model.load_state_dict(load_file(Path(d, MODEL_FILE)))
            load_optimizer(opt, load_file(Path(d, OPTIM_FILE)), meta.pop("optimizer"))
            best_state = load_file(Path(d, BEST_FILE))
        meta["resumes"] += 1
    return meta, best_state


def _my_batches(n: int, seed: int, epoch: int, per_worker: int) -> tuple[torch.Tensor, ...]:
    """This worker's rows of an epoch, in batches: every worker draws the same permutation
    (seeded by the epoch, so a resumed run replays it) and takes every world-th row."""
    import ray.train

    ctx = ray.train.get_context()
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    mine = torch.randperm(n, generator=gen)[ctx.get_world_rank() :: ctx.get_world_size()]
    return mine.split(per_worker)


def _close_epoch(meta: dict, metrics: dict, score: float, model, best_state: dict, opt,
                 patience: int) -> tuple[dict, bool]:  # fmt: skip
    """Record the epoch, checkpoint and report it; returns the best state so far and whether
    early stopping ends the run (`patience` epochs without a better score)."""
    best_state = _end_epoch(meta, metrics, score, model, best_state)
    _report(model, best_state, opt, meta, metrics)
    return best_state, meta["bad_epochs"] >= patience


def _end_epoch(meta: dict, metrics: dict, score: float, model, best_state: dict) -> dict:
    """Record the epoch; returns the best state so far (early stopping reads bad_epochs)."""
    if score > meta["best"]:
        meta.update(best=score, bad_epochs=0, best_epoch=metrics["epoch"])
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        meta["bad_epochs"] += 1
    meta["epoch"] = metrics["epoch"] + 1
    meta["history"].append(metrics)
    return best_state


def _report(model, best_state, opt, meta: dict, metrics: dict) -> None:
    """Checkpoint (rank 0 writes it) and report this epoch's metrics."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            opt_tensors, opt_meta = optimizer_tensors(opt)
            save_file(_on_cpu(model.state_dict()), Path(d, MODEL_FILE))
            save_file(_on_cpu(best_state), Path(d, BEST_FILE))
            save_file(_on_cpu(opt_tensors), Path(d, OPTIM_FILE))
            Path(d, META_FILE).write_text(json.dumps({**meta, "optimizer": opt_meta}))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(
            {k: v for k, v in metrics.items() if not isinstance(v, list)}, checkpoint=checkpoint
        )


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def fit(
    loop,
    loop_config: dict,
    name: str,
    subdir: str,
    compute: ComputeConfig,
    store: StorageConfig,
    max_failures: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run a loop with Ray Train; returns the best state dict and the run's meta."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=compute.train_workers, use_gpu=compute.train_use_gpu
        ),
        run_config=run_config(name, subdir, store, max_failures),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        meta = json.loads(Path(d, META_FILE).read_text())
        meta.pop("optimizer")
        return load_file(Path(d, BEST_FILE)), meta
