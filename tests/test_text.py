"""Tokenisation without transformers gives the Hugging Face tokenizer's ids, and the CPU tasks
of the scoring and training jobs can import and run what they run without importing torch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from pipeline.datasets import bundled_backbone_path
from pipeline.text import distillation_views, load_tokenizer, tokenize, training_rows, view_rows
from tiny import tiny_model

TEXTS = [
    "Shares of ACME Corp. rose 4.5% on Tuesday, traders said.",
    "  leading and trailing spaces  ",
    "Crème brûlée, naïve café: ÀÉÎÕÜ accents",
    "東京の株式市場は上昇した 北京 上海",
    "emoji 😀🚀 and symbols ™ © ∑ ≠",
    "a [SEP] inside [CLS] the text [MASK] [PAD]",
    "tabs\tand\nnew\r\nlines",
    "word " * 300,  # longer than max_length: truncated
    "x",
]


def _hf_ids(tokenizer, texts, max_length):
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)
    return enc["input_ids"], [bool(e.overflowing) for e in enc.encodings]


@pytest.mark.parametrize("max_length", [8, 128])
def test_the_bundled_tokenizer_without_transformers_matches_the_wrapper(tmp_path, max_length):
    hf = AutoTokenizer.from_pretrained(bundled_backbone_path())
    hf.save_pretrained(str(tmp_path))  # what FastBert.save_pretrained writes beside the weights
    ids, errors, truncated = tokenize(load_tokenizer(str(tmp_path)), TEXTS, max_length)
    expected_ids, expected_truncated = _hf_ids(hf, TEXTS, max_length)
    assert ids == expected_ids
    assert truncated.tolist() == expected_truncated
    assert errors == [None] * len(TEXTS)
    assert truncated[TEXTS.index("word " * 300)] and max(map(len, ids)) == max_length


def test_the_wrapper_is_used_through_its_backend_whatever_it_was_set_to_before(tmp_path):
    model = tiny_model()
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8", "good", None, "   "]
    model.tokenizer(["w1", "w1 w2 w3"], padding="max_length", max_length=20, truncation=True)  # leaves padding on
    ids, errors, truncated = tokenize(model.tokenizer, texts, 5)
    expected_ids, expected_truncated = _hf_ids(model.tokenizer, texts[:2], 5)
    assert ids[:2] == expected_ids and ids[2:] == [None, None]  # unpadded, cut to 5
    assert truncated.tolist() == expected_truncated + [False, False] == [True, False, False, False]
    assert errors == [None, None, "text is null", "text is empty"]
    model.save_pretrained(str(tmp_path / "m"))
    assert tokenize(load_tokenizer(str(tmp_path / "m")), texts, 5)[0] == ids


def test_a_folder_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_training_rows_are_the_hugging_face_tokenizers_ids():
    hf = AutoTokenizer.from_pretrained(bundled_backbone_path())
    texts = TEXTS + [""]  # a blank text trains as [CLS] [SEP]
    names = ["b", "a"] * (len(texts) // 2) + ["b"] * (len(texts) % 2)
    batch = pa.table({"text": texts, "label": names})
    rows = training_rows(batch, hf.backend_tokenizer, "text", "label", ["a", "b"], 16)
    expected = hf(texts, truncation=True, max_length=16)["input_ids"]  # the Hugging Face wrapper's ids
    assert [r.tolist() for r in rows["input_ids"]] == expected
    assert rows["input_ids"][0].dtype == np.int32 and len(rows["input_ids"][-1]) == 2
    assert rows["labels"].dtype == np.int64 and rows["labels"].tolist() == [["a", "b"].index(n) for n in names]
    unlabelled = training_rows(batch.select(["text"]), hf.backend_tokenizer, "text", "label", None, 16)
    assert set(unlabelled) == {"input_ids"}
    ints = training_rows(pa.table({"t": ["x", "y"], "l": [12, 2]}), hf, "t", "l", ["12", "2"], 16)
    assert ints["labels"].tolist() == [0, 1]  # integer labels are named by their strings
    with pytest.raises(ValueError, match=r"column 'l': labels \['7'\] are not the model's \['12', '2'\]"):
        training_rows(pa.table({"t": ["x", "y"], "l": [12, 7]}), hf, "t", "l", ["12", "2"], 16)
    with pytest.raises(ValueError, match="column 't', row 1 of a batch: expected a string, got None"):
        training_rows(pa.table({"t": ["x", None], "l": [12, 2]}), hf, "t", "l", ["12", "2"], 16)


def test_distillation_views_are_the_text_its_later_windows_and_spans_of_its_words():
    hf = AutoTokenizer.from_pretrained(bundled_backbone_path())
    long = " ".join(f"Word{i}, item {i}." for i in range(40))  # ~160 tokens: windows of 16 beyond the first
    short = "the quick brown fox jumps over the lazy dog"
    texts = [long, short, "two words", ""]
    views = distillation_views(hf, texts, 5, 16, seed=7)
    content = [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    # the long text, then its next 4 windows of 14 tokens (16 with [CLS] and [SEP]), nothing else
    assert views[:5] == [long] + views[1:5]
    assert [hf(v, add_special_tokens=False)["input_ids"] for v in views[1:5]] == \
        [content[0][14 * k : 14 * (k + 1)] for k in range(1, 5)]
    assert all(v in long for v in views[1:5])
    # the short one (a single window): itself, then 4 random spans of 3 or more of its words, in order
    assert views[5] == short
    words = short.split()
    for span in views[6:10]:
        n = len(span.split())
        assert 3 <= n <= 8 and any(words[i : i + n] == span.split() for i in range(len(words) - n + 1)), span
    assert len(set(views[6:10])) > 1
    assert views[10:] == ["two words", ""]  # under 4 words and one window: the text alone
    # the same views for the same seed and text (in any batch, through the Rust tokenizer too), others for another seed
    assert distillation_views(hf.backend_tokenizer, [short], 5, 16, seed=7) == views[5:10]
    assert distillation_views(hf, [short], 5, 16, seed=8) != views[5:10]
    assert distillation_views(hf, texts, 1, 16) == texts
    assert view_rows(pa.table({"t": texts}), hf.backend_tokenizer, "t", 5, 16, 7).column("t").to_pylist() == views


def test_the_cpu_tasks_of_the_scoring_and_training_jobs_import_no_torch():
    # the training job's map_batches ships its tokenizer pickled, as Ray does with fn_kwargs;
    # the task unpickles it (this test's own bytes) and tokenises
    backend = pickle.dumps(AutoTokenizer.from_pretrained(bundled_backbone_path()).backend_tokenizer)
    code = ("import pickle, sys, pyarrow as pa, pipeline.scoring, pipeline.text; "
            "rows = pipeline.text.training_rows(pa.table({'t': ['a b']}), pickle.loads(sys.stdin.buffer.read()), "
            "'t', 'l', None, 8); assert len(rows['input_ids'][0]) == 4, rows; "  # what the training job's tasks run
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], input=backend, capture_output=True, check=True, cwd=repo)
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
