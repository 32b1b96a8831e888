"""Decoder backbones: the registered families (families), loading from where users keep
them (loading), the split model early exit runs (backbone) and the one attention
implementation every family's layers call (attention)."""

from optirag.backbones.backbone import Backbone
from optirag.backbones.families import ENGINE_FORMAT, FAMILIES, Family, family_of
from optirag.backbones.loading import (
    config_digest,
    load_backbone,
    load_tokenizer,
    model_dir,
    resolve_device,
    resolve_dtype,
    weights_digest,
)

__all__ = [
    "ENGINE_FORMAT",
    "FAMILIES",
    "Backbone",
    "Family",
    "config_digest",
    "family_of",
    "load_backbone",
    "load_tokenizer",
    "model_dir",
    "resolve_device",
    "resolve_dtype",
    "weights_digest",
]
