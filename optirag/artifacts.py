"""Every stored layout, and how each artifact is saved and loaded. No other module spells a
stored path or file name.

Under `storage.root` (a local directory or s3://bucket/prefix):

    interactions/{train,valid,test}.parquet    canonical tables (optirag.data)
    items.parquet
    candidates/{valid,test,test_sample}.parquet
    neighbors/<source>.parquet                 similar users: gcn, text-embed
    retriever/embeddings.safetensors, meta.json
    retriever/ray/, exits/ray/                 Ray Train checkpoints (model, best, optimizer, meta)
    exits/heads.safetensors, exit_config.json  trained heads and their exit config (heads spec,
          adapter.safetensors                  rule, calibrated tau); the LoRA adapter, the CF
          side_features.safetensors(.json)     side features hybrid heads read
    features/<split>-<key hash>.safetensors    cached frozen-backbone states (+ .key.json)
    evaluation/metrics.json, report.md, sweep.png, primary.json
    scores/<run_id>/                           a scoring run (see RunPaths)
    compare/<a>-vs-<b>/                        an A/B comparison of two runs (ComparePaths)
    <synthetic.output>/items.parquet, candidates/part-NNNNN.parquet,
          interactions/train/part-NNNNN.parquet
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from optirag import schema as S
from optirag import storage
from optirag.config import Config, LoraConfig, StorageConfig

if TYPE_CHECKING:  # torch and the model modules load only where tensors are (de)serialised:
    # the job's staging and writing tasks read paths from here and never import torch
    import torch

    from optirag.backbones import Backbone
    from optirag.cf import SideFeatures
    from optirag.pair_scorer import ScoringModel

log = logging.getLogger(__name__)


def _save(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `tensors` (torch is imported here, not with this module)."""
    from safetensors.torch import save as save_tensors

    return save_tensors(tensors)


def _load(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    return load_tensors(blob)


SPLITS = ("train", "valid", "test", "test_sample")

HEADS_FILE = "heads.safetensors"
EXIT_CONFIG_FILE = "exit_config.json"
ADAPTER_FILE = "adapter.safetensors"  # LoRA weights the heads were trained with, if any
SIDE_FEATURES_FILE = "side_features.safetensors"
INIT_HEADS_FILE = "init.safetensors"  # the heads' starting point, read by training workers

# Inside every Ray Train checkpoint directory.
CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_BEST = "best.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
CHECKPOINT_META = "meta.json"


# ----------------------------------------------------------------------------- tables


def _split_uri(root: str, table: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{table} needs a split in {SPLITS}, got {split!r}")
    return storage.join(root, table, f"{split}.parquet")


def interactions_uri(root: str, split: str) -> str:
    return _split_uri(root, "interactions", split)


def candidates_uri(root: str, split: str) -> str:
    return _split_uri(root, "candidates", split)


def partitioned_candidates_uri(root: str, split: str, key: str) -> str:
    """A split's candidates as Hive partitions, `candidates/<split>_by_<key>/<key>=<value>/`."""
    if split not in SPLITS:
        raise ValueError(f"candidates need a split in {SPLITS}, got {split!r}")
    return storage.join(root, "candidates", f"{split}_by_{key}")


def partition_file(folder: str, key: str, value: str) -> str:
    return storage.join(folder, f"{key}={value}", "part-00000.parquet")


def items_uri(root: str) -> str:
    return storage.join(root, "items.parquet")


def neighbors_uri(root: str, source: str = "gcn") -> str:
    """The neighbour table a retriever writes: neighbors/gcn.parquet, neighbors/text-embed..."""
    return storage.join(root, "neighbors", f"{source}.parquet")


def prompt_neighbors_uri(cfg: Config) -> str | None:
    """The neighbour table prompts read: scoring.neighbors_uri, else the GCN table when it
    exists, else none (prompts without similar users)."""
    if cfg.scoring.neighbors_uri:
        return cfg.scoring.neighbors_uri
    default = neighbors_uri(cfg.storage.root)
    return default if storage.exists(default, cfg.storage) else None


def prompt_table_uris(cfg: Config) -> tuple[str, str, str | None]:
    """(train interactions, items, neighbours or None): the tables training and evaluation
    build untimed prompts from (read_prompt_tables's), never the scoring job's
    scoring.history_uri / items_uri: a nightly history may hold the valid and test pairs
    themselves, which would then be in their own prompts."""
    root = cfg.storage.root
    return interactions_uri(root, "train"), items_uri(root), prompt_neighbors_uri(cfg)


def read_prompt_tables(cfg: Config):
    """(train interactions, items, neighbours or None): what prompts are built from."""
    store, root = cfg.storage, cfg.storage.root
    train = storage.read_table(interactions_uri(root, "train"), store, S.INTERACTIONS)
    items = storage.read_table(items_uri(root), store, S.ITEMS)
    uri = prompt_neighbors_uri(cfg)
    neighbors = storage.read_table(uri, store, S.NEIGHBORS) if uri else None
    return train, items, neighbors


def file_stamp(uri: str | None, store: StorageConfig) -> list | None:
    """Size and version (storage.file_stamps) of a stored file (None when absent): part of
    cache keys."""
    if uri is None or not storage.exists(uri, store):
        return None
    return storage.file_stamps(uri, store)[0][1:]


# ----------------------------------------------------------------------------- retriever


def retriever_uri(root: str, name: str = "") -> str:
    return storage.join(root, "retriever", name) if name else storage.join(root, "retriever")


def save_retriever(embeddings: torch.Tensor, meta: dict, root: str, store: StorageConfig) -> None:
    """LightGCN's final node embeddings (users then items) and meta (ids, metrics, config)."""
    blob = _save({"embeddings": embeddings.contiguous()})
    storage.write_bytes(blob, retriever_uri(root, "embeddings.safetensors"), store)
    storage.write_json(meta, retriever_uri(root, "meta.json"), store)


def load_retriever(root: str, store: StorageConfig) -> tuple[np.ndarray, dict] | None:
    """(embeddings (U + I, D), meta) of the trained retriever, or None when there is none."""
    meta_uri = retriever_uri(root, "meta.json")
    if not storage.exists(meta_uri, store):
        return None
    blob = storage.read_bytes(retriever_uri(root, "embeddings.safetensors"), store)
    return _load(blob)["embeddings"].numpy(), storage.read_json(meta_uri, store)


def checkpoints_uri(root: str, job: str) -> str:
    """Where Ray Train keeps a job's checkpoints: retriever/ray, exits/ray."""
    return storage.join(root, job, "ray")


# ----------------------------------------------------------------------------- exit heads


def heads_location(cfg: Config) -> str:
    """Where trained heads live: exits.heads_uri, or <storage.root>/exits."""
    return cfg.exits.heads_uri or storage.join(cfg.storage.root, "exits")


def heads_file(cfg: Config, name: str) -> str:
    return storage.join(heads_location(cfg), name)


def has_trained_heads(cfg: Config) -> bool:
    return storage.exists(heads_file(cfg, HEADS_FILE), cfg.storage)


@dataclass
class StoredHeads:
    """Trained heads as stored: tensors, the exit config (which holds the heads spec), the
    LoRA adapter and the side features' arrays when there are any."""

    tensors: dict[str, torch.Tensor]
    exit_config: dict[str, Any]
    adapter: dict[str, torch.Tensor] | None = None
    side_features: tuple[dict[str, np.ndarray], dict] | None = None


def _tensors_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    return _save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})


def save_heads(stored: StoredHeads, cfg: Config) -> None:
    """Publish trained heads; the exit config goes last, so readers that find it find the rest."""
    store = cfg.storage
    storage.write_bytes(_tensors_blob(stored.tensors), heads_file(cfg, HEADS_FILE), store)
    if stored.adapter is not None:
        storage.write_bytes(_tensors_blob(stored.adapter), heads_file(cfg, ADAPTER_FILE), store)
    if stored.side_features is not None:
        save_side_features(*stored.side_features, heads_file(cfg, SIDE_FEATURES_FILE), store)
    exit_config = json.dumps(stored.exit_config, indent=2, sort_keys=True).encode()
    storage.write_bytes(exit_config, heads_file(cfg, EXIT_CONFIG_FILE), store)


def load_heads(cfg: Config, side_features: bool = True) -> StoredHeads:
    """The stored heads; without `side_features` the hybrid heads' CF arrays (O(users)) are
    not read."""
    store = cfg.storage
    exit_config = storage.read_json(heads_file(cfg, EXIT_CONFIG_FILE), store)
    tensors = _load(storage.read_bytes(heads_file(cfg, HEADS_FILE), store))
    adapter = None
    if "lora" in exit_config:
        adapter = _load(storage.read_bytes(heads_file(cfg, ADAPTER_FILE), store))
    side = None
    if exit_config.get("side_features") and side_features:
        side = read_side_features(heads_file(cfg, SIDE_FEATURES_FILE), store)
    return StoredHeads(tensors, exit_config, adapter, side)


def stored_heads_digests(cfg: Config) -> dict[str, str]:
    """sha256 of each stored file that decides a score beside the backbone (heads, exit
    config, adapter, side features); {} when no heads are stored."""
    if not has_trained_heads(cfg):
        return {}
    names = {
        "heads": HEADS_FILE,
        "exit_config": EXIT_CONFIG_FILE,
        "adapter": ADAPTER_FILE,
        "side_features": SIDE_FEATURES_FILE,
        "side_features_meta": SIDE_FEATURES_FILE + ".json",
    }
    digests = {}
    for key, name in names.items():
        uri = heads_file(cfg, name)
        if storage.exists(uri, cfg.storage):
            digests[key] = storage.sha256(uri, cfg.storage)  # streamed: not O(users)
    return digests


def load_exit_config(cfg: Config) -> dict:
    return storage.read_json(heads_file(cfg, EXIT_CONFIG_FILE), cfg.storage)


def load_scoring_model(cfg: Config, backbone: Backbone, side_features: bool = True) -> ScoringModel:
    """Trained heads on the backbone's device (a LoRA adapter they were trained with is
    merged into the backbone), or untrained (zero-shot) heads at the configured layers when
    no training has run yet; a configured exits.heads_uri must hold heads. Without
    `side_features` the hybrid heads' CF arrays stay unloaded (the scoring job's model actors
    get each row's side features with its tokens)."""
    from optirag.cf import SideFeatures
    from optirag.early_exit import ExitHeads, HeadsSpec, default_exit_layers
    from optirag.lora import load_lora
    from optirag.pair_scorer import ScoringModel
    from optirag.prompts import PromptBuilder

    if has_trained_heads(cfg):
        stored = load_heads(cfg, side_features)
        heads = ExitHeads.from_spec(HeadsSpec.from_dict(stored.exit_config))
        heads.load_state_dict(stored.tensors)
        heads = heads.for_backbone(backbone)
        if stored.adapter is not None:
            load_lora(backbone, LoraConfig(**stored.exit_config["lora"]), stored.adapter)
        side = None
        if stored.side_features:
            side = SideFeatures.from_arrays(*stored.side_features)
        return ScoringModel(heads, stored.exit_config, side)
    if cfg.exits.heads_uri:
        raise FileNotFoundError(f"exits.heads_uri {heads_location(cfg)}: no {HEADS_FILE}")
    log.warning(
        "no trained heads under %s: scoring with untrained (zero-shot) heads", heads_location(cfg)
    )
    layers = cfg.exits.layers or default_exit_layers(backbone.num_layers, cfg.exits.num_heads)
    answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
    return ScoringModel(ExitHeads.from_backbone(backbone, layers, answers=answers), {})


def save_init_heads(tensors: dict[str, torch.Tensor], cfg: Config) -> str:
    uri = heads_file(cfg, INIT_HEADS_FILE)
    storage.write_bytes(_tensors_blob(tensors), uri, cfg.storage)
    return uri


def load_tensors(uri: str, store: StorageConfig) -> dict[str, torch.Tensor]:
    return _load(storage.read_bytes(uri, store))


def save_side_features(
    arrays: dict[str, np.ndarray], meta: dict, uri: str, store: StorageConfig
) -> None:
    import torch

    blob = _save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    storage.write_bytes(blob, uri, store)
    storage.write_json(meta, uri + ".json", store)


def read_side_features(uri: str, store: StorageConfig) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {k: v.numpy() for k, v in _load(storage.read_bytes(uri, store)).items()}
    return arrays, storage.read_json(uri + ".json", store)


class StoredSideFeatures:
    """The side features as stored, read in parts: a safetensors file's header names each
    array's type, shape and bytes, so a task reads just the rows it needs (a range of users)
    and no process holds every user's arrays (a scale run's context stage)."""

    DTYPES = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "BOOL": "|b1"}
    USERS = ("mf.user_ids", "mf.user_emb", "mf.user_bias")  # by user, ids sorted
    USER_STATS = ("users.ids", "users.rate", "users.count")
    ITEMS = ("mf.item_ids", "mf.item_emb", "mf.item_bias", "items.ids", "items.rate", "items.count")

    def __init__(self, uri: str, store: StorageConfig) -> None:
        self.uri, self.store = uri, store
        size = int.from_bytes(storage.read_range(uri, store, 0, 8), "little")
        self.arrays = json.loads(storage.read_range(uri, store, 8, size))
        self.arrays.pop("__metadata__", None)
        self.data_start = 8 + size
        self.meta = storage.read_json(uri + ".json", store)

    def length(self, name: str) -> int:
        return self.arrays[name]["shape"][0]

    def empty(self, name: str) -> np.ndarray:
        spec = self.arrays[name]
        return np.empty((0, *spec["shape"][1:]), self.DTYPES[spec["dtype"]])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array."""
        spec, like = self.arrays[name], self.empty(name)
        stop = min(stop, spec["shape"][0])
        if stop <= start:
            return like
        row = like.itemsize * int(np.prod(like.shape[1:], dtype=np.int64))
        offset = self.data_start + spec["data_offsets"][0] + start * row
        data = storage.read_range(self.uri, self.store, offset, (stop - start) * row)
        return np.frombuffer(data, like.dtype).reshape(stop - start, *like.shape[1:])

    def features(self, given: dict[str, np.ndarray] | None = None) -> SideFeatures:
        """Side features from the `given` arrays (a part of them), the others empty: the
        users and items they lack get the cold-start values."""
        from optirag.cf import SideFeatures

        arrays = {name: self.empty(name) for name in self.arrays} | (given or {})
        return SideFeatures.from_arrays(arrays, self.meta)

    def item_features(self) -> SideFeatures:
        """The items' arrays (what an items table's process needs), no user's."""
        return self.features({n: self.rows(n, 0, self.length(n)) for n in self.ITEMS})


# ----------------------------------------------------------------------------- feature caches


def features_uri(cfg: Config, split: str, key: dict) -> str:
    """Cached states are addressed by what they depend on, so every head variant trained on
    the same backbone, prompts and pairs reuses them."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(cfg.storage.root, "features", f"{split}-{digest}.safetensors")


def load_cached_states(uri: str, key: dict, store: StorageConfig) -> dict | None:
    """The cached states at `uri` when they were made with the same `key`, else None."""
    key_uri = uri + ".key.json"
    if not (storage.exists(uri, store) and storage.exists(key_uri, store)):
        return None
    if storage.read_json(key_uri, store) != key:
        return None
    log.info("reusing cached features %s", uri)
    return load_tensors(uri, store)


def save_cached_states(states: dict, uri: str, key: dict, store: StorageConfig) -> None:
    storage.write_bytes(_save({k: v.contiguous() for k, v in states.items()}), uri, store)
    storage.write_json(key, uri + ".key.json", store)


# ----------------------------------------------------------------------------- evaluation


def evaluation_location(cfg: Config) -> str:
    return cfg.evaluation.output_uri or storage.join(cfg.storage.root, "evaluation")


def save_evaluation(metrics: dict, report: str, plot_png: bytes, cfg: Config) -> None:
    out = evaluation_location(cfg)
    storage.write_bytes(plot_png, storage.join(out, "sweep.png"), cfg.storage)
    storage.write_json(metrics, storage.join(out, "metrics.json"), cfg.storage)
    storage.write_bytes(report.encode(), storage.join(out, "report.md"), cfg.storage)


def primary_uri(cfg: Config) -> str:
    return storage.join(evaluation_location(cfg), "primary.json")


def save_primary(result: dict, cfg: Config) -> None:
    """The primary comparison, written before any other test metric is computed."""
    storage.write_json(result, primary_uri(cfg), cfg.storage)


def load_evaluation(cfg: Config) -> dict:
    return storage.read_json(storage.join(evaluation_location(cfg), "metrics.json"), cfg.storage)


# ----------------------------------------------------------------------------- context tables


def dataset_stamp(
    uri: str | None, store: StorageConfig, map_files: storage.FileMap = storage.serially
) -> list | None:
    """Every file of a table (a file or a folder) pinned by its content
    (storage.content_fingerprints): part of the keys of what is made from the table, so an
    edit makes a new one, even one that keeps the size and modification time."""
    return None if uri is None else storage.content_fingerprints(uri, store, map_files)


@dataclass(frozen=True)
class ContextPaths:
    """The context stage's tables for one set of inputs (optirag.pipelines.context),
    `<storage.root>/context/<key hash>/`:

        _SUCCESS                      written last: the key, the build whose tables these
                                      are, each users part's hash range, the cold-start
                                      context, the side features' combination
        <build>/users/part-BBBBB.parquet   USER_CONTEXT rows of block B (a range of the user
                                           hash), sorted by user hash
        <build>/items/part-BBBBB.parquet   ITEM_CONTEXT rows of block B (a range of the item
                                           hash), sorted by item

    Each build writes into its own folder (a random id), so two jobs building the same
    tables at once never mix their files; `_SUCCESS` names the one to read.
    """

    root: str
    build: str = ""

    @classmethod
    def for_key(cls, store: StorageConfig, key: dict) -> ContextPaths:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cls(storage.join(store.root, "context", digest))

    def new_build(self) -> ContextPaths:
        return ContextPaths(self.root, uuid.uuid4().hex[:12])

    def forget_build(self, store: StorageConfig) -> None:
        """`_SUCCESS` stops naming this build (when it still does): the next run builds the
        tables again instead of reading a damaged one."""
        try:
            if storage.read_json(self.success, store).get("build") == self.build:
                storage.delete_file(self.success, store)
        except (OSError, ValueError):
            pass

    @property
    def folder(self) -> str:
        return storage.join(self.root, self.build) if self.build else self.root

    @property
    def users(self) -> str:
        return storage.join(self.folder, "users")

    def users_part(self, number: int) -> str:
        return storage.join(self.users, f"part-{number:05d}.parquet")

    @property
    def items(self) -> str:
        return storage.join(self.folder, "items")

    def items_part(self, block: int) -> str:
        return storage.join(self.items, f"part-{block:05d}.parquet")

    @property
    def success(self) -> str:
        return storage.join(self.root, "_SUCCESS")


def stored_side_features(cfg: Config) -> StoredSideFeatures | None:
    """The stored heads' side features (hybrid heads), to read in parts; else None."""
    if not has_trained_heads(cfg) or not load_exit_config(cfg).get("side_features"):
        return None
    return StoredSideFeatures(heads_file(cfg, SIDE_FEATURES_FILE), cfg.storage)


# ----------------------------------------------------------------------------- scoring runs


def scores_location(cfg: Config) -> str:
    return cfg.scoring.output_uri or storage.join(cfg.storage.root, "scores")


@dataclass(frozen=True)
class RunPaths:
    """One scoring run, `<output>/<run_id>/`. Each try at the run writes its own attempt
    folder; `_SUCCESS` (one small JSON object, written last) names the published attempt, so
    a replace never unpublishes the run before its new attempt has committed:

        _SUCCESS                      {"attempt": "attempt-0002", "manifest": ...}
        _lease.json                   while an invocation works on the run (optirag.leases)
        attempt-NNNN/                 see AttemptPaths
    """

    root: str

    @property
    def success(self) -> str:
        return storage.join(self.root, "_SUCCESS")

    @property
    def lease(self) -> str:
        return storage.join(self.root, "_lease.json")

    def attempt(self, number: int) -> AttemptPaths:
        return AttemptPaths(storage.join(self.root, f"attempt-{number:04d}"), number)

    @staticmethod
    def attempt_number(folder_name: str) -> int | None:
        """The number of an attempt folder's name, None for anything else."""
        prefix = "attempt-"
        tail = folder_name.removeprefix(prefix)
        return int(tail) if folder_name.startswith(prefix) and tail.isdigit() else None


_MARKER = re.compile(r"shard-(\d+)-(\d+)-of-(\d+)\.rows-(\d+)\.json")


@dataclass(frozen=True)
class AttemptPaths:
    """The files of one attempt. Object storage has no rename, so every file name is fixed by
    its shard and piece and a retry rewrites the same object:

        _plan.json                     input parts (file, row group, rows) + shard count
        scores/shard-BBBBBB-J-of-K.parquet   piece J of K of shard B (a range of user hashes):
                                       user_id, item_id, score, exit_layer, model_version, ...
        rejects/shard-BBBBBB-J-of-K.parquet  the input row's columns + reason
        _markers/shard-BBBBBB-J-of-K.rows-N.json  written after both files: the piece, of N
                                       input rows, is done (one listing tells every done
                                       piece and its rows)
        _manifest.json                 written after every piece verified, before _SUCCESS

    A shard is written in K pieces when its token block would pass Ray Data's block size;
    K is 1 for most shards. Attempts made before pieces (shard-BBBBBB.parquet) are read
    through their manifests as before.
    """

    root: str
    number: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    @staticmethod
    def piece_stem(shard_id: int, piece: int, pieces: int) -> str:
        return f"shard-{shard_id:06d}-{piece}-of-{pieces}"

    @classmethod
    def piece_file(cls, shard_id: int, piece: int, pieces: int) -> str:
        """The name of a piece's scores and rejects files, each in its folder."""
        return f"{cls.piece_stem(shard_id, piece, pieces)}.parquet"

    def scores(self, shard_id: int, piece: int = 0, pieces: int = 1) -> str:
        return storage.join(self.scores_folder, self.piece_file(shard_id, piece, pieces))

    def rejects(self, shard_id: int, piece: int = 0, pieces: int = 1) -> str:
        return storage.join(self.rejects_folder, self.piece_file(shard_id, piece, pieces))

    def marker(self, shard_id: int, piece: int, pieces: int, rows: int) -> str:
        name = f"{self.piece_stem(shard_id, piece, pieces)}.rows-{rows}.json"
        return storage.join(self.markers_folder, name)

    @staticmethod
    def parse_marker(name: str) -> tuple[int, int, int, int] | None:
        """(shard, piece, pieces, rows) of a marker's file name; None for any other name."""
        found = _MARKER.fullmatch(name)
        return tuple(int(g) for g in found.groups()) if found else None  # type: ignore[return-value]

    @property
    def markers_folder(self) -> str:
        return storage.join(self.root, "_markers")

    @property
    def scores_folder(self) -> str:
        return storage.join(self.root, "scores")

    @property
    def rejects_folder(self) -> str:
        return storage.join(self.root, "rejects")

    @property
    def plan(self) -> str:
        return storage.join(self.root, "_plan.json")

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "_manifest.json")


def is_backfill_manifest(location: str) -> bool:
    """A location naming a backfill's manifest (`_backfills/<name>.json`), not a folder."""
    return location.endswith(".json")


def relative_to(uri: str, root: str) -> str:
    """`uri` as a path relative to the folder `root` it lies under (published metadata holds
    these, so a copied or moved output reads its own files)."""
    prefix = root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {root}")
    return uri[len(prefix) :]


def resolve_under(path: str, root: str) -> str:
    """A path from published metadata: relative ones are under `root`; absolute ones (runs
    committed before paths were relative) are used as they are."""
    return path if path.startswith("/") or "://" in path else storage.join(root, path)


def read_manifest(attempt: AttemptPaths, store: StorageConfig) -> dict:
    """A committed attempt's `_manifest.json`, its file lists resolved under the attempt."""
    manifest = storage.read_json(attempt.manifest, store)
    files = manifest.get("files", {})
    manifest["files"] = {k: [resolve_under(f, attempt.root) for f in v] for k, v in files.items()}
    return manifest


def published_attempt(run_root: str, store: StorageConfig) -> AttemptPaths | None:
    """The attempt a committed run's `_SUCCESS` names; None when the run is not committed."""
    run = RunPaths(run_root)
    if not storage.exists(run.success, store):
        return None
    name = storage.read_json(run.success, store)["attempt"]
    number = RunPaths.attempt_number(name)
    if number is None:
        raise storage.StorageError(f"{run.success}: names no attempt folder ({name!r})")
    return run.attempt(number)


# ----------------------------------------------------------------------------- backfills


@dataclass(frozen=True)
class BackfillPaths:
    """A backfill's output under the scores location: one scoring run per (partition, model
    version), in Hive-style folders a warehouse reads by partition, and one manifest per
    model version listing every partition's run and status:

        date=2026-11-01/model=<model_version>/   a run (RunPaths): _SUCCESS, attempt-NNNN/
        _backfills/<name>.json     partitions, runs, statuses (name: model=<model_version>
                                   unless backfill.name gives one)
    """

    root: str

    def run_root(self, key: str, value: str, version: str) -> str:
        return storage.join(self.root, f"{key}={value}", f"model={version}")

    def manifest(self, version: str, name: str | None = None) -> str:
        return storage.join(self.root, "_backfills", f"{name or f'model={version}'}.json")


def table_data_file(location: str, key: str, value: str, version: str) -> str:
    """A new data file of the score table's (key=value, model_version) slice, under the
    table's `location` (Iceberg's own layout: data/<partition>/<name>)."""
    folder = f"{location.rstrip('/')}/data/{key}={value}/{S.MODEL_VERSION}={version}"
    return f"{folder}/{uuid.uuid4().hex}.parquet"


def embedded_catalog(store: StorageConfig) -> dict[str, str]:
    """pyiceberg properties of the embedded SQL catalog on SQLite, `<root>/_iceberg/`: a
    local root only (SQLite needs a file system; give backfill.table.catalog otherwise)."""
    if storage.is_remote(store.root):
        raise storage.StorageError(
            "backfill.table: the embedded SQLite catalog needs a local storage.root; set "
            "backfill.table.catalog (e.g. {type: rest, uri: ...}) for object storage"
        )
    folder = storage.join(store.root, "_iceberg")
    fs, path = storage.resolve(folder, store)
    fs.create_dir(path)
    return {
        "type": "sql",
        "uri": f"sqlite:///{storage.join(folder, 'catalog.db')}",
        "warehouse": f"file://{storage.join(folder, 'warehouse')}",
    }


def _hive_values(relative: str) -> dict[str, str]:
    """`date=2026-11-01/model=x` -> {"date": "2026-11-01", "model": "x"}."""
    return dict(part.split("=", 1) for part in relative.split("/") if "=" in part)


def committed_runs(
    location: str, store: StorageConfig
) -> list[tuple[dict[str, str], AttemptPaths]]:
    """Every committed run at or under `location` (a run folder, a backfill's output, a
    whole scores location, or a backfill's manifest `_backfills/<name>.json`: its runs), with
    the Hive values of its folders (below `location`; of the run folder for a manifest)."""
    found = []
    if is_backfill_manifest(location):
        scores = posixpath.dirname(posixpath.dirname(location.rstrip("/")))  # <scores>/_backfills/
        for entry in storage.read_json(location, store)["partitions"].values():
            run_root = resolve_under(entry["run"], scores)
            attempt = published_attempt(run_root, store)
            if attempt is not None:
                parts = run_root.rstrip("/").split("/")[-2:]
                found.append((_hive_values("/".join(parts)), attempt))
        return found

    def walk(folder: str, relative: str) -> None:
        attempt = published_attempt(folder, store)
        if attempt is not None:
            found.append((_hive_values(relative), attempt))
            return
        for name in storage.list_folders(folder, store):
            if not name.startswith(("_", ".")) and RunPaths.attempt_number(name) is None:
                walk(storage.join(folder, name), posixpath.join(relative, name))

    walk(location, "")
    return found


def read_committed_scores(location: str, store: StorageConfig) -> pa.Table:
    """The score rows of every committed run at or under `location`, one table; a backfill's
    Hive values (`date`, `model`, ...) become string columns. Only published attempts are
    read (never staged or unpublished files)."""
    runs = [
        (values, read_manifest(attempt, store))
        for values, attempt in committed_runs(location, store)
    ]
    if not runs:
        raise storage.StorageError(f"{location}: no committed scoring run (no _SUCCESS)")
    return read_run_scores(runs, store)


def read_run_scores(runs: list[tuple[dict[str, str], dict]], store: StorageConfig) -> pa.Table:
    """The score files that committed runs' manifests list, one table, each run's Hive values
    (`committed_runs`) as string columns."""
    tables = []
    for values, manifest in runs:
        for uri in manifest["files"]["scores"]:
            table = storage.read_table(uri, store)
            for key, value in values.items():
                table = table.append_column(key, pa.array([value] * len(table), pa.string()))
            tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive")


# ----------------------------------------------------------------------------- comparisons

# The Hive key of a backfill's model-version folders (BackfillPaths.run_root): the thing an
# A/B comparison varies, so never a join key.
MODEL_PARTITION_KEY = "model"


def compare_location(cfg: Config) -> str:
    return cfg.compare.output_uri or storage.join(cfg.storage.root, "compare")


def side_name(location: str) -> str:
    """A compared side's default name: its folder's name, or a backfill manifest's name
    (`_backfills/<name>.json` -> `<name>`)."""
    return posixpath.basename(location.rstrip("/")).removesuffix(".json")


@dataclass(frozen=True)
class ComparePaths:
    """One A/B comparison of two runs or backfills, `<compare output>/<a>-vs-<b>/`:

    report.md, metrics.json
    scores.png, exit_layers.png, calibration.png (the last only with labels)
    """

    root: str

    @classmethod
    def of(cls, location: str, name_a: str, name_b: str) -> ComparePaths:
        return cls(storage.join(location, f"{name_a}-vs-{name_b}"))

    @property
    def report(self) -> str:
        return storage.join(self.root, "report.md")

    @property
    def metrics(self) -> str:
        return storage.join(self.root, "metrics.json")

    @staticmethod
    def plot_name(plot: str) -> str:
        """A plot's file name, as report.md links it: scores.png, ..."""
        return f"{plot}.png"

    def plot(self, plot: str) -> str:
        return storage.join(self.root, self.plot_name(plot))


def save_comparison(
    paths: ComparePaths, metrics: dict, report: str, plots: dict[str, bytes], store: StorageConfig
) -> None:
    """The plots and metrics, then the report that links them."""
    for plot, png in plots.items():
        storage.write_bytes(png, paths.plot(plot), store)
    storage.write_json(metrics, paths.metrics, store)
    storage.write_bytes(report.encode(), paths.report, store)


# ----------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class SyntheticPaths:
    """A synthetic data set under `<root>/<output>/`: one part file per generator shard."""

    root: str

    @property
    def items(self) -> str:
        return storage.join(self.root, "items.parquet")

    @property
    def candidates(self) -> str:
        return storage.join(self.root, "candidates")

    @property
    def history(self) -> str:
        return storage.join(self.root, "interactions", "train")

    def part(self, table: str, shard: int) -> str:
        folder = {"candidates": self.candidates, "history": self.history}[table]
        return storage.join(folder, f"part-{shard:05d}.parquet")
