import hashlib

import pyarrow as pa
import pytest

from optirag import schema as S
from optirag import storage
from optirag.schema import SchemaError

TABLE = pa.table({S.USER_ID: [1, 2], S.ITEM_ID: [3, 4]})


@pytest.mark.parametrize("store_fixture", ["local_storage", "s3_storage"])
def test_roundtrip(store_fixture, request):
    store = request.getfixturevalue(store_fixture)
    uri = storage.join(store.root, "t", "a.parquet")
    assert not storage.exists(uri, store)
    storage.write_table(TABLE, uri, store)
    assert storage.exists(uri, store)
    assert storage.read_table(uri, store, required=S.CANDIDATE_KEYS).equals(TABLE)
    assert storage.read_table(storage.join(store.root, "t"), store).num_rows == 2
    storage.write_json({"a": 1}, storage.join(store.root, "m.json"), store)
    assert storage.read_json(storage.join(store.root, "m.json"), store) == {"a": 1}


@pytest.mark.parametrize("store_fixture", ["local_storage", "s3_storage"])
def test_streamed_sha256_is_the_whole_files(store_fixture, request):
    """The driver hashes hybrid heads' side features (O(users) bytes) a chunk at a time; the
    digest must stay the one of the whole content, or committed runs would look changed."""
    store = request.getfixturevalue(store_fixture)
    uri = storage.join(store.root, "blob.bin")
    data = bytes(range(256)) * 1000 + b"tail"  # not a multiple of the chunk
    storage.write_bytes(data, uri, store)
    whole = hashlib.sha256(data).hexdigest()
    assert storage.sha256(uri, store, chunk=4096) == whole
    assert storage.sha256(uri, store) == whole
    storage.write_bytes(data[:-1] + b"T", uri, store)
    assert storage.sha256(uri, store, chunk=4096) != whole


@pytest.mark.parametrize("store_fixture", ["local_storage", "s3_storage"])
def test_file_stamps_change_when_a_file_is_rewritten_at_the_same_size(store_fixture, request):
    """Cache keys (context tables, cached states) hold these stamps: a rewrite must show,
    on S3 too, where pyarrow's fsspec bridge gives no modification time."""
    store = request.getfixturevalue(store_fixture)
    uri = storage.join(store.root, "t", "a.parquet")
    storage.write_table(TABLE, uri, store)
    before = storage.file_stamps(storage.join(store.root, "t"), store)
    storage.write_table(TABLE.take([1, 0]), uri, store)
    after = storage.file_stamps(storage.join(store.root, "t"), store)
    assert [s[:2] for s in before] == [s[:2] for s in after]  # same file, same size
    assert before != after
    # content fingerprints too, without a modification time (S3: the ETag)
    folder = storage.join(store.root, "t")
    pinned = storage.content_fingerprints(folder, store)
    storage.write_table(TABLE, uri, store)
    assert storage.content_fingerprints(folder, store) != pinned
    assert (pinned[0][3] is not None) == (store_fixture == "s3_storage")


def test_s3_uses_configured_endpoint(s3_storage):
    fs, path = storage.resolve(s3_storage.root, s3_storage)
    assert path == s3_storage.root.removeprefix("s3://")
    assert fs.type_name == "py::fsspec+('s3', 's3a')"


def test_one_s3_filesystem_per_settings_and_listings_never_cached(s3_storage):
    """Building an s3fs filesystem costs seconds, so one is kept per process and settings;
    what another process writes or deletes after a listing must still show (resume)."""
    import boto3

    def s3fs_of(uri, store):  # the s3fs instance under pyarrow's wrapper
        return storage.resolve(uri, store)[0].handler.fs

    fs = s3fs_of(s3_storage.root, s3_storage)
    assert s3fs_of(storage.join(s3_storage.root, "x"), s3_storage) is fs
    other = s3_storage.model_copy(
        update={"s3": s3_storage.s3.model_copy(update={"region": "eu-west-1"})}
    )
    assert s3fs_of(s3_storage.root, other) is not fs

    folder = storage.join(s3_storage.root, "runs")
    storage.write_json({}, storage.join(folder, "a", "m.json"), s3_storage)
    assert storage.list_folders(folder, s3_storage) == ["a"]
    bucket, prefix = s3_storage.root.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_storage.s3.endpoint_url, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key=f"{prefix}/runs/b/m.json", Body=b"{}")
    assert storage.list_folders(folder, s3_storage) == ["a", "b"]
    client.delete_object(Bucket=bucket, Key=f"{prefix}/runs/a/m.json")
    assert not storage.exists(storage.join(folder, "a", "m.json"), s3_storage)
    assert storage.list_folders(folder, s3_storage) == ["b"]


def test_missing_path_is_named(local_storage):
    with pytest.raises(storage.StorageError, match="nope.parquet: no such file"):
        storage.read_table(storage.join(local_storage.root, "nope.parquet"), local_storage)


def test_missing_column_is_named(local_storage):
    uri = storage.join(local_storage.root, "a.parquet")
    storage.write_table(pa.table({S.USER_ID: [1]}), uri, local_storage)
    with pytest.raises(SchemaError, match=r"a\.parquet: missing column 'item_id'"):
        storage.read_table(uri, local_storage, required=S.CANDIDATE_KEYS)


def test_wrong_type_is_named(local_storage):
    uri = storage.join(local_storage.root, "a.parquet")
    storage.write_table(pa.table({S.USER_ID: ["x"], S.ITEM_ID: [1]}), uri, local_storage)
    with pytest.raises(SchemaError, match=r"column 'user_id' has type string"):
        storage.read_table(uri, local_storage, required=S.CANDIDATE_KEYS)


def test_unreadable_and_empty_files(local_storage, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(storage.StorageError, match="bad.parquet: not a readable parquet"):
        storage.read_table(str(bad), local_storage)
    empty = storage.join(local_storage.root, "empty.parquet")
    storage.write_table(TABLE.slice(0, 0), empty, local_storage)
    with pytest.raises(storage.StorageError, match="empty.parquet: table is empty"):
        storage.read_table(empty, local_storage)


def test_unsupported_scheme(local_storage):
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x", local_storage)


def test_a_corrupt_file_is_named_by_every_read(local_storage, tmp_path):
    """Issue 29: a flipped byte gave "Corrupt snappy compressed data." with no path."""
    import pyarrow.parquet as pq

    folder = tmp_path / "t"
    folder.mkdir()
    big = pa.table({S.USER_ID: list(range(2000)), S.ITEM_ID: list(range(2000))})
    pq.write_table(big, folder / "a.parquet")
    pq.write_table(big, folder / "b.parquet")
    blob = bytearray((folder / "b.parquet").read_bytes())
    for i in range(100, 400):  # inside the first data page, the footer intact
        blob[i] ^= 0xFF
    (folder / "b.parquet").write_bytes(bytes(blob))
    reads = (
        lambda: storage.read_table(str(folder), local_storage),
        lambda: storage.read_own_table(str(folder), local_storage, big.schema),
    )
    for read in reads:
        with pytest.raises(storage.StorageError, match=r"b\.parquet: unreadable or corrupt"):
            read()
