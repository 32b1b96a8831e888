"""The text-embedding retrieval baseline the paper compares against: users embedded from the
text of their liked items (MiniLM, or the backbone's mean-pooled states), their cosine top-k
as neighbors/text-embed.parquet."""

from __future__ import annotations

import time

import numpy as np

from optirag import artifacts as A
from optirag import retriever as R
from optirag import schema as S
from optirag import storage, text_embed
from optirag.backbones import model_dir
from optirag.config import Config
from optirag.model_files import local_backbone
from optirag.pipelines.retrieval import user_universe


def run(cfg: Config) -> dict:
    store, root, rcfg = cfg.storage, cfg.storage.root, cfg.retriever
    train = storage.read_table(A.interactions_uri(root, "train"), store, S.INTERACTIONS)
    items = storage.read_table(A.items_uri(root), store, S.ITEMS)
    graph = R.build_graph(train, items)
    start = time.perf_counter()
    directory = (
        text_embed.minilm_dir()
        if rcfg.text_embedder == "minilm"
        else str(model_dir(local_backbone(cfg)))
    )
    user_ids, emb = text_embed.user_text_embeddings(train, items, directory)
    cold = np.setdiff1d(user_universe(root, store), user_ids)
    table = R.neighbor_table(
        user_ids,
        emb,
        cold,
        R.popular_users(graph),
        rcfg.num_neighbors,
        rcfg.block_size,
        R.SOURCE_TEXT,
    )
    storage.write_table(table, A.neighbors_uri(root, R.SOURCE_TEXT), store)
    return {
        "neighbors": table.num_rows,
        "seconds": round(time.perf_counter() - start, 2),
        "embedder": rcfg.text_embedder,
    }
