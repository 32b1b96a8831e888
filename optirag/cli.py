"""Command-line entry points: `python jobs/<job>.py --config conf/x.yaml [a.b=c ...]`.

This is the only module that sets up logging, reads the environment for Ray, and calls
ray.init; each job is a module of optirag.pipelines and takes plain config objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable

from optirag.config import Config, ConfigError, load_config, section_help

log = logging.getLogger("optirag")


def _parse(
    job: str, description: str, argv: list[str], variant_key: str | None = None
) -> list[tuple[str | None, Config]]:
    """The job's config, or with `variant_key` one config per `--variant name=conf.yaml` (the
    overrides apply to each; the variant's name goes to the config key `variant_key`)."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py",
        description=description,
        epilog="config sections and their keys:\n" + section_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see conf/)")
    if variant_key:
        parser.add_argument(
            "--variant",
            action="append",
            default=[],
            metavar="NAME=CONF",
            help="run once per model variant, each with its own config file (repeatable)",
        )
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("OPTIRAG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # These libraries log signed request headers (the access key id) at DEBUG; keep them
    # quiet whatever the optirag level is.
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sources: list[tuple[str | None, str | None]] = [(None, args.config)]
    if getattr(args, "variant", None):
        if args.config:
            raise ConfigError("give either --config or --variant NAME=CONF, not both")
        sources = []
        for item in args.variant:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--variant {item!r}: expected NAME=CONF")
            sources.append((name, path))
    configs = []
    for name, path in sources:
        named = [f"{variant_key}={name}"] if name else []
        cfg = load_config(path, [*args.overrides, *named])
        log.info(
            "config%s (secrets redacted): %s",
            f" of variant {name}" if name else "",
            json.dumps(cfg.redacted(), sort_keys=True),
        )
        configs.append((name, cfg))
    return configs


IDLE_WORKERS_ENV, IDLE_WORKERS_MS = "RAY_idle_worker_killing_time_threshold_ms", "600000"
RAY_START_ATTEMPTS = 3


def _init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Local Ray: the dashboard (which also serves the state API Ray Train's controller
        # polls) listens on loopback only. Idle workers are kept for 10 minutes (by default Ray
        # kills those beyond one per CPU after 1 s): a new worker imports torch again.
        os.environ.setdefault(IDLE_WORKERS_ENV, IDLE_WORKERS_MS)
        _start_local_ray(cfg)


def _start_local_ray(cfg: Config) -> None:
    """ray.init of a local cluster, tried again when Ray's fixed 30 s for a new raylet to
    register runs out (a loaded machine misses it). Ray raises before the half-started
    node is registered, so ray.shutdown() cannot stop it: the processes that try started
    (this process's new children) are killed before the next."""
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        before = {child.pid for child in me.children(recursive=True)}
        try:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
            return
        except Exception as err:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(err) or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning(
                "local Ray did not start in time (try %d of %d); again", attempt, RAY_START_ATTEMPTS
            )
            ray.shutdown()
            started = [c for c in me.children(recursive=True) if c.pid not in before]
            for child in started:
                try:
                    child.kill()
                except psutil.Error:
                    continue
            psutil.wait_procs(started, timeout=30)


def _run(
    job: str,
    description: str,
    argv: list[str],
    body: Callable[[Config], object],
    needs_ray: bool = False,
    variant_key: str | None = None,
) -> int:
    try:
        configs = _parse(job, description, argv, variant_key)
        if needs_ray:
            _init_ray(configs[0][1])
        if len(configs) == 1 and configs[0][0] is None:
            result = body(configs[0][1])
        else:
            result = {}
            for name, cfg in configs:  # each variant runs even when an earlier one failed
                try:
                    result[name] = body(cfg)
                except (ValueError, OSError, RuntimeError) as err:
                    log.error("%s of variant %s failed: %s", job, name, err)
                    result[name] = {"failed": str(err)}
            if any("failed" in r for r in result.values() if isinstance(r, dict)):
                print(json.dumps(result, indent=2, sort_keys=True, default=str))
                return 1
    except ConfigError as err:
        logging.basicConfig()
        log.error("%s", err)
        return 2
    except (ValueError, OSError, RuntimeError) as err:
        log.error("%s failed: %s", job, err)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def prepare_data(argv: list[str]) -> int:
    from optirag.pipelines import prepare

    return _run(
        "prepare_data",
        "Build the canonical interactions/items/candidates tables under storage.root.",
        argv,
        lambda cfg: prepare.run(cfg.data, cfg.storage),
    )


def partition_candidates(argv: list[str]) -> int:
    from optirag.pipelines import prepare

    return _run(
        "partition_candidates",
        "Write the test candidates again as Hive partitions by time (backfill.partition_key: "
        "date or month) under candidates/test_by_<key>/, for backfills.",
        argv,
        lambda cfg: prepare.partition_candidates(
            cfg.backfill.partition_key, cfg.storage, cfg.backfill.sample_users
        ),
    )


def generate_synthetic(argv: list[str]) -> int:
    from optirag.pipelines import synthetic

    return _run(
        "generate_synthetic",
        "Write a deterministic synthetic candidates data set as parquet shards (Ray Data).",
        argv,
        lambda cfg: synthetic.run(cfg.synthetic, cfg.storage),
        needs_ray=True,
    )


def score(argv: list[str]) -> int:
    from optirag.pipelines import scoring

    return _run(
        "score",
        "Score candidate pairs with the early-exit LLM; writes scores/<run_id>/ exactly once.",
        argv,
        scoring.run,
        needs_ray=True,
    )


def backfill(argv: list[str]) -> int:
    from optirag.pipelines import backfill as job

    return _run(
        "backfill",
        "Score each partition of a Hive-partitioned candidates folder (backfill.partitions) as "
        "its own run, scores/<key>=<value>/model=<model_version>/; committed ones are skipped.",
        argv,
        job.run,
        needs_ray=True,
        variant_key="backfill.name",
    )


def train_retriever(argv: list[str]) -> int:
    from optirag.pipelines import retrieval

    return _run(
        "train_retriever",
        "Train LightGCN with Ray Train and write the retriever and its similar-user table.",
        argv,
        retrieval.run,
        needs_ray=True,
    )


def build_text_neighbors(argv: list[str]) -> int:
    from optirag.pipelines import text_neighbors

    return _run(
        "build_text_neighbors",
        "The text-embedding retrieval baseline: a similar-user table from item texts.",
        argv,
        text_neighbors.run,
    )


def train_exits(argv: list[str]) -> int:
    from optirag.pipelines import train_exits as job

    return _run(
        "train_exits",
        "Train the exit heads (frozen backbone, depth-decayed LR) and calibrate tau.",
        argv,
        job.run,
        needs_ray=True,
    )


def evaluate(argv: list[str]) -> int:
    from optirag.pipelines import evaluation

    return _run(
        "evaluate",
        "Evaluate the trained heads and early exit against baselines on the test candidates.",
        argv,
        evaluation.run,
    )


def compare(argv: list[str]) -> int:
    from optirag.pipelines import compare as job

    return _run(
        "compare",
        "Compare two scoring runs or backfills (compare.a vs compare.b) on the pairs both "
        "scored: score distributions, rank agreement, top-k overlap, exit layers, speed and, "
        "with labels, AUC/LogLoss/calibration with bootstrap intervals; writes "
        "compare/<a>-vs-<b>/.",
        argv,
        job.run,
    )
