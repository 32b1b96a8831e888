"""The head-training and evaluation stages: read the tables, run the modules, write results.

<root>/exits/                 heads.safetensors + exit_config.json (layers, rule, calibrated tau)
<root>/exits/features/        cached frozen-backbone features (train, valid, test)
<root>/evaluation/            metrics.json, sweep.md, sweep.png
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from optirag import evaluate as E
from optirag import features as F
from optirag import schema as S
from optirag import storage
from optirag.backbone import Backbone, load_backbone
from optirag.config import Config
from optirag.context import ContextStore
from optirag.data import table_uri
from optirag.early_exit import ExitHeads, ExitRule, default_exit_layers
from optirag.prompts import PromptBuilder
from optirag.scorer import PairScorer

log = logging.getLogger(__name__)


def _tables(cfg: Config):
    store, root = cfg.storage, cfg.storage.root
    train = storage.read_table(table_uri(root, "interactions", "train"), store, S.INTERACTIONS)
    items = storage.read_table(table_uri(root, "items"), store, S.ITEMS)
    neighbors_uri = cfg.scoring.neighbors_uri or storage.join(root, "neighbors", "gcn.parquet")
    neighbors = (
        storage.read_table(neighbors_uri, store, S.NEIGHBORS)
        if storage.exists(neighbors_uri, store)
        else None
    )
    return train, items, neighbors


def _scorer(cfg: Config, backbone: Backbone, heads: ExitHeads, contexts, rule) -> PairScorer:
    return PairScorer(
        backbone, heads, rule, contexts, PromptBuilder(backbone.tokenizer, cfg.prompts),
        share_prefixes=cfg.compute.share_prefixes, batch_rows=cfg.compute.batch_rows,
    )  # fmt: skip


def exits_uri(cfg: Config, *parts: str) -> str:
    return storage.join(cfg.storage.root, "exits", *parts)


def train_exits(cfg: Config) -> dict:
    """Extract features, train the heads with Ray Train, calibrate tau on valid, publish."""
    from optirag.training import fit, heads_loop

    store, hc = cfg.storage, cfg.heads
    train, items, neighbors = _tables(cfg)
    backbone = load_backbone(cfg.backbone)
    layers = cfg.exits.layers or default_exit_layers(backbone.num_layers, cfg.exits.num_heads)
    init = ExitHeads.from_backbone(backbone, layers)
    scorer = _scorer(cfg, backbone, init, ContextStore(train, items, neighbors, cfg.prompts),
                     ExitRule("none"))  # fmt: skip

    started = time.perf_counter()
    pairs = F.training_pairs(train, hc.train_users, hc.history_fraction, hc.targets_per_user,
                             hc.seed)  # fmt: skip
    valid_cands = storage.read_table(table_uri(cfg.storage.root, "candidates", "valid"), store)
    valid_pairs = F.candidate_pairs(valid_cands, hc.valid_users, hc.seed)
    log.info("extracting features: %d train pairs, %d valid pairs", len(pairs), len(valid_pairs))
    F.save_features(F.extract(scorer, pairs, "train features"), exits_uri(cfg, "features",
                    "train.safetensors"), store)  # fmt: skip
    valid = F.extract(scorer, valid_pairs, "valid features")
    F.save_features(valid, exits_uri(cfg, "features", "valid.safetensors"), store)
    extract_s = time.perf_counter() - started
    init_state = {k: v.float().cpu().contiguous() for k, v in init.state_dict().items()}
    storage.write_bytes(save(init_state), exits_uri(cfg, "init.safetensors"), store)

    loop_config = {
        "heads": hc, "storage": store, "layers": layers, "hidden_size": init.hidden_size,
        "eps": init.eps, "num_layers": backbone.num_layers,
        "train_uri": exits_uri(cfg, "features", "train.safetensors"),
        "valid_uri": exits_uri(cfg, "features", "valid.safetensors"),
        "init_uri": exits_uri(cfg, "init.safetensors"),
    }  # fmt: skip
    state, meta = fit(heads_loop, loop_config, hc.run_name, "exits/ray", cfg.compute, store,
                      hc.max_failures)  # fmt: skip
    heads = ExitHeads(layers, init.hidden_size, init.eps)
    heads.load_state_dict(state)

    probs = head_probs(heads, valid["states"])
    labels = valid["labels"].numpy()
    rows = E.sweep(probs, labels, layers, backbone.num_layers, hc.tau_grid, hc.confidence_grid)
    chosen = E.calibrate(rows, hc.auc_budget)
    exit_config = {
        "rule": "agreement", "threshold": chosen.threshold, "auc_budget": hc.auc_budget,
        "backbone": backbone.version, "calibration": [r.as_dict() for r in rows],
        "training": {k: v for k, v in meta.items() if k != "history"},
        "history": meta["history"], "train_pairs": len(pairs), "valid_pairs": len(valid_pairs),
        "feature_extraction_s": round(extract_s, 1),
    }  # fmt: skip
    _publish_heads(heads, exit_config, cfg)
    return {
        "train_pairs": len(pairs), "valid_pairs": len(valid_pairs),
        "best_epoch": meta.get("best_epoch"), "valid_auc_per_head":
        meta["history"][meta.get("best_epoch", -1)]["valid_auc_per_head"],
        "calibrated": chosen.as_dict(), "heads_uri": exits_uri(cfg),
        "feature_extraction_s": round(extract_s, 1),
    }  # fmt: skip


def head_probs(heads: ExitHeads, states: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(heads.float()(states.float())).numpy()


def _publish_heads(heads: ExitHeads, exit_config: dict, cfg: Config) -> None:
    with tempfile.TemporaryDirectory() as d:
        heads.save(d, exit_config)
        for name in ("heads.safetensors", "exit_config.json"):
            storage.write_bytes(Path(d, name).read_bytes(), exits_uri(cfg, name), cfg.storage)
