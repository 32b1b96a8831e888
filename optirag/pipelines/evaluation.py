"""The evaluation job: test metrics of the trained heads and of the baselines on the same
pairs (all pairs, cold-start items, light users), the exit-rule sweep, measured speed, and
the report (metrics.json, report.md, sweep.png)."""

from __future__ import annotations

import time

import numpy as np
import torch

from optirag import artifacts as A
from optirag import baselines as B
from optirag import cf, storage
from optirag import metrics as M
from optirag import pairs as P
from optirag import schema as S
from optirag.backbones import load_backbone
from optirag.config import Config
from optirag.context import ContextStore
from optirag.early_exit import ExitRule
from optirag.model_files import local_backbone
from optirag.pair_scorer import make_pair_scorer, resolve_rule
from optirag.pipelines.states import cached_states, feature_key, head_probs, table_state_scorer


def run(cfg: Config) -> dict:
    """Evaluate; writes the evaluation outputs and returns a summary."""
    store, ec = cfg.storage, cfg.evaluation
    train, items, neighbors = A.read_prompt_tables(cfg)
    backbone = load_backbone(local_backbone(cfg))
    if not A.has_trained_heads(cfg):
        raise FileNotFoundError(f"no trained heads under {A.heads_location(cfg)}: run train_exits")
    model = A.load_scoring_model(cfg, backbone)
    heads, side_features = model.heads, model.side_features
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    test_cands = storage.read_table(A.candidates_uri(store.root, "test"), store)
    pairs = P.candidate_pairs(test_cands, ec.test_users, seed=cfg.heads.seed)
    states_scorer = table_state_scorer(cfg, backbone, heads.layers)  # the job's prompts
    test_key = {**feature_key(cfg, backbone, heads.layers), "pairs": [ec.test_users]}
    feats = cached_states(states_scorer, pairs, "test", test_key, cfg, "test features")
    side = side_features(pairs.users, pairs.items) if side_features is not None else None
    probs = head_probs(heads, feats["states"], None if side is None else torch.from_numpy(side))
    n_layers = backbone.num_layers
    rule = resolve_rule(cfg.exits, model.exit_config)
    ee_scores, ee_exits = M.simulate_exits(probs, heads.layers, rule)

    retriever = A.load_retriever(store.root, store)
    valid = storage.read_table(A.interactions_uri(store.root, "valid"), store, S.INTERACTIONS)
    tuned = B.tune_all(train, valid, pairs.users, pairs.items, ec)
    models = B.baseline_scores(train, pairs.users, pairs.items, retriever)
    models.update({t.name: t.scores for t in tuned})
    models[B.SAME_INFORMATION], control = _same_information_control(
        cfg, train, items, neighbors, pairs
    )
    if heads.side_names:
        x_train, y_train = _control_training_set(cfg, train, heads.side_names)
        models[B.SIDE_ONLY] = B.side_features_only(x_train, y_train, side)
    models["LLM zero-shot P(Yes)"] = head_probs(states_scorer.engine.heads, feats["states"])[:, -1]
    for h, layer in enumerate(heads.layers):
        models[f"exit head @ layer {layer}"] = probs[:, h]
    models["trained heads, full depth"] = probs[:, -1]
    models[f"early exit (calibrated {_rule_name(rule)})"] = ee_scores
    masks = M.slice_masks(train, pairs.users, pairs.items)
    # Every choice (heads, tau, baseline settings) is made; the test labels are read from here
    # on, and the primary comparison is computed and written before any other test metric.
    labels = feats["labels"].numpy()
    primary = None
    if ec.primary is not None:
        primary = _primary(ec.primary, models, labels, masks, pairs.users, ec.bootstrap_resamples)
        A.save_primary(primary, cfg)
    table = M.model_table(
        models,
        labels,
        masks,
        B.MF_BASELINE,
        set(models) - {B.LIGHTGCN_BASELINE},
        ec.bootstrap_resamples,
        groups=pairs.users,
    )
    for row in table:
        row["role"] = "primary" if primary and row["model"] == primary["model"] else "exploratory"
    # What the LLM adds over the same-information control (exploratory): same pairs, paired
    # user-level intervals of the difference to the control instead of to MF.
    llm = {k: models[k] for k in models if k.startswith(("trained heads", "early exit"))}
    over_control = M.model_table(
        {B.SAME_INFORMATION: models[B.SAME_INFORMATION], **llm},
        labels,
        masks,
        B.SAME_INFORMATION,
        set(),
        ec.bootstrap_resamples,
        groups=pairs.users,
    )[1:]
    rows = M.sweep(
        probs, labels, heads.layers, n_layers, cfg.heads.tau_grid, cfg.heads.confidence_grid
    )
    speed_rules = [ExitRule("agreement", t) if t > 0 else ExitRule("none") for t in ec.speed_taus]
    speed = _measure_speed(cfg, backbone, model, contexts, pairs, [*speed_rules, rule])
    calibrated = M.evaluate_rule(probs, labels, heads.layers, n_layers, rule)
    png = M.plot_sweep(rows, calibrated, f"test AUC vs compute ({backbone.version})")
    counts = {int(k): int(v) for k, v in zip(*np.unique(ee_exits, return_counts=True), strict=True)}
    metrics = {
        "test_pairs": len(pairs),
        "test_users": int(len(np.unique(pairs.users))),
        "backbone": backbone.version,
        "layers": heads.layers,
        "calibrated_tau": rule.threshold,
        "rule": rule.kind,
        "side_features": heads.side_names,
        "mlp_size": heads.mlp_size,
        "primary": primary,
        "intervals": _interval_note(ec.bootstrap_resamples),
        "models": table,
        "baselines": [t.report(labels, masks) for t in tuned],
        "controls": {B.SAME_INFORMATION: control},
        "vs_same_information_control": over_control,
        "sweep": [r.as_dict() for r in rows],
        "speed": speed,
        "exit_histogram": counts,
        "mean_exit_layer": float(ee_exits.mean()),
        "compute_vs_full_depth": float(ee_exits.mean()) / n_layers,
        "train_pairs": model.exit_config.get("train_pairs"),
    }
    report = render_report(metrics)
    A.save_evaluation(metrics, report, png, cfg)
    print(report)
    return {
        k: metrics[k]
        for k in ("test_pairs", "calibrated_tau", "mean_exit_layer", "compute_vs_full_depth")
    }


def _primary(spec, models: dict, labels, masks: dict, users, n_resamples: int) -> dict:
    """The comparison named in evaluation.primary before running: model vs baseline on one
    slice, its AUCs and the paired user-level bootstrap interval of the difference."""

    def find(name: str, among) -> str:
        found = [k for k in among if k == name] or [k for k in among if k.startswith(name)]
        if len(found) != 1:
            raise ValueError(f"evaluation.primary: {name!r} names {len(found)} of {list(among)}")
        return found[0]

    model, baseline = find(spec.model, models), find(spec.baseline, models)
    mask = masks[find(spec.slice, masks)]
    y, a, b = labels[mask], models[model][mask], models[baseline][mask]
    d, lo, hi = M.auc_difference(y, a, b, n_resamples, groups=users[mask])
    return {
        "variant": spec.variant,
        "model": model,
        "baseline": baseline,
        "slice": find(spec.slice, masks),
        "pairs": int(mask.sum()),
        "users": int(len(np.unique(users[mask]))),
        "auc_model": M.auc(y, a),
        "auc_baseline": M.auc(y, b),
        "diff": d,
        "diff_ci": [lo, hi],
        "resolved": bool(lo > 0 or hi < 0),
        "interval": _interval_note(n_resamples),
    }


def _interval_note(n_resamples: int) -> str:
    return f"paired user-level bootstrap, {n_resamples} resamples, 95% percentile"


def _rule_name(rule: ExitRule) -> str:
    return (
        f"tau={rule.threshold:g}" if rule.kind == "agreement" else f"{rule.kind} {rule.threshold:g}"
    )


def _control_training_set(cfg: Config, train, names: list[str]):
    """The CF-only control's training set: the heads' own training pairs and their leak-free
    side features."""
    hc = cfg.heads
    train_pairs = P.training_pairs(
        train, hc.train_users, hc.history_fraction, hc.targets_per_user, hc.seed
    )
    x = P.training_side_features(names, hc.seed, train, train_pairs)
    return x, train_pairs.labels


def _same_information_control(cfg: Config, train, items, neighbors, pairs: P.Pairs):
    """The CF-only control with what the CF prompt shows: every CF side feature plus the
    target's mean rating, count and the neighbours' ratings (prompts.target_ratings), fitted on
    the heads' training pairs with leak-free features (each pair's prompt cut), C chosen on
    the heads' valid pairs. (test probabilities, what was chosen)."""
    hc, store = cfg.heads, cfg.storage
    names = list(cf.SIDE_FEATURES)
    shown = cfg.prompts.model_copy(update={"target_ratings": True})
    ratings = ContextStore(train, items, neighbors, shown)
    slots = shown.max_neighbor_ratings
    train_pairs = P.training_pairs(
        train, hc.train_users, hc.history_fraction, hc.targets_per_user, hc.seed
    )
    valid_cands = storage.read_table(A.candidates_uri(store.root, "valid"), store)
    valid_pairs = P.candidate_pairs(valid_cands, hc.valid_users, hc.seed)
    full = cf.SideFeatures.fit(names, train, hc.seed)

    def features(p: P.Pairs, side: np.ndarray, cutoffs) -> np.ndarray:
        return np.hstack(
            [side, B.prompt_rating_features(ratings, p.users, p.items, cutoffs, slots)]
        )

    x_train = features(
        train_pairs,
        P.training_side_features(names, hc.seed, train, train_pairs),
        train_pairs.cutoff,
    )
    x_valid = features(valid_pairs, full(valid_pairs.users, valid_pairs.items), None)
    x_test = features(pairs, full(pairs.users, pairs.items), None)
    probs, chosen = B.tuned_logistic_regression(
        x_train, train_pairs.labels, x_valid, valid_pairs.labels, x_test, cfg.evaluation.lr_c_grid
    )
    info = {
        "features": [
            *names,
            "target mean rating",
            "target rated",
            "log1p target count",
            "neighbours' mean rating",
            "neighbours' ratings shown",
            *(f"neighbour rating {k + 1}" for k in range(slots)),
        ],
        "train_pairs": len(train_pairs),
        "valid_pairs": len(valid_pairs),
        "chosen_on_valid": chosen,
    }
    return probs, info


def _measure_speed(cfg, backbone, model, contexts, pairs: P.Pairs, rules: list[ExitRule]) -> list:
    """Measured pairs/s of the real engine (the scoring configuration: compaction, batching,
    prefix sharing) on the first `speed_pairs` pairs, per rule."""
    n = min(cfg.evaluation.speed_pairs, len(pairs))
    results = []
    for rule in rules if n else []:
        scorer = make_pair_scorer(cfg, backbone, model, contexts, rule)
        start = time.perf_counter()
        out = scorer.score(pairs.users[:n], pairs.items[:n])
        seconds = time.perf_counter() - start
        results.append(
            {
                "rule": rule.kind,
                "tau": rule.threshold,
                "pairs": n,
                "compaction": scorer.engine.compaction,
                "pairs_per_s": round(n / seconds, 2),
                "mean_exit_layer": float(out.exit_layers.mean()),
                "layer_tokens_per_pair": out.layer_tokens / n,
            }
        )
    return results


def render_report(metrics: dict) -> str:
    lines = [
        f"Test pairs: {metrics['test_pairs']} ({metrics['test_users']} users); "
        f"backbone {metrics['backbone']}; exit layers {metrics['layers']}; "
        f"side features {metrics.get('side_features') or 'none'}; "
        f"MLP size {metrics.get('mlp_size', 0)}; train pairs {metrics.get('train_pairs')}",
        "",
    ]
    primary = metrics.get("primary")
    if primary:
        lo, hi = primary["diff_ci"]
        lines += [
            f"Primary comparison (named in the config before running): {primary['model']} "
            f"vs {primary['baseline']}, {primary['slice']} ({primary['pairs']} pairs): AUC "
            f"{primary['auc_model']:.4f} vs {primary['auc_baseline']:.4f}, difference "
            f"{primary['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]. Every other row is "
            "exploratory.",
            "",
        ]
    else:
        lines += [
            "No primary comparison was named (evaluation.primary): every row is exploratory.",
            "",
        ]
    lines += [f"Intervals: {metrics.get('intervals', '')}.", ""]
    slices = list(metrics["models"][0]["slices"])
    lines.append(
        "| model | " + " | ".join(f"AUC {s} (vs MF, 95% CI)" for s in slices) + " | LogLoss |"
    )
    lines.append("|---" * (len(slices) + 2) + "|")
    for row in metrics["models"]:
        cells = [_auc_cell(row["slices"][name]) for name in slices]
        ll = row["slices"]["all"].get("logloss")
        ll_cell = f"{ll:.4f}" if ll is not None else "-"
        name = row["model"] + (" (primary)" if row.get("role") == "primary" else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ll_cell} |")
    over = metrics.get("vs_same_information_control") or []
    if over:
        lines += [
            "",
            "What the LLM adds over the same-information control (CF features and the "
            "prompt's ratings, no LLM), exploratory:",
            "",
        ]
        lines.append(
            "| model | " + " | ".join(f"AUC {s} (vs control, 95% CI)" for s in slices) + " |"
        )
        lines.append("|---" * (len(slices) + 1) + "|")
        for row in over:
            lines.append(
                f"| {row['model']} | "
                + " | ".join(_auc_cell(row["slices"][s]) for s in slices)
                + " |"
            )
    lines += [
        "",
        "Pairs per slice: "
        + ", ".join(f"{k} {v['pairs']}" for k, v in metrics["models"][0]["slices"].items()),
    ]
    for b in metrics.get("baselines", []):
        over = b["test_auc_over_seeds"]["all"]
        lines += [
            "",
            f"{b['model']}: chosen on valid {b['chosen_on_valid']}; test AUC over "
            f"{len(b['per_seed'])} seeds {over['mean']:.4f} +- {over['std']:.4f} "
            f"(min {over['min']:.4f}, max {over['max']:.4f})",
        ]
    lines += ["", "| rule | threshold | AUC | mean exit layer | compute |", "|---|---|---|---|---|"]
    for r in metrics["sweep"]:
        lines.append(
            f"| {r['rule']} | {r['threshold']:g} | {r['auc']:.4f} | "
            f"{r['mean_exit_layer']:.2f} | {r['compute']:.2f} |"
        )
    lines += [
        "",
        "| tau | pairs | pairs/s | mean exit layer | layer-tokens/pair |",
        "|---|---|---|---|---|",
    ]
    for s in metrics["speed"]:
        tau = "none (full depth)" if s["rule"] == "none" else f"{s['tau']:g}"
        lines.append(
            f"| {tau} | {s['pairs']} | {s['pairs_per_s']} | "
            f"{s['mean_exit_layer']:.2f} | {s['layer_tokens_per_pair']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _auc_cell(entry: dict) -> str:
    cell = f"{entry['auc']:.4f}"
    if "diff_vs_reference" in entry:
        lo, hi = entry["diff_ci"]
        cell += f" ({entry['diff_vs_reference']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
    return cell
