"""The early-exit engines, named as the config names them (`exits.engine`):

- `packed` (optirag.engine.packed.PackedEngine): a flat token stream per launch, each prefix
  once, survivors refilling the next block's launches; the default;
- `reference` (optirag.engine.reference.ReferenceEngine): padded batches, the obviously
  correct path the packed one is tested against.

Both run the family's own decoder layers (optirag.backbones); they differ only in how tokens
are batched and attend.
"""

from __future__ import annotations

from typing import Literal

from optirag.backbones import Backbone
from optirag.early_exit import ExitHeads, ExitRule
from optirag.engine.packed import LAUNCH_TOKENS, PackedEngine
from optirag.engine.reference import ReferenceEngine

EngineKind = Literal["packed", "reference"]

__all__ = [
    "LAUNCH_TOKENS",
    "EngineKind",
    "PackedEngine",
    "ReferenceEngine",
    "make_engine",
]


def make_engine(
    kind: EngineKind,
    backbone: Backbone,
    heads: ExitHeads,
    rule: ExitRule,
    *,
    compaction: bool = True,
    max_tokens: int = LAUNCH_TOKENS,
):
    """The engine behind a config key; `max_tokens` is the packed engine's launch size
    (`compute.batch_tokens`)."""
    if kind == "packed":
        return PackedEngine(backbone, heads, rule, compaction=compaction, max_tokens=max_tokens)
    if kind == "reference":
        return ReferenceEngine(backbone, heads, rule, compaction=compaction)
    raise ValueError(f"unknown engine {kind!r}: packed or reference")
