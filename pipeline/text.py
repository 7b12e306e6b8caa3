"""Texts -> token ids, without torch or transformers.

The scoring and training jobs tokenise in Ray Data CPU tasks (``tokenize``,
``training_rows``); this module is all those tasks import besides pyarrow, so a tokenising
worker starts in a fraction of a second (importing torch and transformers took it about 2
CPU-seconds, on a 2-core machine the time of the replicas' own start). Tokenisation runs on
the Rust tokenizer that the Hugging Face fast tokenizer wraps (``tokenizer.json`` in a model
folder, or the wrapper's ``backend_tokenizer``), with the settings the wrapper would pass
it: the ids are the same (``tests/test_text.py`` checks them against the wrapper).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.outputs import UserError

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
    texts = _as_list(texts)
    errors = [_text_error(t) for t in texts]
    valid = [i for i, e in enumerate(errors) if e is None]
    token_ids: list[list[int] | None] = [None] * len(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    if valid:
        ids, cut = encode(tokenizer, [texts[i] for i in valid], max_length)
        for i, row, was_cut in zip(valid, ids, cut):
            token_ids[i] = row
            truncated[i] = was_cut
    return token_ids, errors, truncated


def training_rows(batch: pa.Table, tokenizer, text_column: str, label_column: str, labels: list[str] | None,
                  max_length: int) -> dict[str, np.ndarray]:
    """One Ray Data batch of a training input -> ``input_ids`` (per row, its token ids as an
    int32 array, unpadded, cut at ``max_length``) and, with ``labels`` (the model's label
    names), ``labels`` (int64 indices into them; integer labels are named by their strings).
    The training job's tokenising tasks run this, so they import no torch either. The job
    checked the input on the driver; a blank text still trains, as [CLS] [SEP]."""
    texts = batch.column(text_column).to_pylist()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"column {text_column!r}, row {i} of a batch: expected a string, got {text!r}")
    ids, _ = encode(tokenizer, texts, max_length)
    out = {"input_ids": np.empty(len(texts), dtype=object)}
    out["input_ids"][:] = [np.asarray(row, dtype=np.int32) for row in ids]
    if labels is not None:
        index = {name: i for i, name in enumerate(labels)}
        names = [str(v) for v in batch.column(label_column).to_pylist()]
        unknown = sorted({name for name in names if name not in index})
        if unknown:
            raise ValueError(f"column {label_column!r}: labels {unknown[:10]} are not the model's {labels[:10]}")
        out["labels"] = np.array([index[name] for name in names], dtype=np.int64)
    return out


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Strings -> token ids with special tokens, cut at ``max_length``, and whether each was cut."""
    encodings = _truncating(tokenizer, max_length).encode_batch(texts, add_special_tokens=True)
    return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]


def _truncating(tokenizer, max_length: int):
    """The Rust tokenizer of ``tokenizer``, set to cut at ``max_length`` tokens and not to pad."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"expected a tokenizers.Tokenizer or a Hugging Face fast tokenizer, got {type(tokenizer)}")
    # what the Hugging Face wrapper sets for truncation=True, max_length=..., no padding
    # (it sets them again on each of its own calls, so sharing its backend is safe)
    truncation = {"max_length": max_length, "stride": 0, "strategy": "longest_first",
                  "direction": getattr(tokenizer, "truncation_side", "right")}
    current = backend.truncation
    if current is None or any(current.get(k) != v for k, v in truncation.items()):
        backend.enable_truncation(**truncation)
    if backend.padding is not None:
        backend.no_padding()
    return backend


def distillation_views(tokenizer, texts: Sequence[str], views: int, max_length: int, seed: int = 0) -> list[str]:
    """Up to ``views`` texts to distil on from each text, so that stage 2 without unlabelled
    texts sees more than the labelled rows (the teacher labels each one): the text itself; the
    next windows of ``max_length`` tokens of a longer text (what the model never reads of it);
    then random spans of 30-90% of its words, drawn from ``seed`` and the text alone (the same
    views on every run and worker). A text of fewer than 4 words gets no spans; ``views`` 1
    gives the texts alone. On 1,000 labelled rows of each bundled set, 4 views raised the test
    FLOP speed-up of the speed chosen for 0.5 point from 2.45x to 3.38x on average
    (``benchmarks.speed_choice`` in benchmarks/RESULTS.md)."""
    texts = list(texts)
    if views <= 1:
        return texts
    out: list[str] = []
    for text, encoding in zip(texts, _truncating(tokenizer, max_length).encode_batch(texts, add_special_tokens=True)):
        mine = [text]
        for window in encoding.overflowing[: views - 1]:
            chars = [(start, end) for start, end in window.offsets if end > start]  # its tokens' characters
            if chars:
                mine.append(text[chars[0][0] : chars[-1][1]])
        words = text.split()
        rng = np.random.default_rng([seed, zlib.crc32(text.encode("utf-8", "surrogatepass"))])
        while len(mine) < views and len(words) >= 4:
            n = max(3, int(len(words) * rng.uniform(0.3, 0.9)))
            first = int(rng.integers(0, len(words) - n + 1))
            mine.append(" ".join(words[first : first + n]))
        out += mine
    return out


def view_rows(batch: pa.Table, tokenizer, text_column: str, views: int, max_length: int, seed: int) -> pa.Table:
    """Ray Data: a batch of texts -> the ``distillation_views`` of each (the text column only)."""
    texts = batch.column(text_column).to_pylist()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"column {text_column!r}, row {i} of a batch: expected a string, got {text!r}")
    return pa.table({text_column: pa.array(distillation_views(tokenizer, texts, views, max_length, seed), pa.string())})


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


# -- column types: one type per column, the way Spark reads a folder ------------------------------


def expand_inputs(specs: list[str]) -> list[str]:
    """Files named by ``specs`` (files, folders searched recursively for ``*.parquet``, or
    globs) as sorted URIs; names starting with ``_`` or ``.`` are skipped, as Parquet readers do.
    What an input means in every job."""
    import fsspec

    found = set()
    for spec in specs:
        try:
            fs, path = fsspec.core.url_to_fs(spec)
            if any(c in path for c in "*?["):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.find(path) if p.endswith(".parquet")]
            elif fs.exists(path):
                paths = [path]
            else:
                paths = []
        except Exception as e:  # unknown protocol, missing backend, unreachable endpoint
            raise UserError(f"{spec}: cannot be reached ({type(e).__name__}: {e}); check the URI, that its fsspec "
                             "backend is installed (s3fs, gcsfs, ...) and the credentials and network") from e
        for p in paths:
            if not p.rsplit("/", 1)[-1].startswith(("_", ".")) and not fs.isdir(p):
                found.add(fs.unstrip_protocol(p) if "://" in spec else p)
    if not found:
        raise UserError(f"no input files matched {specs}: --input takes Parquet files, folders (searched for "
                        "*.parquet) or globs; check the path")
    return sorted(found)


def parquet_dataset(spec: str, columns: list[str]):
    """A ``pyarrow.dataset`` over the Parquet files ``spec`` names (``expand_inputs``), with
    ``columns`` in their plain types (``plain_dataset``): the training and evaluation jobs read
    their inputs through it, so an input means there what it means to the scoring job."""
    import fsspec
    import pyarrow.dataset as pds

    files = expand_inputs([spec])
    fs = fsspec.core.url_to_fs(files[0])[0]
    paths = [fsspec.core.url_to_fs(f)[1] for f in files]
    return plain_dataset(pds.dataset(paths, format="parquet", filesystem=fs), columns)


def describe_columns(schema: pa.Schema) -> str:
    """``id: int64, text: string``: a file's columns as an error message lists them."""
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def plain_type(kind: pa.DataType) -> pa.DataType:
    """``kind`` without its storage flavour: a dictionary-encoded column (what pandas writes for
    a categorical) as its values, ``large_string`` and ``string_view`` as ``string``,
    ``large_binary`` and ``binary_view`` as ``binary``; any other type as it is. Files that
    differ only in these hold the same column."""
    if pa.types.is_dictionary(kind):
        return plain_type(kind.value_type)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return pa.binary()
    return kind


def is_text_type(kind: pa.DataType) -> bool:
    """Whether a column of this type holds strings: ``string``, ``large_string``,
    ``string_view``, or a dictionary of them (any index type)."""
    return plain_type(kind) == pa.string()


def plain_dataset(dataset, columns: list[str]):
    """A ``pyarrow.dataset`` Parquet dataset over the same files, read as one table with
    ``columns`` in their plain types (``plain_type``): files without rows are left out (pandas
    writes an empty frame's text as the null type: they neither fix a type nor fail on it),
    and the other files may store a column as ``string``, ``large_string`` or dictionary-encoded
    alike. pyarrow takes a folder's types from its first file, and failed on a string file
    after a null-typed empty one. The other columns keep the types of the first file with rows;
    a column of ``columns`` whose files hold types that differ beyond flavour (a null-typed
    column fits any) raises a one-line ValueError naming both files. With no rows anywhere,
    ``dataset`` itself is returned."""
    import pyarrow.dataset as pds

    fragments = [f for f in dataset.get_fragments() if f.metadata.num_rows]
    if not fragments:
        return dataset
    first = fragments[0].physical_schema
    types: dict[str, tuple[pa.DataType, str]] = {}  # column -> (its plain type, the file that fixed it)
    for fragment in fragments:
        schema = fragment.physical_schema
        for name in columns:
            if name not in schema.names:
                continue
            kind = plain_type(schema.field(name).type)
            seen = types.get(name)
            if seen is None or (pa.types.is_null(seen[0]) and not pa.types.is_null(kind)):
                types[name] = (kind, fragment.path)
            elif not pa.types.is_null(kind) and kind != seen[0]:
                raise UserError(f"{fragment.path}: column {name!r} holds {schema.field(name).type}, but "
                                 f"{seen[1]} holds {seen[0]}; a column must hold one type in every file")
    schema = pa.schema([f.with_type(types[f.name][0]) if f.name in types else f for f in first])
    return pds.dataset([f.path for f in fragments], schema=schema, format="parquet", filesystem=dataset.filesystem)
