"""The frozen backbone's last-token states of a set of pairs, cached in storage by what they
depend on, shared by head training and evaluation (both read only these states)."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch

from optirag import artifacts as A
from optirag.backbones import Backbone
from optirag.config import Config
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule
from optirag.pair_scorer import PairScorer, ScoringModel, make_pair_scorer, make_token_scorer
from optirag.pairs import Pairs, extract_states
from optirag.prompts import PromptBuilder


def state_scorer(
    cfg: Config, backbone: Backbone, layers: list[int], contexts: ContextStore
) -> PairScorer:
    """What extracts the backbone's states at the exit layers: plain heads whatever the head
    variant (states do not depend on the heads), full depth for every row."""
    answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
    plain = ExitHeads.from_backbone(backbone, layers, answers=answers)
    return make_pair_scorer(cfg, backbone, ScoringModel(plain), contexts, ExitRule("none"))


def table_state_scorer(cfg: Config, backbone: Backbone, layers: list[int]):
    """`state_scorer` for pairs without a time cut (valid, test), reading the context tables
    the scoring job reads (built here when missing): the states come from the job's ids."""
    from optirag.pipelines import context

    answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
    plain = ExitHeads.from_backbone(backbone, layers, answers=answers)
    tokens = make_token_scorer(cfg, backbone, ScoringModel(plain), ExitRule("none"))
    tables = context.build(cfg, *A.prompt_table_uris(cfg))
    return context.TableScorer(tokens, tables, cfg, with_side=False)  # states need none


def feature_key(cfg: Config, backbone: Backbone, layers: list[int]) -> dict:
    """What cached states depend on: model, prompt settings and wording (a prompt rendered
    from fake data), neighbour table, the interaction tables prompts and pairs are made from
    (size and modification time of each), seed."""
    store, root = cfg.storage, cfg.storage.root
    neighbors = A.prompt_neighbors_uri(cfg) or A.neighbors_uri(root)
    template = PromptBuilder(backbone.tokenizer, cfg.prompts).template_sample()
    tables = {
        f"{kind}/{split}": A.file_stamp(uri(root, split), store)
        for kind, uri in (("interactions", A.interactions_uri), ("candidates", A.candidates_uri))
        for split in ("train", "valid", "test")
        if (kind, split) != ("candidates", "train")
    }
    return {
        "backbone": backbone.version,
        "layers": layers,
        "seed": cfg.heads.seed,
        "prompts": cfg.prompts.model_dump(),
        "neighbors": [neighbors, A.file_stamp(neighbors, store)],
        "tables": tables,
        "template": hashlib.sha256(template.encode()).hexdigest()[:12],
    }


def cached_states(
    scorer: PairScorer, pairs: Pairs, split: str, key: dict, cfg: Config, desc: str
) -> dict[str, torch.Tensor]:
    """`extract_states`, reusing the cached states of `split` made with the same `key`
    (backbone, prompt settings, neighbour table, pair sampling): the backbone is frozen, so
    retraining heads or re-evaluating needs no model time."""
    uri = A.features_uri(cfg, split, key)
    cached = A.load_cached_states(uri, key, cfg.storage)
    if cached is not None:
        return cached
    states = extract_states(scorer, pairs, desc)
    A.save_cached_states(states, uri, key, cfg.storage)
    return states


def head_probs(
    heads: ExitHeads, states: torch.Tensor, side: torch.Tensor | None = None
) -> np.ndarray:
    """Every head's P(Yes) of cached states: (N, num_heads)."""
    cpu_heads = copy.deepcopy(heads).float().cpu()  # cached states live on the CPU
    with torch.no_grad():
        return torch.sigmoid(cpu_heads(states.float(), side)).numpy()
