"""The jobs' safety rules on real files and real processes: outputs that appear whole, an
--overwrite that removes only an earlier run's own files, outputs never written onto or
around an input, and one line (exit status 2, no traceback) for each mistake, printed before
Ray starts: the job modules run as their own processes with ``ray`` unimportable, so a job
that reached Ray would fail with a traceback instead."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.outputs import MANIFEST, Manifest, UserError, claim_output, refuse_unsafe_output, write_file
from pipeline.tradeoff import tradeoff_table
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the helpers ------------------------------------------------------------------------------------


def test_a_file_appears_whole_and_no_temporary_is_left(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    target = tmp_path / "sub" / "_summary.json"
    write_file(fs, str(target), "first")
    write_file(fs, str(target), b"second")
    assert target.read_bytes() == b"second" and [p.name for p in target.parent.iterdir()] == ["_summary.json"]


def test_overwrite_removes_only_what_the_manifest_owns(tmp_path):
    out = tmp_path / "out"
    manifest = Manifest("jobs.score", ["part-*.parquet", "_pieces/part-*.json", "_SUCCESS"], {"speed": 0.5})
    assert claim_output(str(out), manifest, overwrite=False) is None  # a new folder: claimed
    (out / "_pieces").mkdir()
    for name in ("part-0.parquet", "_pieces/part-0.parquet.json", "_SUCCESS", ".part-1.parquet.tmp-0a1b2c3d"):
        (out / name).write_bytes(b"ours")
    previous = claim_output(str(out), manifest, overwrite=False)
    assert previous == manifest  # an earlier run of this job: the caller compares its arguments
    assert claim_output(str(out), Manifest("jobs.score", manifest.owns, {"speed": 0.1}), overwrite=True) is None
    assert list(files(out)) == [MANIFEST] and not (out / "_pieces").exists()
    assert json.loads((out / MANIFEST).read_text())["arguments"] == {"speed": 0.1}

    (out / "part-0.parquet").write_bytes(b"ours")
    (out / "part-2024").mkdir()  # a folder of the user's whose name a pattern of ours would match
    (out / "part-2024" / "x.parquet").write_bytes(b"the user's")
    with pytest.raises(UserError, match=r"did not write \(part-2024/x.parquet\)"):
        claim_output(str(out), manifest, overwrite=True)
    (out / "part-2024" / "x.parquet").unlink()
    (out / "part-2024").rmdir()
    (out / "sub").mkdir()
    (out / "sub" / "mine.parquet").write_bytes(b"the user's")
    before = files(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"did not write \(sub/mine.parquet\); nothing was deleted"):
            claim_output(str(out), manifest, overwrite=overwrite)
    assert files(out) == before
    with pytest.raises(UserError, match="holds the output of jobs.score, not of jobs.evaluate"):
        claim_output(str(out), Manifest("jobs.evaluate", []), overwrite=True)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "part-0.parquet").write_bytes(b"looks like ours, is not")  # no manifest: not ours
    with pytest.raises(UserError, match=r"already holds files that jobs.score did not write \(part-0.parquet\)"):
        claim_output(str(theirs), manifest, overwrite=True)
    assert files(theirs) == {"part-0.parquet": b"looks like ours, is not"}


def test_outputs_onto_or_around_an_input_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"x")
    (data / "notes.txt").write_bytes(b"y")
    cases = [
        ([("--input", str(data / "part-0.parquet"))], data, "holds the input --input"),
        ([("--input", str(data / "part-0.parquet"))], tmp_path, "holds the input --input"),
        ([("--input", str(data))], data, "is the input --input"),
        ([("--input", str(data))], data / "scored", "lies inside the input folder --input"),
        ([("--input", str(data / "**" / "*.parquet"))], data / "scored", "lies inside the input folder"),
        ([("--input", str(data / "*.parquet"))], tmp_path, "holds the input --input"),
        ([("--input", str(data / "part-0.parquet"))], data / "notes.txt", "is an existing file"),
        ([("--input", str(data / "part-0.parquet"))], data / "notes.txt" / "out", "lies inside the file"),
    ]
    for inputs, output, message in cases:
        with pytest.raises(UserError, match=message):
            refuse_unsafe_output(str(output), inputs)
    refuse_unsafe_output(str(data / "scored"), [("--input", str(data / "*.parquet"))])  # a flat glob: not read there
    refuse_unsafe_output(str(tmp_path / "elsewhere"), [("--input", str(data)), ("--model", None)])


def test_save_pretrained_keeps_the_other_files_of_its_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("the user's")
    tiny_model().save_pretrained(str(folder))
    assert (folder / "README.md").read_text() == "the user's" and (folder / "config.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# -- the jobs' command lines ----------------------------------------------------------------------


def run_job(module: str, argv: list[str], tmp_path: Path, ray_importable: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module argv`` in its own process; with ``ray`` unimportable unless asked."""
    code = (f"import runpy, sys; {'' if ray_importable else 'sys.modules.update(ray=None); '}"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster unless asked
    environ.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, module: str, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a labelled Parquet file beside a file of the user's, and a corrupt file."""
    root = tmp_path_factory.mktemp("world")
    tiny_model().save_pretrained(str(root / "model"))
    with_table = tiny_model()  # a model whose trade-off table a budget can be asked of
    with_table.tradeoff = tradeoff_table(with_table, ["good w1", "bad w2", "w3"], ["pos", "neg", "pos"], data="toy")
    with_table.save_pretrained(str(root / "with-table"))
    backbone = root / "backbone"
    tiny = tiny_model()
    tiny.backbone.save_pretrained(backbone)
    tiny.tokenizer.save_pretrained(backbone)
    (root / "data").mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": ["good w1", "bad w2", "w3", "w4 w5"],
                             "label": ["pos", "neg", "pos", "neg"]}), root / "data" / "part-0.parquet")
    pq.write_table(pa.table({"text": ["a b", "c"], "label": ["x", "x"]}), root / "data" / "one-label.parquet")
    (root / "data" / "notes.txt").write_text("the user's notes")
    (root / "bad").mkdir()
    (root / "bad" / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    return root


def test_every_scoring_mistake_is_one_line_before_ray_starts(world, tmp_path):
    model, part = str(world / "model"), str(world / "data" / "part-0.parquet")
    out = str(tmp_path / "out")
    previous = tmp_path / "previous"  # an earlier run at speed 0.5, to --resume with another speed
    claim_output(str(previous), Manifest("jobs.score", [], {
        "model": model, "speed": 0.5, "text_column": "text", "id_column": None, "columns": None, "max_length": None,
        "precision": "auto",
        "inputs": [part]}), overwrite=False)
    audited = str(tmp_path / "audited.parquet")  # a column the audit would write
    pq.write_table(pa.table({"text": ["a text"], "audited": [True]}), audited)
    cases = [
        (["--input", part, "--output", out, "--text-column", "body"],
         "no text column 'body'; it has id: int64, text: string, label: string"),
        (["--input", part, "--output", out, "--speed", "1.7"], "speed must be a number in [0, 1]"),
        (["--input", str(world / "nothing-*.parquet"), "--output", out], "no input files matched"),
        (["--input", part, "--output", out, "--model", str(world / "data")], "is missing config.json (it holds"),
        (["--input", str(world / "bad" / "x.parquet"), "--output", out], "x.parquet: not a readable Parquet file"),
        (["--input", part, "--output", str(world / "data"), "--overwrite"], "holds the input --input"),
        (["--input", part, "--output", str(world / "data" / "notes.txt"), "--overwrite"], "is an existing file"),
        (["--input", part, "--output", str(previous), "--speed", "0.3", "--resume"], "(differing: speed)"),
        (["--input", part, "--output", str(world / "data"), "--target-speedup", "2"], "no tradeoff.json"),
        (["--input", part, "--output", out, "--model", str(world / "with-table"), "--target-speedup", "50"],
         "no speed reaches a 50.0x FLOP speed-up"),
        (["--input", part, "--output", out, "--audit", "2"], "audit must be a share of rows in [0, 1]"),
        (["--input", part, "--output", out, "--price-per-hour", "-1"], "price_per_hour must be >= 0"),
        (["--input", audited, "--output", out, "--audit", "0.01"], "input columns ['audited'] would clash"),
        (["--input", part, "--output", out, "--rows-per-call", "many"],  # argparse's own mistakes: one line too
         "argument --rows-per-call: invalid int value: 'many' (the flags: python -m jobs.score --help)"),
    ]
    for argv, message in cases:
        if "--model" not in argv:
            argv = ["--model", model, *argv]
        assert_one_line(run_job("jobs.score", argv, tmp_path), "jobs.score", message)
    assert not Path(out).exists()
    assert (world / "data" / "notes.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in (world / "data").iterdir()) == ["notes.txt", "one-label.parquet", "part-0.parquet"]


def test_an_unreachable_ray_address_is_one_line(world, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_job("jobs.score", ["--model", str(world / "model"), "--input", str(world / "data" / "part-0.parquet"),
                                    "--output", str(tmp_path / "out")], tmp_path, ray_importable=True,
                     env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_one_line(result, "jobs.score", f"RAY_ADDRESS=127.0.0.1:{port}: cannot reach it")


def test_training_mistakes_are_one_line_before_ray_starts(world, tmp_path):
    part, backbone = str(world / "data" / "part-0.parquet"), str(world / "backbone")
    cases = [
        (["--train", part, "--validation", part, "--label-column", "y", "--output", str(tmp_path / "m")],
         "no column 'y'"),
        (["--train", str(world / "data" / "one-label.parquet"), "--validation", part, "--output", str(tmp_path / "m")],
         "single class ['x']"),
        (["--train", part, "--validation", part, "--output", str(world / "data"), "--overwrite"],
         "holds the input --train"),
        (["--train", part, "--validation", part, "--output", str(tmp_path / "m"), "--lr", "-1"], "lr"),
        (["--train", part, "--validation", part, "--output", str(tmp_path / "m"), "--max-length", "99999"],
         "max_length must be in [2, 64]"),
        (["--train", part, "--validation", part, "--output", str(tmp_path / "m"), "--storage", str(tmp_path / "m" / "r")],
         "lies in --output"),
        (["--train", part, "--validation", part, "--output", str(tmp_path / "m"), "--backbone", str(world / "data")],
         "is not a Hugging Face model transformers can load"),
        (["--train", part, "--validation", part, "--output", str(tmp_path / "m"), "--backbone", "no-such-model"],
         "no such model in the Hugging Face cache"),
    ]
    argvs = [argv if "--backbone" in argv else [*argv, "--backbone", backbone] for argv, _ in cases]
    with ThreadPoolExecutor(4) as pool:  # the processes side by side: each spends its time importing
        results = list(pool.map(lambda argv: run_job("jobs.train", argv, tmp_path), argvs))
    for result, (_, message) in zip(results, cases):
        assert_one_line(result, "jobs.train", message)
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in (world / "data").iterdir()) == ["notes.txt", "one-label.parquet", "part-0.parquet"]


def test_help_shows_every_flag_with_its_default(tmp_path):
    for module in ("jobs.score", "jobs.train", "jobs.evaluate", "jobs.demo"):
        text = run_job(module, ["--help"], tmp_path).stdout
        assert text.startswith(f"usage: python -m {module}")
        options = text.split("options:", 1)[1]
        flags = [line.split()[0] for line in options.splitlines() if line.startswith("  --")]
        assert len(flags) >= 8, module
        # every flag's help says its default or that it is required (switches are off by default)
        blocks = options.split("\n  --")[1:]
        for block in blocks:
            words = " ".join(block.split())
            assert "(default:" in words or "(required)" in words or block.split()[0].split(",")[0] in {
                "overwrite", "resume", "skip-bad-files", "verbose", "gpu", "compile"}, (module, words)


def test_evaluation_and_demo_outputs_keep_the_users_files(world, tmp_path):
    from jobs.demo import DemoConfig, run_demo
    from pipeline.evaluate import EvaluateConfig, run_evaluation

    for name in ("evaluation", "demo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the user's")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"did not write \(mine.txt\); nothing was deleted"):
            run_evaluation(EvaluateConfig(model=str(world / "model"), input=str(world / "data" / "part-0.parquet"),
                                          output=str(tmp_path / "evaluation"), overwrite=overwrite))
        with pytest.raises(UserError, match=r"did not write \(mine.txt\); nothing was deleted"):
            run_demo(DemoConfig(output=str(tmp_path / "demo"), overwrite=overwrite))
    assert files(tmp_path / "evaluation") == files(tmp_path / "demo") == {"mine.txt": b"the user's"}


def test_a_folder_input_means_its_parquet_files_in_every_job(world, tmp_path):
    """A folder is read as the ``*.parquet`` files below it (names starting with _ or . left
    out) by scoring, training and evaluation alike: a user's notes beside the data are no input."""
    from pipeline.distributed import TrainJobConfig, check_inputs
    from pipeline.evaluate import EvaluateConfig, read_labelled
    from pipeline.text import parquet_dataset

    folder = tmp_path / "labelled"
    (folder / "more").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["good w1", "bad w2"], "label": ["pos", "neg"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": ["w3 good"], "label": ["pos"]}), folder / "more" / "b.parquet")
    (folder / "notes.txt").write_text("the user's notes")
    (folder / "_SUCCESS").write_text("")
    assert parquet_dataset(str(folder), ["text"]).to_table().num_rows == 3
    config = EvaluateConfig(model=str(world / "model"), input=str(folder), output=str(tmp_path / "e"))
    assert read_labelled(config, ["neg", "pos"])[1] == ["pos", "neg", "pos"]
    inputs = check_inputs(TrainJobConfig(train=str(folder), validation=str(folder), output=str(tmp_path / "m"),
                                         workers=1, backbone=str(world / "backbone")))
    assert (inputs.train_rows, inputs.labels) == (3, ["neg", "pos"])
