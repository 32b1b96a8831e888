"""Shared fixtures: local Ray, an S3 endpoint from moto's server, a tiny random Llama."""

from __future__ import annotations

import os
import uuid

import pytest

from optirag import cli
from optirag.config import S3Config, StorageConfig

FAKE_KEY_ID = "AKIAFAKETESTKEY00001"
FAKE_SECRET = "fake-secret-do-not-log-0123456789"
# How long a kill-and-rerun test waits for a job's progress or its rerun: Ray's start and the
# model load take minutes on a loaded CI machine.
SLOW_JOB_S = 900
# A run's lease in the kill-and-rerun tests: the rerun waits this long for a killed driver's.
LEASE_S = 3.0


def pytest_configure(config):
    # Set before any Ray worker starts, so workers inherit them; never real credentials.
    os.environ.update(
        AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    # Keep idle Ray workers (as local jobs do, optirag.cli): each new one imports torch again.
    os.environ.setdefault(cli.IDLE_WORKERS_ENV, cli.IDLE_WORKERS_MS)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint) -> StorageConfig:
    """A fresh bucket on the moto server; storage.root points into it."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return StorageConfig(
        root=f"s3://{bucket}/optirag",
        s3=S3Config(endpoint_url=s3_endpoint, region="us-east-1"),
    )


@pytest.fixture
def local_storage(tmp_path) -> StorageConfig:
    return StorageConfig(root=str(tmp_path / "store"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from optirag.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def study_config(tiny_llama_dir):
    """Makes the Config of a heads study (train_exits, evaluation) on the tiny model under a
    storage root: exits at layers 3 and 6, every user, 3 targets each; keyword sections add
    to (or replace keys of) the base's sections."""
    from optirag.config import Config

    def make(root: str, **sections: dict) -> Config:
        base = {
            "storage": {"root": root},
            "backbone": {"source": "path", "path": str(tiny_llama_dir), "device": "cpu"},
            "exits": {"layers": [3, 6]},
            "heads": {"train_users": None, "targets_per_user": 3, "valid_users": None},
            "evaluation": {"test_users": None},
            "compute": {"batch_rows": 8, "train_workers": 1},
        }
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        return Config.model_validate(base)

    return make


@pytest.fixture(scope="session")
def tiny_backbone(tiny_llama_dir):
    from optirag.backbones import load_backbone
    from optirag.config import BackboneConfig

    return load_backbone(BackboneConfig(source="path", path=str(tiny_llama_dir), device="cpu"))


@pytest.fixture(scope="session")
def movie_tables():
    """A handful of users, items and neighbours in the canonical schemas."""
    import numpy as np
    import pyarrow as pa

    from optirag import schema as S

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, 7), 8)
    items = rng.integers(1, 21, size=len(users))
    interactions = pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.LABEL: (rng.random(len(users)) < 0.6).astype(np.int8),
            S.TS: np.tile(np.arange(8), 6) * 10,
            S.RATING: rng.integers(1, 6, len(users)).astype(np.float32),
        },
        schema=S.INTERACTIONS,
    )
    titles = [f"Movie {i} ({1990 + i})" for i in range(1, 21)]
    catalog = pa.table(
        {S.ITEM_ID: np.arange(1, 21), S.TITLE: titles, S.TEXT: ["Genres: Drama"] * 20},
        schema=S.ITEMS,
    )
    neighbors = pa.table(
        {
            S.USER_ID: [1, 2, 3],
            S.NEIGHBOR_IDS: [[2, 3], [1], [1, 2]],
            S.SIMILARITIES: [[0.9, 0.5], [0.9], [0.5, 0.4]],
            S.SOURCE: ["gcn"] * 3,
        },
        schema=S.NEIGHBORS,
    )
    return interactions, catalog, neighbors


def default_answers(backbone) -> tuple[int, int]:
    """The answer ids of the default prompt settings for a backbone's tokenizer."""
    from optirag.config import PromptConfig
    from optirag.prompts import PromptBuilder

    return PromptBuilder(backbone.tokenizer, PromptConfig()).answer_ids
