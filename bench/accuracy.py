"""The accuracy study (issue 8) on MovieLens-100k with SmolLM2: each head variant trained and
evaluated on the same pairs, against MF, on all test pairs and the cold-item and light-user
slices, with paired user-level bootstrap 95% intervals of each AUC difference to tuned MF.
The primary comparison is named in the config (evaluation.primary) before running; every
other row is exploratory.

    python bench/accuracy.py --config conf/accuracy.yaml [--variants ...] [--curve 2500 5000]

  frozen-linear   linear heads on the frozen backbone's states (the paper's heads)
  frozen-mlp      one-hidden-layer heads
  hybrid-linear   linear heads reading MF score + user/item statistics beside the state
  hybrid-mlp      both
  cf-prompt-*     the prompt also shows the target's mean rating and count and similar users'
                  ratings of it (prompts.target_ratings), with linear or hybrid heads
  lora-hybrid     LoRA + hybrid heads trained jointly (CPU proof: 400 pairs, 1 epoch,
                  evaluated on 100 test users only)
  lora-hybrid-gpu the same on every training pair (1 epoch), on a GPU (`--name accuracy_gpu`)
  combination-gpu every lever: CF prompt + hybrid MLP heads + LoRA, on a GPU

`--curve N ...` also trains frozen-linear and hybrid-linear on N extracted pairs each (AUC
against training pairs). Features are cached, so variants cost head training and evaluation
only. Needs prepare_data and train_retriever with the same config to have run (the commands
are in conf/accuracy.yaml; conf/accuracy-global.yaml is the global time split). Each variant writes
under <root>/accuracy/<variant>/; results go to bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_variant, write_results  # noqa: E402

from optirag import storage  # noqa: E402
from optirag.config import load_config  # noqa: E402

HYBRID = "heads.side_features=[mf,user_rate,user_count,item_rate,item_count]"
CF_PROMPT = "prompts.target_ratings=true"
# LoRA on a GPU: every training pair, one epoch (what 15 minutes of a lent GPU allow).
LORA_GPU = [
    "heads.lora.enabled=true",
    "heads.lora.epochs=1",
    "heads.lora.batch_size=32",
    "compute.train_use_gpu=true",
    "compute.train_workers=1",
]
VARIANTS = {
    "frozen-linear": [],
    "frozen-mlp": ["heads.mlp_size=64"],
    "hybrid-linear": [HYBRID],
    "hybrid-mlp": [HYBRID, "heads.mlp_size=64"],
    "cf-prompt-linear": [CF_PROMPT],
    "cf-prompt-hybrid": [CF_PROMPT, HYBRID],
    "lora-hybrid": [
        HYBRID,
        "heads.lora.enabled=true",
        "heads.max_train_pairs=400",
        "heads.valid_users=40",
        "heads.lora.epochs=1",
        "evaluation.test_users=100",
        "evaluation.speed_pairs=0",
    ],
    "lora-hybrid-gpu": [HYBRID, *LORA_GPU],
    # Every lever at once: CF in the prompt, hybrid MLP heads, LoRA (64 prompts a step: the
    # run had to fit the GPU minutes left).
    "combination-gpu": [
        CF_PROMPT,
        HYBRID,
        "heads.mlp_size=64",
        "heads.lr=0.002",
        *LORA_GPU,
        "heads.lora.batch_size=64",
    ],
}
FAST_EVAL = ["evaluation.speed_pairs=0"]


def _cell(entry: dict) -> str:
    if "diff_vs_reference" not in entry:
        return f"{entry['auc']:.4f}"
    lo, hi = entry["diff_ci"]
    return f"{entry['auc']:.4f} ({entry['diff_vs_reference']:+.3f} [{lo:+.3f}, {hi:+.3f}])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/accuracy.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4])
    parser.add_argument("--curve", nargs="*", type=int, default=[])
    parser.add_argument("--name", default="accuracy", help="results file name")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    root = cfg.storage.root
    primary = cfg.evaluation.primary.model_dump() if cfg.evaluation.primary else None
    runs = {name: [*VARIANTS[name]] for name in args.variants}
    for n in args.curve:
        runs[f"frozen-linear@{n}"] = [f"heads.max_train_pairs={n}", *FAST_EVAL]
        runs[f"hybrid-linear@{n}"] = [HYBRID, f"heads.max_train_pairs={n}", *FAST_EVAL]
    results, failed = {}, {}
    for name, extra in runs.items():
        folder = storage.join(root, "accuracy", name.replace("@", "-"))
        try:
            results[name] = run_variant(args.config, [*args.overrides, *extra], folder)
        except Exception as err:  # one failed variant must not lose the others' hours
            logging.exception("variant %s failed", name)
            failed[name] = f"{type(err).__name__}: {err}"
        result = {
            "machine": machine(),
            "config": args.config,
            "overrides": args.overrides,
            "primary": primary,
            "variants": results,
            "failed": failed,
        }
        write(args.name, result)  # after every variant: a long study keeps what it finished


def write(name: str, result: dict) -> None:
    variants = result["variants"]
    if not variants:  # every variant failed: keep the errors
        write_results(name, result, [], ("model",))
        return
    first = next(iter(variants.values()))["evaluation"]
    slices = list(first["models"][0]["slices"])
    rows = []
    baselines = [
        m
        for m in first["models"]
        if not m["model"].startswith(("exit head", "trained heads", "early exit", "LLM"))
    ]
    primary = (result.get("primary") or {}).get("variant")
    for m in baselines:  # identical in every variant
        rows.append(
            (m["model"], "exploratory", "-", *(_cell(m["slices"][s]) for s in slices), "-", "-")
        )
    for variant, r in variants.items():
        ev = r["evaluation"]
        by_name = {m["model"]: m for m in ev["models"]}
        full = by_name["trained heads, full depth"]
        ee = next(m for k, m in by_name.items() if k.startswith("early exit"))
        ee_auc, compute = ee["slices"]["all"]["auc"], ev["compute_vs_full_depth"]
        role = "primary (early exit vs MF, all)" if variant == primary else "exploratory"
        rows.append(
            (
                variant,
                role,
                r["train"]["train_pairs"],
                *(_cell(full["slices"][s]) for s in slices),
                f"{ee_auc:.4f}",
                f"{compute:.2f}",
            )
        )
    header = (
        "model",
        "role",
        "train pairs",
        *(f"AUC {s} (vs MF [95% CI])" for s in slices),
        "early exit AUC",
        "compute",
    )
    write_results(name, result, rows, header)


if __name__ == "__main__":
    main()
