"""Configuration: YAML files in conf/ loaded into frozen pydantic models.

Every model forbids unknown keys, so a typo is an error that names the key and the file.
`load_config(path, ["a.b=c", ...])` applies command-line overrides, each value parsed with
YAML's safe rules without implicit dates (so `compute.max_actors=2` is an int, and
`data.source=parquet` and `backfill.partitions=2026-11-01` are strings).
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)


def _absolute_if_local(value: str | None) -> str | None:
    """Local paths are made absolute when the config loads: Ray workers run elsewhere."""
    if value is None or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


# A local path or a URI such as s3://bucket/prefix.
Location = Annotated[str, AfterValidator(_absolute_if_local)]

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_run_id(value: str | None) -> str | None:
    """A run id names one folder under the output: no '/', no '..', not absolute."""
    if value is not None and (not RUN_ID_PATTERN.fullmatch(value) or ".." in value):
        raise ValueError(
            f"run id {value!r} must match [A-Za-z0-9][A-Za-z0-9._-]* and must not contain '..'"
        )
    return value


RunId = Annotated[str, AfterValidator(_check_run_id)]


class StrictModel(BaseModel):
    # validate_default: default paths are made absolute too (Ray workers run elsewhere).
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class S3Config(StrictModel):
    """Object-store settings. Credentials are best left out: s3fs then takes them from the
    standard AWS environment variables or the instance role."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None


class StorageConfig(StrictModel):
    root: Location = Field("data/demo", description="local directory or s3://bucket/prefix")
    s3: S3Config = S3Config()


class ColumnMapping(StrictModel):
    """Names of the columns in a user's own interactions and items files."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "ts"
    rating: str | None = "rating"
    label: str | None = None
    title: str = "title"
    text: str | None = None


class DataConfig(StrictModel):
    source: Literal["movielens", "parquet"] = "movielens"
    movielens_dir: Location = "data/raw/movielens"
    interactions_uri: Location | None = None
    items_uri: Location | None = None
    columns: ColumnMapping = ColumnMapping()
    like_threshold: float = Field(4.0, description="label = rating >= this, when no label column")
    sample_users: int | None = Field(
        None, gt=0, description="also write test candidates of this many users (test_sample)"
    )
    valid_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    split: Literal["user_time", "global_time"] = Field(
        "user_time",
        description="user_time: each user's last interactions (the fractions above); "
        "global_time: before the time quantile T1 train, [T1, T2) valid, from T2 test",
    )
    time_quantiles: tuple[float, float] = Field(
        (0.8, 0.9), description="T1, T2 of global_time as quantiles of the interaction times"
    )

    @model_validator(mode="after")
    def _parquet_needs_uris(self) -> DataConfig:
        if self.source == "parquet" and not (self.interactions_uri and self.items_uri):
            raise ValueError("data.source=parquet needs data.interactions_uri and data.items_uri")
        if self.columns.rating is None and self.columns.label is None:
            raise ValueError("data.columns needs a rating or a label column")
        t1, t2 = self.time_quantiles
        if not 0 < t1 < t2 < 1:
            raise ValueError("data.time_quantiles must be 0 < T1 < T2 < 1")
        return self


class SyntheticConfig(StrictModel):
    """Scale-test data: num_users x candidates_per_user candidate rows over num_items items."""

    num_users: int = Field(10_000, gt=0)
    num_items: int = Field(5_000, gt=0)
    candidates_per_user: int = Field(20, gt=0)
    candidate_users: int | None = Field(
        None, gt=0, description="about this many users (every k-th id) get candidates; None: all"
    )
    history_per_user: int = Field(10, ge=0)
    users_per_shard: int = Field(50_000, gt=0)
    seed: int = 0
    output: str = Field("synthetic", description="folder under storage.root")


class BackboneConfig(StrictModel):
    source: Literal["smollm2", "path", "hub", "tiny"] = "smollm2"
    path: Location | None = Field(
        None,
        description="Hugging Face model folder (source=path): a local directory, or s3://... "
        "copied once per node into cache_dir",
    )
    repo_id: str | None = Field(None, description="hub repo id, read from the hub cache (hub)")
    revision: str = Field("main", description="branch, tag or commit in the hub cache (hub)")
    hub_cache: Location | None = Field(
        None, description="the hub cache folder (hub); default: Hugging Face's (HF_HUB_CACHE)"
    )
    cache_dir: Location = "data/cache/models"
    tiny_layers: int = Field(6, gt=0, description="layers of the tiny random model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    device: str = "auto"

    @model_validator(mode="after")
    def _path_given(self) -> BackboneConfig:
        if self.source == "path" and not self.path:
            raise ValueError("backbone.source=path needs backbone.path")
        if self.source == "hub" and not self.repo_id:
            raise ValueError("backbone.source=hub needs backbone.repo_id")
        return self


class RetrieverConfig(StrictModel):
    """LightGCN on the liked-interaction graph, trained with BPR (see optirag.retriever)."""

    embedding_dim: int = Field(64, gt=0)
    num_layers: int = Field(3, gt=0)
    epochs: int = Field(60, gt=0)
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(1024, gt=0, description="positive edges per step, all workers")
    weight_decay: float = Field(1e-4, ge=0, description="BPR L2 on the batch embeddings")
    patience: int = Field(8, gt=0, description="epochs without valid NDCG@k gain before stop")
    eval_k: int = Field(20, gt=0)
    num_neighbors: int = Field(10, gt=0)
    block_size: int = Field(2048, gt=0, description="users per block in the top-k search")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    run_name: str = "lightgcn"
    text_embedder: Literal["minilm", "backbone"] = "minilm"


class PromptConfig(StrictModel):
    instruction: str = (
        "You are a recommender system. From a user's history and what users with similar "
        "taste liked, predict whether the user will like an item. Answer Yes or No."
    )
    max_history: int = Field(12, ge=0, description="most recent interactions shown")
    max_neighbor_items: int = Field(6, ge=0)
    max_item_chars: int = Field(80, gt=8)
    history_item_text: bool = Field(False, description="show item text (genres) in history too")
    max_prefix_tokens: int = Field(384, gt=16)
    use_neighbors: bool = True
    use_chat_template: bool = True
    target_ratings: bool = Field(
        False,
        description="collaborative signal in the prompt: the target item's mean rating and "
        "rating count, and similar users' ratings of it",
    )
    max_neighbor_ratings: int = Field(5, ge=0, description="similar users' ratings shown")
    answer_words: tuple[str, str] = Field(
        ("Yes", "No"),
        description="the positive and negative answer; each must be one token where the "
        "prompt ends (' Yes' after 'Answer:', 'Yes' after a chat template's turn header)",
    )

    @model_validator(mode="after")
    def _answers_distinct(self) -> PromptConfig:
        words = self.answer_words
        if len(set(words)) != 2 or any(not w or w != w.strip() for w in words):
            raise ValueError(
                f"prompts.answer_words: two distinct words without surrounding spaces (the "
                f"space before an answer comes from the prompt), got {words}"
            )
        return self


class ExitConfig(StrictModel):
    layers: list[int] | None = Field(None, description="exit depths; default: num_heads evenly")
    num_heads: int = Field(6, gt=0)
    rule: Literal["agreement", "confidence", "none"] | None = None  # None: from trained heads
    threshold: float | None = Field(None, ge=0, description="tau (agreement) or c (confidence)")
    heads_uri: Location | None = Field(None, description="trained heads directory")
    compaction: bool = True
    engine: Literal["packed", "reference"] = Field(
        "packed",
        description="packed: each prefix once in a flat token stream, cascade attention, "
        "refilled early-exit batches (optirag.engine.packed); reference: the padded engine the "
        "tests hold it to (optirag.early_exit). Same scores within float rounding",
    )


class ComputeConfig(StrictModel):
    """Resource and speed decisions; none of them changes a score."""

    batch_rows: int = Field(64, gt=0, description="pairs per model forward of the reference engine")
    batch_tokens: int = Field(
        32_768,
        gt=0,
        description="prompt tokens per model launch of the packed engine (each prefix once, "
        "plus every suffix); an engine call holds 4 launches' worth, and the rows that "
        "survive a block of layers refill the next block's launches from the whole call",
    )
    share_prefixes: bool = True
    min_actors: int = Field(1, gt=0, description="scoring actors, one model replica each")
    max_actors: int = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    train_workers: int = Field(2, gt=0, description="Ray Train workers (DDP)")
    train_use_gpu: bool = False
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per actor")
    actors_per_gpu: int = Field(
        1, gt=0, description="model actors sharing a GPU (each takes 1/N of it)"
    )
    context_users_per_task: int = Field(
        20_000,
        gt=0,
        description="users per block of the context stage's users table if every user's "
        "neighbours' rows were copied to it (the most rows a block holds); blocks share "
        "copies, so a block holds more users, fewer at scale (docs/design.md)",
    )
    shuffle_batch_mib: float = Field(
        128,
        gt=0,
        description="input a keyed shuffle's map task takes at once (Ray Data's "
        "shuffle_input_batch_bytes): blocks wait for it in the object store. With the "
        "object-store shuffle keep Ray's 1024: a map task returns a shard per partition, and "
        "shards under Ray's 100 KiB inline limit are kept in the driver's heap (docs/design.md)",
    )
    object_store_fraction: float | None = Field(
        0.075,
        gt=0,
        le=1,
        description="the share of the cluster's object store a stage's Ray Data graph may "
        "hold at once (Ray Data's override_object_store_memory_limit_fraction, followed as "
        "the cluster scales): reads wait for the shuffles and actors downstream instead of "
        "filling the store ahead of them, so its peak follows the cluster, not the data. "
        "None: Ray Data's 0.5, which a fast read fills in the first seconds of a large build",
    )
    disk_shuffle: bool = Field(
        True,
        description="keyed shuffles write their map outputs to the workers' local disks "
        "($TMPDIR; Ray Data's use_disk_based_hash_shuffle) and return metadata only: the "
        "driver and the object store stay flat in the users. False: Ray's object-store shuffle",
    )

    @model_validator(mode="after")
    def _actor_range(self) -> ComputeConfig:
        if self.min_actors > self.max_actors:
            raise ValueError("compute.min_actors must be <= compute.max_actors")
        return self


class ScoringConfig(StrictModel):
    """Inputs default to the canonical tables under storage.root (see optirag.data)."""

    candidates_uri: Location | None = None  # default: <root>/candidates/test.parquet
    history_uri: Location | None = None  # default: <root>/interactions/train.parquet
    items_uri: Location | None = None  # default: <root>/items.parquet
    neighbors_uri: Location | None = None  # default: <root>/neighbors/gcn.parquet when present
    output_uri: Location | None = None  # default: <root>/scores
    run_id: RunId | None = None  # default: <date>-<model>-<config hash>
    replace: bool = Field(
        False, description="publish a new attempt in place of a committed run (after it commits)"
    )
    rows_per_shard: int = Field(20_000, gt=0, description="target rows per shard (by user hash)")
    ignore_other_files: bool = Field(
        False, description="skip (with a warning) non-parquet files in the candidates folder"
    )
    allow_empty: bool = Field(False, description="commit a run whose input has no rows")
    max_write_retries: int = Field(3, ge=0, description="retries of a shard write on OSError")
    max_actor_restarts: int = Field(2, ge=0)
    lease_s: float = Field(
        120.0,
        gt=0,
        description="one invocation per run: its lease, renewed every third of this, lets a "
        "rerun take over this long after a killed driver's last renewal",
    )
    max_task_retries: int = Field(2, ge=0)
    timeout_s: float = Field(
        6 * 3600,
        gt=0,
        description="wall-clock limit of the run (a backfill's one scoring graph: this times "
        "the partitions it scores)",
    )
    stall_timeout_s: float = Field(
        900,
        gt=0,
        description="fail when no shard finishes and no input is read or staged this long",
    )
    shuffle_min_rows: int = Field(
        100_000,
        ge=0,
        description="below this many rows to score, read and group them by shard in one task "
        "instead of Ray Data's keyed shuffle (which takes seconds to start); 0: always shuffle",
    )
    max_block_mib: float | None = Field(
        None,
        gt=0,
        description="Ray Data's block size in the scoring graph (target_max_block_size; None: "
        "Ray's, 128 MiB): a model actor scores about this much token data per call at most, "
        "and a shard whose token block passes an eighth of it is written in pieces",
    )


PARTITION_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _check_partitions(value: str | list[str]) -> str | list[str]:
    """ "all", "<first>..<last>" (inclusive), one value, or a list of values."""
    if value == "all":
        return value
    values = value.split("..") if isinstance(value, str) else value
    if isinstance(value, str) and len(values) > 2:
        raise ValueError(f"partitions {value!r}: use 'all', '<first>..<last>' or a list")
    for v in values:
        if not PARTITION_VALUE.fullmatch(v) or ".." in v:
            raise ValueError(f"partition value {v!r} must match {PARTITION_VALUE.pattern}")
    return value


def _partition_text(value: Any) -> Any:
    """YAML reads 2026-11-01 as a date; a partition value is the folder's text."""
    if isinstance(value, list):
        return [v.isoformat() if hasattr(v, "isoformat") else str(v) for v in value]
    return value.isoformat() if hasattr(value, "isoformat") else value


def _no_secret_properties(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if any(word in key.lower() for word in (*SECRET_KEYS, "credential")):
            raise ValueError(
                f"catalog property {key!r}: secrets do not belong in a config; pyiceberg reads "
                "them from PYICEBERG_CATALOG__<NAME>__<PROPERTY> environment variables"
            )
    return value


class TableConfig(StrictModel):
    """Publish each committed partition of a backfill into an Apache Iceberg table
    (pyiceberg), partitioned by the partition key and model_version, one atomic snapshot per
    partition. Without catalog properties: an embedded SQL catalog on SQLite under a local
    storage.root (`_iceberg/`); on a cluster give the user's catalog (REST, Glue, Hive)."""

    enabled: bool = False
    name: str = Field("optirag.scores", pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
    catalog_name: str = "optirag"
    catalog: Annotated[dict[str, str], AfterValidator(_no_secret_properties)] = Field(
        {}, description="pyiceberg catalog properties (type, uri, warehouse); no secrets"
    )
    drop_missing: bool = Field(
        False,
        description="drop this model version's slices whose partition folder is gone from the "
        "candidates (never done unasked)",
    )


class BackfillConfig(StrictModel):
    """`jobs/backfill.py`: score a Hive-partitioned candidates folder
    (`<candidates_uri>/<key>=<value>/...`), each partition its own scoring run under
    `<scores>/<key>=<value>/model=<model_version>/`; everything in `scoring` applies to each."""

    candidates_uri: Location | None = Field(
        None, description="the partitioned candidates; default: scoring.candidates_uri"
    )
    partition_key: str = Field("date", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    sample_users: int | None = Field(
        None,
        gt=0,
        description="jobs/partition_candidates.py: keep this many of the test sample's users in "
        "candidates/test_sample_by_<key>/ (None: all of them)",
    )
    partitions: Annotated[
        str | list[str], BeforeValidator(_partition_text), AfterValidator(_check_partitions)
    ] = Field("all", description="'all', '<first>..<last>' (inclusive) or a list of values")
    name: RunId | None = Field(
        None, description="names the manifest, _backfills/<name>.json; default model=<version>"
    )
    fail_fast: bool = Field(
        False, description="plan no partition after one fails (those planned are scored)"
    )
    max_concurrent: int = Field(
        1,
        gt=0,
        description="partitions planned at once; one actor pool then scores all of them",
    )
    table: TableConfig = TableConfig()


class CompareConfig(StrictModel):
    """`jobs/compare.py`: A/B comparison of two scoring runs or backfills on the pairs both
    scored (optirag.pipelines.compare); writes `<output_uri>/<name_a>-vs-<name_b>/`."""

    a: Location | None = Field(
        None,
        description="side A: a run folder, a backfill's output or manifest "
        "(scores/_backfills/<name>.json), or a scores location",
    )
    b: Location | None = Field(None, description="side B, as a")
    model_a: str | None = Field(
        None, description="keep only A's rows of this model version (a backfill holding several)"
    )
    model_b: str | None = Field(None, description="keep only B's rows of this model version")
    name_a: RunId | None = Field(
        None,
        description="A's name in the output folder; default: model_a, else a's last folder "
        "(a backfill manifest: its name)",
    )
    name_b: RunId | None = Field(
        None, description="B's name in the output folder; default: model_b, else b's last folder"
    )
    labels_uri: Location | None = Field(
        None,
        description="a table of user_id, item_id, label (e.g. the interactions that followed); "
        "default: the scores' own label column when they carry one",
    )
    top_k: int = Field(10, gt=0, description="top-k overlap of each user's two rankings")
    bootstrap_resamples: int = Field(
        1000, ge=1000, description="paired user-level bootstrap of the AUC/LogLoss differences"
    )
    seed: int = 0
    output_uri: Location | None = None  # default: <root>/compare


class LoraConfig(StrictModel):
    """Fine-tune the backbone with LoRA jointly with the heads (optirag.lora) instead of
    training heads on frozen features. Heads use heads.lr; both decay with depth (beta)."""

    enabled: bool = False
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="modules to adapt; default: the family's (q_proj, v_proj; Phi-3 qkv_proj)"
    )
    lr: float = Field(1e-3, gt=0, description="lr_0 of the LoRA weights")
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(16, gt=0, description="prompts per step, all workers")


class HeadTrainingConfig(StrictModel):
    """Exit-head training on a frozen backbone (see optirag.pairs, optirag.pipelines.train_exits).

    Training pairs: per sampled user, the train history is cut at `history_fraction`; the
    prompt shows only interactions before the cut and the targets are up to
    `targets_per_user` interactions after it, so no prompt sees its target or anything later,
    and all of a user's targets share one prefix.
    """

    train_users: int | None = Field(300, gt=0, description="users sampled; None = all")
    history_fraction: float = Field(0.5, gt=0, lt=1)
    targets_per_user: int = Field(10, gt=0)
    valid_users: int | None = Field(200, gt=0, description="valid users sampled; None = all")
    max_train_pairs: int | None = Field(
        None, gt=0, description="train on a random subset of this many extracted pairs"
    )
    side_features: list[Literal["mf", "user_rate", "user_count", "item_rate", "item_count"]] = (
        Field([], description="CF features hybrid heads read beside the state (optirag.cf)")
    )
    mlp_size: int = Field(0, ge=0, description="hidden units of MLP heads; 0: linear heads")
    lora: LoraConfig = LoraConfig()
    epochs: int = Field(40, gt=0)
    lr: float = Field(0.02, gt=0, description="lr_0, of a head at depth 0")
    beta: float = Field(1.0, ge=0, description="lr_n = lr_0 * exp(-beta * layer_n / layers)")
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(128, gt=0)
    patience: int = Field(6, gt=0)
    auc_budget: float = Field(0.005, ge=0, description="max valid AUC loss of calibrated tau")
    tau_grid: list[float] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
    confidence_grid: list[float] = [0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6]
    max_failures: int = Field(2, ge=0)
    run_name: str = "exit-heads"
    seed: int = 0


class PrimaryComparison(StrictModel):
    """The one comparison named before running; every other row is exploratory."""

    variant: str | None = Field(None, description="head variant it is about (bench/accuracy.py)")
    model: str = Field("early exit", description="a model row, or the start of its name")
    baseline: str = "matrix factorisation (tuned on valid)"
    slice: str = "all"


class EvalConfig(StrictModel):
    output_uri: Location | None = None  # default: <root>/evaluation
    test_users: int | None = Field(200, gt=0, description="test users sampled; None = all")
    speed_pairs: int = Field(200, ge=0, description="pairs timed per tau for pairs/s; 0: skip")
    speed_taus: list[float] = [0.0, 0.01, 0.05]
    bootstrap_resamples: int = Field(
        1000, ge=1000, description="paired user-level bootstrap of the AUC-difference CIs"
    )
    baseline_seeds: list[int] = Field([0, 1, 2], min_length=1, description="tuned baselines")
    mf_l2_grid: list[float] = Field([0.01, 0.03, 0.1, 0.3], min_length=1, description="on valid")
    mf_max_epochs: int = Field(40, gt=0, description="MF early-stopped on valid AUC")
    mf_patience: int = Field(3, gt=0)
    lr_c_grid: list[float] = Field(
        [0.05, 0.1, 0.2, 0.5, 1.0, 2.0], min_length=1, description="id logistic regression's C"
    )
    primary: PrimaryComparison | None = None


class RayConfig(StrictModel):
    address: str | None = Field(None, description="None: a local Ray (dashboard on 127.0.0.1)")
    num_cpus: int | None = None


class Config(StrictModel):
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    backbone: BackboneConfig = BackboneConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    prompts: PromptConfig = PromptConfig()
    exits: ExitConfig = ExitConfig()
    heads: HeadTrainingConfig = HeadTrainingConfig()
    evaluation: EvalConfig = EvalConfig()
    compute: ComputeConfig = ComputeConfig()
    scoring: ScoringConfig = ScoringConfig()
    backfill: BackfillConfig = BackfillConfig()
    compare: CompareConfig = CompareConfig()
    ray: RayConfig = RayConfig()

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '**********'."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """A short stable hash of the redacted config."""
        blob = json.dumps(self.redacted(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


def section_help() -> str:
    """One line per top-level config section, for `--help`."""
    lines = []
    for name, field in Config.model_fields.items():
        keys = ", ".join(field.annotation.model_fields)  # type: ignore[union-attr]
        lines.append(f"  {name}: {keys}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config file (None: the defaults) with `a.b=c` overrides applied. A file may start
    from another with `extends: other.yaml` (relative to the file): its keys are merged into
    the other's, section by section, so a model variant states only what it changes."""
    source = str(path) if path else "<defaults>"
    raw = _read_yaml(Path(path), ()) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top level>"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(problems)) from None


class _Loader(yaml.SafeLoader):
    """YAML without implicit timestamps: `2026-11-01` stays the text it is (a partition
    value, a run id), and `2026-13-45` is not an error without a key."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _yaml_error(err: yaml.YAMLError) -> str:
    """Where and what, never the offending line (it may hold a secret)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(err, 'problem', None) or type(err).__name__}"


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's mapping, with the file it `extends` merged under it."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: `extends` goes round in a circle: {chain}")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_error(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "extends" not in raw:
        return raw
    base = raw.pop("extends")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: extends: expected the path of another config file")
    if not (path.parent / base).is_file():
        raise ConfigError(f"{path}: extends: config file not found: {path.parent / base}")
    return _merged(_read_yaml(path.parent / base, (*seen, path.resolve())), raw)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (`exits:`) changes nothing
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


SECRET_KEYS = ("secret", "password", "token", "access_key")


def _names_a_secret(key: str) -> bool:
    """A key whose words (split at _, -, spaces and camelCase humps) include a SECRET_KEYS
    entry: session_token, secret_access_key and apiToken do, batch_tokens does not."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key.strip()).lower()
    words = [w for w in re.split(r"[_\-\s]+", spaced) if w]
    runs = {"_".join(words[i : i + n]) for n in (1, 2) for i in range(len(words) - n + 1)}
    return any(word in runs for word in SECRET_KEYS)


def _holds_a_secret(value: Any) -> bool:
    """A parsed override value (a whole section given inline) with a secret key inside."""
    if isinstance(value, dict):
        return any(_names_a_secret(str(k)) or _holds_a_secret(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_a_secret(v) for v in value)
    return False


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form a.b=c")
    *parents, leaf = key.split(".")
    as_text = _is_string_field(key.split(".")) and value not in ("null", "~")
    try:
        parsed, bad_yaml = (value if as_text else _load_yaml(value)), False
    except yaml.YAMLError:
        parsed, bad_yaml = None, True
    if _names_a_secret(leaf) or _holds_a_secret(parsed):
        # A command line is stored in plain text by shells and by Ray's job table and log.
        raise ConfigError(
            f"override {key}=...: secrets are not accepted on the command line; set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment "
            "(or use the instance role)"
        )
    if bad_yaml:  # the value is not echoed: it may hold what the checks above could not see
        raise ConfigError(f"override {key}=...: the value is not valid YAML")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    # A string field keeps the text as given (a run id 2026-11-25 is not a date).
    node[leaf] = parsed


def _is_string_field(path: list[str]) -> bool:
    """Whether the config key at `path` holds a string (or an optional one)."""
    model: Any = Config
    for part in path:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
        if typing.get_origin(model) in (typing.Union, types.UnionType):  # X | None
            args = [a for a in typing.get_args(model) if a is not type(None)]
            model = args[0] if len(args) == 1 else None
        if typing.get_origin(model) is typing.Annotated:  # Location, RunId
            model = typing.get_args(model)[0]
    return model is str
