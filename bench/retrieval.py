"""Retrievers on MovieLens-100k, in one run: time to build the neighbour table for all users
(GCN training reported separately), LightGCN test recall/NDCG@20 against most-popular, and
the LightGCN dot-product AUC on all test candidates.

    python bench/retrieval.py --config conf/demo.yaml [--llm-users 100]

The LLM embedder (mean-pooled SmolLM2 states) is timed on `--llm-users` users and the full
table time extrapolated linearly; the JSON says which figures are extrapolated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import artifacts as A  # noqa: E402
from optirag import retriever as R  # noqa: E402
from optirag import schema as S  # noqa: E402
from optirag import storage, text_embed  # noqa: E402
from optirag.backbones import model_dir  # noqa: E402
from optirag.baselines import lightgcn_scores  # noqa: E402
from optirag.cli import _init_ray  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.metrics import auc  # noqa: E402
from optirag.model_files import local_backbone  # noqa: E402
from optirag.pairs import Pairs  # noqa: E402
from optirag.pipelines import retrieval, text_neighbors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/demo.yaml")
    parser.add_argument("--llm-users", type=int, default=100)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_name = f"bench-{int(time.time())}"
    cfg = load_config(args.config, [*args.overrides, f"retriever.run_name={run_name}"])
    store, root = cfg.storage, cfg.storage.root
    _init_ray(cfg)

    start = time.perf_counter()
    report = retrieval.run(cfg)
    train_s = time.perf_counter() - start

    train = storage.read_table(A.interactions_uri(root, "train"), store)
    items = storage.read_table(A.items_uri(root), store)
    graph = R.build_graph(train, items)
    embeddings, meta = A.load_retriever(root, store)
    emb = torch.from_numpy(embeddings)
    universe = retrieval.user_universe(root, store)
    start = time.perf_counter()
    gcn_table = R.publish_neighbors(graph, emb[: graph.num_users], universe, cfg.retriever, "gcn")
    gcn_s = time.perf_counter() - start

    start = time.perf_counter()
    text_neighbors.run(cfg)
    minilm_s = time.perf_counter() - start

    docs = text_embed.user_documents(train, items)
    sample = sorted(docs)[: args.llm_users]
    start = time.perf_counter()
    text_embed.embed_texts([docs[u] for u in sample], str(model_dir(local_backbone(cfg))), 8)
    llm_sample_s = time.perf_counter() - start
    llm_full_s = llm_sample_s * len(docs) / len(sample)

    test = storage.read_table(A.candidates_uri(root, "test"), store)
    pairs = Pairs(test[S.USER_ID].to_numpy(), test[S.ITEM_ID].to_numpy(), test[S.LABEL].to_numpy())
    gcn_auc = auc(pairs.labels, lightgcn_scores(embeddings, meta, pairs.users, pairs.items))
    result = {
        "machine": machine(),
        "users": int(len(universe)),
        "neighbors_rows": gcn_table.num_rows,
        "gcn_train_s": round(train_s, 1),
        "gcn_neighbor_table_s": round(gcn_s, 3),
        "minilm_neighbor_table_s": round(minilm_s, 1),
        "llm_embedder_sample_users": len(sample),
        "llm_embedder_sample_s": round(llm_sample_s, 1),
        "llm_embedder_full_s_extrapolated": round(llm_full_s, 1),
        "gcn_speedup_vs_minilm": round(minilm_s / gcn_s, 1),
        "gcn_speedup_vs_llm_embedder": round(llm_full_s / gcn_s, 1),
        "lightgcn": report,
        "lightgcn_dot_auc_test": gcn_auc,
        "test_pairs": len(pairs),
    }
    rows = [
        (
            "LightGCN (Ray Train, 2 workers)",
            f"{gcn_s:.3f} (+ {train_s:.0f} training)",
            f"{report['test']['recall@20']:.3f}",
            f"{report['test']['ndcg@20']:.3f}",
        ),
        (
            "most popular items",
            "-",
            f"{report['test_most_popular']['recall@20']:.3f}",
            f"{report['test_most_popular']['ndcg@20']:.3f}",
        ),
        ("MiniLM text embedder", f"{minilm_s:.1f}", "-", "-"),
        (
            f"SmolLM2 mean-pooled (extrapolated from {len(sample)} users)",
            f"{llm_full_s:.0f}",
            "-",
            "-",
        ),
    ]
    write_results(
        "retrieval",
        result,
        rows,
        ("retriever", "neighbour table for all users (s)", "test recall@20", "test NDCG@20"),
    )
    print(f"LightGCN dot-product AUC on {len(pairs)} test pairs: {gcn_auc:.4f}")


if __name__ == "__main__":
    main()
