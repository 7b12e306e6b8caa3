"""pipeline.scoring on a real local Ray (CPU, 2 replicas) with a tiny random FastBERT: every
input row comes out exactly once and in order, equal to the in-process engine; resume;
bad input refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch

from jobs.score import parse_args
from pipeline.outputs import UserError
from pipeline import FastBert, Scorer, uncertainty
from pipeline.scoring import (REPLICA_GLIBC_TUNABLES, Replica, ScoreJobConfig, _audit_summary, cpu_replica_env,
                              read_chunk, run)
from pipeline.text import tokenize
from pipeline.tradeoff import choose_speed, exit_drift, tradeoff_table
from test_train import LABELS, toy_task
from driver import start_driver
from faults import KillMidCall, process_gone
from tiny import tiny_model

ray = pytest.importorskip("ray")



def _middle_speed() -> float:
    """A speed at which about half of the inputs leave at the tiny model's first exit."""
    model = tiny_model(labels=LABELS, seed=4).eval()
    texts, _ = toy_task(np.random.default_rng(0), 90)
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"]).logits  # (L, B, N)
    values = np.sort(uncertainty(logits[0]).numpy())  # (90,)
    middle = np.arange(35, 55)
    k = middle[np.argmax(values[middle + 1] - values[middle])]  # the widest gap near the median
    return float((values[k] + values[k + 1]) / 2)  # no row sits within float noise of the threshold


SPEED = _middle_speed()
BAD_TEXTS = [None, "", "   ", "good " * 20_000, "😀 good w1 🎉", "好的电影 bad", "w3 w4"]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A FastBERT folder and three Parquet files: two row groups, bad rows, a third file."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_model(labels=LABELS, seed=4).save_pretrained(str(root / "model"))
    texts, _ = toy_task(np.random.default_rng(0), 90)
    data = root / "data"
    data.mkdir()
    files = {
        "a.parquet": (texts[:50], 25),  # two row groups
        "b.parquet": (BAD_TEXTS + texts[50:60], None),
        "c.parquet": (texts[60:], None),
    }
    start = 0
    for name, (rows, group) in files.items():
        table = pa.table({"id": np.arange(start, start + len(rows)), "text": pa.array(rows, pa.string()),
                          "score": np.linspace(0, 1, len(rows))})
        pq.write_table(table, data / name, row_group_size=group)
        start += len(rows)
    return root


def job(inputs, output, **changes) -> ScoreJobConfig:
    settings = dict(model=str(inputs / "model"), input=[str(inputs / "data")], output=str(output), speed=SPEED,
                    replicas="2", rows_per_call=16, micro_batch=4, cpus_per_replica=0.5, precision="fp32")
    return ScoreJobConfig(**{**settings, **changes})


def all_inputs(inputs) -> pa.Table:
    return pa.concat_tables(pq.read_table(inputs / "data" / n) for n in ("a.parquet", "b.parquet", "c.parquet"))


def read_output(output) -> pa.Table:
    """The output folder as one table, files in name order (pyarrow skips _ and . names)."""
    dataset = pds.dataset(str(output), format="parquet")
    return pa.concat_tables(pq.read_table(f) for f in sorted(dataset.files))


@pytest.fixture(scope="module")
def scored(ray_session, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("scored") / "out"
    return output, run(job(inputs, output))


def test_every_row_once_in_order_and_equal_to_the_engine(scored, inputs):
    output, summary = scored
    assert summary["precision"] == "fp32"  # what the replicas ran in, recorded
    assert summary["retried_calls"] == 0 and summary["audit"] is None and summary["drift"] is None  # no table
    source = all_inputs(inputs)
    out = read_output(output)
    assert out.column_names == ["id", "text", "score", "prediction", "probabilities", "exit_layer", "uncertainty",
                                "error"]
    assert out.column("id").to_pylist() == source.column("id").to_pylist()  # once each, in input order
    assert out.column("text").to_pylist() == source.column("text").to_pylist()
    assert out.column("score").to_pylist() == source.column("score").to_pylist()

    expected = Scorer(tiny_model(labels=LABELS, seed=4), precision="fp32", speed=SPEED, micro_batch=8)(source.column("text"))
    for name in ("prediction", "exit_layer", "error"):
        assert out.column(name).to_pylist() == expected.column(name).to_pylist(), name
    got = np.array([p or [0.0, 0.0] for p in out.column("probabilities").to_pylist()])
    want = np.array([p or [0.0, 0.0] for p in expected.column("probabilities").to_pylist()])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(out.column("exit_layer").drop_null().to_pylist())) > 1  # some rows left early

    errors = dict(zip(source.column("id").to_pylist(), out.column("error").to_pylist()))
    assert [errors[i] for i in range(50, 57)] == ["text is null", "text is empty", "text is empty", None, None, None,
                                                  None]
    assert summary["rows_in"] == summary["rows_out"] == 97 and summary["files"] == 3
    assert summary["errors"] == {"text is null": 1, "text is empty": 2} and summary["error_rows"] == 3
    assert summary["truncated_rows"] == 1 and sum(summary["exit_counts"].values()) == 94
    assert list(summary["exit_counts"]) == ["1", "2", "3"]  # keyed by layer
    assert summary["flop_speedup"] > 1.0
    assert json.loads((output / "_summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (output / "_SUCCESS").exists()
    assert not list(output.glob(".*")), "temporary files left behind"
    # a replica call never straddles two row groups, so no sliver files: each row group of n
    # rows is ceil(n / rows_per_call) files of rows_per_call rows, the last holding the rest
    pieces = Counter()
    for path in output.glob("part-*.parquet"):
        _, file, group, _ = path.stem.split("-")
        pieces[file, group] += 1
        assert pq.read_metadata(path).num_rows <= 16
    assert pieces == {("00000", "00000"): 2, ("00000", "00001"): 2, ("00001", "00000"): 2, ("00002", "00000"): 2}


def test_resume_after_a_crash_finishes_without_duplicates(scored, inputs, tmp_path):
    import shutil

    first, _ = scored
    output = tmp_path / "out"
    shutil.copytree(first, output)
    before = read_output(output)
    pieces = sorted(output.glob("part-*.parquet"))
    # a crash: no _SUCCESS yet, one piece written without its marker, one piece missing, a temp file
    (output / "_SUCCESS").unlink()
    (output / "_pieces" / f"{pieces[0].name}.json").unlink()
    pieces[-1].unlink()
    (output / "_pieces" / f"{pieces[-1].name}.json").unlink()
    # a run stopped while removing an unfinished row group's pieces: a marker whose piece is gone
    lost = next(p for p in pieces if p.name.startswith("part-00001-"))
    lost.unlink()
    (output / ".part-00002-00000-0000000000.parquet.tmp-1a2b3c4d").write_bytes(b"half")

    with pytest.raises(UserError, match="holds an unfinished run of this job: pass --resume"):
        run(job(inputs, output))
    with pytest.raises(UserError, match=r"scoring job with other arguments \(differing: speed\)"):
        run(job(inputs, output, speed=0.1, resume=True))
    summary = run(job(inputs, output, resume=True))
    after = read_output(output)
    for name in ("id", "text", "prediction", "exit_layer", "error"):  # every row once, in order, same answers
        assert after.column(name).to_pylist() == before.column(name).to_pylist(), name
    np.testing.assert_allclose(after.column("uncertainty").to_numpy(zero_copy_only=False).astype(float),
                               before.column("uncertainty").to_numpy(zero_copy_only=False).astype(float),
                               atol=1e-5)  # batch neighbours differ: float noise only
    assert summary["rows_out"] == 97
    assert summary["rows_this_run"] == 25 + 17 + 30  # the row groups with a piece or marker lost ran again
    # the costs count this run's pieces alone, every one of them
    redone = {"-".join(p.name.split("-")[1:3]) for p in (pieces[0], pieces[-1], lost)}
    ours = [m for m in markers_of(output) if f"{m['file']:05d}-{m['row_group']:05d}" in redone]
    assert sum(m["rows"] for m in ours) == summary["rows_this_run"]
    assert summary["replica_busy_seconds_per_million_rows"] == pytest.approx(
        sum(m["busy_seconds"] for m in ours) / summary["rows_this_run"] * 1e6)
    assert (output / "_SUCCESS").exists() and not list(output.glob(".*"))


def markers_of(output) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "_pieces").glob("part-*.json"))]


def many_files(folder, rows: int, files: int, row_group_size: int, seed: int):
    """``files`` Parquet files of ``rows`` toy texts in all, ids 0..rows-1 in file order."""
    folder.mkdir()
    texts, _ = toy_task(np.random.default_rng(seed), rows)
    per = rows // files
    for i in range(files):
        pq.write_table(pa.table({"id": list(range(per * i, per * (i + 1))), "text": texts[per * i: per * (i + 1)]}),
                       folder / f"{i}.parquet", row_group_size=row_group_size)
    return folder


def test_a_replica_killed_inside_a_call_is_replaced_and_the_call_retried(ray_session, inputs, tmp_path):
    """The only replica's process is killed (SIGKILL, from outside) inside a call (frozen first,
    to be sure the call it began has not finished): Ray Data replaces the replica and begins the
    call again; every row comes out once, and the summary counts the retried call."""
    data = many_files(tmp_path / "many", rows=300, files=3, row_group_size=25, seed=7)
    output = tmp_path / "out"
    killer = KillMidCall(output)
    killer.start()
    try:
        summary = run(job(inputs, output, input=[str(data)], rows_per_call=10, micro_batch=2, replicas="1"))
    finally:
        killer.finish()
    assert killer.killed is not None, "the job finished before the replica was caught inside a call"
    assert process_gone(killer.killed)
    assert read_output(output).column("id").to_pylist() == list(range(300))  # every row once, in order
    assert summary["rows_out"] == 300 and summary["error_rows"] == 0 and summary["retried_calls"] >= 1


def test_the_driver_runs_without_torch(ray_session, inputs, model_with_table, tmp_path):
    """`python -m jobs.score` with torch unimportable in its process finishes the job, with no
    speed given: the model's own suggestion from its table (the fastest within 0.5 point).
    Only the replicas load the model (the driver
    checks it, reads its table, plans, tokenises through Ray Data tasks and writes the summary),
    so a Ray head node needs no torch, and on 2 cores the driver spends no CPU-seconds importing
    it while the replicas start."""
    folder, model = model_with_table
    output = tmp_path / "out"
    argv = ["--model", str(folder), "--input", str(inputs / "data"), "--output", str(output),
            "--rows-per-call", "16", "--micro-batch", "4", "--replicas", "1",
            "--cpus-per-replica", "0.5"]
    driver = start_driver("jobs.score", argv, tmp_path / "driver.log", without=("torch",))
    assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["speed"] == choose_speed(model.tradeoff, max_accuracy_drop=0.5).speed
    assert summary["speed_choice"]["max_accuracy_drop"] == 0.5
    from pipeline.model import resolve_precision

    assert json.loads((output / "_summary.json").read_text())["precision"] == resolve_precision("auto", "cpu")
    assert read_output(output).column("id").to_pylist() == all_inputs(inputs).column("id").to_pylist()
    # quiet: the choice, the plan, the summary last; none of Ray's INFO or WARNING lines (Ray's
    # C++ core worker still logs one ERROR-level notice about its actors' restarts)
    lines = [line for line in (tmp_path / "driver.log").read_text().splitlines() if "core_worker.cc" not in line]
    assert lines[0].startswith("chose speed") and lines[1].startswith("scoring 97 rows"), lines
    assert " rows written to " in lines[2] and lines[3].startswith("start-up ") and len(lines) == 4, lines

    # the same command again: already complete, exit 0, nothing rewritten
    before = {p.name: p.read_bytes() for p in sorted(output.iterdir()) if p.is_file()}
    again = start_driver("jobs.score", argv, tmp_path / "again.log", without=("torch",))
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert "already holds the complete output of this job" in (tmp_path / "again.log").read_text()
    assert {p.name: p.read_bytes() for p in sorted(output.iterdir()) if p.is_file()} == before


def test_replica_scores_one_batch_without_ray(inputs):
    model = tiny_model(labels=LABELS, seed=4)
    texts = ["good w1", None, "bad w2 w3"]
    ids, errors, truncated = tokenize(model.tokenizer, texts, 32)
    batch = pa.table({"id": [1, 2, 3], "__ids": pa.array(ids, pa.list_(pa.int32())), "__error": errors,
                      "__truncated": truncated})
    out = Replica(str(inputs / "model"), speed=0.0, threads=1, precision="fp32")(batch)
    assert out.column("id").to_pylist() == [1, 2, 3]
    assert out.column("error").to_pylist() == [None, "text is null", None]
    assert out.column("prediction").to_pylist() == Scorer(model, precision="fp32", speed=0.0)(texts).column("prediction").to_pylist()


# a process that allocates, fills and frees an 8 MiB block three times, then prints how much its
# resident memory grew: with glibc's floating mmap threshold the first free raises the
# threshold, the next blocks come from the heap and stay resident
_BIG_BLOCKS = """
import numpy as np
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
for _ in range(3):
    block = np.ones(2**20)  # 8 MiB
    del block
print(rss() - base)
"""


@pytest.mark.skipif(cpu_replica_env() is None, reason="needs glibc >= 2.35 with transparent huge pages")
def test_cpu_replica_malloc_settings_give_big_blocks_back_to_the_os(monkeypatch):
    def grown(tunables: str | None) -> int:
        # without anything else that changes malloc: a preloaded allocator, glibc's MALLOC_* variables
        env = {k: v for k, v in os.environ.items()
               if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        return int(subprocess.run([sys.executable, "-c", _BIG_BLOCKS], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    assert grown(None) > 6 * 2**20  # glibc's default keeps the freed blocks
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert grown(cpu_replica_env()["env_vars"]["GLIBC_TUNABLES"]) < 4 * 2**20  # the replicas' settings give them back
    # a user's own tunables come last, so that glibc takes theirs where both set one
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert cpu_replica_env()["env_vars"]["GLIBC_TUNABLES"] == REPLICA_GLIBC_TUNABLES + ":glibc.malloc.mmap_threshold=65536"


def test_a_big_row_group_is_read_in_blocks_of_the_batch_size(tmp_path):
    path = str(tmp_path / "one-group.parquet")
    pq.write_table(pa.table({"id": np.arange(50), "text": [f"w{i}" for i in range(50)], "x": np.arange(50.0)}),
                   path, row_group_size=50)
    chunk = {"uri": np.array([path]), "file": np.array([3]), "row_group": np.array([0]), "first_row": np.array([100])}
    blocks = list(read_chunk(chunk, columns=["id"], text_column="text", rows_per_block=16))
    assert [b.num_rows for b in blocks] == [16, 16, 16, 2]  # never the whole row group at once
    table = pa.concat_tables(blocks)
    assert table.column_names == ["id", "__text", "__file", "__group", "__row"]
    assert table.column("__row").to_pylist() == list(range(100, 150))
    assert table.column("__text").to_pylist() == [f"w{i}" for i in range(50)]
    assert set(table.column("__file").to_pylist()) == {3}


def write(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_bad_input_is_refused_before_anything_is_written(inputs, tmp_path):
    output = tmp_path / "out"
    no_text = write(tmp_path / "no_text.parquet", body=["a"], id=[1])
    with pytest.raises(ValueError, match=r"no_text.parquet: no text column 'text'; it has body: string, id: int64"):
        run(job(inputs, output, input=[no_text]))
    ints = write(tmp_path / "ints.parquet", text=[1, 2])
    with pytest.raises(ValueError, match="ints.parquet: text column 'text' must hold strings, it holds int64"):
        run(job(inputs, output, input=[ints]))
    with pytest.raises(ValueError, match="no input files matched"):
        run(job(inputs, output, input=[str(tmp_path / "nothing-*.parquet")]))
    corrupt = tmp_path / "corrupt" / "x.parquet"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"x.parquet: not a readable Parquet file .*--skip-bad-files"):
        run(job(inputs, output, input=[str(corrupt)]))
    with pytest.raises((ValueError, FileNotFoundError), match="FastBert|config.json|no such folder"):
        run(job(inputs, output, model=str(tmp_path)))
    assert not output.exists()
    with pytest.raises(ValueError, match="speed must be a number in"):
        job(inputs, output, speed=1.5)
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"already holds files that jobs.score did not write \(notes.txt\)"):
            run(job(inputs, output, overwrite=overwrite))
    assert (output / "notes.txt").read_text() == "mine"


def test_corrupt_file_can_be_skipped_and_recorded(ray_session, inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.parquet").write_bytes(b"not parquet at all")
    write(folder / "good.parquet", text=["good w1", "bad w2"], id=[1, 2])
    summary = run(job(inputs, tmp_path / "out", input=[str(folder)], skip_bad_files=True, replicas="1"))
    assert list(summary["bad_files"]) == [str(folder / "bad.parquet")] and summary["rows_out"] == 2


def test_a_budget_picks_the_speed_from_the_models_table(ray_session, inputs, model_with_table, tmp_path):
    folder, model = model_with_table
    expected = choose_speed(model.tradeoff, target_speedup=1.1)
    assert expected.speed > 0  # the tiny model has a speed that saves FLOPs
    summary = run(job(inputs, tmp_path / "out", model=str(folder), speed=None, target_speedup=1.1))
    assert summary["speed"] == expected.speed
    assert summary["speed_choice"]["target_speedup"] == 1.1
    assert summary["speed_choice"]["promised"]["speed"] == expected.speed
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["speed_choice"] == summary["speed_choice"]
    with pytest.raises(ValueError, match="no tradeoff.json"):  # a model trained before tables existed
        run(job(inputs, tmp_path / "other", speed=None, max_accuracy_drop=1.0))
    assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def model_with_table(inputs, tmp_path_factory):
    """The inputs' model with a trade-off table of 64 validation rows."""
    model = FastBert.from_pretrained(str(inputs / "model"))
    texts, labels = toy_task(np.random.default_rng(9), 64)
    model.tradeoff = tradeoff_table(model, texts, labels, data="toy validation rows")
    folder = tmp_path_factory.mktemp("table") / "model"
    model.save_pretrained(str(folder))
    return folder, model


def test_audit_startup_costs_and_drift_in_the_summary(ray_session, inputs, model_with_table, tmp_path):
    folder, model = model_with_table
    speed = SPEED  # about half the rows leave at layer 1
    warnings: list[str] = []
    summary = run(job(inputs, tmp_path / "out", model=str(folder), speed=speed, audit=0.5, price_per_hour=2.0,
                      gpus_per_replica=0), warn=warnings.append)
    out, source = read_output(tmp_path / "out"), all_inputs(inputs)
    assert out.column_names[-2:] == ["audited", "teacher_prediction"]
    audited = np.array(out.column("audited").to_pylist())
    teacher = Scorer(FastBert.from_pretrained(str(folder)), precision="fp32", speed=0.0)(source.column("text"))
    errors = np.array([e is not None for e in out.column("error").to_pylist()])
    assert 20 < audited.sum() < 75 and not (audited & errors).any()  # about half, never a row without an answer
    assert out.column("teacher_prediction").to_pylist() == [
        t if a else None for t, a in zip(teacher.column("prediction").to_pylist(), audited)]
    chosen = np.array(out.column("prediction").to_pylist(), dtype=object)[audited]
    truth = np.array(teacher.column("prediction").to_pylist(), dtype=object)[audited]
    assert (chosen != truth).any()  # the speed changes some answers: the audit has something to find
    probs = np.array([p for p, a in zip(teacher.column("probabilities").to_pylist(), audited) if a])  # (A, 2)
    cost = probs.max(1) - probs[np.arange(len(chosen)), [model.config.labels.index(c) for c in chosen]]  # (A,)
    audit = summary["audit"]
    assert audit["rows"] == audited.sum() and audit["agreement"] == pytest.approx(np.mean(chosen == truth))
    assert 0 < audit["agreement_ci95"][0] < audit["agreement"] < audit["agreement_ci95"][1] < 1
    assert audit["estimated_cost_points"] == pytest.approx(100 * cost.mean(), abs=1e-4)
    assert audit["estimated_cost_ci95"][0] < audit["estimated_cost_points"] < audit["estimated_cost_ci95"][1]
    assert 100 * np.mean(chosen != truth) < audit["max_cost_points"] == pytest.approx(100 * (1 - audit["agreement_ci95"][0]))
    assert 0 < audit["estimated_cost_points"] <= 100 * np.mean(chosen != truth)  # a lost row costs at most 1
    # the same rows are audited whatever the calls: a second run with other call sizes agrees
    again = run(job(inputs, tmp_path / "again", model=str(folder), speed=speed, audit=0.5, rows_per_call=7,
                    replicas="1"), warn=warnings.append)
    assert read_output(tmp_path / "again").column("audited").to_pylist() == audited.tolist()
    for key in ("rows", "agreement", "agreement_ci95", "max_cost_points"):
        assert again["audit"][key] == audit[key], key
    assert again["audit"]["estimated_cost_points"] == pytest.approx(audit["estimated_cost_points"])  # float noise

    assert 0 < summary["startup_seconds"] < summary["wall_seconds"] and summary["steady_rows_per_s"] > 0
    markers = markers_of(tmp_path / "out")  # every piece's, all of this run
    assert summary["cpu_seconds_per_million_rows"] == pytest.approx(
        sum(m["cpu_seconds"] for m in markers) / summary["rows_this_run"] * 1e6)
    assert summary["cpu_seconds_per_million_rows"] > 0 and summary["gpu_seconds_per_million_rows"] == 0
    assert summary["cost_per_million_rows"] == pytest.approx(summary["replica_busy_seconds_per_million_rows"] / 3600 * 2.0)
    assert again["cost_per_million_rows"] is None  # no price given

    counts = np.bincount(Scorer(model, precision="fp32", speed=speed)(source.column("text")).column("exit_layer")
                         .drop_null().to_numpy(), minlength=4)[1:].tolist()
    expected = exit_drift(model.tradeoff, speed, counts)
    assert {k: v for k, v in summary["drift"].items() if k != "warning"} == pytest.approx(dataclasses.asdict(expected))
    assert not expected.drifted and warnings == []  # the same kind of rows as the validation rows

    # rows that all leave at the layer the validation rows left at least: drift, one warning
    layers = Scorer(model, precision="fp32", speed=speed)(source.column("text")).column("exit_layer").to_pylist()
    point = min(model.tradeoff.points, key=lambda p: abs(p.speed - speed))
    rare = min(set(layers) - {None}, key=lambda layer: point.exit_counts[layer - 1])
    text = source.column("text")[layers.index(rare)].as_py()
    write(tmp_path / "odd.parquet", text=[text] * 60, id=list(range(60)))
    odd = run(job(inputs, tmp_path / "odd", model=str(folder), speed=speed, input=[str(tmp_path / "odd.parquet")],
                  replicas="1"), warn=warnings.append)
    assert odd["drift"]["drifted"] and odd["drift"]["total_variation"] > odd["drift"]["threshold"]
    assert len(warnings) == 1 and "validation rows" in warnings[0] and odd["drift"]["warning"] in warnings[0]


def test_an_audit_without_disagreements_gives_a_bound_but_no_cost_interval():
    markers = [{"audit": {"rows": 60, "agree": 60, "cost": 0.0, "cost_squared": 0.0}},
               {"audit": {"rows": 40, "agree": 40, "cost": 0.0, "cost_squared": 0.0}}, {}]
    audit = _audit_summary(ScoreJobConfig(model="m", input="i", output="o", audit=0.1), markers)
    assert audit["rows"] == 100 and audit["agreement"] == 1.0 and audit["agreement_ci95"][1] == 1.0
    assert audit["estimated_cost_points"] == 0.0 and audit["estimated_cost_ci95"] is None  # nothing to decide on
    assert 3.0 < audit["max_cost_points"] < 4.5  # 100 rows all agreeing still allow ~3.7% disagreement (Wilson)


def test_command_line_mirrors_the_config():
    config = parse_args(["--model", "m", "--input", "a.parquet", "b/", "--output", "o", "--speed", "0.3",
                         "--replicas", "1-4", "--columns", "id", "--resume"])
    assert config == ScoreJobConfig(model="m", input=["a.parquet", "b/"], output="o", speed=0.3, replicas="1-4",
                                    columns=["id"], resume=True)
    assert config.replica_range() == (1, 4)
    budget = parse_args(["--model", "m", "--input", "a", "--output", "o", "--max-accuracy-drop", "0.5"])
    assert budget.speed is None and budget.max_accuracy_drop == 0.5
    assert parse_args(["--model", "m", "--input", "a", "--output", "o"]).speed is None  # run() asks the model
    with pytest.raises(SystemExit):  # a speed and a budget exclude each other
        parse_args(["--model", "m", "--input", "a", "--output", "o", "--speed", "0.3", "--target-speedup", "2"])
    with pytest.raises(UserError, match="replicas must be N or MIN-MAX"):
        ScoreJobConfig(model="m", input="i", output="o", replicas="4-1")
    audited = parse_args(["--model", "m", "--input", "a", "--output", "o", "--audit", "0.01", "--price-per-hour", "3"])
    assert audited.audit == 0.01 and audited.price_per_hour == 3.0 and "audit" in audited.identity()
    assert "audit" not in config.identity()  # without it, an earlier version's output still matches
    for bad in ({"audit": 2.0}, {"audit": -0.1}, {"price_per_hour": -1.0}):
        with pytest.raises(UserError, match="audit must be|price_per_hour must be"):
            ScoreJobConfig(model="m", input="i", output="o", **bad)


def test_costs_pair_the_arrivals_with_the_pieces_in_stream_order():
    from pipeline.scoring import _costs

    def piece(file: int, group: int, first: int, rows: int) -> dict:
        return {"file": file, "row_group": group, "first_row": first, "rows": rows, "busy_seconds": rows / 100,
                "cpu_seconds": rows / 50}

    job = ScoreJobConfig(model="m", input=["i"], output="o", price_per_hour=2.0)
    # listed out of order: the stream's is (0, 0, 0), (0, 1, 100), (1, 0, 0); 1 piece came at 10 s, 2 at 12 s
    pieces = [piece(1, 0, 0, 30), piece(0, 1, 100, 20), piece(0, 0, 0, 100)]
    costs = _costs(job, pieces, [(10.0, 1), (12.0, 2)], started_at=4.0, gpus=0.0)
    assert costs["startup_seconds"] == 6.0 and costs["steady_rows_per_s"] == (20 + 30) / 2
    assert costs["cpu_seconds_per_million_rows"] == pytest.approx(3.0 / 150 * 1e6)
    assert costs["replica_busy_seconds_per_million_rows"] == pytest.approx(1.5 / 150 * 1e6)
    assert costs["cost_per_million_rows"] == pytest.approx(1.5 / 150 * 1e6 / 3600 * 2.0)
    assert costs["gpu_seconds_per_million_rows"] == 0.0
    # arrivals that do not count the pieces: no steady rate rather than a wrong one; the rest stands
    short = _costs(job, pieces, [(10.0, 1), (12.0, 1)], started_at=4.0, gpus=1.0)
    assert short["steady_rows_per_s"] is None and short["startup_seconds"] == 6.0
    assert short["gpu_seconds_per_million_rows"] == pytest.approx(1.5 / 150 * 1e6)
    assert _costs(job, [], [], started_at=4.0, gpus=0.0)["cpu_seconds_per_million_rows"] is None  # nothing ran
