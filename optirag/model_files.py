"""Model folders from where users keep them, as local directories the backbone loads.

- a local directory (`backbone.source: path`): used as it is;
- an `s3://` folder (`backbone.source: path`, `backbone.path: s3://bucket/models/x`): copied
  once per node into `backbone.cache_dir`, under a name made of the listing's sizes and
  ETags, so a changed object is a new copy. Several processes on one node (the scoring
  actors) take a file lock: one downloads, the others wait and reuse it. Each file's size is
  checked, and the folder appears by one atomic rename, whole or not at all;
- a Hugging Face hub cache snapshot (`backbone.source: hub`): read in place by
  optirag.backbones, never downloaded, nothing written into it.

`model_version` names the weights without reading them in the driver: from the S3 listing
(sizes and ETags), the hub snapshot's commit, or a hash of a local folder (cached beside it).
Copying from storage is not a model's job, so this module sits on the floor that may touch
storage, and optirag.backbones only ever sees a local directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
from pathlib import Path

from optirag import storage
from optirag.backbones import weights_digest
from optirag.config import BackboneConfig, Config, StorageConfig

log = logging.getLogger(__name__)


def local_backbone(cfg: Config, *, tokenizer_only: bool = False) -> BackboneConfig:
    """The backbone config with a local model directory: an `s3://` path fetched (once per
    node) into the cache, without its weights for `tokenizer_only` (the context stage
    encodes prompts with no model); anything else as it is."""
    bb = cfg.backbone
    if bb.source == "path" and storage.is_remote(str(bb.path)):
        path, _ = fetch(str(bb.path), Path(bb.cache_dir), cfg.storage, weights=not tokenizer_only)
        return bb.model_copy(update={"path": str(path)})
    return bb


def model_digest(cfg: Config) -> tuple[str, str]:
    """(model name, digest of its weights) for model versions and cache keys: from the S3
    listing for an `s3://` folder, else optirag.backbones.weights_digest."""
    bb = cfg.backbone
    if bb.source == "path" and storage.is_remote(str(bb.path)):
        uri = str(bb.path)
        return _name(uri), _listing_digest(_listing(uri, cfg.storage))
    return weights_digest(bb)


def fetch(
    uri: str, cache_dir: Path, store: StorageConfig, *, weights: bool = True
) -> tuple[Path, bool]:
    """The local copy of the model folder at `uri` (without its weight files unless
    `weights`) and whether this call downloaded it. A copy whose files do not have the
    listed sizes (a disk that lost them) is made again."""
    listing = _listing(uri, store)
    suffix = "" if weights else "-tokenizer"
    target = cache_dir / "s3" / f"{_name(uri)}-{_listing_digest(listing)[:16]}{suffix}"
    if not weights:
        listing = [f for f in listing if not f[0].endswith(WEIGHT_SUFFIXES)]
    if _complete(target, listing):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait for it
        if _complete(target, listing):
            return target, False
        for stale in target.parent.glob(f"{target.name}.tmp-*"):  # a killed download's
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            _download(uri, listing, tmp, store)
            if [f for f in _listing(uri, store) if f in listing] != listing:
                raise OSError(f"{uri}: an object changed while it was copied; run again")
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied %s (%d files) into %s", uri, len(listing), target)
    return target, True


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _complete(target: Path, listing: list[list]) -> bool:
    try:
        return all((target / name).stat().st_size == size for name, size, _ in listing)
    except OSError:
        return False


def _listing(uri: str, store: StorageConfig) -> list[list]:
    """[name relative to the folder, size, ETag] of each file, sorted; refuses a folder
    without safetensors weights (pickle weights are never loaded)."""
    _, root = storage.resolve(uri, store)
    listing = [
        [p[len(root) :].lstrip("/"), size, version]
        for p, size, version in storage.file_stamps(uri, store)
    ]
    if not any(name.endswith(".safetensors") for name, _, _ in listing):
        raise FileNotFoundError(f"backbone.path {uri}: no *.safetensors (pickle is refused)")
    return listing


def _listing_digest(listing: list[list]) -> str:
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) or "model"


def _download(uri: str, listing: list[list], tmp: Path, store: StorageConfig) -> None:
    fs, root = storage.resolve(uri, store)
    for name, size, _ in listing:
        dest = tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{name}") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
        got = dest.stat().st_size
        if got != size:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise OSError(f"{uri}/{name}: copied {got} bytes, the listing says {size}")
