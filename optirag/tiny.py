"""A tiny random Llama and tokenizer, for tests and pipeline benchmarks (no hub, no weights).

The tokenizer is a byte-level BPE trained on a few sentences with the `tokenizers` library,
so any text tokenizes; ` Yes` and ` No` are added as single tokens, as they follow the
prompt's `Answer:` (the tiny tokenizer has no chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = [
    "You are a movie recommender. Answer Yes or No.",
    "The user liked: Toy Story (1995), GoldenEye (1995). The user disliked: Heat (1995).",
    "Similar users liked: Star Wars (1977), Fargo (1996), Contact (1997).",
    "Will the user like the item? Genres: Action, Comedy, Drama, Thriller, Romance.",
    "Item 0 1 2 3 4 5 6 7 8 9 Category",
]


def build_tiny_llama(
    directory: str | Path, num_layers: int = 6, hidden: int = 32, seed: int = 0
) -> Path:
    """Write a random Llama (safetensors) and its tokenizer to `directory`; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>"
    )
    tokenizer.add_tokens([" Yes", " No"])
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory
