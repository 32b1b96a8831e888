"""Per-file work of the driver (footers, fingerprints, schema checks, markers) in parallel
Ray tasks, so the driver makes a request per listing, not per file: `storage.FileMap`."""

from __future__ import annotations

import ctypes
import functools
import gc
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from optirag import storage
from optirag.config import ComputeConfig

SERIAL_BELOW = 64  # fewer items than this: in the driver (a task costs more than it saves)
MAX_PER_TASK = 1000
# A keyed shuffle's most partitions. Ray Data's reduce task holds its whole partition, so a
# partition per group (a context block, a scoring shard; routed by `ShuffleRoutes`) keeps a
# task's memory flat in the data; but the driver keeps, per map task, a reference per
# partition (object-store shuffle) or a handle with a row per partition (disk shuffle). At
# 1,000 a partition holds one block up to about 2 x 10^7 users, ceil(blocks / 1,000) beyond
# (docs/design.md).
MAX_PARTITIONS = 1000


def task_ids(n: int, compute: ComputeConfig) -> ray.data.Dataset:
    """A dataset of the ids 0..n-1, one per block (a task each downstream), whose keyed
    shuffles start a map task per `compute.shuffle_batch_mib` of input (`compute.disk_shuffle`
    puts the map outputs on local disk), and whose graph holds at most
    `compute.object_store_fraction` of the cluster's object store: what waits there is
    bounded by those and the cluster, not by the data."""
    ds = ray.data.range(n, override_num_blocks=n)
    ds.context.shuffle_input_batch_bytes = int(compute.shuffle_batch_mib * 2**20)
    ds.context.use_disk_based_hash_shuffle = compute.disk_shuffle
    if compute.object_store_fraction:
        ds.context.override_object_store_memory_limit_fraction = compute.object_store_fraction
    return ds


def shuffle_partitions(groups: int) -> int:
    """The partitions of a keyed shuffle of `groups` groups: one each, up to MAX_PARTITIONS."""
    return max(1, min(groups, MAX_PARTITIONS))


class ShuffleRoutes:
    """Keys that take groups 0..n-1 (context blocks, scoring shards) through a keyed Ray Data
    shuffle to partitions of their own, as evenly as the partitions allow (group g to
    partition g % partitions).

    Ray Data's hash shuffle sends a key to partition hash(key) % partitions, and its reduce
    task holds the whole partition. Keyed 0..n-1 in n partitions, groups collide like balls
    in bins: the fullest partition held 3 blocks at 10^6 users (45 blocks), 5 at 10^7 (495)
    and would hold 16 at 10^8 (4,995 in 1,000 partitions), while a third of the reduce tasks
    had nothing to do; the largest worker grew with the users though every block stayed the
    same size. So each group gets a key whose hash lands in its partition, found once here by
    Ray Data's own partitioner (the function its map tasks call), and rows carry that key.
    `group` turns a key back into its group."""

    def __init__(self, groups: int, column: str) -> None:
        self.groups, self.column = groups, column
        self.partitions = shuffle_partitions(groups)
        self.keys = _partition_keys(groups, self.partitions, column)
        self._order = np.argsort(self.keys)

    def key(self, groups: np.ndarray | int) -> np.ndarray:
        """The keys of these groups."""
        return self.keys[groups]

    def group(self, keys: np.ndarray | int) -> np.ndarray:
        """The groups of these keys."""
        return self._order[np.searchsorted(self.keys, keys, sorter=self._order)]

    def groupby(self, ds: ray.data.Dataset):
        """`ds` grouped by the routed column, a partition per group up to MAX_PARTITIONS."""
        return ds.groupby(self.column, num_partitions=self.partitions)


def _partition_keys(groups: int, partitions: int, column: str) -> np.ndarray:
    """Distinct non-negative keys, the g-th one sent by Ray Data's hash shuffle to partition
    g % partitions: candidates 0, 1, 2, ... hashed in chunks, each taken by the first group
    of its partition still without a key. `hash_partition` is Ray Data's own (private):
    tests/test_context_stage.py checks the routing through a real shuffle, so a Ray release
    that partitions otherwise fails a test, not a worker's memory."""
    from ray.data._internal.arrow_ops.transform_pyarrow import hash_partition

    wanted = [list(range(p, groups, partitions)) for p in range(partitions)]
    keys = np.full(groups, -1, np.int64)
    start, chunk = 0, max(4096, 4 * groups)
    while (keys < 0).any():
        candidates = pa.table({column: pa.array(np.arange(start, start + chunk), pa.int64())})
        for p, found in hash_partition(
            candidates, hash_cols=[column], num_partitions=partitions
        ).items():
            take = min(len(wanted[p]), len(found))
            keys[wanted[p][:take]] = found[column].to_numpy()[:take]
            del wanted[p][:take]
        start += chunk
    return keys


def in_tasks(fn: Callable[[Any], Any], items: list) -> list:
    """`[fn(x) for x in items]`, in order, in Ray tasks of up to MAX_PER_TASK items each;
    bad input found for an item (StorageError, ValueError: they name the file) is raised
    here as it was; other errors are retried by Ray, then raised."""
    return [value for chunk in _chunk_results(fn, items, None) for value in chunk]


def combined_in_tasks(fn: Callable[[Any], Any], items: list, combine: Callable[[list], Any]):
    """`combine([fn(x) for x in items])`, where `combine` also folds its own results (a
    k-minimum-values sketch's merge): each task combines its items' results first, so the
    driver receives one value per task, not one per item (per file: O(users) at 10^5
    files). Errors as in `in_tasks`."""
    return combine([value for chunk in _chunk_results(fn, items, combine) for value in chunk])


def _chunk_results(fn, items: list, combine: Callable[[list], Any] | None) -> list[list]:
    """Each chunk's results (`[combine(results)]` with `combine`), chunk by chunk in order."""
    if len(items) < SERIAL_BELOW or not ray.is_initialized():
        return [storage.serially(fn, items)]
    per_task = min(MAX_PER_TASK, max(SERIAL_BELOW, math.ceil(len(items) / 32)))
    chunks = [items[i : i + per_task] for i in range(0, len(items), per_task)]
    task = ray.remote(num_cpus=0.5, max_retries=3)(_run_chunk)
    fn_ref = ray.put(fn)
    out = []
    for done in ray.get([task.remote(fn_ref, chunk, combine) for chunk in chunks]):
        for ok, value in done:
            if not ok:
                raise value
        out.append([value for _, value in done])
    return out


def _run_chunk(fn: Callable[[Any], Any], chunk: list, combine=None) -> list[tuple[bool, Any]]:
    out = []
    for item in chunk:
        try:
            out.append((True, fn(item)))
        except (storage.StorageError, ValueError) as err:  # bad input: named, not retried
            return [(False, err)]
    return [(True, combine([value for _, value in out]))] if combine else out


def releasing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, handing the memory it freed back to the OS when it returns: Arrow's pool (its
    allocator keeps freed pages) and glibc's heap (`malloc_trim`). A Ray worker runs a keyed
    shuffle's group tasks one after another, hundreds at 10^7 users, and without this its resident
    memory creeps up with every task it ran, not with the block it holds (docs/design.md).
    A generator function releases when it is exhausted or closed; `fn` must be a function
    (a callable class, or one returning a lazy iterator, would release too early)."""
    if isinstance(fn, type):
        raise TypeError(f"releasing wraps functions, not classes: {fn!r}")
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def run_all(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            finally:
                release_freed_memory()

        return run_all

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_freed_memory()

    return run


def release_freed_memory() -> None:
    gc.collect()
    pa.default_memory_pool().release_unused()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _glibc_malloc_trim():
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


_malloc_trim = _glibc_malloc_trim()
