"""Models from where users keep them: an s3:// folder (moto's server) copied once per node,
and a Hugging Face hub cache snapshot read by repo id, never downloaded, never written to."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from optirag import model_files, storage
from optirag.backbones import load_backbone
from optirag.config import BackboneConfig, Config
from optirag.early_exit import ExitHeads, ExitRule
from optirag.engine import PackedEngine
from tests.conftest import default_answers


def _upload(folder: Path, uri: str, store) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            storage.write_bytes(f.read_bytes(), storage.join(uri, f.name), store)


def _scores(bb) -> torch.Tensor:
    heads = ExitHeads.from_backbone(bb, [3, 6], answers=default_answers(bb))
    prompts = np.random.default_rng(0).integers(2, 300, (4, 20)).tolist()
    return PackedEngine(bb, heads, ExitRule("none")).score(prompts).scores


def test_an_s3_model_is_copied_once_per_node_and_named_by_its_etags(
    ray_session, s3_storage, tiny_llama_dir, tmp_path
):
    uri = storage.join(s3_storage.root, "models", "tiny")
    _upload(tiny_llama_dir, uri, s3_storage)
    cfg = Config.model_validate(
        {
            "storage": s3_storage.model_dump(mode="json"),
            "backbone": {
                "source": "path",
                "path": uri,
                "cache_dir": str(tmp_path / "cache"),
                "device": "cpu",
            },
        }
    )

    @ray_session.remote
    class Loader:
        def fetch(self, cfg):
            return model_files.fetch(
                str(cfg.backbone.path), Path(cfg.backbone.cache_dir), cfg.storage
            )

    loaders = [Loader.remote() for _ in range(2)]  # two actors on this one node
    fetched = ray_session.get([a.fetch.remote(cfg) for a in loaders])
    assert sorted(downloaded for _, downloaded in fetched) == [False, True]
    assert fetched[0][0] == fetched[1][0]
    assert not list(Path(tmp_path / "cache" / "s3").glob("*.tmp-*"))  # the copy was renamed in

    local = model_files.local_backbone(cfg)
    assert Path(local.path) == fetched[0][0]
    torch.testing.assert_close(
        _scores(load_backbone(local)),
        _scores(
            load_backbone(BackboneConfig(source="path", path=str(tiny_llama_dir), device="cpu"))
        ),
    )

    name, digest = model_files.model_digest(cfg)
    assert name == "tiny"
    # the context stage's copy holds no weights; a copy that lost a file is made again
    tok = model_files.local_backbone(cfg, tokenizer_only=True)
    assert (
        not list(Path(tok.path).glob("*.safetensors")) and Path(tok.path, "tokenizer.json").exists()
    )
    next(Path(local.path).glob("*.safetensors")).write_bytes(b"truncated")
    assert model_files.fetch(uri, tmp_path / "cache", s3_storage)[1]
    # a rewrite of one object, same size: a new digest and a new copy
    blob = (tiny_llama_dir / "config.json").read_bytes().replace(b'  "', b' \t"', 1)
    assert len(blob) == (tiny_llama_dir / "config.json").stat().st_size
    storage.write_bytes(blob, storage.join(uri, "config.json"), s3_storage)
    assert model_files.model_digest(cfg)[1] != digest
    path, downloaded = model_files.fetch(uri, tmp_path / "cache", s3_storage)
    assert downloaded and path != fetched[0][0]


def test_an_s3_folder_without_safetensors_is_refused(s3_storage, tiny_llama_dir, tmp_path):
    uri = storage.join(s3_storage.root, "models", "pickled")
    storage.write_bytes(b"{}", storage.join(uri, "config.json"), s3_storage)
    storage.write_bytes(b"x", storage.join(uri, "pytorch_model.bin"), s3_storage)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        model_files.fetch(uri, tmp_path, s3_storage)


def _hub_cache(root: Path, repo_id: str, model: Path, commit: str) -> Path:
    """The layout of a Hugging Face hub cache holding one snapshot of repo_id at main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    return root


def test_a_hub_snapshot_loads_by_repo_id_without_network_or_writes(tiny_llama_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = _hub_cache(tmp_path / "hub", "acme/tiny-ranker", tiny_llama_dir, commit)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    cfg = Config.model_validate(
        {
            "backbone": {
                "source": "hub",
                "repo_id": "acme/tiny-ranker",
                "hub_cache": str(cache),
                "device": "cpu",
            }
        }
    )
    bb = load_backbone(model_files.local_backbone(cfg))
    assert bb.version.startswith(f"acme--tiny-ranker-{commit[:12]}-")
    assert model_files.model_digest(cfg) == ("acme--tiny-ranker", commit)
    torch.testing.assert_close(
        _scores(bb),
        _scores(
            load_backbone(BackboneConfig(source="path", path=str(tiny_llama_dir), device="cpu"))
        ),
    )
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # nothing written

    missing = cfg.backbone.model_copy(update={"repo_id": "acme/absent"})
    with pytest.raises(FileNotFoundError, match="acme/absent@main: no snapshot.*never downloads"):
        load_backbone(missing)
