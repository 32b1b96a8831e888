"""The retrieval job: train LightGCN with Ray Train (DDP over shards of the liked edges, BPR),
then write the retriever (embeddings + meta) and the similar-user table neighbors/gcn.parquet
for every user the scorer may meet (cold ones get the popular-users fallback)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import ray.train
import torch
from ray.train.torch import prepare_model

from optirag import artifacts as A
from optirag import retriever as R
from optirag import schema as S
from optirag import storage
from optirag.config import ComputeConfig, Config, RetrieverConfig, StorageConfig
from optirag.head_training import optimizer_step
from optirag.pipelines.ray_train import close_epoch, fit, my_batches, restore


def retriever_loop(config: dict) -> None:
    """Ray Train worker loop: BPR on this worker's shard of the liked edges."""
    cfg: RetrieverConfig = config["retriever"]
    graph: R.Graph = config["graph"]
    valid = config["valid"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model = R.new_model(graph, cfg.embedding_dim, cfg.num_layers)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    meta, best_state = restore(model, opt)
    model = prepare_model(model)
    edge_index = graph.edge_index()
    edges = torch.as_tensor(graph.edges)
    per_worker = max(1, cfg.batch_size // world)

    for epoch in range(meta["epoch"], cfg.epochs):
        neg_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + rank)
        losses = []
        model.train()
        for rows in my_batches(edges.shape[1], cfg.seed, epoch, per_worker):
            loss = R.bpr_step(
                model,
                edge_index,
                edges[:, rows],
                graph.num_users,
                graph.num_items,
                cfg.weight_decay,
                neg_gen,
            )
            losses.append(optimizer_step(opt, loss))
        inner = model.module if hasattr(model, "module") else model
        metrics = R.ranking_metrics(
            R.final_embeddings(inner, edge_index), graph, valid, cfg.eval_k, cfg.block_size
        )
        metrics.update(epoch=epoch, loss=sum(losses) / max(len(losses), 1))
        score = metrics[f"ndcg@{cfg.eval_k}"]
        best_state, stop = close_epoch(meta, metrics, score, inner, best_state, opt, cfg.patience)
        if stop:
            break


def train_retriever(
    graph, valid, cfg: RetrieverConfig, compute: ComputeConfig, store: StorageConfig
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit LightGCN with Ray Train; returns the best state dict and the run's meta."""
    config = {"retriever": cfg, "graph": graph, "valid": valid}
    # The run name carries the config hash: an identical rerun resumes, a changed one doesn't.
    digest = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()
    name = f"{cfg.run_name}-{digest[:8]}"
    return fit(retriever_loop, config, name, "retriever", compute, store, cfg.max_failures)


def user_universe(root: str, store: StorageConfig) -> np.ndarray:
    """Every user id the scorer may meet: interactions of all splits and candidates."""
    ids = []
    sources = [A.interactions_uri(root, s) for s in ("train", "valid", "test")]
    sources += [A.candidates_uri(root, s) for s in ("valid", "test")]
    for uri in sources:
        if storage.exists(uri, store):
            ids.append(storage.read_table(uri, store, columns=[S.USER_ID])[S.USER_ID].to_numpy())
    return np.unique(np.concatenate(ids))


def run(cfg: Config) -> dict:
    """Train LightGCN with Ray Train, then write the retriever and neighbors/gcn.parquet."""
    store, root, rcfg = cfg.storage, cfg.storage.root, cfg.retriever
    train = storage.read_table(A.interactions_uri(root, "train"), store, S.INTERACTIONS)
    valid = storage.read_table(A.interactions_uri(root, "valid"), store, S.INTERACTIONS)
    items = storage.read_table(A.items_uri(root), store, S.ITEMS)
    graph = R.build_graph(train, items)
    state, meta = train_retriever(graph, valid, rcfg, cfg.compute, store)

    model = R.new_model(graph, rcfg.embedding_dim, rcfg.num_layers)
    model.load_state_dict(state)
    emb = R.final_embeddings(model, graph.edge_index())
    report = {
        "best_epoch": meta.get("best_epoch"),
        "epochs_run": meta["epoch"],
        "resumes": meta["resumes"],
        "valid": meta["history"][meta.get("best_epoch", -1)],
    }
    test_uri = A.interactions_uri(root, "test")
    if storage.exists(test_uri, store):
        test = storage.read_table(test_uri, store, S.INTERACTIONS)
        report["test"] = R.ranking_metrics(emb, graph, test, rcfg.eval_k, rcfg.block_size)
        report["test_most_popular"] = R.popularity_metrics(graph, test, rcfg.eval_k)

    ids = {"user_ids": graph.user_ids.tolist(), "item_ids": graph.item_ids.tolist()}
    A.save_retriever(emb, {**report, **ids, "config": rcfg.model_dump()}, root, store)
    table = R.publish_neighbors(
        graph, emb[: graph.num_users], user_universe(root, store), rcfg, R.SOURCE_GCN
    )
    storage.write_table(table, A.neighbors_uri(root, R.SOURCE_GCN), store)
    return {**report, "neighbors": table.num_rows}
