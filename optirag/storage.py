"""Storage: a URI (local path or s3://bucket/prefix) -> a pyarrow filesystem and a path.

s3:// goes through s3fs. Endpoint, region and credentials come from the storage config or,
when absent there, from the standard AWS environment variables / instance role, which s3fs
(botocore) reads itself. Nothing here logs a credential.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from optirag.config import S3Config, StorageConfig
from optirag.schema import check_columns


class StorageError(OSError):
    """A path does not exist, is unreadable or is not a table; the message names it."""


# How per-file work (a footer, a fingerprint, a marker) is mapped over many files: one by
# one here, in parallel Ray tasks in the job (optirag.pipelines.parallel.in_tasks), so the
# driver makes no request per file.
FileMap = Callable[[Callable[[Any], Any], list], list]


def serially(fn: Callable[[Any], Any], items: list) -> list:
    return [fn(item) for item in items]


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri, *parts))


def resolve(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3:// URI."""
    if is_remote(uri):
        return _s3_filesystem(storage.s3), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme: {uri} (use a local path or s3://)")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _s3_filesystem(s3: S3Config) -> pafs.FileSystem:
    import s3fs

    kwargs: dict[str, Any] = {}
    if s3.access_key_id and s3.secret_access_key:
        kwargs["key"] = s3.access_key_id.get_secret_value()
        kwargs["secret"] = s3.secret_access_key.get_secret_value()
        if s3.session_token:
            kwargs["token"] = s3.session_token.get_secret_value()
    if s3.endpoint_url:
        kwargs["endpoint_url"] = s3.endpoint_url
    if s3.region:
        kwargs["client_kwargs"] = {"region_name": s3.region}
    # fsspec keeps one instance per process and settings (building one, a botocore session
    # and client, took 1-2 s on 2 slow cores; it builds new ones in a forked child). No
    # listings cache: a resumed run must see objects written by other processes.
    fs = s3fs.S3FileSystem(use_listings_cache=False, **kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


PARQUET_SUFFIXES = (".parquet", ".parq")  # compared case-insensitively


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def list_all_files(uri: str, storage: StorageConfig) -> list[str]:
    """Sorted paths (inside the filesystem) of every file under a folder, or the file itself;
    names starting with '_' or '.' (markers, temporaries) are not data and are left out."""
    fs, path = resolve(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(
        i.path
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and not any(part.startswith(("_", ".")) for part in i.path[len(path) :].split("/") if part)
    )


def file_stamps(uri: str, storage: StorageConfig) -> list[list]:
    """[path, size, version] of every file `list_all_files` lists: what changes when a file
    is rewritten. The version is the modification time on a local disk and the ETag on S3
    (pyarrow's fsspec bridge drops S3's times, so a same-size rewrite would look unchanged)."""
    fs, _ = resolve(uri, storage)
    stamps = []
    for path in list_all_files(uri, storage):
        if is_remote(uri):
            info = fs.handler.fs.info(path)
            stamps.append([path, info["size"], str(info.get("ETag") or info.get("LastModified"))])
        else:
            info = fs.get_file_info(path)
            stamps.append([path, info.size, str(info.mtime)])
    return stamps


def content_fingerprints(
    uri: str, storage: StorageConfig, map_files: FileMap = serially
) -> list[list]:
    """[path, size, content hash, ETag (S3) or None] of every file `list_all_files` lists:
    what changes when a file's content changes, and not when it is merely touched or copied
    (no modification time). On S3 the hash is of the Parquet footer (every row group's
    offsets, sizes, row counts and column statistics) and the ETag adds the object's own
    content hash; on a local disk a file up to WHOLE_FILE_HASH bytes is hashed whole (a
    footer misses values that move within a column and keep its statistics), a larger one
    by its footer."""
    fs, _ = resolve(uri, storage)
    paths = list_all_files(uri, storage)
    found = map_files(partial(fingerprint, fs, remote=is_remote(uri)), paths)
    return [[path, *one] for path, one in zip(paths, found, strict=True)]


WHOLE_FILE_HASH = 256 << 20


def fingerprint(fs: pafs.FileSystem, path: str, *, remote: bool) -> list:
    """[size, content hash, ETag or None] of one file (see content_fingerprints)."""
    with fs.open_input_file(path) as f:
        size = f.size()
        whole = not is_parquet(path) or (not remote and size <= WHOLE_FILE_HASH)
        content = f.read() if whole else parquet_footer(f)
    etag = str(fs.handler.fs.info(path).get("ETag")) if remote else None
    return [size, hashlib.sha256(content).hexdigest()[:32], etag]


def parquet_footer(f: Any) -> bytes:
    """The footer of an open Parquet file (its metadata and the closing magic)."""
    size = f.size()
    if size < 12:
        return b""
    f.seek(size - 8)
    tail = f.read(8)
    length = int.from_bytes(tail[:4], "little")
    f.seek(max(size - 8 - length, 0))
    return f.read(length + 8)


def list_folders(uri: str, storage: StorageConfig) -> list[str]:
    """Names of the folders directly under `uri` ([] when it does not exist)."""
    fs, path = resolve(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def list_file_names(uri: str, storage: StorageConfig) -> set[str]:
    """Names of the files directly under `uri`, from one listing (empty when it does not
    exist)."""
    fs, path = resolve(uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return set()
    return {i.base_name for i in infos if i.type == pafs.FileType.File}


# ----------------------------------------------------------------------------- conditional writes
# A version is the S3 ETag, or on a local disk the sha256 of the content.


def create_exclusive(uri: str, data: bytes, storage: StorageConfig) -> str | None:
    """Write `data` at `uri` only if nothing is there, atomically; its version, or None when
    something already was (S3: `If-None-Match: *`; local: a hard link of a temporary)."""
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        try:
            reply = _s3fs(storage).call_s3(
                "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"
            )
        except OSError as err:  # s3fs: FileExistsError, or a precondition's OSError
            if isinstance(err, FileExistsError) or _precondition_failed(err):
                return None
            raise
        return str(reply["ETag"])
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return None
    finally:
        tmp.unlink()
    return _digest(data)


def read_versioned(uri: str, storage: StorageConfig) -> tuple[bytes, str] | None:
    """(content, version) of the object at `uri`, None when there is none. On S3 the ETag is
    read first: content newer than it only makes a later conditional replace fail."""
    if is_remote(uri):
        fs = _s3fs(storage)
        path = uri.removeprefix("s3://")
        try:
            etag = str(fs.info(path)["ETag"])
            return fs.cat_file(path), etag
        except FileNotFoundError:
            return None
    try:
        data = Path(uri).read_bytes()
    except FileNotFoundError:
        return None
    return data, _digest(data)


def replace_if_unchanged(uri: str, data: bytes, version: str, storage: StorageConfig) -> str | None:
    """Overwrite `uri` with `data` only if it is still at `version`; the new version, or None
    (S3: `If-Match`; local: a compare-and-swap under a lock on the folder)."""
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        try:
            reply = _s3fs(storage).call_s3(
                "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version
            )
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _precondition_failed(err):
                return None
            raise
        return str(reply["ETag"])
    import fcntl

    path = Path(uri)
    # the lock is the folder's (flock on its descriptor): a lock file beside `path` would be
    # left in the folder, e.g. in a committed run's root
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            return None
        if _digest(current) != version:
            return None
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        os.close(folder)  # releases the lock
    return _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _precondition_failed(err: OSError) -> bool:
    return "pre-condition" in str(err).lower() or "precondition" in str(err).lower()


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _s3fs(storage: StorageConfig):
    return _s3_filesystem(storage.s3).handler.fs


def delete_file(uri: str, storage: StorageConfig) -> None:
    fs, path = resolve(uri, storage)
    fs.delete_file(path)


def delete_folder(uri: str, storage: StorageConfig) -> None:
    fs, path = resolve(uri, storage)
    fs.delete_dir(path)


def list_files(uri: str, storage: StorageConfig) -> list[str]:
    """The parquet files (.parquet / .parq, any case) under a folder, or the file itself."""
    files = list_all_files(uri, storage)
    if len(files) == 1 and files[0] == resolve(uri, storage)[1]:
        return files
    return [f for f in files if is_parquet(f)]


def checked_files(
    uri: str,
    storage: StorageConfig,
    required: pa.Schema | None = None,
    map_files: FileMap = serially,
) -> list[str]:
    """The table's parquet files; fails naming the file that is unreadable or lacks a
    required column (before any row is read)."""
    fs, _ = resolve(uri, storage)
    files = list_files(uri, storage)
    if not files:
        raise StorageError(f"{uri}: folder holds no parquet files")
    map_files(partial(check_file, fs, required), files)
    return files


def read_schema(uri: str, storage: StorageConfig) -> pa.Schema:
    """A parquet file's schema (its footer only); fails naming the file."""
    return _file_schema(*resolve(uri, storage))


def check_file(fs: pafs.FileSystem, required: pa.Schema | None, path: str) -> None:
    """Fail naming the file when it is not readable parquet or lacks a required column."""
    schema = _file_schema(fs, path)
    if required is not None:
        check_columns(schema, required, source=path)


def _file_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    try:
        return pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{path}: not a readable parquet file ({err})") from None


def read_table(
    uri: str,
    storage: StorageConfig,
    required: pa.Schema | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read a parquet file or folder; fail naming the file on a missing, empty or bad input."""
    fs, _ = resolve(uri, storage)
    tables = [
        _read_file(path, fs, columns=columns) for path in checked_files(uri, storage, required)
    ]
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows == 0:
        raise StorageError(f"{uri}: table is empty")
    return table


def read_own_table(uri: str, storage: StorageConfig, schema: pa.Schema) -> pa.Table:
    """A folder of parquet files this job wrote itself, read in one pass: listed once, no
    file-by-file schema check first (`read_table`'s check reads every footer twice on S3)."""
    fs, _ = resolve(uri, storage)
    files = list_files(uri, storage)
    try:
        return ds.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table()
    except (pa.ArrowException, OSError):
        name_bad_file(files, fs, schema)  # which file: one by one, only on this error path
        raise


def name_bad_file(files: list[str], fs: pafs.FileSystem, schema: pa.Schema | None = None) -> None:
    """Read `files` one by one and raise the StorageError naming the first unreadable or
    corrupt one (after a read of them all failed without saying which)."""
    for path in files:
        _read_file(path, fs, schema=schema)


def _read_file(path: str, fs: pafs.FileSystem, **kwargs: Any) -> pa.Table:
    """One parquet file; an unreadable or corrupt one is a StorageError naming it."""
    try:
        return pq.read_table(path, filesystem=fs, **kwargs)
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"{path}: unreadable or corrupt parquet file ({err})") from None


def open_dataset(uri: str, storage: StorageConfig, required: pa.Schema | None = None) -> ds.Dataset:
    """A checked parquet table to read parts of with a filter, many times: the files are
    listed and checked once here."""
    fs, _ = resolve(uri, storage)
    return ds.dataset(checked_files(uri, storage, required), filesystem=fs, format="parquet")


# Row groups small enough that a filtered read (a shard's users) skips most of a big table.
ROW_GROUP_ROWS = 128 * 1024


def write_table(
    table: pa.Table, uri: str, storage: StorageConfig, row_group_rows: int = ROW_GROUP_ROWS
) -> None:
    """Write one parquet file so that readers never see it half-written.

    Local: write a temporary sibling, then rename. S3: a single PUT is already atomic.
    """
    fs, path = resolve(uri, storage)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if is_remote(uri):
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_rows)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj: Any, uri: str, storage: StorageConfig) -> None:
    write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), uri, storage)


def read_json(uri: str, storage: StorageConfig) -> Any:
    return json.loads(read_bytes(uri, storage))


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def sha256(uri: str, storage: StorageConfig, chunk: int = 16 << 20) -> str:
    """The sha256 of a file's content, read `chunk` bytes at a time: a file of any size
    (hybrid heads' side features grow with the users) costs this process one chunk."""
    fs, path = resolve(uri, storage)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_range(uri: str, storage: StorageConfig, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset` (one ranged GET on object storage)."""
    fs, path = resolve(uri, storage)
    with fs.open_input_file(path) as f:
        return f.read_at(length, offset)


def write_bytes(data: bytes, uri: str, storage: StorageConfig) -> None:
    fs, path = resolve(uri, storage)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)
