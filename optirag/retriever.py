"""LightGCN retriever: the user-item graph, BPR training steps, ranking metrics and the
similar-user (neighbour) table.

Nodes are users 0..U-1 then items U..U+I-1; edges are the liked training interactions, both
directions. The final embedding of a node is the mean of its embeddings over the layers
(PyG's LightGCN with the default alpha = 1 / (num_layers + 1)), as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch_geometric.nn.models import LightGCN

from optirag import schema as S
from optirag.ids import lookup

SOURCE_GCN = "gcn"
SOURCE_POPULAR = "popular"
SOURCE_TEXT = "text-embed"


@dataclass
class Graph:
    user_ids: np.ndarray  # (U,) external id of user node u
    item_ids: np.ndarray  # (I,) external id of item node U + i
    edges: np.ndarray  # (2, E) liked (user index, item index), item index not offset
    rated: np.ndarray  # (2, R) every training interaction, excluded when ranking

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def edge_index(self) -> torch.Tensor:
        """(2, 2E) message-passing edges over the joint node set, both directions."""
        u = torch.tensor(self.edges[0])
        i = torch.tensor(self.edges[1]) + self.num_users
        return torch.stack([torch.cat([u, i]), torch.cat([i, u])])

    def user_index(self, ids: np.ndarray) -> np.ndarray:
        """Node index per external user id, -1 where unknown."""
        return lookup(self.user_ids, ids)

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        return lookup(self.item_ids, ids)


def build_graph(train: pa.Table, items: pa.Table | None = None) -> Graph:
    """Users of the train split and all items (catalog + train) as nodes; likes as edges."""
    users = np.unique(train[S.USER_ID].to_numpy())
    item_sources = [train[S.ITEM_ID].to_numpy()]
    if items is not None:
        item_sources.append(items[S.ITEM_ID].to_numpy())
    item_ids = np.unique(np.concatenate(item_sources))
    u = np.searchsorted(users, train[S.USER_ID].to_numpy())
    i = np.searchsorted(item_ids, train[S.ITEM_ID].to_numpy())
    liked = train[S.LABEL].to_numpy() == 1
    edges = np.unique(np.stack([u[liked], i[liked]]), axis=1)  # liked twice: one edge
    return Graph(users, item_ids, edges, np.unique(np.stack([u, i]), axis=1))


def new_model(graph: Graph, embedding_dim: int, num_layers: int) -> LightGCN:
    return LightGCN(graph.num_users + graph.num_items, embedding_dim, num_layers)


def bpr_step(
    model: torch.nn.Module,
    edge_index: torch.Tensor,
    pos: torch.Tensor,  # (2, B) user index, item index
    num_users: int,
    num_items: int,
    weight_decay: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """BPR loss of a batch of positive edges against uniformly sampled negative items."""
    neg_items = torch.randint(0, num_items, (pos.shape[1],), generator=generator)
    users = pos[0]
    label_index = torch.stack(
        [torch.cat([users, users]), torch.cat([pos[1], neg_items]) + num_users]
    )  # (2, 2B)
    pos_rank, neg_rank = model(edge_index, label_index).chunk(2)
    inner = model.module if hasattr(model, "module") else model
    node_ids = torch.cat([users, pos[1] + num_users, neg_items + num_users])
    return inner.recommendation_loss(pos_rank, neg_rank, node_id=node_ids, lambda_reg=weight_decay)


@torch.no_grad()
def final_embeddings(model: LightGCN, edge_index: torch.Tensor) -> torch.Tensor:
    return model.get_embedding(edge_index)  # (U + I, D), averaged over layers


def ranking_metrics(
    embeddings: torch.Tensor, graph: Graph, heldout: pa.Table, k: int, block_size: int = 2048
) -> dict[str, float]:
    """Recall@k and NDCG@k of held-out liked items; items the user rated in training are
    excluded from the ranking."""
    liked = heldout.filter(pa.compute.equal(heldout[S.LABEL], 1))
    u = graph.user_index(liked[S.USER_ID].to_numpy())
    i = graph.item_index(liked[S.ITEM_ID].to_numpy())
    keep = (u >= 0) & (i >= 0)
    truth: dict[int, set[int]] = {}
    for a, b in zip(u[keep].tolist(), i[keep].tolist(), strict=True):
        truth.setdefault(a, set()).add(b)
    if not truth:
        return {f"recall@{k}": math.nan, f"ndcg@{k}": math.nan}
    seen: dict[int, list[int]] = {}
    for a, b in zip(graph.rated[0].tolist(), graph.rated[1].tolist(), strict=True):
        seen.setdefault(a, []).append(b)
    users_e, items_e = embeddings[: graph.num_users], embeddings[graph.num_users :]
    eval_users = sorted(truth)
    recall, ndcg = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for start in range(0, len(eval_users), block_size):
        block = eval_users[start : start + block_size]
        scores = users_e[block] @ items_e.T  # (B, I)
        for row, user in enumerate(block):
            scores[row, seen.get(user, [])] = -math.inf
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
        for user, ranked in zip(block, top, strict=True):
            hits = np.array([item in truth[user] for item in ranked], dtype=float)
            recall.append(hits.sum() / min(len(truth[user]), k))
            ideal = discounts[: min(len(truth[user]), k)].sum()
            ndcg.append((hits * discounts[: len(hits)]).sum() / ideal)
    return {f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg))}


def popularity_metrics(graph: Graph, heldout: pa.Table, k: int) -> dict[str, float]:
    """The same metrics for a most-popular-items ranking (the baseline LightGCN must beat)."""
    counts = np.bincount(graph.edges[1], minlength=graph.num_items).astype(np.float32)
    items = torch.as_tensor(counts)[:, None]
    users = torch.ones(graph.num_users, 1)
    return ranking_metrics(torch.cat([users, items]), graph, heldout, k)


def top_k_neighbors(
    user_embeddings: torch.Tensor, k: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours, self excluded, one block of users at a time, so memory
    is O(block_size x users). Returns (indices, similarities), each (U, k)."""
    unit = torch.nn.functional.normalize(user_embeddings.float(), dim=1)
    n = len(unit)
    k = min(k, n - 1)
    indices, sims = [], []
    for start in range(0, n, block_size):
        block = unit[start : start + block_size]
        scores = block @ unit.T  # (B, U)
        rows = torch.arange(len(block))
        scores[rows, rows + start] = -math.inf
        top = scores.topk(k, dim=1)
        indices.append(top.indices)
        sims.append(top.values)
    return torch.cat(indices), torch.cat(sims)


def neighbor_table(
    user_ids: np.ndarray,
    user_embeddings: torch.Tensor,
    cold_users: np.ndarray,
    popular_users: np.ndarray,
    k: int,
    block_size: int,
    source: str,
) -> pa.Table:
    """The neighbors table: embedded users by cosine; `cold_users` (no training likes)
    get the `popular_users` (most training likes) with similarity 0 and source 'popular'."""
    idx, sims = top_k_neighbors(user_embeddings, k, block_size)
    neighbor_ids = user_ids[idx.numpy()]
    fallback = [int(u) for u in popular_users[: k + 1]]
    cold_lists = [[v for v in fallback if v != u][:k] for u in cold_users.tolist()]
    return pa.table(
        {
            S.USER_ID: np.concatenate([user_ids, cold_users]).astype(np.int64),
            S.NEIGHBOR_IDS: [*neighbor_ids.tolist(), *cold_lists],
            S.SIMILARITIES: [*sims.numpy().tolist(), *[[0.0] * len(c) for c in cold_lists]],
            S.SOURCE: [source] * len(user_ids) + [SOURCE_POPULAR] * len(cold_users),
        },
        schema=S.NEIGHBORS,
    )


def popular_users(graph: Graph) -> np.ndarray:
    """Users by number of training likes, most first (ties by id): the cold-start fallback."""
    likes = np.bincount(graph.edges[0], minlength=graph.num_users)
    order = np.lexsort((graph.user_ids, -likes))
    return graph.user_ids[order][likes[order] > 0]


def warm_users(graph: Graph) -> np.ndarray:
    """Node indices of users with at least one training like (the others are cold)."""
    return np.unique(graph.edges[0])


def publish_neighbors(
    graph: Graph, user_embeddings: torch.Tensor, universe: np.ndarray, cfg, source: str
) -> pa.Table:
    """Neighbour table for every user in `universe` (cold ones via the popular fallback)."""
    warm = warm_users(graph)
    warm_ids = graph.user_ids[warm]
    cold = np.setdiff1d(universe, warm_ids)
    return neighbor_table(
        warm_ids,
        user_embeddings[warm],
        cold,
        popular_users(graph),
        cfg.num_neighbors,
        cfg.block_size,
        source,
    )
