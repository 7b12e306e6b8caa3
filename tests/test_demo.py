"""The README's main command, reduced (tiny backbone, a few R8 rows) end to end on a real local
Ray: Parquet, the Ray Train job, the Ray Data scoring job, the evaluation job."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.demo import parse_args
from pipeline import FastBert
from jobs.demo import run_demo
from tiny import tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_demo_end_to_end(ray_session, tmp_path):
    backbone = tmp_path / "backbone"
    tiny = tiny_model()
    tiny.backbone.save_pretrained(backbone)
    tiny.tokenizer.save_pretrained(backbone)
    out = tmp_path / "demo"
    config = parse_args(["--output", str(out), "--backbone", str(backbone), "--train-rows", "64", "--validation-rows", "32",
                         "--test-rows", "40", "--epochs", "1", "--distill-epochs", "1", "--batch-size", "16",
                         "--max-length", "32", "--speeds", "0", "0.5", "1", "--replicas", "1", "--log-every", "2"])
    lines: list[str] = []
    result = run_demo(config, log=lines.append)

    data = out / "data" / "r8-64-32-40-seed0"  # the sample's own folder
    assert [pq.read_metadata(data / f"{split}.parquet").num_rows
            for split in ("train", "validation", "test")] == [64, 32, 40]
    model = FastBert.from_pretrained(str(out / "model"))
    assert len(model.config.labels) == 8 and model.tradeoff is not None and model.tradeoff.rows == 32
    summary = json.loads((out / "scored" / "_summary.json").read_text())
    assert summary["rows_out"] == 40 and (out / "scored" / "_SUCCESS").exists()
    assert summary["speed_choice"]["max_accuracy_drop"] == 1.0  # the speed came from the validation table
    assert pq.read_table(out / "scored").num_rows == 40
    assert [r["speed"] for r in result.speeds] == [0.0, 0.5, 1.0] and result.rows == 40
    assert result.speeds[0]["mean_exit_layer"] == 3 and result.speeds[2]["mean_exit_layer"] == 1
    saved = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert saved["teacher_accuracy"] == result.teacher_accuracy
    assert all((out / "evaluation" / name).stat().st_size > 0 for name in saved["files"])
    # a person at the terminal sees each phase with the demo's ETA, the table and where things are
    phases = [line for line in lines if line.startswith("[")]
    assert [p[:5] for p in phases] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert any(" speed  accuracy" in line for line in lines) and any("demo finished in" in line for line in lines)
    assert any(str(out / "evaluation") in line for line in lines)


def test_demo_arguments_are_checked(capsys):
    for argv, message in ((["--speeds", "0", "1.5"], "speeds"), (["--train-rows", "0"], "train_rows"),
                          (["--replicas", "3-1"], "replicas"), (["--dataset", "imdb"], "dataset")):
        with pytest.raises(SystemExit) as stop:
            parse_args(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("jobs.demo: error: ") and message in err, err
    assert parse_args(["--overwrite"]).overwrite is True
    assert parse_args(["--speeds", "0,0.5", "1"]).speeds == [0.0, 0.5, 1.0]  # space- or comma-separated
