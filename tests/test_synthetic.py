import pyarrow.compute as pc

from optirag import schema as S
from optirag import storage, synthetic
from optirag.config import SyntheticConfig
from optirag.pipelines import synthetic as synthetic_job


def _read(store, cfg, table):
    return storage.read_table(storage.join(store.root, cfg.output, table), store)


def test_generator_is_deterministic_and_complete(ray_session, local_storage):
    cfg = SyntheticConfig(
        num_users=25,
        num_items=40,
        candidates_per_user=6,
        history_per_user=3,
        users_per_shard=10,
        seed=3,
    )
    totals = synthetic_job.run(cfg, local_storage)
    assert totals == {"items": 40, "candidates": 150, "history": 75}
    cands = _read(local_storage, cfg, "candidates")
    assert (
        len(
            storage.list_files(
                storage.join(local_storage.root, "synthetic", "candidates"), local_storage
            )
        )
        == 3
    )
    pairs = set(zip(cands[S.USER_ID].to_pylist(), cands[S.ITEM_ID].to_pylist(), strict=True))
    assert len(pairs) == 150  # no candidate pair twice
    assert pc.max(cands[S.ITEM_ID]).as_py() < 40
    # Same seed, other shard size: each shard has its own stream, so only the seed matters
    # for a given shard layout; same config again gives identical bytes.
    again = synthetic.generate_shard(cfg, 1, synthetic.item_factors(cfg))["candidates"]
    assert again.equals(cands.slice(60, 60))


def test_generator_writes_to_s3(ray_session, s3_storage):
    cfg = SyntheticConfig(
        num_users=12, num_items=30, candidates_per_user=5, history_per_user=0, users_per_shard=5
    )
    assert synthetic_job.run(cfg, s3_storage)["candidates"] == 60
    assert _read(s3_storage, cfg, "candidates").num_rows == 60


def test_candidates_for_some_users_history_for_all(ray_session, local_storage):
    cfg = SyntheticConfig(
        num_users=40,
        num_items=30,
        candidates_per_user=3,
        candidate_users=8,
        history_per_user=2,
        users_per_shard=15,
    )
    assert synthetic_job.run(cfg, local_storage) == {"items": 30, "candidates": 24, "history": 80}
    cands = _read(local_storage, cfg, "candidates")
    assert sorted(set(cands[S.USER_ID].to_pylist())) == list(range(0, 40, 5))
    assert sorted(
        set(_read(local_storage, cfg, "interactions/train")[S.USER_ID].to_pylist())
    ) == list(range(40))
