"""Scores of 40 demo pairs (SmolLM2, the demo's prompts with the chat template, untrained
last head, full depth), both engines, with whatever optirag is first on sys.path; saved to
argv[1] (.npz). Run from worktrees of two commits and compare, e.g.

    cd <worktree of bdfc462> && PYTHONPATH=$PWD python bench/scores_before_after.py old.npz
    cd <worktree of main>    && PYTHONPATH=$PWD python bench/scores_before_after.py new.npz

(needs `make data smollm2` and `python jobs/prepare_data.py --config conf/demo.yaml`).
"""

import sys

import numpy as np

from optirag import artifacts as A
from optirag import schema as S
from optirag.config import load_config
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule, default_exit_layers
from optirag.pair_scorer import PairScorer
from optirag.prompts import PromptBuilder

try:
    from optirag.backbones import load_backbone
except ImportError:
    from optirag.backbone import load_backbone


def demo_pair_scores(cfg) -> dict[str, np.ndarray]:
    """Each engine's full-depth scores of the 40 pairs (4 users drawn with seed 0, 10 items
    each); tests/test_slow.py checks them against the golden file."""
    bb = load_backbone(cfg.backbone)
    builder = PromptBuilder(bb.tokenizer, cfg.prompts)
    layers = default_exit_layers(bb.num_layers, 6)
    try:
        heads = ExitHeads.from_backbone(bb, layers, answers=builder.answer_ids)
    except (TypeError, AttributeError):  # commits before the answer ids were the prompt's
        heads = ExitHeads.from_backbone(bb, layers)
    train, items, neighbors = A.read_prompt_tables(cfg)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    rng = np.random.default_rng(0)
    users = rng.choice(np.unique(train[S.USER_ID].to_numpy()), 4, replace=False)
    pu = np.repeat(users, 10)
    pi = np.concatenate([rng.choice(items[S.ITEM_ID].to_numpy(), 10, replace=False) for _ in users])
    out = {}
    for engine in ("packed", "reference"):
        scorer = PairScorer(
            bb,
            heads,
            ExitRule("none"),
            contexts,
            builder,
            share_prefixes=True,
            engine=engine,
            batch_tokens=cfg.compute.batch_tokens,
        )
        out[engine] = scorer.score(pu, pi).scores
    return out


if __name__ == "__main__":
    scores = demo_pair_scores(load_config("conf/demo.yaml", []))
    np.savez(sys.argv[1], **scores)
    print({k: v[:4] for k, v in scores.items()})
