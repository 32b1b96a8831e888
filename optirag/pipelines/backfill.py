"""Offline backfills: score a Hive-partitioned candidates folder, one scoring run per partition.

    candidates/date=2026-11-01/*.parquet   ->  scores/date=2026-11-01/model=<model_version>/

Each partition is an ordinary scoring run (exactly once, resumable, `_SUCCESS` last) whose
folder names the model version, so two model variants backfill side by side and a warehouse
reads the output by partition. A partition already committed for the same model version and
the same input content (runs.committed_state) is skipped; one whose input changed since is
rescored as a new attempt, published once committed. The others are planned first
(`backfill.max_concurrent` at a time), then one Ray Data graph scores all their rows with
one actor pool, started once for the whole backfill, and each partition commits as soon as
its last shard is written.

Bad input fails its partition while planning; the backfill fails, naming it, after the others
have finished (`backfill.fail_fast`: no partition is planned after the failure; those planned
before it are scored). A failure inside the scoring graph (after
its retries) fails every partition not committed by then; the rerun resumes them. The
backfill's manifest (`scores/_backfills/<backfill.name>.json`, default name
`model=<model_version>`) lists every partition's run and status and is rewritten as each
partition finishes, so a long backfill shows its progress.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa

from optirag import artifacts as A
from optirag import runs, score_table, storage
from optirag.config import PARTITION_VALUE, Config
from optirag.pipelines import scoring
from optirag.pipelines.parallel import in_tasks

log = logging.getLogger(__name__)

COMMITTED, SKIPPED, FAILED, PLANNED = "committed", "skipped", "failed", "planned"
NOT_RUN = "not run (fail_fast)"


class BackfillFailed(RuntimeError):
    """One or more partitions failed; the others are committed."""


def available_partitions(cfg: Config) -> dict[str, str]:
    """{value: folder} of the `<key>=<value>` folders under the candidates whose value
    `backfill.partitions` could name (PARTITION_VALUE); other folders are left out with a
    warning naming them (an empty, `..`, spaced or non-ASCII value is never published)."""
    root = _candidates_root(cfg)
    prefix = f"{cfg.backfill.partition_key}="
    found, invalid = {}, []
    for name in storage.list_folders(root, cfg.storage):
        if name.startswith(prefix):
            value = name.removeprefix(prefix)
            if PARTITION_VALUE.fullmatch(value) and ".." not in value:
                found[value] = storage.join(root, name)
            else:
                invalid.append(name)
    if invalid:
        log.warning(
            "backfill: %s: left out folders whose value is not a partition value (%s): %s",
            root,
            PARTITION_VALUE.pattern,
            ", ".join(map(repr, invalid)),
        )
    if not found:
        raise storage.StorageError(f"{root}: no {prefix}<value> partition folders")
    return found


def selected_partitions(
    cfg: Config, found: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The partitions `backfill.partitions` selects, and the dates of a date range that have
    no folder (reported, not an error: a day may have had no candidates). A range of dates
    (or months) selects the folders whose value is such a date within it, compared as
    dates; any other range compares the values as text. Selecting nothing is an error."""
    found = available_partitions(cfg) if found is None else found
    spec, key = cfg.backfill.partitions, cfg.backfill.partition_key
    missing: list[str] = []
    if spec == "all":
        chosen = dict(sorted(found.items()))
    elif isinstance(spec, str) and ".." in spec:
        first, last = spec.split("..")
        kind = _date_kind(first, key)
        if kind and _date_kind(last, key) == kind:
            start, end = _as_date(first, kind), _as_date(last, kind)
            chosen = {
                v: f
                for v, f in sorted(found.items())
                if _is_date(v, kind) and start <= _as_date(v, kind) <= end
            }
            missing = [d for d in _dates(start, end, kind) if d not in found]
        else:
            chosen = {v: f for v, f in sorted(found.items()) if first <= v <= last}
    else:
        wanted = [spec] if isinstance(spec, str) else list(dict.fromkeys(spec))
        absent = [v for v in wanted if v not in found]
        if absent:
            raise storage.StorageError(
                f"{_candidates_root(cfg)}: no partition {key}="
                f"{', '.join(absent)} (found: {', '.join(sorted(found)[:10])})"
            )
        chosen = {v: found[v] for v in wanted}
    if not chosen:
        raise storage.StorageError(
            f"backfill.partitions={spec!r} selects no {key}=<value> partition under "
            f"{_candidates_root(cfg)} (found: {', '.join(sorted(found)[:10])})"
        )
    return chosen, missing


_DAY, _MONTH = re.compile(r"\d{4}-\d{2}-\d{2}"), re.compile(r"\d{4}-\d{2}")


def _date_kind(value: str, key: str) -> str | None:
    """'day' or 'month' when `value` is written as one (it must then be a real one, else an
    error naming the key and the value), None otherwise."""
    kind = "day" if _DAY.fullmatch(value) else "month" if _MONTH.fullmatch(value) else None
    if kind and not _is_date(value, kind):
        raise ValueError(f"backfill.partitions: {key}={value} is not a real {kind}")
    return kind


def _is_date(value: str, kind: str) -> bool:
    try:
        _as_date(value, kind)
    except ValueError:
        return False
    return (_DAY if kind == "day" else _MONTH).fullmatch(value) is not None


def _as_date(value: str, kind: str) -> dt.date:
    return dt.date.fromisoformat(value if kind == "day" else f"{value}-01")


def _dates(start: dt.date, end: dt.date, kind: str) -> list[str]:
    if kind == "month":
        months = (end.year - start.year) * 12 + end.month - start.month + 1
        return [
            f"{start.year + (start.month - 1 + i) // 12}-{(start.month - 1 + i) % 12 + 1:02d}"
            for i in range(months)
        ]
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _candidates_root(cfg: Config) -> str:
    root = cfg.backfill.candidates_uri or cfg.scoring.candidates_uri
    if root is None:
        raise storage.StorageError("set backfill.candidates_uri (the partitioned candidates)")
    return root


def _failed(err: Exception) -> dict:
    return {"status": FAILED, "error": f"{type(err).__name__}: {err}"}


def _history(manifest_uri: str, store) -> list[dict]:
    """The earlier invocations of this backfill, from its manifest: when each started, its
    counts and its failed partitions' errors (a rerun keeps them rather than overwrite)."""
    if not storage.exists(manifest_uri, store):
        return []
    try:
        before = storage.read_json(manifest_uri, store)
    except (OSError, ValueError) as err:
        log.warning("backfill: %s unreadable (%s); its history is lost", manifest_uri, err)
        return []
    failed = {
        v: e.get("error")
        for v, e in before.get("partitions", {}).items()
        if e.get("status") == FAILED
    }
    last = {"started": before.get("started"), "counts": before.get("counts"), "failed": failed}
    return [*before.get("history", []), last]


def partition_config(cfg: Config, folder: str) -> Config:
    """The scoring config of one partition: its candidates, everything else the backfill's."""
    scoring_cfg = cfg.scoring.model_copy(update={"candidates_uri": folder, "run_id": None})
    return cfg.model_copy(update={"scoring": scoring_cfg})


def run(cfg: Config) -> dict:
    """Score every selected partition; returns the backfill manifest. Needs ray.init()."""
    started = time.time()
    store = cfg.storage
    version = runs.model_version(cfg)[0]
    key = cfg.backfill.partition_key
    available = available_partitions(cfg)  # listed once: selection and dropped slices
    chosen, missing = selected_partitions(cfg, available)
    out = A.BackfillPaths(A.scores_location(cfg))
    manifest_uri = out.manifest(version, cfg.backfill.name)
    manifest = {
        "name": cfg.backfill.name,
        "model_version": version,
        "candidates": _candidates_root(cfg),
        "partition_key": key,
        "selected": cfg.backfill.partitions,
        "missing_dates": missing,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "partitions": {  # run folders relative to the scores location (A.committed_runs)
            value: {
                "run": A.relative_to(out.run_root(key, value, version), out.root),
                "status": "pending",
            }
            for value in chosen
        },
        "config": cfg.redacted(),
        "history": _history(manifest_uri, store),
    }
    storage.write_json(manifest, manifest_uri, store)
    if missing:
        log.warning("backfill: no partition folder for %s", ", ".join(missing))

    stop = threading.Event()  # set by a failure under backfill.fail_fast
    table = None
    if cfg.backfill.table.enabled:
        embedded = {} if cfg.backfill.table.catalog else A.embedded_catalog(store)
        table = score_table.open_table(cfg.backfill.table, key, embedded)
    lock = threading.Lock()  # the manifest is updated from the staging threads

    def record(value: str, entry: dict) -> None:
        if entry["status"] == FAILED:
            log.error("backfill: partition %s=%s failed: %s", key, value, entry["error"])
            if cfg.backfill.fail_fast:
                stop.set()
        with lock:
            manifest["partitions"][value].update(entry)
            storage.write_json(manifest, manifest_uri, store)

    def publish(value: str, entry: dict, committed_before: bool) -> dict:
        """The table commit is the last step: a skipped partition whose slice does not hold
        its committed attempt (a failed table commit, a replace published elsewhere) is
        published again."""
        run_root = out.run_root(key, value, version)
        attempt, rows = entry["attempt"], entry["scored"]
        if table is None or (
            committed_before
            and score_table.slice_is_current(table, key, value, version, attempt, rows)
        ):
            return entry
        entry["table_snapshot"] = _publish_slice(table, run_root, key, value, version, rows, store)
        return entry

    def plan(value: str) -> scoring.Planned | None:
        """Skip a committed partition, or plan it for scoring; None when nothing is left."""
        if stop.is_set():
            record(value, {"status": NOT_RUN})
            return None
        part_cfg = partition_config(cfg, chosen[value])
        run_root = out.run_root(key, value, version)
        try:
            done, changed = (
                (None, [])
                if cfg.scoring.replace
                else runs.committed_state(part_cfg, version, run_root, in_tasks)
            )
            if changed:  # rescored as a new attempt, published only once committed
                log.warning(
                    "backfill: %s=%s: its input changed since it was committed (%s); rescoring it",
                    key,
                    value,
                    ", ".join(changed),
                )
                scoring_cfg = part_cfg.scoring.model_copy(update={"replace": True})
                part_cfg = part_cfg.model_copy(update={"scoring": scoring_cfg})
            if done is None:
                planned = scoring.plan(part_cfg, run_root=run_root, restart_if_changed=True)
                record(
                    value,
                    {
                        "status": PLANNED,
                        "shards_done": len(planned.done),
                        "rows_pending": planned.pending_rows,
                    },
                )
                return planned
            log.info(
                "backfill: %s=%s is committed for %s and these inputs; skipped", key, value, version
            )
            entry = {"status": SKIPPED, "scored": done["scored"], "attempt": done["attempt"]}
            record(value, publish(value, entry, committed_before=True))
        except scoring.RUN_ERRORS as err:
            record(value, _failed(err))
        return None

    # Plan the partitions (max_concurrent at a time), then score every planned partition's
    # rows in one graph: one actor pool for the whole backfill, not one per partition.
    with ThreadPoolExecutor(cfg.backfill.max_concurrent, "optirag-backfill") as pool:
        planned = {v: p for v, p in zip(chosen, pool.map(plan, chosen), strict=True) if p}
    values = list(planned)

    def scored(i: int, outcome: dict | Exception) -> None:
        value = values[i]
        if isinstance(outcome, Exception):
            record(value, _failed(outcome))
            return
        entry = {"status": COMMITTED, **{k: outcome[k] for k in ("scored", "attempt", "wall_s")}}
        try:
            record(value, publish(value, entry, committed_before=False))
        except scoring.RUN_ERRORS as err:
            record(value, _failed(err))

    if planned:  # under fail_fast too: what was planned before the failure is scored
        scoring.score_planned(list(planned.values()), on_done=scored)
    if table is not None and cfg.backfill.table.drop_missing:
        gone = sorted(score_table.slice_values(table, key, version) - set(available))
        for value in gone:  # a partition folder removed from the candidates, on request
            score_table.drop_slice(table, key, value, version)
            log.warning(
                "backfill: dropped the table slice %s=%s of %s (no such partition)",
                key,
                value,
                version,
            )
        manifest["dropped_slices"] = gone
    failed = [v for v, e in manifest["partitions"].items() if e["status"] == FAILED]
    manifest["wall_s"] = round(time.time() - started, 2)
    manifest["counts"] = {
        status: sum(e["status"] == status for e in manifest["partitions"].values())
        for status in (COMMITTED, SKIPPED, FAILED, NOT_RUN)
    }
    storage.write_json(manifest, manifest_uri, store)
    if failed:
        raise BackfillFailed(
            f"backfill failed for {key}={', '.join(sorted(failed))} "
            f"(see {manifest_uri}); the other partitions are committed, rerun to retry"
        )
    return manifest


def _publish_slice(table, run_root: str, key: str, value: str, version: str, rows: int, store):
    """Publish a committed run as its table slice: its score files are rewritten as the
    table's data files by tasks (`in_tasks`), then one commit in this process; no score row
    passes through it."""
    attempt = A.published_attempt(run_root, store)
    files = A.read_manifest(attempt, store)["files"]["scores"]
    found = pa.unify_schemas(in_tasks(partial(storage.read_schema, storage=store), files))
    schema = score_table.slice_schema(table, found, key)
    write = partial(
        _slice_file,
        store=store,
        schema=schema,
        key=key,
        value=value,
        version=version,
        io=dict(table.io.properties),
        location=table.location(),
    )
    written = in_tasks(write, files)
    paths, counts = [p for p, _ in written], sum(n for _, n in written)
    return score_table.publish_files(
        table, paths, schema, key, value, version, attempt.name, rows, counts
    )


def _slice_file(uri: str, store, schema, key, value, version, io, location) -> tuple[str, int]:
    path = A.table_data_file(location, key, value, version)
    return score_table.write_slice_file(
        storage.read_table(uri, store), schema, key, value, path, io
    )
