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

cfg = load_config("conf/demo.yaml", [])
bb = load_backbone(cfg.backbone)
builder = PromptBuilder(bb.tokenizer, cfg.prompts)
layers = default_exit_layers(bb.num_layers, 6)
try:
    heads = ExitHeads.from_backbone(bb, layers, answers=builder.answer_ids)
except (TypeError, AttributeError):
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
np.savez(sys.argv[1], **out)
print({k: v[:4] for k, v in out.items()})
