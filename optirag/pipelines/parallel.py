"""Per-file work of the driver (footers, fingerprints, schema checks, markers) in parallel
Ray tasks, so the driver makes a request per listing, not per file: `storage.FileMap`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ray

from optirag import storage

SERIAL_BELOW = 64  # fewer items than this: in the driver (a task costs more than it saves)
MAX_PER_TASK = 1000


def in_tasks(fn: Callable[[Any], Any], items: list) -> list:
    """`[fn(x) for x in items]`, in order, in Ray tasks of up to MAX_PER_TASK items each;
    bad input found for an item (StorageError, ValueError: they name the file) is raised
    here as it was; other errors are retried by Ray, then raised."""
    if len(items) < SERIAL_BELOW or not ray.is_initialized():
        return storage.serially(fn, items)
    per_task = min(MAX_PER_TASK, max(SERIAL_BELOW, math.ceil(len(items) / 32)))
    chunks = [items[i : i + per_task] for i in range(0, len(items), per_task)]
    task = ray.remote(num_cpus=0.5, max_retries=3)(_run_chunk)
    fn_ref = ray.put(fn)
    out = []
    for done in ray.get([task.remote(fn_ref, chunk) for chunk in chunks]):
        for ok, value in done:
            if not ok:
                raise value
            out.append(value)
    return out


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list[tuple[bool, Any]]:
    out = []
    for item in chunk:
        try:
            out.append((True, fn(item)))
        except (storage.StorageError, ValueError) as err:  # bad input: named, not retried
            return [*out, (False, err)]
    return out
