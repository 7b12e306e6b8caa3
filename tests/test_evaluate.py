"""pipeline.evaluate and jobs.evaluate on tiny trained models: the numbers per speed equal the
engine's, truncation is compared on the same rows, the files are complete, bad input is a
clear error; and the lab's half (benchmarks.baselines): the plain classifier and the
label-trained students on the same rows, the engine's wall time."""

from __future__ import annotations

import csv
import re
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.evaluate import main, parse_args
from pipeline.outputs import UserError
from pipeline import Scorer
from benchmarks.baselines import (label_students_baseline, load_plain_bert, new_plain_bert, plain_bert_baseline,
                                  plain_bert_labels, plain_bert_predict, save_plain_bert, time_speeds,
                                  train_label_students, train_plain_bert, wall_speedups)
from pipeline.evaluate import (EvaluateConfig, _verdict, at_equal_flops, format_table, macro_f1, run_evaluation,
                               tabulate)
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits
from pipeline.train import TrainConfig, fit
from test_train import FAST, LABELS, accuracy, toy_task
from tiny import tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A self-distilled tiny FastBERT, one whose students learnt the labels, a plain classifier
    on the same tiny backbone, and labelled test rows as Parquet."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    train_texts, train_labels = toy_task(rng, 192)
    val_texts, val_labels = toy_task(rng, 64)
    paths = {}
    for name in ("distilled", "labels"):
        model = tiny_model(labels=LABELS, seed=0)
        fit(model, train_texts, train_labels, val_texts, val_labels,
            TrainConfig(epochs=3, distill_epochs=2 if name == "distilled" else 0, seed=0, **FAST), log=lambda *_: None)
        if name == "labels":  # baseline (c): the same stage 1, the students trained on the labels
            train_label_students(model, train_texts, train_labels, epochs=2, lr=FAST["distill_lr"], batch_size=16)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    backbone = root / "backbone"
    model.backbone.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    paths["plain"] = str(root / "plain")
    save_plain_bert(new_plain_bert(str(backbone), list(LABELS), max_length=32), paths["plain"])
    texts, labels = toy_task(np.random.default_rng(1), 120)
    paths["data"] = str(root / "test.parquet")
    pq.write_table(pa.table({"review": texts, "sentiment": labels}), paths["data"])
    return paths


def test_macro_f1_is_the_mean_of_the_labels_f1():
    truth, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # label 0: tp 1, fp 1, fn 1 -> 0.5; label 1: tp 2, fp 1, fn 0 -> 0.8; label 2: tp 0 -> 0
    assert macro_f1(truth, predicted, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # label 3 occurs nowhere
    assert macro_f1(truth, truth, 3) == 1.0
    # a wrong prediction of a label the rows do not hold costs its row, not a whole F1 term
    assert macro_f1(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx(2 / 3)


def _hits(accuracy: float, rows: int = 20) -> np.ndarray:
    """(rows,) the first ``accuracy * rows`` rows right."""
    return np.arange(rows) < round(accuracy * rows)


def test_at_equal_flops_interpolates_the_other_curve_inside_its_range():
    curve = [{"flop_speedup": 1.0, "accuracy": 0.9}, {"flop_speedup": 3.0, "accuracy": 0.8},
             {"flop_speedup": 2.0, "accuracy": 0.85}]  # any order
    curve_correct = np.stack([_hits(p["accuracy"]) for p in curve])  # (3, 20)
    rows = [{"speed": s, "flop_speedup": x, "accuracy": 0.85, "exit_counts": [5, 1, 0]}
            for s, x in ((0.1, 2.5), (0.0, 1.0), (0.9, 3.5))]
    out = at_equal_flops(rows, curve, np.stack([_hits(0.85)] * 3), curve_correct)
    assert out[0]["baseline_accuracy"] == pytest.approx(0.825) and out[0]["gain_points"] == pytest.approx(2.5)
    assert out[1]["baseline_accuracy"] == pytest.approx(0.9)
    assert out[2]["baseline_accuracy"] is None and out[2]["gain_points"] is None  # beyond the curve
    assert out[2]["gain_ci95_points"] is None
    for c in out[:2]:  # the interval lies around the gain
        low, high = c["gain_ci95_points"]
        assert low < c["gain_points"] < high and (low + high) / 2 == pytest.approx(c["gain_points"])


def test_gain_intervals_are_paired_over_the_same_rows():
    rows = [{"speed": 0.5, "flop_speedup": 2.0, "accuracy": 0.5, "exit_counts": [10, 10]}]
    curve = [{"flop_speedup": 1.0, "accuracy": 0.5}, {"flop_speedup": 3.0, "accuracy": 0.5}]
    same = _hits(0.5, 400)  # (400,)
    # the same rows right: no gain, and no doubt about it, however uncertain each accuracy is alone
    tie = at_equal_flops(rows, curve, same[None], np.stack([same, same]))[0]
    assert tie["gain_points"] == pytest.approx(0.0) and tie["gain_ci95_points"] == pytest.approx([0.0, 0.0])
    # as many rows right, but other rows: still no gain, now with a wide interval
    other = ~same
    swap = at_equal_flops(rows, curve, same[None], np.stack([other, other]))[0]
    assert swap["gain_points"] == pytest.approx(0.0)
    assert swap["gain_ci95_points"][0] < -5 and swap["gain_ci95_points"][1] > 5
    # worse on 40 of 400 rows, right on none the other gets wrong: worse beyond chance
    worse = same & (np.arange(400) >= 40)
    lost = at_equal_flops([{**rows[0], "accuracy": 0.4}], curve, worse[None], np.stack([same, same]))
    assert lost[0]["gain_points"] == pytest.approx(-10.0) and lost[0]["gain_ci95_points"][1] < 0
    assert lost[0]["differing_rows"] == 40
    verdict = _verdict(lost)
    assert verdict["never_worse"] is False and verdict["worse_beyond_chance_at"] == [0.5]
    assert _verdict(at_equal_flops(rows, curve, same[None], np.stack([other, other])))["worse_beyond_chance_at"] == []
    # 4 rows lost and none won: below 0 by the normal interval, but too few rows to decide
    few = same & (np.arange(400) >= 4)
    four = at_equal_flops([{**rows[0], "accuracy": 0.49}], curve, few[None], np.stack([same, same]))
    assert four[0]["gain_ci95_points"][1] < 0 and four[0]["differing_rows"] == 4
    assert _verdict(four)["worse_beyond_chance_at"] == [] and _verdict(four)["never_worse"] is False


def test_equal_speedups_in_the_other_curve_keep_gain_and_interval_together():
    # two points at 2.0x with different rows right: the gain and its interval use the same point
    curve = [{"flop_speedup": 1.0, "accuracy": 0.9}, {"flop_speedup": 2.0, "accuracy": 0.8},
             {"flop_speedup": 2.0, "accuracy": 0.6}, {"flop_speedup": 3.0, "accuracy": 0.5}]
    curve_correct = np.stack([_hits(p["accuracy"]) for p in curve])  # (4, 20)
    for at in (1.0, 2.0, 2.5, 3.0, 3.0 + 5e-10):
        out = at_equal_flops([{"speed": 0.3, "flop_speedup": at, "accuracy": 0.7, "exit_counts": [1, 1]}], curve,
                             _hits(0.7)[None], curve_correct)[0]
        assert (out["gain_ci95_points"][0] + out["gain_ci95_points"][1]) / 2 == pytest.approx(out["gain_points"])
    # one row: a gain, no interval, and no verdict of chance
    one = at_equal_flops([{"speed": 0.3, "flop_speedup": 1.0, "accuracy": 0.0, "exit_counts": [1, 0]}],
                         [{"flop_speedup": 1.0, "accuracy": 1.0}], np.zeros((1, 1), bool), np.ones((1, 1), bool))
    assert one[0]["gain_points"] == pytest.approx(-100.0) and one[0]["gain_ci95_points"] is None
    assert _verdict(one)["worse_beyond_chance_at"] == []


def test_wall_speedup_compares_each_pass_with_speed_0_at_its_own_moment():
    # (speed, start, seconds). The machine slows down steadily: speed 0 takes 10 s at t=5 and 20 s at
    # t=40, so a pass centred at t=22.5 would have taken speed 0 15 s; the pass took 3 s: 5x. Compared
    # with the round's first pass of speed 0 alone it would read 10/3 = 3.3x
    walls = wall_speedups([(0.0, 0.0, 10.0), (1.0, 21.0, 3.0), (0.0, 30.0, 20.0)])
    assert walls == {0.0: 1.0, 1.0: pytest.approx(5.0)}
    # two rounds on a machine that slows steadily (pace 1 + t/100): a pass of w seconds of work takes
    # w * pace(its midpoint). Speed 0 does 10 s of work, 0.5 4 s, 1.0 2 s: exactly 2.5x and 5x at every
    # moment; against each round's first pass of speed 0 they would read 2.33x and 4.53x
    passes, t = [], 0.0
    for speed, work in [(0.0, 10.0), (0.5, 4.0), (1.0, 2.0)] * 2 + [(0.0, 10.0)]:
        seconds = work * (1 + t / 100) / (1 - work / 200)  # solves seconds = work * pace(t + seconds / 2)
        passes.append((speed, t, seconds))
        t += seconds
    walls = wall_speedups(passes)
    assert walls[0.5] == pytest.approx(2.5) and walls[1.0] == pytest.approx(5.0)
    # per-pass ratios 2, 5 and 2 on a steady machine: the median is 2, not the fastest pass's 10/4 = 2.5
    steady = [(0.0, 0, 10.0), (0.5, 10, 5.0), (0.0, 15, 10.0), (0.5, 25, 2.0), (0.0, 27, 10.0), (0.5, 37, 5.0),
              (0.0, 42, 10.0)]
    assert wall_speedups(steady)[0.5] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="begin and end with a pass of speed 0"):
        wall_speedups([(0.0, 0, 10.0), (0.5, 10, 5.0)])


def test_evaluation_matches_the_engine_and_writes_every_file(models, tmp_path):
    output = tmp_path / "eval"
    lines: list[str] = []
    speeds = [0.0, 0.05, 0.3, 1.0]
    result = run_evaluation(EvaluateConfig(model=models["distilled"], input=models["data"], output=str(output),
                                           speeds=speeds, text_column="review", label_column="sentiment",
                                           max_rows=100, precision="fp32"),
                            log=lines.append)
    assert result.rows == 100 and [r["speed"] for r in result.speeds] == speeds and result.precision == "fp32"
    table = pq.read_table(models["data"]).slice(0, 100)
    texts, labels = table.column("review").to_pylist(), table.column("sentiment").to_pylist()

    model = FastBert.from_pretrained(models["distilled"])
    for row in result.speeds:  # the full pass says what the engine does at each speed
        scorer = Scorer(model, precision="fp32", speed=row["speed"])
        predicted = scorer(texts).column("prediction").to_pylist()
        assert row["accuracy"] == pytest.approx(accuracy(predicted, labels))
        assert row["exit_counts"] == scorer.stats.exit_counts
        assert row["flop_speedup"] == pytest.approx(scorer.stats.flop_speedup)
        assert row["flops_per_row"] == pytest.approx(scorer.stats.flops / 100)
        assert 0.0 <= row["macro_f1"] <= 1.0
    assert result.speeds[0]["flop_speedup"] == pytest.approx(1.0)
    assert result.teacher_accuracy == result.speeds[0]["accuracy"] > 0.8
    assert result.speeds[-1]["exit_counts"] == [100, 0, 0]  # speed 1: every row leaves at layer 1

    truncation = result.baselines["truncation"]
    assert [p["layer"] for p in truncation["curve"]] == [1, 2, 3]
    assert truncation["curve"][-1]["accuracy"] == result.teacher_accuracy  # layer L is the teacher
    assert truncation["curve"][-1]["flop_speedup"] == pytest.approx(1.0)
    at_one = truncation["at_speeds"][-1]  # speed 1 runs exactly what truncation at layer 1 runs
    assert at_one["flop_speedup"] == pytest.approx(truncation["curve"][0]["flop_speedup"])
    assert at_one["gain_points"] == pytest.approx(0.0) and at_one["one_exit_layer"]
    assert truncation["speeds_compared"] == sum(not c["one_exit_layer"] and c["baseline_accuracy"] is not None
                                                for c in truncation["at_speeds"]) <= 2  # ties left out
    for c in truncation["at_speeds"]:  # every compared speed has its interval
        if c["baseline_accuracy"] is not None:
            low, high = c["gain_ci95_points"]
            assert (low + high) / 2 == pytest.approx(c["gain_points"]) and low <= high

    on_disk = json.loads((output / "evaluation.json").read_text())
    assert on_disk["speeds"] == json.loads(json.dumps(result.speeds))
    with open(output / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["speed"]) for r in rows] == speeds
    assert {"accuracy", "macro_f1", "flop_speedup", "exits_layer_3", "truncation_accuracy_equal_flops"} <= set(rows[0])
    for name in ("tradeoff.png", "exits.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("speed  accuracy" in line for line in lines) and any("(b) fixed-depth truncation" in line for line in lines)

    with pytest.raises(UserError, match="holds an earlier evaluation with other arguments"):  # never overwritten silently
        run_evaluation(EvaluateConfig(model=models["distilled"], input=models["data"], output=str(output),
                                      text_column="review", label_column="sentiment"))


def test_the_labs_baselines_and_wall_time_on_the_same_rows(models):
    """benchmarks.ablation's additions to the evaluation: (c) the label-trained students at equal
    FLOPs, (a) the plain classifier against the teacher, and the engine timed at every speed."""
    table = pq.read_table(models["data"]).slice(0, 100)
    texts, labels = table.column("review").to_pylist(), table.column("sentiment").to_pylist()
    model = FastBert.from_pretrained(models["distilled"])
    exits = all_exits(model, texts, labels, precision="fp32")
    speeds = [0.0, 0.05, 0.3, 1.0]
    result = tabulate(model, exits, speeds, data=models["data"], model_uri=models["distilled"], precision="fp32")

    students = label_students_baseline(FastBert.from_pretrained(models["labels"]), models["labels"], model,
                                       result.speeds, exits, texts, labels, "fp32")
    assert students["model"] == models["labels"] and len(students["at_speeds"]) == 4
    curve = sorted(students["curve"], key=lambda p: p["flop_speedup"])
    for c in students["at_speeds"]:  # the label-trained model's accuracy at the same FLOP speed-up
        if c["baseline_accuracy"] is not None:
            assert c["baseline_accuracy"] == pytest.approx(np.interp(
                c["flop_speedup"], [p["flop_speedup"] for p in curve], [p["accuracy"] for p in curve]))
            low, high = c["gain_ci95_points"]
            assert (low + high) / 2 == pytest.approx(c["gain_points"]) and low <= high
    plain = plain_bert_baseline(load_plain_bert(models["plain"]), models["plain"], model, exits, texts)
    classifier = load_plain_bert(models["plain"])
    expected = accuracy([LABELS[i] for i in plain_bert_predict(classifier, texts)], labels)
    assert plain["accuracy"] == pytest.approx(expected)
    assert plain["teacher_minus_plain_points"] == pytest.approx(100 * (result.teacher_accuracy - expected))
    low, high = plain["teacher_minus_plain_ci95_points"]
    assert (low + high) / 2 == pytest.approx(plain["teacher_minus_plain_points"]) and low <= high
    with pytest.raises(ValueError, match="a FastBERT model, not a plain classifier"):
        load_plain_bert(models["distilled"])

    lines: list[str] = []
    passes = time_speeds(model, texts, exits, result.speeds, repeats=2, micro_batch=8, precision="fp32",
                         log=lines.append)
    assert [p[0] for p in passes] == [*speeds * 2, 0.0]  # every speed once per round, speed 0 first and last
    assert wall_speedups(passes) == {r["speed"]: r["wall_speedup"] for r in result.speeds}
    for row in result.speeds:
        assert row["engine_agreement"] == 1.0 and row["rows_per_s"] > 0 and row["wall_speedup"] > 0
    assert result.speeds[0]["wall_speedup"] == 1.0
    result.baselines.update(label_students=students, plain_bert=plain)
    shown = format_table(result)
    assert any("(a) plain BERT" in line for line in shown) and any("(c) label-trained" in line for line in shown)


def test_the_plain_classifier_learns_the_task_and_is_a_standard_folder(models, tmp_path):
    """Baseline (a): a Hugging Face classifier on the same backbone, fine-tuned like stage 1
    (benchmarks.baselines.train_plain_bert), saved as a folder transformers opens."""
    from transformers import AutoModelForSequenceClassification

    rng = np.random.default_rng(3)
    texts, labels = toy_task(rng, 256)
    val_texts, val_labels = toy_task(rng, 64)
    backbone = str(tmp_path / "backbone")
    tiny = tiny_model(labels=LABELS, seed=0)
    tiny.backbone.save_pretrained(backbone)
    tiny.tokenizer.save_pretrained(backbone)
    plain = new_plain_bert(backbone, list(LABELS), max_length=32)
    # batch 8: [CLS] pooling from a random tiny backbone needs more steps than FastBERT's teacher
    accuracies = train_plain_bert(plain, texts, labels, val_texts, val_labels, epochs=2, lr=3e-3, head_lr=1e-2,
                                  batch_size=8, log=lambda line: None)
    assert len(accuracies) == 2 and max(accuracies) > 0.9
    save_plain_bert(plain, str(tmp_path / "plain"))
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")).__name__ == \
        "BertForSequenceClassification"
    loaded = load_plain_bert(str(tmp_path / "plain"))
    assert plain_bert_labels(loaded) == list(LABELS)
    test_texts, test_labels = toy_task(np.random.default_rng(1), 64)
    assert accuracy([LABELS[i] for i in plain_bert_predict(loaded, test_texts)], test_labels) > 0.9
    with pytest.raises(ValueError, match="no config.json"):
        load_plain_bert(str(tmp_path))


def test_the_command_line_runs_and_refuses_bad_input_in_one_line(models, tmp_path, capsys):
    data = ["--model", models["distilled"], "--input", models["data"], "--text-column", "review"]
    result = main(data + ["--label-column", "sentiment", "--output", str(tmp_path / "ok"), "--speeds", "0,0.5",
                          "--max-rows", "20"])
    assert [r["speed"] for r in result.speeds] == [0.0, 0.5] and "wall_speedup" not in result.speeds[1]
    assert parse_args(["--model", "m", "--input", "d", "--output", "o"]).speeds == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                                                                  0.7, 0.8, 0.9, 1.0]
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"review": ["good w1", "bad w2", "w3 good"], "sentiment": ["pos", "meh", "neutral"]}),
                   unknown)
    cases = [
        (data + ["--output", str(tmp_path / "a")], r"no label column 'label'; it has review: string, sentiment: string"),
        (["--model", models["distilled"], "--input", str(unknown), "--text-column", "review", "--label-column",
          "sentiment", "--output", str(tmp_path / "b")],
         r"labels the model does not know: \['meh', 'neutral'\] \(2 rows, first: row 1\); the model's labels"),
        (data + ["--label-column", "sentiment", "--output", str(tmp_path / "c"), "--speeds", "0,1.5"],
         r"each of speeds must be a number in \[0, 1\].*got 1.5"),
        (data + ["--label-column", "sentiment", "--output", str(tmp_path / "d"), "--max-rows", "0"],
         "max_rows must be a positive integer"),
        (["--model", models["data"], "--input", models["data"], "--output", str(tmp_path / "e")],
         "no such folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("jobs.evaluate: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
    assert not any((tmp_path / name).exists() for name in "abcde")  # nothing written
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["good w1", "bad w2"], "label": ["pos", None]}), nulls)
    with pytest.raises(ValueError, match=r"nulls.parquet: column 'label' has 1 null labels \(first: row 1\)"):
        run_evaluation(EvaluateConfig(model=models["distilled"], input=str(nulls), output=str(tmp_path / "f")))
