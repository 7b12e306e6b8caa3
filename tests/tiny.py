"""A tiny random FastBert with an in-memory word-level vocabulary, for fast unit tests.

Words are ``w0`` .. ``w{n-1}`` plus a few named ones; nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertTokenizer

from pipeline.model import FastBert, FastBertConfig

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NAMED = ["good", "bad", "great", "awful", "fine", "the", "movie", "was"]


def tiny_vocab(words: int = 60) -> list[str]:
    return SPECIAL + NAMED + [f"w{i}" for i in range(words)]


def tiny_tokenizer(words: int = 60) -> BertTokenizer:
    vocab = tiny_vocab(words)
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_model(
    labels=("neg", "pos"),
    num_layers: int = 3,
    hidden: int = 32,
    heads: int = 4,
    branch_width: int = 16,
    max_length: int = 32,
    seed: int = 0,
    attn: str = "sdpa",
    teacher_head: str = "pooler",
) -> FastBert:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    backbone = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attn_implementation=attn,
    ).to_dict()
    config = FastBertConfig(backbone=backbone, labels=list(labels), branch_width=branch_width, branch_heads=2,
                            max_length=max_length, teacher_head=teacher_head)
    return FastBert(config, tokenizer=tokenizer).eval()


def random_texts(rng, n: int, min_words: int = 1, max_words: int = 40, words: int = 60) -> list[str]:
    """n texts of random length drawn from the tiny vocabulary."""
    vocab = NAMED + [f"w{i}" for i in range(words)]
    return [" ".join(rng.choice(vocab, size=rng.integers(min_words, max_words + 1))) for _ in range(n)]
