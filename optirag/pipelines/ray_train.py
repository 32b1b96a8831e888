"""The Ray Train skeleton every training job shares: a TorchTrainer run whose loop checkpoints
each epoch (safetensors + JSON, never pickle), resumes from `ray.train.get_checkpoint()`
after a worker failure, shuffles per epoch with a seed (so a resumed run replays it), shards
rows by rank, and stops early after `patience` epochs without a better valid score. A rerun
with the same run name resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from optirag import artifacts as A
from optirag import storage
from optirag.config import ComputeConfig, StorageConfig
from optirag.head_training import load_optimizer, optimizer_tensors


def run_config(name: str, job: str, store: StorageConfig, max_failures: int):
    """RunConfig writing checkpoints under the job's checkpoint folder (local or s3)."""
    fs, path = storage.resolve(A.checkpoints_uri(store.root, job), store)
    fs.create_dir(path, recursive=True)
    return ray.train.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def fit(
    loop,
    loop_config: dict,
    name: str,
    job: str,
    compute: ComputeConfig,
    store: StorageConfig,
    max_failures: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run a loop with Ray Train; returns the best state dict and the run's meta."""
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=compute.train_workers, use_gpu=compute.train_use_gpu
        ),
        run_config=run_config(name, job, store, max_failures),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        meta = json.loads(Path(d, A.CHECKPOINT_META).read_text())
        meta.pop("optimizer")
        return load_file(Path(d, A.CHECKPOINT_BEST)), meta


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Resume from Ray Train's latest checkpoint when there is one: (meta, best state)."""
    meta = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": [], "resumes": 0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            meta = json.loads(Path(d, A.CHECKPOINT_META).read_text())
            model.load_state_dict(load_file(Path(d, A.CHECKPOINT_MODEL)))
            load_optimizer(opt, load_file(Path(d, A.CHECKPOINT_OPTIMIZER)), meta.pop("optimizer"))
            best_state = load_file(Path(d, A.CHECKPOINT_BEST))
        meta["resumes"] += 1
    return meta, best_state


def my_batches(n: int, seed: int, epoch: int, per_worker: int) -> tuple[torch.Tensor, ...]:
    """This worker's rows of an epoch, in batches: every worker draws the same permutation
    (seeded by the epoch, so a resumed run replays it) and takes every world-th row."""
    ctx = ray.train.get_context()
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    mine = torch.randperm(n, generator=gen)[ctx.get_world_rank() :: ctx.get_world_size()]
    return mine.split(per_worker)


def close_epoch(
    meta: dict, metrics: dict, score: float, model, best_state: dict, opt, patience: int
) -> tuple[dict, bool]:
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
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            opt_tensors, opt_meta = optimizer_tensors(opt)
            save_file(_on_cpu(model.state_dict()), Path(d, A.CHECKPOINT_MODEL))
            save_file(_on_cpu(best_state), Path(d, A.CHECKPOINT_BEST))
            save_file(_on_cpu(opt_tensors), Path(d, A.CHECKPOINT_OPTIMIZER))
            Path(d, A.CHECKPOINT_META).write_text(json.dumps({**meta, "optimizer": opt_meta}))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(
            {k: v for k, v in metrics.items() if not isinstance(v, list)}, checkpoint=checkpoint
        )


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
