from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pyarrow.fs import FileSelector
from safetensors.torch import load, load_file

from optirag import retriever as R
from optirag import schema as S
from optirag import storage
from optirag.config import ComputeConfig, RetrieverConfig, StorageConfig
from optirag.pipelines.retrieval import train_retriever


def _train_table(n_users=30, n_items=40, per_user=8, seed=0):
    """Two taste groups: even users like even items, odd users odd items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        pool = np.arange(u % 2, n_items, 2)
        for t, i in enumerate(rng.choice(pool, per_user, replace=False)):
            rows.append((u + 100, int(i) + 1000, 1, t))
    users, items, labels, ts = map(np.array, zip(*rows, strict=True))
    return pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.LABEL: labels.astype(np.int8),
            S.TS: ts,
            S.RATING: np.full(len(users), 5.0, np.float32),
        },
        schema=S.INTERACTIONS,
    )


def test_graph_and_blockwise_topk_equals_brute_force():
    graph = R.build_graph(_train_table())
    assert graph.num_users == 30 and graph.num_items == 40
    assert graph.edge_index().shape == (2, 2 * graph.edges.shape[1])
    emb = torch.randn(57, 8)
    idx, sims = R.top_k_neighbors(emb, k=5, block_size=7)
    unit = torch.nn.functional.normalize(emb, dim=1)
    full = unit @ unit.T
    full.fill_diagonal_(-float("inf"))
    brute = full.topk(5, dim=1)
    assert idx.shape == (57, 5)
    assert torch.equal(idx, brute.indices)
    torch.testing.assert_close(sims, brute.values)
    assert not (idx == torch.arange(57)[:, None]).any()  # self excluded


def test_neighbor_table_with_cold_start_fallback():
    graph = R.build_graph(_train_table())
    emb = torch.randn(graph.num_users, 8)
    universe = np.concatenate([graph.user_ids, [7, 8]])
    table = R.publish_neighbors(graph, emb, universe, RetrieverConfig(num_neighbors=4), "gcn")
    assert table.schema == S.NEIGHBORS and table.num_rows == 32
    rows = {r[S.USER_ID]: r for r in table.to_pylist()}
    assert all(len(r[S.NEIGHBOR_IDS]) == 4 for r in rows.values())
    assert rows[7][S.SOURCE] == "popular" and rows[100][S.SOURCE] == "gcn"
    assert rows[7][S.NEIGHBOR_IDS] == R.popular_users(graph)[:4].tolist()
    assert all(u not in r[S.NEIGHBOR_IDS] for u, r in rows.items())


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    store = StorageConfig(root=str(tmp_path_factory.mktemp("retriever")))
    train = _train_table()
    valid = _train_table(seed=1)
    graph = R.build_graph(train)
    cfg = RetrieverConfig(
        embedding_dim=16,
        num_layers=2,
        epochs=6,
        batch_size=64,
        lr=0.01,
        patience=10,
        run_name="tiny",
    )
    state, meta = train_retriever(graph, valid, cfg, ComputeConfig(train_workers=2), store)
    return store, graph, cfg, state, meta


def test_ray_train_two_workers_loss_goes_down(trained):
    store, graph, cfg, state, meta = trained
    losses = [h["loss"] for h in meta["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = sorted(Path(store.root, "retriever", "ray").glob("tiny-*/checkpoint_2*"))
    assert saved and (saved[-1] / "model.safetensors").exists()
    assert set(load_file(saved[-1] / "best.safetensors")) == set(state)


def test_learned_neighbors_share_taste(trained):
    _, graph, cfg, state, _ = trained
    model = R.new_model(graph, cfg.embedding_dim, cfg.num_layers)
    model.load_state_dict(state)
    emb = R.final_embeddings(model, graph.edge_index())[: graph.num_users]
    idx, _ = R.top_k_neighbors(emb, 3, 16)
    same = (graph.user_ids[idx.numpy()] % 2) == (graph.user_ids[:, None] % 2)
    assert same.mean() > 0.8


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_checkpoint_roundtrips_through_s3(ray_session, s3_storage):
    train = _train_table()
    graph = R.build_graph(train)
    cfg = RetrieverConfig(embedding_dim=8, num_layers=1, epochs=2, batch_size=128, run_name="s3run")
    state, meta = train_retriever(graph, train, cfg, ComputeConfig(train_workers=1), s3_storage)
    fs, path = storage.resolve(storage.join(s3_storage.root, "retriever/ray"), s3_storage)
    names = [i.path for i in fs.get_file_info(FileSelector(path, recursive=True))]
    best = [n for n in names if n.endswith("best.safetensors")]
    assert best, names
    with fs.open_input_stream(sorted(best)[-1]) as f:
        loaded = load(f.read())
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_worker_killed_resumes_from_checkpoint(ray_session, tmp_path):
    from tests.test_scoring import _kill_when

    store = StorageConfig(root=str(tmp_path / "s"))
    train = _train_table()
    graph = R.build_graph(train)
    cfg = RetrieverConfig(
        embedding_dim=8,
        num_layers=1,
        epochs=15,
        batch_size=16,
        patience=100,
        run_name="killed",
        max_failures=2,
    )
    run_dir = Path(store.root, "retriever", "ray")
    # Kill once the controller has registered a checkpoint (it then writes this snapshot).
    killed = _kill_when(
        lambda: any(run_dir.glob("killed-*/checkpoint_manager_snapshot.json")), "RayTrainWorker"
    )
    state, meta = train_retriever(graph, train, cfg, ComputeConfig(train_workers=2), store)
    assert killed.is_set()
    assert meta["resumes"] >= 1 and meta["epoch"] == 15
    assert [h["epoch"] for h in meta["history"]] == list(range(15))
