"""Odd but legal Parquet inputs (issue 26 §3): text stored dictionary-encoded (pandas'
categorical), as large_string or string_view, zero-row files whose columns have the null type
(pandas' empty frame), and a folder that mixes these. Spark reads each as one string column;
the scoring job (on a real local Ray, with a tiny random FastBERT), the training job's input
check and the evaluation's reader must too. Also: the output names the label of every entry
of ``probabilities``, and ``_summary.json`` keys ``exit_counts`` by layer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import Scorer, uncertainty
from pipeline.scoring import LABELS_METADATA, ScoreJobConfig, plan, read_chunk, run
from test_train import LABELS, toy_task
from tiny import tiny_model

ray = pytest.importorskip("ray")

try:
    import pandas as pd
except ImportError:  # pragma: no cover - the pyarrow equivalents below stand in
    pd = None

SEED = 4  # the tiny model's
BAD = [None, "", "good w1 w2"]  # a null and an empty text, and a normal one


def _speed(texts: list[str]) -> float:
    """A speed at which some rows leave early and no row's uncertainty at any layer is within
    float noise of it (the replicas batch rows differently from the in-process Scorer)."""
    model = tiny_model(labels=LABELS, seed=SEED).eval()
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        values = uncertainty(model(enc["input_ids"], enc["attention_mask"]).logits).numpy().ravel()  # (L * B,)
    first = np.sort(values[: len(texts)])  # layer 1
    low, high = first[len(first) // 4], first[3 * len(first) // 4]
    inside = np.sort(values[(values >= low) & (values <= high)])
    k = int(np.argmax(np.diff(inside)))  # the widest gap among all layers' values in that range
    return float((inside[k] + inside[k + 1]) / 2)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A FastBERT folder and a folder of odd files; returns (root, files in name order with
    their rows as {id, text, tag}). Carried columns: id (int64; double in the empty file), tag
    (categorical, string, large_string, a dictionary of uint8), note (all nulls in one file)."""
    root = tmp_path_factory.mktemp("odd")
    tiny_model(labels=LABELS, seed=SEED).save_pretrained(str(root / "model"))
    texts, _ = toy_task(np.random.default_rng(3), 40)
    texts = texts + texts[:6]  # repeats, so the dictionaries share entries
    data = root / "data"
    data.mkdir()
    files: dict[str, list[str | None]] = {
        "a-empty.parquet": [],  # first: it must not fix the carried columns' types
        "b-categorical.parquet": texts[:14],  # two row groups
        "c-large.parquet": texts[14:22] + BAD,
        "d-view.parquet": texts[22:30],
        "e-dict-int64.parquet": texts[30:38],
        "f-string.parquet": texts[38:],
    }
    ids, start = {}, 0
    for name, rows in files.items():
        ids[name] = list(range(start, start + len(rows)))
        start += len(rows)
    tags = {name: [f"t{i % 3}" for i in ids[name]] for name in files}
    notes = {name: [f"n{i}" for i in ids[name]] for name in files}

    if pd is not None:  # what pandas writes: an empty frame, a categorical
        pd.DataFrame({"id": [], "text": pd.Series([], dtype=object), "tag": [], "note": []}).to_parquet(
            data / "a-empty.parquet")
        pd.DataFrame({"id": ids["b-categorical.parquet"], "text": pd.Categorical(files["b-categorical.parquet"]),
                      "tag": pd.Categorical(tags["b-categorical.parquet"]),
                      "note": notes["b-categorical.parquet"]}).to_parquet(data / "b-categorical.parquet",
                                                                            row_group_size=7)
    else:
        pq.write_table(pa.table({"id": pa.array([], pa.float64()), "text": pa.array([], pa.null()),
                                 "tag": pa.array([], pa.float64()), "note": pa.array([], pa.float64())}),
                       data / "a-empty.parquet")
        b = "b-categorical.parquet"
        pq.write_table(pa.table({"id": ids[b], "text": pa.array(files[b]).dictionary_encode(),
                                 "tag": pa.array(tags[b]).dictionary_encode(), "note": notes[b]}),
                       data / b, row_group_size=7)
    c, d, e, f = "c-large.parquet", "d-view.parquet", "e-dict-int64.parquet", "f-string.parquet"
    pq.write_table(pa.table({"id": ids[c], "text": pa.array(files[c], pa.large_string()),
                             "tag": pa.array(tags[c], pa.large_string()), "note": notes[c]}), data / c)
    pq.write_table(pa.table({"id": ids[d], "text": pa.array(files[d], pa.string_view()), "tag": tags[d],
                             "note": pa.array([None] * len(files[d]), pa.null())}), data / d)
    pq.write_table(pa.table({"id": ids[e],
                             "text": pa.array(files[e], pa.large_string()).dictionary_encode().cast(
                                 pa.dictionary(pa.int64(), pa.large_string())),
                             "tag": pa.array(tags[e]).dictionary_encode().cast(pa.dictionary(pa.uint8(), pa.string())),
                             "note": notes[e]}), data / e)
    pq.write_table(pa.table({"id": ids[f], "text": files[f], "tag": tags[f], "note": notes[f]}), data / f)

    stored = {name: pq.read_schema(data / name) for name in files}
    assert pa.types.is_null(stored["a-empty.parquet"].field("text").type)
    assert not pa.types.is_integer(stored["a-empty.parquet"].field("id").type)  # pandas: double
    assert pa.types.is_dictionary(stored["b-categorical.parquet"].field("text").type)
    assert stored["c-large.parquet"].field("text").type == pa.large_string()
    assert stored["d-view.parquet"].field("text").type == pa.string_view()
    assert stored["e-dict-int64.parquet"].field("text").type.index_type == pa.int64()
    assert pq.ParquetFile(data / "b-categorical.parquet").metadata.num_row_groups == 2
    rows = {"id": [i for n in files for i in ids[n]], "text": [t for n in files for t in files[n]],
            "tag": [t for n in files for t in tags[n]],
            "note": [None if n == d else x for n in files for x in notes[n]]}
    return root, rows


def job(root, output, **changes) -> ScoreJobConfig:
    settings = dict(model=str(root / "model"), input=[str(root / "data")], output=str(output), replicas="1",
                    micro_batch=4, cpus_per_replica=0.5, precision="fp32")
    return ScoreJobConfig(**{**settings, **changes})


def read_output(output) -> pa.Table:
    """The output folder as one table, files in name order (pyarrow skips _ and . names)."""
    return pa.concat_tables(pq.read_table(f) for f in sorted(pds.dataset(str(output), format="parquet").files))


@pytest.fixture(scope="module")
def scored(ray_session, odd, tmp_path_factory):
    root, rows = odd
    speed = _speed([t for t in rows["text"] if t])
    output = tmp_path_factory.mktemp("scored") / "out"
    return output, speed, run(job(root, output, speed=speed))


def test_odd_files_in_one_folder_score_every_row_once_like_the_engine(scored, odd):
    output, speed, summary = scored
    _, rows = odd
    out = read_output(output)
    assert out.column_names == ["id", "text", "tag", "note", "prediction", "probabilities", "exit_layer",
                                "uncertainty", "error"]
    # the carried text-like columns come out as plain string, whatever flavour each file held
    assert [out.schema.field(n).type for n in ("id", "text", "tag", "note")] == [pa.int64(), pa.string(),
                                                                                 pa.string(), pa.string()]
    for name in ("id", "text", "tag", "note"):  # every row once, in file and row order
        assert out.column(name).to_pylist() == rows[name], name

    expected = Scorer(tiny_model(labels=LABELS, seed=SEED), precision="fp32", speed=speed, micro_batch=8)(rows["text"])
    for name in ("prediction", "exit_layer", "error"):
        assert out.column(name).to_pylist() == expected.column(name).to_pylist(), name
    got = np.array([p or [0.0, 0.0] for p in out.column("probabilities").to_pylist()])
    want = np.array([p or [0.0, 0.0] for p in expected.column("probabilities").to_pylist()])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert out.column("error").to_pylist().count("text is null") == 1
    assert out.column("error").to_pylist().count("text is empty") == 1
    assert summary["rows_in"] == summary["rows_out"] == len(rows["id"]) == 49
    assert summary["files"] == 5  # the empty file adds no work


def test_the_output_names_the_labels_and_the_summary_keys_exits_by_layer(scored, odd):
    output, speed, summary = scored
    _, rows = odd
    for piece in sorted(output.glob("part-*.parquet")):
        schema = pq.read_schema(piece)
        assert json.loads(schema.metadata[LABELS_METADATA.encode()]) == list(LABELS), piece.name
        assert json.loads(schema.field("probabilities").metadata[LABELS_METADATA.encode()]) == list(LABELS)
    dataset_schema = pds.dataset(str(output), format="parquet").schema
    assert json.loads(dataset_schema.metadata[LABELS_METADATA.encode()]) == list(LABELS)
    # the label of probabilities[i] is labels[i]: the prediction is the label of the largest
    out = read_output(output).to_pydict()
    for prediction, probabilities in zip(out["prediction"], out["probabilities"]):
        if probabilities is not None:
            assert prediction == LABELS[int(np.argmax(probabilities))]

    exits = [e for e in Scorer(tiny_model(labels=LABELS, seed=SEED), precision="fp32", speed=speed)(rows["text"])
             .column("exit_layer").to_pylist() if e is not None]
    assert summary["labels"] == list(LABELS)
    assert summary["exit_counts"] == {str(k): exits.count(k) for k in (1, 2, 3)}
    assert summary["exit_counts"]["1"] > 0 and sum(summary["exit_counts"].values()) == 47  # some left early
    on_disk = json.loads((output / "_summary.json").read_text())
    assert on_disk["labels"] == list(LABELS) and on_disk["exit_counts"] == summary["exit_counts"]


def test_only_empty_files_score_to_an_empty_output(ray_session, odd, tmp_path):
    root, _ = odd
    summary = run(job(root, tmp_path / "out", input=[str(root / "data" / "a-empty.parquet")]))
    assert summary["rows_in"] == summary["rows_out"] == 0
    assert summary["exit_counts"] == {"1": 0, "2": 0, "3": 0} and summary["labels"] == list(LABELS)
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_each_odd_file_alone_plans_plain_string_columns(odd):
    root, _ = odd
    for name in ("a-empty.parquet", "b-categorical.parquet", "c-large.parquet", "d-view.parquet",
                 "e-dict-int64.parquet"):
        work = plan(job(root, root / "never", input=[str(root / "data" / name)]), labels=list(LABELS))
        assert work.carried.field("text").type == pa.string(), name
        assert work.carried.field("tag").type == pa.string() or name == "a-empty.parquet", name
        assert sum(c.rows for c in work.chunks) == pq.ParquetFile(root / "data" / name).metadata.num_rows
        assert work.output_schema.metadata == {LABELS_METADATA.encode(): json.dumps(list(LABELS)).encode()}


def test_blocks_of_every_flavour_have_the_same_schema(odd):
    root, _ = odd
    schemas = set()
    for name in ("b-categorical.parquet", "c-large.parquet", "d-view.parquet", "e-dict-int64.parquet",
                 "f-string.parquet"):
        chunk = {"uri": np.array([str(root / "data" / name)]), "file": np.array([0]), "row_group": np.array([0]),
                 "first_row": np.array([0])}
        for block in read_chunk(chunk, columns=["id", "text", "tag"], text_column="text", rows_per_block=4):
            schemas.add(block.schema)
    assert schemas == {pa.schema([("id", pa.int64()), ("text", pa.string()), ("tag", pa.string()),
                                  ("__text", pa.string()), ("__file", pa.int32()), ("__group", pa.int32()),
                                  ("__row", pa.int64())])}


def test_genuinely_wrong_types_are_still_refused_naming_file_and_column(odd, tmp_path):
    root, _ = odd
    output = tmp_path / "out"
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(ValueError, match="ints.parquet: text column 'text' must hold strings, it holds int64$"):
        run(job(root, output, input=[str(ints)]))
    raw = tmp_path / "raw.parquet"  # bytes are no strings in any flavour
    pq.write_table(pa.table({"text": pa.array([b"good w1"], pa.large_binary()).dictionary_encode()}), raw)
    with pytest.raises(ValueError, match=r"raw.parquet: text column 'text' must hold strings, it holds "
                                         r"dictionary<values=binary"):
        run(job(root, output, input=[str(raw)]))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["good w1"]}), mixed / "a.parquet")
    pq.write_table(pa.table({"id": pa.array(["x"]).dictionary_encode(), "text": ["bad w2"]}), mixed / "b.parquet")
    with pytest.raises(ValueError) as info:
        run(job(root, output, input=[str(mixed)]))
    message = str(info.value)
    assert "b.parquet: column 'id' must be int64 like in " in message and "a.parquet" in message
    assert "it has dictionary<values=string" in message and "\n" not in message
    assert not output.exists()


def _labelled_folder(folder) -> tuple[list[str], list[str]]:
    """A labelled folder of odd files: a pandas-style empty file first, categorical texts and
    labels, large_string texts; returns its texts and labels in file order."""
    folder.mkdir()
    texts, labels = toy_task(np.random.default_rng(8), 12)
    pq.write_table(pa.table({"text": pa.array([], pa.null()), "label": pa.array([], pa.float64())}),
                   folder / "a-empty.parquet")
    pq.write_table(pa.table({"text": pa.array(texts[:6]).dictionary_encode(),
                             "label": pa.array(labels[:6]).dictionary_encode()}), folder / "b-categorical.parquet")
    pq.write_table(pa.table({"text": pa.array(texts[6:], pa.large_string()),
                             "label": pa.array(labels[6:], pa.large_string())}), folder / "c-large.parquet")
    return texts, labels


def test_training_input_check_accepts_odd_text_and_refuses_numbers(tmp_path):
    from pipeline.distributed import TrainJobConfig, check_inputs

    _, labels = _labelled_folder(tmp_path / "train")
    inputs = check_inputs(TrainJobConfig(train=str(tmp_path / "train"), validation=str(tmp_path / "train"),
                                         output=str(tmp_path / "out")))
    assert inputs.labels == sorted(set(labels)) and inputs.train_rows == inputs.validation_rows == 12
    pq.write_table(pa.table({"text": [1, 2, 3], "label": ["neg", "pos", "neg"]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="ints.parquet: text column 'text' must hold strings, it holds int64"):
        check_inputs(TrainJobConfig(train=str(tmp_path / "ints.parquet"), validation=str(tmp_path / "train"),
                                    output=str(tmp_path / "out")))


def test_evaluation_reads_odd_text_and_refuses_numbers(tmp_path):
    from pipeline.evaluate import EvaluateConfig, read_labelled

    texts, labels = _labelled_folder(tmp_path / "data")
    assert read_labelled(EvaluateConfig("m", str(tmp_path / "data"), str(tmp_path / "out")), list(LABELS)) == (
        texts, labels)
    pq.write_table(pa.table({"text": [1, 2], "label": ["neg", "pos"]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="ints.parquet: text column 'text' must hold strings, it holds int64"):
        read_labelled(EvaluateConfig("m", str(tmp_path / "ints.parquet"), str(tmp_path / "out")), list(LABELS))
