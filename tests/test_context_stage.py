"""The context stage (issue 16): tables made once from the history, neighbours and items; the
scoring job's token blocks give the same ids and the same scores as the in-process scorer."""

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from optirag import artifacts as A
from optirag import cf, runs, storage
from optirag import schema as S
from optirag.backbones import load_backbone
from optirag.context import ContextStore
from optirag.context_tables import cut_block
from optirag.early_exit import ExitHeads
from optirag.pair_scorer import make_pair_scorer
from optirag.pipelines import context, parallel, scoring
from tests.conftest import default_answers
from tests.test_scoring import _candidates, _config, _write_inputs

SIDE = ["mf", "user_rate", "user_count", "item_rate", "item_count"]


def _with_cold_user(cands: pa.Table) -> pa.Table:
    """A user with no history and no neighbours: the cold-start context."""
    extra = pa.table(
        {
            S.USER_ID: [999, 999],
            S.ITEM_ID: [3, 4],
            S.LABEL: pa.array([1, 0], pa.int8()),
            "segment": ["c", "c"],
        }
    )
    return pa.concat_tables([cands, extra.cast(cands.schema)])


def _save_hybrid_heads(cfg, backbone, interactions):
    """Hybrid heads whose side weights matter, with side features fitted on the history."""
    side = cf.SideFeatures.fit(SIDE, interactions)
    heads = ExitHeads.from_backbone(
        backbone, [2, 4, 6], side_names=SIDE, answers=default_answers(backbone)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for head in heads.heads:
            head.proj.weight[:, -len(SIDE) :].normal_(0, 1.0)
    exit_config = {**heads.spec.as_dict(), "rule": "agreement", "threshold": 0.002}
    A.save_heads(A.StoredHeads(heads.state_dict(), exit_config, None, side.arrays()), cfg)
    return side


@pytest.mark.parametrize("variant", ["plain", "target-ratings", "hybrid"])
def test_token_blocks_score_as_the_in_process_scorer(
    ray_session, local_storage, tiny_llama_dir, movie_tables, variant
):
    cands = _with_cold_user(_candidates(n_users=6, per_user=5))
    _write_inputs(local_storage, movie_tables, cands)
    cfg = _config(local_storage, tiny_llama_dir, rows_per_shard=8)
    prompts = cfg.prompts.model_copy(update={"target_ratings": variant != "plain"})
    compute = cfg.compute.model_copy(update={"context_users_per_task": 2})  # neighbours cross
    cfg = cfg.model_copy(update={"prompts": prompts, "compute": compute})
    backbone = load_backbone(cfg.backbone)
    if variant == "hybrid":
        _save_hybrid_heads(cfg, backbone, movie_tables[0])
    inputs = runs.Inputs.from_config(cfg)
    tables = context.build(cfg, inputs.history, inputs.items, inputs.neighbors)
    whole = make_pair_scorer(
        cfg, backbone, A.load_scoring_model(cfg, backbone), ContextStore(*movie_tables, prompts)
    )
    actor = scoring.ScoreTokens(cfg, "v1")
    side_names = list(actor.scorer.engine.heads.spec.side_features)
    assert side_names == (SIDE if variant == "hybrid" else [])

    run = runs.start(cfg, "v1")  # plan, then group by shard as the job's shuffle does
    fs, _ = storage.resolve(inputs.candidates, cfg.storage)
    known_items = movie_tables[1][S.ITEM_ID].to_numpy()
    rows = pa.concat_tables(
        [runs.with_shards(runs.read_part(p, fs, known_items), run.num_shards) for p in run.parts]
    )
    shards = np.unique(rows[runs.SHARD_ID].to_numpy()).tolist()
    assert len(shards) > 1
    scored = 0
    for shard in shards:
        staged = rows.filter(pc.equal(rows[runs.SHARD_ID], shard)).drop_columns([runs.SHARD_ID])
        staged = runs.mark_duplicates(staged)
        block = scoring.assemble_shard(staged, shard, run.num_shards, tables, cfg)
        users, items = block[S.USER_ID].to_numpy(), block[S.ITEM_ID].to_numpy()
        # The same ids: each user's prefix (on their first row) + each row's suffix.
        prefix_of, suffixes = {}, block[S.SUFFIX_IDS].to_pylist()
        for u, p in zip(users.tolist(), block[S.PREFIX_IDS].to_pylist(), strict=True):
            prefix_of.setdefault(u, p)
        got = [prefix_of[u] + s for u, s in zip(users.tolist(), suffixes, strict=True)]
        assert got == whole.prompt_ids(users, items)
        out = actor(block)
        assert out.column_names[-3:] == [S.SCORE, S.EXIT_LAYER, S.MODEL_VERSION]
        assert S.PREFIX_IDS not in out.column_names
        expected = whole.score(users, items)
        np.testing.assert_allclose(out[S.SCORE].to_numpy(), expected.scores, atol=1e-5)
        assert np.array_equal(out[S.EXIT_LAYER].to_numpy(), expected.exit_layers)
        scored += len(out)
        # Cut into pieces under a block size (Ray Data's, in the job), in any batches: the
        # same scores, each user cut across pieces keeping their prefix.
        pieces = cut_block(block, max(1, block.nbytes // 4))
        assert len(pieces) >= 3 and sum(map(len, pieces)) == len(block)
        cut = pa.concat_tables([actor(pa.concat_tables(pieces[:2])), *map(actor, pieces[2:])])
        order = [(runs.ROW, "ascending")]
        np.testing.assert_allclose(
            cut.sort_by(order)[S.SCORE].to_numpy(),
            out.sort_by(order)[S.SCORE].to_numpy(),
            atol=1e-5,
        )
    assert scored == cands.num_rows


def test_context_tables_are_remade_when_an_input_changes(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    interactions, items, neighbors = movie_tables
    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    inputs = runs.Inputs.from_config(cfg)

    def build(c=cfg):
        return context.build(c, inputs.history, inputs.items, inputs.neighbors).paths.root

    first = build()
    manifest = storage.read_json(A.ContextPaths(first).success, cfg.storage)
    assert build() == first  # reused: not built again
    assert storage.read_json(A.ContextPaths(first).success, cfg.storage) == manifest
    seen = {first}
    edits = [
        lambda: storage.write_table(interactions.slice(1), inputs.history, cfg.storage),
        lambda: storage.write_table(neighbors.slice(1), inputs.neighbors, cfg.storage),
        lambda: storage.write_table(items.slice(0, len(items) - 1), inputs.items, cfg.storage),
    ]
    for edit in edits:
        edit()
        seen.add(build())
    reworded = cfg.model_copy(
        update={"prompts": cfg.prompts.model_copy(update={"instruction": "Say Yes or No."})}
    )
    seen.add(build(reworded))
    assert len(seen) == 5, "every change of an input made new tables"


def test_users_table_is_sorted_by_user_hash_and_shards_are_its_ranges(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    from optirag.ids import hash_range, user_hash

    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    inputs = runs.Inputs.from_config(cfg)
    tables = context.build(cfg, inputs.history, inputs.items, inputs.neighbors)
    users = storage.read_table(tables.paths.users, cfg.storage)
    hashes = users[S.USER_HASH].to_numpy()
    assert np.array_equal(hashes, user_hash(users[S.USER_ID].to_numpy()))
    assert (np.diff(hashes) >= 0).all()
    ids = np.arange(-50, 5000)
    for shard in range(5):
        low, high = hash_range(shard, 5)
        in_range = (user_hash(ids) >= low) & (user_hash(ids) < high)
        assert np.array_equal(in_range, runs.shard_of(ids, 5) == shard)


def test_table_scorer_gives_the_in_process_ids_and_scores(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """Valid and test pairs are scored from the job's tables in training and evaluation."""
    from optirag.pipelines.states import state_scorer, table_state_scorer

    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    prompts = cfg.prompts.model_copy(update={"target_ratings": True})
    cfg = cfg.model_copy(update={"prompts": prompts})
    backbone = load_backbone(cfg.backbone)
    tables = table_state_scorer(cfg, backbone, [2, 4, 6])
    local = state_scorer(cfg, backbone, [2, 4, 6], ContextStore(*movie_tables, prompts))
    users = np.array([3, 1, 1, 2, 999, 3, 6])
    items = np.array([5, 6, 7, 8, 9, 10, 11])
    assert tables.prompt_ids(users, items) == local.prompt_ids(users, items)
    got = tables.score(users, items, keep_hidden=True)
    want = local.score(users, items, keep_hidden=True)
    np.testing.assert_allclose(got.hidden, want.hidden, atol=1e-5)
    with pytest.raises(ValueError, match="time-cut"):
        tables.score(users, items, before_ts=np.zeros(len(users), np.int64))


def test_items_missing_from_the_items_table_are_rejects_and_a_block_of_rejects_scores(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """Rows staged against an older items table, and shards with nothing to score (hybrid
    heads: no side features to look up)."""
    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    _save_hybrid_heads(cfg, load_backbone(cfg.backbone), movie_tables[0])
    inputs = runs.Inputs.from_config(cfg)
    tables = context.build(cfg, inputs.history, inputs.items, inputs.neighbors)
    users = storage.read_table(tables.paths.users, cfg.storage)
    items = storage.read_table(tables.paths.items, cfg.storage)
    assembler = tables.assembler(cfg)
    batch = pa.table(
        {
            S.USER_ID: [1, 1, 2],
            S.ITEM_ID: [5, 10**9, 6],
            S.REASON: pa.array([None, None, None], pa.string()),
        }
    )
    block = assembler.assemble(batch, users, items)
    assert block[S.REASON].to_pylist() == [None, S.REJECT_UNKNOWN_ITEM, None]
    assert [len(s) > 0 for s in block[S.SUFFIX_IDS].to_pylist()] == [True, False, True]

    rejects = pa.table(
        {
            S.USER_ID: [1, 2],
            S.ITEM_ID: [10**9, 5],
            S.REASON: [S.REJECT_UNKNOWN_ITEM, S.REJECT_NULL_ID],
        }
    )
    block = assembler.assemble(rejects, users.slice(0, 0), items.slice(0, 0))
    out = scoring.ScoreTokens(cfg, "v1")(block)
    assert out[S.REASON].to_pylist() == rejects[S.REASON].to_pylist()
    assert np.isnan(out[S.SCORE].to_numpy()).all()


def test_users_table_made_in_pieces_equals_one_piece(monkeypatch, tiny_backbone, movie_tables):
    """user_rows makes its rows in pieces of USER_PIECE users: the boundaries change nothing."""
    from optirag import context_tables
    from optirag.config import PromptConfig
    from optirag.prompts import PromptBuilder

    prompts_cfg = PromptConfig(target_ratings=True)
    contexts = ContextStore(*movie_tables, prompts_cfg)
    prompts = PromptBuilder(tiny_backbone.tokenizer, prompts_cfg)
    users = np.unique(movie_tables[0][S.USER_ID].to_numpy())
    whole = context_tables.user_rows(users, contexts, prompts, None)
    monkeypatch.setattr(context_tables, "USER_PIECE", 2)
    pieces = context_tables.user_rows(users, contexts, prompts, None)
    assert len(users) > 4 and pieces.equals(whole)


@pytest.mark.parametrize("side", [False, True])
def test_users_table_is_the_same_for_any_blocks_of_users(
    ray_session, local_storage, tiny_llama_dir, movie_tables, monkeypatch, side
):
    """Each block gets its users' history rows and their neighbours' through two keyed
    shuffles: one block or about a block per user, the same rows. With side features, each
    block reads only its users' (a user known to the side features alone included)."""
    from optirag.ids import hash_range

    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    cfg = cfg.model_copy(
        update={"prompts": cfg.prompts.model_copy(update={"target_ratings": True})}
    )
    fitted = None
    if side:  # fitted on the history and one user the history lacks
        monkeypatch.setattr(context, "SIDE_CHUNK", 7)  # the side's users in many tasks
        alone = movie_tables[0].slice(0, 3).to_pylist()
        extra = pa.Table.from_pylist([r | {S.USER_ID: 4242} for r in alone], movie_tables[0].schema)
        fitted = _save_hybrid_heads(
            cfg, load_backbone(cfg.backbone), pa.concat_tables([movie_tables[0], extra])
        )
    inputs = runs.Inputs.from_config(cfg)
    tables, folders = {}, []
    items = {}
    # files read a row at a time: a neighbour listed from several batches is copied to
    # the lister's block once all the same
    monkeypatch.setattr(context, "ROUTE_BATCH", 1)
    # 3: two blocks (blocks sized by rows, neighbours' copies counted), users 1 and 3 (both
    # list user 2) in one; its shuffles go through disk
    for per_task, disk in ((1000, False), (3, True)):
        monkeypatch.setattr(context, "ITEMS_PER_TASK", per_task * 3)  # items too, in blocks
        compute = cfg.compute.model_copy(
            update={"context_users_per_task": per_task, "disk_shuffle": disk}
        )
        built = context.build(
            cfg.model_copy(update={"compute": compute}),
            inputs.history,
            inputs.items,
            inputs.neighbors,
        )
        whole = storage.read_table(built.paths.users, cfg.storage)
        assert built.users == len(whole)
        assert len(built.parts) == 1 if per_task == 1000 else 1 < len(built.parts) <= len(whole)
        for shard in range(3):  # a shard opens only the parts that meet its hash range
            low, high = hash_range(shard, 3)
            got = built.read_users(whole[S.USER_ID].to_numpy(), low, high, cfg.storage)
            hashes = whole[S.USER_HASH].to_numpy()
            assert got.equals(whole.filter((hashes >= low) & (hashes < high)))
        tables[per_task] = whole
        assert (len(built.item_parts) == 1) == (per_task == 1000)
        items[per_task] = built.read_items(None, cfg.storage).sort_by(S.ITEM_ID)
        fs, success = storage.resolve(built.paths.success, cfg.storage)
        fs.delete_file(success)  # the same key: built again
        folders.append(built.paths.users)
    one, many = tables[1000], tables[3]
    assert len(one) == (7 if side else 6) and one.equals(many)
    if side:
        users = one[S.USER_ID].to_numpy()
        assert 4242 in users
        stored = np.array(one[S.SIDE].to_pylist(), np.float32)
        np.testing.assert_array_equal(stored, fitted.user_side(users))
    assert len(items[1000]) == len(movie_tables[1]) and items[1000].equals(items[3])
    # Each build wrote into a folder of its own: a second build of one key (another job at
    # the same time) never touched the first one's files.
    assert folders[0] != folders[1]
    assert storage.read_table(folders[0], cfg.storage).equals(one)
    assert sum(len(r) for r in one[S.RATED_ITEMS].to_pylist()) > 0  # neighbours' rows arrived


def test_the_users_are_counted_by_sketches_without_a_list_of_them():
    from optirag.ids import user_hash

    rng = np.random.default_rng(0)
    users = rng.choice(10**9, 300_000, replace=False)
    files = np.array_split(np.concatenate([users, users[:50_000]]), 7)  # users in two files
    sketches = [np.unique(user_hash(f))[: context.SKETCH] for f in files]
    assert abs(context.estimate_distinct(sketches) / len(users) - 1) < 0.05
    assert context.estimate_distinct([np.unique(user_hash(users[:100]))]) == 100  # exact
    # merged in any grouping (each task merges its files' sketches): the same users counted
    merged = [context.merge_sketches(sketches[:3]), context.merge_sketches(sketches[3:])]
    assert context.estimate_distinct(merged) == context.estimate_distinct(sketches)
    assert len(context.merge_sketches(merged)) == context.SKETCH


def test_a_neighbour_list_is_counted_from_one_open_of_its_file(tmp_path):
    """Its users' sketch and its list entries from one footer read, not one each."""
    import fsspec
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from optirag.ids import user_hash

    class Opens(pafs.FSSpecHandler):
        opened = 0

        def open_input_file(self, path):
            Opens.opened += 1
            return super().open_input_file(path)

    users = np.arange(1000, 4000, dtype=np.int64)
    lists = [list(range(u % 7 + 1)) for u in users.tolist()]
    path = str(tmp_path / "lists.parquet")
    pq.write_table(pa.table({S.USER_ID: users, S.NEIGHBOR_IDS: lists}), path, row_group_size=700)
    fs = pafs.PyFileSystem(Opens(fsspec.filesystem("file")))
    sketch, entries = context._census((context.LISTS, (fs, path)))
    assert Opens.opened == 1
    assert entries == sum(map(len, lists))
    assert np.array_equal(sketch, np.unique(user_hash(users))[: context.SKETCH])


def test_blocks_are_sized_by_the_rows_they_hold_not_by_users():
    """A block receives its users' rows and a copy of each of their neighbours' rows per
    listing block: with blocks sized by users, 10x the users held +8% rows a block (the
    largest worker grew with the users); sized by rows (`context_blocks`) it stays flat."""
    from optirag.ids import range_of

    def rows_per_block(users: int, blocks: int, k: int = 10) -> float:
        """A block's rows in users' worth: its users', and one copy of a neighbour's per
        other block listing them (as `_edges` and `_fan_out` route them)."""
        rng = np.random.default_rng(0)
        ids = rng.choice(10**12, users, replace=False)
        listers = np.repeat(range_of(ids, blocks), k)
        neighbours = ids[rng.integers(0, users, users * k)]
        away = listers != range_of(neighbours, blocks)
        copies = np.unique(np.stack([neighbours[away], listers[away]], 1), axis=0)
        return (users + len(copies)) / blocks

    assert context.context_blocks(10**6, 0, 20_000) == 50  # no neighbours: by users
    small, large = 20_000, 200_000
    by_users = [rows_per_block(n, n // 400) for n in (small, large)]
    assert by_users[1] / by_users[0] > 1.07  # what went wrong: +8%
    blocks = [context.context_blocks(n, 10 * n, 400) for n in (small, large)]
    assert blocks[0] < small // 400 and blocks[1] <= large // 400
    by_rows = [rows_per_block(n, b) for n, b in zip((small, large), blocks, strict=True)]
    assert abs(by_rows[1] / by_rows[0] - 1) < 0.02
    assert max(by_rows) <= 400 * 11 * 1.02  # the budget: 400 users copying 10 neighbours


def test_a_damaged_context_table_is_named_and_built_again(
    ray_session, local_storage, tiny_llama_dir, movie_tables
):
    """Issue 29: a corrupt context-table file was never rebuilt (every rerun failed) and a
    flipped byte gave "Corrupt snappy compressed data." with no path."""
    from pathlib import Path

    from optirag.ids import hash_range

    _write_inputs(local_storage, movie_tables, _candidates(n_users=2, per_user=2))
    cfg = _config(local_storage, tiny_llama_dir)
    inputs = runs.Inputs.from_config(cfg)

    def build():
        return context.build(cfg, inputs.history, inputs.items, inputs.neighbors)

    tables = build()
    users = np.arange(1, 7)
    low, high = hash_range(0, 1)
    assert len(tables.read_users(users, low, high, cfg.storage)) == 6
    part = Path(tables.paths.users_part(0))
    blob = bytearray(part.read_bytes())
    for i in range(4, len(blob) // 2):  # the data pages, the footer intact
        blob[i] ^= 0x5A
    part.write_bytes(bytes(blob))
    with pytest.raises(storage.StorageError, match=r"(?s)part-00000\.parquet.*rebuilt on the next"):
        tables.read_users(users, low, high, cfg.storage)
    again = build()
    assert again.paths.folder != tables.paths.folder
    assert len(again.read_users(users, low, high, cfg.storage)) == 6
    Path(again.item_files()[0]).unlink()  # a missing file: built again too
    third = build()
    assert third.paths.folder != again.paths.folder and Path(third.item_files()[0]).exists()


def test_a_block_cut_into_pieces_keeps_every_row_and_each_users_prefix():
    """Pieces of any size: every row once, and in each piece a user's first row to score
    carries their prefix (a user's rows may start with rejects, which have none)."""
    rng = np.random.default_rng(0)
    n = 60
    users = rng.integers(0, 6, n)
    reasons = [None if rng.random() < 0.7 else "duplicate_pair" for _ in range(n)]
    prefix_of, prefixes = {}, []
    for u, reason in zip(users.tolist(), reasons, strict=True):
        first = reason is None and u not in prefix_of
        prefix_of.setdefault(u, [u + 1] * 30) if first else None
        prefixes.append(prefix_of[u] if first else [])
    block = pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: np.arange(n),
            S.REASON: pa.array(reasons, pa.string()),
            S.PREFIX_IDS: pa.array(prefixes, pa.list_(pa.int32())),
            S.SUFFIX_IDS: pa.array([[7, 8, 9]] * n, pa.list_(pa.int32())),
            S.SIDE: pa.nulls(n, pa.list_(pa.float32())),
        }
    )
    for budget in (1, 64, 300, 10**6):
        pieces = cut_block(block, budget)
        assert (len(pieces) == 1) == (budget == 10**6)
        items = np.concatenate([p[S.ITEM_ID].to_numpy() for p in pieces])
        assert sorted(items.tolist()) == list(range(n))
        for piece in pieces:
            seen = set()
            for row in piece.to_pylist():
                if row[S.REASON] is None and row[S.USER_ID] not in seen:
                    seen.add(row[S.USER_ID])
                    assert row[S.PREFIX_IDS] == prefix_of[row[S.USER_ID]]


def test_per_file_results_are_combined_in_the_tasks(ray_session):
    """The driver gets one combined value per task (not one per file) and the same answer."""
    items = list(range(3 * parallel.SERIAL_BELOW + 5))  # several tasks

    def square(x):
        if x == 150:
            raise ValueError("item 150 is bad")
        return x * x

    fine = items[:150] + items[151:]
    assert parallel.in_tasks(square, fine) == [x * x for x in fine]
    assert parallel.combined_in_tasks(square, fine, sum) == sum(x * x for x in fine)
    assert parallel.combined_in_tasks(square, fine[:10], sum) == sum(x * x for x in fine[:10])
    with pytest.raises(ValueError, match="item 150 is bad"):
        parallel.combined_in_tasks(square, items, sum)


def test_keyed_shuffles_take_the_configured_input_per_map_task(ray_session):
    """What a shuffle parks in the object store before its map tasks start is bounded by
    compute.shuffle_batch_mib (128 MiB by default), and compute.disk_shuffle reaches
    Ray Data too; both give the same groups. The graph's share of the object store
    (compute.object_store_fraction) reaches Ray Data, or is Ray Data's own with None."""
    from optirag.config import ComputeConfig

    for disk, share in ((False, None), (True, 0.1)):
        compute = ComputeConfig(shuffle_batch_mib=2, disk_shuffle=disk, object_store_fraction=share)
        ds = parallel.task_ids(5, compute)
        assert ds.context.shuffle_input_batch_bytes == 2 << 20
        assert ds.context.use_disk_based_hash_shuffle == disk
        assert ds.context.override_object_store_memory_limit_fraction == share
        grouped = ds.groupby("id", num_partitions=2).map_groups(lambda g: g, batch_format="pyarrow")
        assert sorted(grouped.to_pandas()["id"]) == list(range(5))
    # a partition per block (a reduce task holds its partition), up to the cap
    blocks = [0, 1, 150, parallel.MAX_PARTITIONS, 10 * parallel.MAX_PARTITIONS]
    assert [parallel.shuffle_partitions(n) for n in blocks] == [1, 1, 150, 1000, 1000]


def test_each_group_has_a_shuffle_partition_of_its_own(ray_session, monkeypatch):
    """A reduce task holds its whole partition: keyed 0..n-1, groups collided in Ray Data's
    hash partitions (3 blocks in one at 10^6 users, 5 at 10^7) and the largest worker grew
    with the users. Routed keys give each group its own partition, or spread them evenly
    when there are more groups than partitions; checked through Ray Data's shuffle itself."""
    from optirag.config import ComputeConfig

    def groups_per_reduce_task(keys: np.ndarray, partitions: int) -> list[int]:
        ds = parallel.task_ids(len(keys), ComputeConfig()).map_batches(
            lambda b: {"key": keys[b["id"]]}, batch_size=None
        )
        held = ds.repartition(partitions, keys=["key"]).map_batches(
            lambda b: {"n": [len(np.unique(b["key"]))]}, batch_size=None
        )
        return sorted(n for n in held.to_pandas()["n"] if n)

    plain = groups_per_reduce_task(np.arange(45), 45)
    assert max(plain) >= 2  # what went wrong
    routes = parallel.ShuffleRoutes(45, "key")
    assert routes.partitions == 45
    assert groups_per_reduce_task(routes.keys, routes.partitions) == [1] * 45
    assert (routes.group(routes.key(np.arange(45))) == np.arange(45)).all()

    monkeypatch.setattr(parallel, "MAX_PARTITIONS", 16)  # more groups than partitions
    routes = parallel.ShuffleRoutes(40, "key")
    assert routes.partitions == 16 and len(set(routes.keys.tolist())) == 40
    assert groups_per_reduce_task(routes.keys, routes.partitions) == [2] * 8 + [3] * 8


def test_a_worker_keeps_one_builds_shared_inputs():
    """The items table, tokenizer and items' side are made once per build in a process, and a
    task of another build drops them (a long-lived worker does not keep every build's)."""
    made = []

    def make(value):
        return lambda: made.append(value) or value

    assert context._once_per_build("b1", "items", make("items 1")) == "items 1"
    assert context._once_per_build("b1", "items", make("again")) == "items 1"  # cached
    assert context._once_per_build("b2", "items", make("items 2")) == "items 2"
    assert context._once_per_build("b2", "side", make("side 2")) == "side 2"
    assert made == ["items 1", "items 2", "side 2"]
    assert "items 1" not in context._PER_BUILD.values()


_CHURN = """
import sys
import numpy as np
import pyarrow as pa
from optirag.pipelines.parallel import releasing

kept = []

def churn(n):
    heap = [np.ones(256) for _ in range(n)]  # 2 KiB chunks from glibc's heap
    pool = [pa.allocate_buffer(2048) for _ in range(n)]  # and from Arrow's pool
    kept.extend(heap[::256] + pool[::256])  # what is freed sits between survivors
    yield len(kept)

def status_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

churned = releasing(churn) if sys.argv[1] == "released" else churn
assert list(churned(100_000)) == [2 * 391]
print(status_kib("RssAnon") // 1024)
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or parallel._malloc_trim is None,
    reason="reads /proc; trims glibc's heap",
)
@pytest.mark.skipif(resource.getpagesize() != 4096, reason="sized for 4 KiB pages")
def test_a_group_task_hands_back_what_it_freed():
    """A shuffle's group function, wrapped in `releasing`, leaves its worker holding what
    survives it, not every page it ever touched: a worker runs hundreds of such tasks. The
    same churn (about 400 MiB of small chunks, one in 256 kept) without and with it."""
    anon_mib = {
        way: int(subprocess.check_output([sys.executable, "-c", _CHURN, way], text=True))
        for way in ("plain", "released")
    }
    assert anon_mib["released"] < anon_mib["plain"] - 150, anon_mib
