"""The head-training and evaluation stages: read the tables, run the modules, write results.

<root>/exits/                 heads.safetensors + exit_config.json (layers, rule, calibrated tau)
<root>/features/              cached frozen-backbone features, named by split and key hash
<root>/evaluation/            metrics.json, sweep.md, sweep.png
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save, save_file

from optirag import cf, storage
from optirag import evaluate as E
from optirag import features as F
from optirag import schema as S
from optirag.backbone import Backbone, load_backbone
from optirag.config import Config
from optirag.context import ContextStore
from optirag.data import table_uri
from optirag.early_exit import (
    ADAPTER_FILE,
    EXIT_CONFIG_FILE,
    HEADS_FILE,
    ExitHeads,
    ExitRule,
    default_exit_layers,
)
from optirag.prompts import PromptBuilder
from optirag.scorer import (
    PairScorer,
    has_trained_heads,
    heads_location,
    load_heads,
    load_side_features,
    side_features_uri,
)

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


def _scorer(
    cfg: Config, backbone: Backbone, heads: ExitHeads, contexts, rule, side=None
) -> PairScorer:
    return PairScorer(
        backbone, heads, rule, contexts, PromptBuilder(backbone.tokenizer, cfg.prompts),
        share_prefixes=cfg.compute.share_prefixes, batch_rows=cfg.compute.batch_rows,
        side_features=side,
    )  # fmt: skip


def _state_scorer(cfg: Config, backbone: Backbone, layers: list[int], contexts) -> PairScorer:
    """What extracts the backbone's states at the exit layers: plain heads whatever the head
    variant (states do not depend on the heads), full depth for every row."""
    plain = ExitHeads.from_backbone(backbone, layers)
    return _scorer(cfg, backbone, plain, contexts, ExitRule("none"))


def exits_uri(cfg: Config, *parts: str) -> str:
    return storage.join(heads_location(cfg), *parts)


def train_exits(cfg: Config) -> dict:
    """Train the exit heads with Ray Train (on cached frozen-backbone features, or jointly
    with a LoRA adapter when heads.lora.enabled), calibrate tau on valid, publish."""
    store, hc = cfg.storage, cfg.heads
    train, items, neighbors = _tables(cfg)
    backbone = load_backbone(cfg.backbone)
    layers = cfg.exits.layers or default_exit_layers(backbone.num_layers, cfg.exits.num_heads)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    pairs = F.training_pairs(train, hc.train_users, hc.history_fraction, hc.targets_per_user,
                             hc.seed)  # fmt: skip
    valid_cands = storage.read_table(table_uri(cfg.storage.root, "candidates", "valid"), store)
    valid_pairs = F.candidate_pairs(valid_cands, hc.valid_users, hc.seed)
    log.info("%d train pairs, %d valid pairs", len(pairs), len(valid_pairs))
    side_features, train_side, valid_side = _side_features(
        hc.side_features, hc.seed, train, pairs, valid_pairs
    )
    init = ExitHeads.from_backbone(backbone, layers, hc.side_features, hc.mlp_size)
    rows = None
    if hc.max_train_pairs is not None and hc.max_train_pairs < len(pairs):
        rng = np.random.default_rng(hc.seed)
        rows = torch.from_numpy(np.sort(rng.choice(len(pairs), hc.max_train_pairs, False)))
    train_exits_fn = _fit_lora_heads if hc.lora.enabled else _fit_frozen_heads
    started = time.perf_counter()
    heads, adapter, valid_states, meta = train_exits_fn(
        cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side, valid_side
    )
    train_s = time.perf_counter() - started

    probs = head_probs(heads, valid_states, valid_side)
    calibration = E.sweep(probs, valid_pairs.labels, layers, backbone.num_layers, hc.tau_grid,
                          hc.confidence_grid)  # fmt: skip
    chosen = E.calibrate(calibration, hc.auc_budget)
    n_train = len(rows) if rows is not None else len(pairs)
    exit_config = {
        "rule": "agreement", "threshold": chosen.threshold, "auc_budget": hc.auc_budget,
        "backbone": backbone.version, "calibration": [r.as_dict() for r in calibration],
        "training": {k: v for k, v in meta.items() if k != "history"},
        "history": meta["history"], "train_pairs": n_train, "valid_pairs": len(valid_pairs),
        "training_s": round(train_s, 1),
    }  # fmt: skip
    if adapter is not None:
        exit_config["lora"] = hc.lora.model_dump()
    _publish_heads(heads, exit_config, cfg, adapter)
    if side_features is not None:
        side_features.save(side_features_uri(cfg), store)
    return {
        "train_pairs": n_train, "valid_pairs": len(valid_pairs),
        "best_epoch": meta.get("best_epoch"), "valid_auc_per_head":
        meta["history"][meta.get("best_epoch", -1)]["valid_auc_per_head"],
        "calibrated": chosen.as_dict(), "heads_uri": exits_uri(cfg),
        "training_s": round(train_s, 1),
    }  # fmt: skip


def _fit_frozen_heads(cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side,
                      valid_side):  # fmt: skip
    """Extract (or reuse) the frozen backbone's states, then train the heads on them."""
    from optirag.training import fit, heads_loop

    store, hc = cfg.storage, cfg.heads
    scorer = _state_scorer(cfg, backbone, init.layers, contexts)  # shared by all head variants
    key = feature_key(cfg, backbone, init.layers)
    train_key = {**key, "pairs": [hc.train_users, hc.history_fraction, hc.targets_per_user]}
    valid_key = {**key, "pairs": [hc.valid_users]}
    train_uri = features_uri(cfg, "train", train_key)
    valid_uri = features_uri(cfg, "valid", valid_key)
    F.cached_extract(scorer, pairs, train_uri, train_key, store, "train features")
    valid = F.cached_extract(scorer, valid_pairs, valid_uri, valid_key, store, "valid features")
    init_state = {k: v.float().cpu().contiguous() for k, v in init.state_dict().items()}
    storage.write_bytes(save(init_state), exits_uri(cfg, "init.safetensors"), store)
    loop_config = {
        "heads": hc, "storage": store, "layers": init.layers, "hidden_size": init.hidden_size,
        "eps": init.eps, "num_layers": backbone.num_layers,
        "train_uri": train_uri, "valid_uri": valid_uri, "train_rows": rows,
        "train_side": train_side, "valid_side": valid_side,
        "init_uri": exits_uri(cfg, "init.safetensors"),
    }  # fmt: skip
    # The run name carries the config hash: an identical rerun resumes, a changed one doesn't.
    state, meta = fit(heads_loop, loop_config, f"{hc.run_name}-{cfg.fingerprint()}",
                      "exits/ray", cfg.compute, store, hc.max_failures)  # fmt: skip
    heads = ExitHeads(init.layers, init.hidden_size, init.eps, hc.side_features, hc.mlp_size)
    heads.load_state_dict(state)
    return heads, None, valid["states"], meta


def _fit_lora_heads(cfg, backbone, init, contexts, pairs, valid_pairs, rows, train_side,
                    valid_side):  # fmt: skip
    """Train LoRA + heads on whole prompts; valid states come from the merged backbone."""
    from optirag import lora
    from optirag.training import fit, lora_loop

    hc = cfg.heads
    scorer = _state_scorer(cfg, backbone, init.layers, contexts)  # encodes the prompts
    if rows is not None:
        pairs = pairs.take(rows.numpy())
        train_side = train_side[rows] if train_side is not None else None

    def split(p: F.Pairs, side) -> dict:
        return {"prompts": scorer.prompt_ids(p.users, p.items, p.cutoff),
                "labels": torch.from_numpy(p.labels.astype(np.float32)), "side": side}  # fmt: skip

    loop_config = {
        "heads": hc, "backbone": cfg.backbone, "layers": init.layers, "eps": init.eps,
        "init_heads": {k: v.float().cpu() for k, v in init.state_dict().items()},
        "train": split(pairs, train_side), "valid": split(valid_pairs, valid_side),
    }  # fmt: skip
    state, meta = fit(lora_loop, loop_config, f"{hc.run_name}-lora-{cfg.fingerprint()}",
                      "exits/ray", cfg.compute, cfg.storage, hc.max_failures)  # fmt: skip
    heads = ExitHeads(init.layers, init.hidden_size, init.eps, hc.side_features, hc.mlp_size)
    heads_state, adapter = lora.TrainableParts.split(state)
    heads.load_state_dict(heads_state)
    lora.load_lora(backbone, hc.lora, adapter)
    merged = _state_scorer(cfg, backbone, init.layers, contexts)
    valid = F.extract(merged, valid_pairs, "valid features (LoRA)")
    return heads, adapter, valid["states"], meta


def _side_features(names: list[str], seed: int, train, pairs: F.Pairs, other: F.Pairs):
    """The hybrid heads' CF features: for training pairs fitted only on what their prompts
    may know (before each user's cut), for other pairs (valid; later test and scoring) on
    the whole train split, which is what is published beside the heads."""
    if not names:
        return None, None, None
    train_side = _training_side(names, seed, train, pairs)
    full = cf.SideFeatures.fit(names, train, seed)
    return full, torch.from_numpy(train_side), torch.from_numpy(full(other.users, other.items))


def _training_side(names: list[str], seed: int, train, pairs: F.Pairs) -> np.ndarray:
    """Training pairs' side features, fitted before each user's cut (leak-free)."""
    known = F.before_cutoffs(train, pairs.users, pairs.cutoff)
    return cf.SideFeatures.fit(names, known, seed)(pairs.users, pairs.items)


def side_features_only(cfg: Config, train, names: list[str], test_side: np.ndarray) -> np.ndarray:
    """The hybrid heads' control: logistic regression on the same CF features of the same
    training pairs, without the LLM's state, scoring the test pairs' features `test_side`.
    What a hybrid head adds over this is the LLM."""
    from sklearn.linear_model import LogisticRegression

    hc = cfg.heads
    train_pairs = F.training_pairs(train, hc.train_users, hc.history_fraction,
                                   hc.targets_per_user, hc.seed)  # fmt: skip
    x_train = _training_side(names, hc.seed, train, train_pairs)
    model = LogisticRegression(max_iter=1000).fit(x_train, train_pairs.labels)
    return model.predict_proba(test_side)[:, 1]


def feature_key(cfg: Config, backbone: Backbone, layers: list[int]) -> dict:
    """What the cached features depend on: model, prompt settings and wording (a prompt
    rendered from fake data), neighbour table, seed."""
    neighbors = cfg.scoring.neighbors_uri or storage.join(cfg.storage.root, "neighbors",
                                                          "gcn.parquet")  # fmt: skip
    stamp = None
    if storage.exists(neighbors, cfg.storage):
        fs, path = storage.resolve(neighbors, cfg.storage)
        info = fs.get_file_info(path)
        stamp = [info.size, str(info.mtime)]
    template = PromptBuilder(backbone.tokenizer, cfg.prompts).template_sample()
    return {"backbone": backbone.version, "layers": layers, "seed": cfg.heads.seed,
            "prompts": cfg.prompts.model_dump(), "neighbors": [neighbors, stamp],
            "template": hashlib.sha256(template.encode()).hexdigest()[:12]}  # fmt: skip


def features_uri(cfg: Config, split: str, key: dict) -> str:
    """Cached features are addressed by what they depend on, so every head variant trained
    on the same backbone, prompts and pairs reuses them."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(cfg.storage.root, "features", f"{split}-{digest}.safetensors")


def head_probs(
    heads: ExitHeads, states: torch.Tensor, side: torch.Tensor | None = None
) -> np.ndarray:
    cpu_heads = copy.deepcopy(heads).float().cpu()  # cached features live on the CPU
    with torch.no_grad():
        return torch.sigmoid(cpu_heads(states.float(), side)).numpy()


def _publish_heads(heads: ExitHeads, exit_config: dict, cfg: Config, adapter=None) -> None:
    with tempfile.TemporaryDirectory() as d:
        heads.save(d, exit_config)
        names = [HEADS_FILE, EXIT_CONFIG_FILE]
        if adapter is not None:
            save_file(
                {k: v.float().contiguous() for k, v in adapter.items()}, f"{d}/{ADAPTER_FILE}"
            )
            names.append(ADAPTER_FILE)
        for name in names:
            storage.write_bytes(Path(d, name).read_bytes(), exits_uri(cfg, name), cfg.storage)


def run_evaluation(cfg: Config) -> dict:
    """Test metrics of the trained heads and the baselines, on all pairs and the cold-item and
    light-user slices, the tau sweep, and measured speed."""
    store, ec = cfg.storage, cfg.evaluation
    train, items, neighbors = _tables(cfg)
    backbone = load_backbone(cfg.backbone)
    if not has_trained_heads(cfg):
        raise FileNotFoundError(f"no trained heads under {heads_location(cfg)}: run train_exits")
    heads, exit_config = load_heads(backbone, cfg)
    side_features = load_side_features(heads, cfg)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    test_cands = storage.read_table(table_uri(store.root, "candidates", "test"), store)
    pairs = F.candidate_pairs(test_cands, ec.test_users, seed=cfg.heads.seed)
    state_scorer = _state_scorer(cfg, backbone, heads.layers, contexts)
    test_key = {**feature_key(cfg, backbone, heads.layers), "pairs": [ec.test_users]}
    feats = F.cached_extract(state_scorer, pairs, features_uri(cfg, "test", test_key), test_key,
                             store, "test features")  # fmt: skip
    labels = feats["labels"].numpy()
    side = side_features(pairs.users, pairs.items) if side_features is not None else None
    probs = head_probs(heads, feats["states"], None if side is None else torch.from_numpy(side))
    n_layers = backbone.num_layers
    tau = float(cfg.exits.threshold if cfg.exits.threshold is not None
                else exit_config["threshold"])  # fmt: skip
    rule = ExitRule("agreement", tau)
    ee_scores, ee_exits = E.simulate_exits(probs, heads.layers, rule)

    models = _baselines(cfg, train, pairs)
    if heads.side_names:
        models[SIDE_ONLY] = side_features_only(cfg, train, heads.side_names, side)
    models["LLM zero-shot P(Yes)"] = head_probs(state_scorer.engine.heads, feats["states"])[:, -1]
    for h, layer in enumerate(heads.layers):
        models[f"exit head @ layer {layer}"] = probs[:, h]
    models["trained heads, full depth"] = probs[:, -1]
    models[f"early exit (calibrated tau={tau:g})"] = ee_scores
    table = E.model_table(models, labels, E.slice_masks(train, pairs.users, pairs.items),
                          MF_BASELINE, set(models) - {LIGHTGCN_BASELINE},
                          ec.bootstrap_resamples)  # fmt: skip
    rows = E.sweep(probs, labels, heads.layers, n_layers, cfg.heads.tau_grid,
                   cfg.heads.confidence_grid)  # fmt: skip
    speed = _measure_speed(cfg, backbone, heads, contexts, pairs, [*ec.speed_taus, tau],
                           side_features)  # fmt: skip
    calibrated = E.evaluate_rule(probs, labels, heads.layers, n_layers, rule)
    out = ec.output_uri or storage.join(store.root, "evaluation")
    with tempfile.TemporaryDirectory() as d:
        E.plot_sweep(rows, calibrated, f"{d}/sweep.png",
                     f"test AUC vs compute ({backbone.version})")  # fmt: skip
        png = Path(d, "sweep.png").read_bytes()
    storage.write_bytes(png, storage.join(out, "sweep.png"), store)
    counts = {int(k): int(v) for k, v in zip(*np.unique(ee_exits, return_counts=True),
                                              strict=True)}  # fmt: skip
    metrics = {
        "test_pairs": len(pairs), "test_users": int(len(np.unique(pairs.users))),
        "backbone": backbone.version, "layers": heads.layers, "calibrated_tau": tau,
        "side_features": heads.side_names, "mlp_size": heads.mlp_size,
        "models": table, "sweep": [r.as_dict() for r in rows], "speed": speed,
        "exit_histogram": counts, "mean_exit_layer": float(ee_exits.mean()),
        "compute_vs_full_depth": float(ee_exits.mean()) / n_layers,
        "train_pairs": exit_config.get("train_pairs"),
    }  # fmt: skip
    storage.write_json(metrics, storage.join(out, "metrics.json"), store)
    storage.write_bytes(render_markdown(metrics).encode(), storage.join(out, "report.md"), store)
    print(render_markdown(metrics))
    return {k: metrics[k] for k in ("test_pairs", "calibrated_tau", "mean_exit_layer",
                                    "compute_vs_full_depth")}  # fmt: skip


MF_BASELINE = "matrix factorisation (dim 32, BCE)"
LIGHTGCN_BASELINE = "LightGCN dot product"
SIDE_ONLY = "CF side features only (logistic regression)"


def _baselines(cfg: Config, train, pairs: F.Pairs) -> dict[str, np.ndarray]:
    models = {
        "item popularity": cf.popularity_scores(train, pairs.items),
        "logistic regression on ids": E.id_logistic_regression(train, pairs.users, pairs.items),
        MF_BASELINE: cf.MatrixFactorisation.fit(train).probs(pairs.users, pairs.items),
    }
    gcn = _lightgcn_scores(cfg, pairs)
    if gcn is not None:
        models[LIGHTGCN_BASELINE] = gcn
    return models


def _lightgcn_scores(cfg: Config, pairs: F.Pairs) -> np.ndarray | None:
    """Dot products of the trained LightGCN embeddings; 0 for users/items it never saw."""
    from safetensors.torch import load

    root = storage.join(cfg.storage.root, "retriever")
    if not storage.exists(storage.join(root, "meta.json"), cfg.storage):
        return None
    meta = storage.read_json(storage.join(root, "meta.json"), cfg.storage)
    emb = load(storage.read_bytes(storage.join(root, "embeddings.safetensors"), cfg.storage))
    emb = emb["embeddings"].numpy()
    user_ids, item_ids = np.asarray(meta["user_ids"]), np.asarray(meta["item_ids"])
    u, i = cf.lookup(user_ids, pairs.users), cf.lookup(item_ids, pairs.items)
    known = (u >= 0) & (i >= 0)
    scores = np.zeros(len(pairs), dtype=np.float32)
    ue, ie = emb[u[known]], emb[len(user_ids) + i[known]]
    scores[known] = (ue * ie).sum(1)
    return scores


def _measure_speed(
    cfg, backbone, heads, contexts, pairs: F.Pairs, taus: list[float], side_features
) -> list:
    """Measured pairs/s of the real engine on the first `speed_pairs` pairs, per tau."""
    n = min(cfg.evaluation.speed_pairs, len(pairs))
    results = []
    for tau in taus if n else []:
        rule = ExitRule("agreement", tau) if tau > 0 else ExitRule("none")
        scorer = _scorer(cfg, backbone, heads, contexts, rule, side_features)
        start = time.perf_counter()
        out = scorer.score(pairs.users[:n], pairs.items[:n])
        seconds = time.perf_counter() - start
        results.append({"tau": tau, "pairs": n, "pairs_per_s": round(n / seconds, 2),
                        "mean_exit_layer": float(out.exit_layers.mean()),
                        "layer_tokens_per_pair": out.layer_tokens / n})  # fmt: skip
    return results


def render_markdown(metrics: dict) -> str:
    lines = [f"Test pairs: {metrics['test_pairs']} ({metrics['test_users']} users); "
             f"backbone {metrics['backbone']}; exit layers {metrics['layers']}; "
             f"side features {metrics.get('side_features') or 'none'}; "
             f"MLP size {metrics.get('mlp_size', 0)}; train pairs {metrics.get('train_pairs')}",
             ""]  # fmt: skip
    slices = list(metrics["models"][0]["slices"])
    lines.append("| model | " + " | ".join(f"AUC {s} (vs MF, 95% CI)" for s in slices)
                 + " | LogLoss |")  # fmt: skip
    lines.append("|---" * (len(slices) + 2) + "|")
    for row in metrics["models"]:
        cells = []
        for name in slices:
            e = row["slices"][name]
            cell = f"{e['auc']:.4f}"
            if "diff_vs_reference" in e:
                lo, hi = e["diff_ci"]
                cell += f" ({e['diff_vs_reference']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
            cells.append(cell)
        ll = row["slices"]["all"].get("logloss")
        ll_cell = f"{ll:.4f}" if ll is not None else "-"
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {ll_cell} |")
    lines += ["", "Pairs per slice: " + ", ".join(
        f"{k} {v['pairs']}" for k, v in metrics["models"][0]["slices"].items())]  # fmt: skip
    lines += ["", "| rule | threshold | AUC | mean exit layer | compute |", "|---|---|---|---|---|"]
    for r in metrics["sweep"]:
        lines.append(f"| {r['rule']} | {r['threshold']:g} | {r['auc']:.4f} | "
                     f"{r['mean_exit_layer']:.2f} | {r['compute']:.2f} |")  # fmt: skip
    lines += ["", "| tau | pairs | pairs/s | mean exit layer | layer-tokens/pair |",
              "|---|---|---|---|---|"]  # fmt: skip
    for s in metrics["speed"]:
        lines.append(
            f"| {s['tau']:g} | {s['pairs']} | {s['pairs_per_s']} | "
            f"{s['mean_exit_layer']:.2f} | {s['layer_tokens_per_pair']:.0f} |"
        )
    return "\n".join(lines) + "\n"
