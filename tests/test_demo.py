"""The README's main command, reduced: bundled backbone, a few R8 rows, both stages, scoring."""

import json

import pytest

from jobs.demo import parse_args
from pipeline import FastBert
from pipeline.demo import run_demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    config = parse_args(["--output", str(tmp_path), "--train-rows", "48", "--val-rows", "16", "--test-rows", "24",
                         "--epochs", "1", "--distill-epochs", "1", "--batch-size", "16", "--speeds", "0", "0.5"])
    lines = []
    rows = run_demo(config, log=lines.append)
    assert [r["speed"] for r in rows] == [0.0, 0.5]
    assert rows[0]["mean_exit_layer"] == 6 and rows[0]["flop_speedup"] == pytest.approx(1.0)
    assert rows[1]["mean_exit_layer"] <= 6 and sum(rows[1]["exit_counts"]) == 24  # students barely trained
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["speeds"] == json.loads(json.dumps(rows)) and saved["config"]["train_rows"] == 48
    model = FastBert.from_pretrained(str(tmp_path / "model"))
    assert len(model.config.labels) == 8
    assert any("finetune epoch 1/1" in line for line in lines) and any("distill epoch 1/1" in line for line in lines)


def test_demo_arguments_are_checked():
    with pytest.raises(ValueError, match="speeds"):
        parse_args(["--speeds", "0", "1.5"])
    with pytest.raises(ValueError, match="train_rows"):
        parse_args(["--train-rows", "0"])
