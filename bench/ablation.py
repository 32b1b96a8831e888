"""The paper's ablations on MovieLens-100k with SmolLM2, each a full train_exits + evaluate
run with its own heads and evaluation folder (features are cached per variant):

  gcn         similar-user block from LightGCN neighbours (the default)
  no-block    no similar-user block in the prompt
  text-embed  similar-user block from MiniLM text-embedding neighbours

    python bench/ablation.py --config conf/demo.yaml [--variants ...] [a.b=c overrides]

Each variant writes under <root>/ablation/<variant>/.

Needs prepare_data, train_retriever and build_text_neighbors to have run. Writes
bench/results/ablation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_variant, write_results  # noqa: E402

from optirag import storage  # noqa: E402
from optirag.config import load_config  # noqa: E402

VARIANTS = {
    "gcn": [],
    "no-block": ["prompts.use_neighbors=false"],
    "text-embed": ["scoring.neighbors_uri={root}/neighbors/text-embed.parquet"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/demo.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    root = base.storage.root
    results = {}
    for name in args.variants:
        extra = [o.format(root=root) for o in VARIANTS[name]]
        # The default variant is the main pipeline's own heads and evaluation folder.
        folder = storage.join(root, "ablation", name) if extra else None
        results[name] = run_variant(args.config, [*args.overrides, *extra], folder)
    rows = []
    for name, r in results.items():
        models = {m["model"]: m["slices"]["all"]["auc"] for m in r["evaluation"]["models"]}
        ee = next(v for k, v in models.items() if k.startswith("early exit"))
        rows.append(
            (
                name,
                f"{models['trained heads, full depth']:.4f}",
                f"{ee:.4f}",
                f"{r['evaluation']['compute_vs_full_depth']:.2f}",
                f"{max(r['train']['valid_auc_per_head']):.4f}",
            )
        )
    write_results(
        "ablation",
        {"machine": machine(), "variants": results},
        rows,
        (
            "variant",
            "test AUC full depth",
            "test AUC early exit",
            "compute",
            "best valid AUC of a head",
        ),
    )


if __name__ == "__main__":
    main()
