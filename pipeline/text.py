"""Texts -> token ids, without torch or transformers.

The scoring job tokenises in Ray Data CPU tasks; this module is all those tasks import
besides pyarrow, so a tokenising worker starts in a fraction of a second (importing torch
and transformers took it about 2 CPU-seconds, on a 2-core machine the time of the replicas'
own start). Tokenisation runs on the Rust tokenizer that the Hugging Face fast tokenizer
wraps (``tokenizer.json`` in a model folder), with the settings the wrapper would pass it:
the ids are the same (``tests/test_engine.py`` checks them against the wrapper).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a model folder written by ``FastBert.save_pretrained``
    (local path or fsspec URI): for processes that tokenise and never run the model."""
    import fsspec
    from tokenizers import Tokenizer

    fs, root = fsspec.core.url_to_fs(path)
    file = f"{root.rstrip('/')}/{TOKENIZER_FILE}"
    if not fs.isfile(file):
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}; is it a folder written by FastBert.save_pretrained?")
    with fs.open(file, "rb") as f:
        return Tokenizer.from_buffer(f.read())


def tokenize(tokenizer, texts: Sequence[str | None], max_length: int
             ) -> tuple[list[list[int] | None], list[str | None], np.ndarray]:
    """Texts -> (token ids or None, error or None, truncated) per row, for
    ``Scorer.score_tokens``. ``tokenizer``: a ``tokenizers.Tokenizer`` or a Hugging Face fast
    tokenizer (its ``backend_tokenizer`` is used). A null, non-string or blank text gets an
    error, not token ids; a text longer than ``max_length`` tokens is cut to it (special
    tokens included) and flagged as truncated."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"expected a tokenizers.Tokenizer or a Hugging Face fast tokenizer, got {type(tokenizer)}")
    texts = _as_list(texts)
    errors = [_text_error(t) for t in texts]
    valid = [i for i, e in enumerate(errors) if e is None]
    token_ids: list[list[int] | None] = [None] * len(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    if valid:
        # what the Hugging Face wrapper sets for truncation=True, max_length=..., no padding
        # (it sets them again on each of its own calls, so sharing its backend is safe)
        truncation = {"max_length": max_length, "stride": 0, "strategy": "longest_first",
                      "direction": getattr(tokenizer, "truncation_side", "right")}
        current = backend.truncation
        if current is None or any(current.get(k) != v for k, v in truncation.items()):
            backend.enable_truncation(**truncation)
        if backend.padding is not None:
            backend.no_padding()
        encodings = backend.encode_batch([texts[i] for i in valid], add_special_tokens=True)
        for i, encoding in zip(valid, encodings):
            token_ids[i] = encoding.ids
            truncated[i] = bool(encoding.overflowing)
    return token_ids, errors, truncated


def _as_list(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise TypeError("Scorer expects a list of texts, got a single string: wrap it in a list")
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return texts.to_pylist()
    return list(texts)


def _text_error(text) -> str | None:
    """Why a text cannot be scored, or None when it can."""
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text is not a string (got {type(text).__name__})"
    if not text.strip():
        return "text is empty"
    return None
