"""Tests for pipeline.distributed on a real local Ray (CPU, 2 workers, gloo): the toy task
through both stages (distilling on unlabelled texts, past a failed worker), a killed driver's
job run again, a finished job run again, reproducibility, and bad input refused on the driver."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import pyarrow.parquet as pq
import pytest

from pipeline import FastBert, Scorer
from jobs.train import parse_args
from pipeline.distributed import TrainJobConfig, _cached, _dataset, _shuffled, bucketed_batches, check_inputs, run
from pipeline.evaluate import EvaluateConfig
from pipeline.outputs import UserError
from pipeline.scoring import ScoreJobConfig
from pipeline.text import distillation_views
from pipeline.config import SPEED_GRID
from pipeline.tradeoff import calibrate, choose_speed
from test_train import LABELS, accuracy, toy_task
from driver import start_driver
from faults import KillWhen, alive_actor_pids, process_gone
from tiny import tiny_model

ray = pytest.importorskip("ray")

FAST = dict(epochs=2, distill_epochs=2, lr=3e-3, head_lr=1e-2, distill_lr=1e-2, batch_size=16, max_length=32, log_every=4,
            precision="fp32",  # the exact comparisons below; tests/test_train.py trains in bf16 and fp16
            branch_width=16)  # students narrower than the 32-wide backbone, or no exit saves FLOPs


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # own instance
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny backbone folder and the toy task as Parquet files."""
    root = tmp_path_factory.mktemp("data")
    model = tiny_model()
    model.backbone.save_pretrained(root / "backbone")
    model.tokenizer.save_pretrained(root / "backbone")
    rng = np.random.default_rng(0)
    for name, n in (("train", 256), ("validation", 128), ("distill", 256)):
        texts, labels = toy_task(rng, n)
        columns = {"text": texts} if name == "distill" else {"text": texts, "label": labels}  # distill: unlabelled
        pq.write_table(pa.table(columns), root / f"{name}.parquet")
    return root


def job(data, output, **changes) -> TrainJobConfig:
    paths = dict(train=str(data / "train.parquet"), validation=str(data / "validation.parquet"),
                 backbone=str(data / "backbone"))
    fast = {k: v for k, v in FAST.items()  # a finetuned model keeps its own widths
            if not (k == "branch_width" and changes.get("finetuned"))}
    return TrainJobConfig(output=str(output), **{**paths, **fast, **changes})


@pytest.fixture(scope="module")
def trained(ray_session, data, tmp_path_factory):
    """The module's job, both stages, distilling on unlabelled texts."""
    output = tmp_path_factory.mktemp("runs") / "model"
    return output, run(job(data, output, distill=str(data / "distill.parquet")))


def test_two_workers_learn_and_distil(trained, data):
    """Both stages, each epoch once, every row of every input once per epoch."""
    output, metrics = trained
    assert [e["epoch"] for e in metrics.finetune] == [1, 2]
    assert [e["epoch"] for e in metrics.distill] == [1, 2]
    assert max(e["teacher_accuracy"] for e in metrics.finetune) > 0.9  # chance is 0.5
    last = metrics.distill[-1]
    assert last["agreement"][0] > 0.85 and last["agreement"][-1] == 1.0
    assert len(last["exit_accuracy"]) == 3 and last["samples_per_s"] > 0 and last["seconds"] > 0
    for stage in ("finetune", "distill"):  # the workers' shards cover each input once per epoch
        assert [(e["samples"], e["validation_samples"], e["workers"]) for e in getattr(metrics, stage)] == [(256, 128, 2)] * 2
    assert metrics.labels == list(LABELS) and metrics.precision == "fp32"
    scores = [float(np.mean(e["agreement"][:-1])) for e in metrics.distill]  # stage 2 keeps its best epoch
    assert metrics.kept["distill"]["epoch"] == max((1, 2), key=lambda e: (scores[e - 1], e))
    assert metrics.kept["finetune"]["epoch"] == metrics.best_epoch and metrics.kept["finetune"]["by"] == "teacher_accuracy"
    on_disk = json.loads((output / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics.to_json()))
    assert on_disk["arguments"]["epochs"] == 2 and on_disk["arguments"]["train"].endswith("train.parquet")

    model = FastBert.from_pretrained(str(output))
    assert model.config.labels == list(LABELS)
    temperatures = model.config.exit_temperatures  # calibrated on the validation rows and their labels
    assert len(temperatures) == 3 and all(t > 0 for t in temperatures)
    validation = pq.read_table(data / "validation.parquet")
    assert calibrate(model, validation.column("text").to_pylist(),
                     [str(v) for v in validation.column("label").to_pylist()]) == temperatures
    texts, labels = toy_task(np.random.default_rng(1), 64)
    table = Scorer(model, precision="fp32", speed=0.0)(texts)
    assert set(table.column("prediction").to_pylist()) <= set(LABELS)
    assert accuracy(table.column("prediction").to_pylist(), labels) > 0.9


def test_the_model_carries_its_validation_tradeoff_and_keeps_its_promises(trained, data):
    output, metrics = trained
    model = FastBert.from_pretrained(str(output))
    table = model.tradeoff
    assert table.rows == 128 and table.data.endswith("validation.parquet")
    assert [p.speed for p in table.points] == list(SPEED_GRID)
    assert table.teacher.accuracy == pytest.approx(metrics.distill[-1]["teacher_accuracy"], abs=1.5 / 128)
    validation = pq.read_table(data / "validation.parquet")
    texts, labels = validation.column("text").to_pylist(), validation.column("label").to_pylist()
    for budget in ({"max_accuracy_drop": 1.0}, {"target_speedup": 1.2}):
        scorer = Scorer(model, precision="fp32", **budget)  # the speed comes from the table
        promised = scorer.speed_choice
        assert scorer.speed == promised.speed and promised in table.points
        out = scorer(texts)  # on the same rows, the engine delivers exactly what the table promised
        assert accuracy(out.column("prediction").to_pylist(), labels) == pytest.approx(promised.accuracy)
        assert scorer.stats.flop_speedup == pytest.approx(promised.flop_speedup)
    assert table.teacher.accuracy - Scorer(model, precision="fp32", max_accuracy_drop=1.0).speed_choice.accuracy <= 0.01
    # no speed, no budget: the model's own suggestion, the fastest speed within 0.5 point
    assert Scorer(model, precision="fp32").speed_choice == choose_speed(table, max_accuracy_drop=0.5)
    with pytest.raises(ValueError, match="no speed reaches a 50.0x FLOP speed-up .* the most is"):
        Scorer(model, precision="fp32", target_speedup=50.0)


def test_running_a_finished_job_again_resumes(trained, data):
    output, metrics = trained
    lines: list[str] = []
    again = run(job(data, output, distill=str(data / "distill.parquet"), workers=1, cache="off"),
                log=lines.append)  # workers and cache may change
    assert any("nothing to train" in line for line in lines)  # no trainer started
    assert again.finetune == metrics.finetune  # the same epochs (their timings too): nothing retrained
    assert again.distill == metrics.distill


def test_stage_two_alone_from_a_finetuned_model(trained, data, tmp_path):
    """--finetuned skips stage 1 and distils the students of the fine-tuned model; its
    backbone and teacher stay as they were."""
    _, metrics = trained
    start = metrics.finetuned  # the best fine-tuning checkpoint of the trained job
    assert os.path.isfile(os.path.join(start, "model.safetensors"))
    output = tmp_path / "stage2"
    stage2 = run(job(data, output, finetuned=start, distill_epochs=1))
    assert stage2.finetune == [] and stage2.best_epoch is None and stage2.finetuned == start
    assert [e["epoch"] for e in stage2.distill] == [1]
    # no unlabelled texts: stage 2 distils on the training texts' views, each once (Ray's split drops views % 2)
    train = pq.read_table(data / "train.parquet").column("text").to_pylist()
    views = distillation_views(FastBert.from_pretrained(start).tokenizer, train, 4, 32)
    assert len(views) > 2 * len(train) and stage2.distill[0]["samples"] == len(views) // 2 * 2
    assert stage2.distill[0]["agreement"][0] > 0.8  # the first student learnt the teacher's answers
    before, after = FastBert.from_pretrained(start).state_dict(), FastBert.from_pretrained(str(output)).state_dict()
    teacher = "branches.2."  # the tiny model has 3 layers
    frozen = [k for k in after if not k.startswith("branches.") or k.startswith(teacher)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not all(torch.equal(before[k], after[k]) for k in after if k.startswith("branches.0."))
    assert not (output / "optimizer.json").exists() and not (output / "state.json").exists()  # checkpoint-only


def test_finetuned_model_must_know_every_label(trained, data, tmp_path):
    _, metrics = trained
    train = write(tmp_path / "train.parquet", text=["good w1", "bad w2", "fine w3"], label=["pos", "neg", "meh"])
    with pytest.raises(ValueError, match=r"labels never seen in .* \['meh'\]; the model's labels are \['neg', 'pos'\]"):
        run(job(data, tmp_path / "out", train=train, finetuned=metrics.finetuned))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="distill_epochs must be >= 1"):
        job(data, tmp_path / "out", finetuned=metrics.finetuned, distill_epochs=0)


def test_one_worker_takes_the_steps_two_workers_take_past_a_killed_driver_and_worker(trained, data, tmp_path):
    """--batch-size is the global batch: one worker takes the 16 rows of a step alone, two
    take 8 each, so both take the same optimizer steps over the same rows every epoch. On the
    way, two faults, each from outside: `python -m jobs.train` is killed (SIGKILL) after Ray
    committed its first fine-tuning checkpoint, and the same command run again finishes the
    job without redoing the committed epoch; during that run its worker's process is killed
    (SIGKILL), and Ray Train restarts it from the checkpoint (the model, AdamW's moments and
    the schedule), so epoch 2 finishes after both kills."""
    output = tmp_path / "one"
    argv = ["--train", str(data / "train.parquet"), "--validation", str(data / "validation.parquet"),
            "--output", str(output), "--backbone", str(data / "backbone"), "--epochs", "2", "--distill-epochs", "0",
            "--lr", "3e-3", "--head-lr", "1e-2", "--distill-lr", "1e-2", "--batch-size", "16", "--max-length", "32",
            "--branch-width", "16", "--workers", "1", "--cpus-per-worker", "2", "--precision", "fp32",
            "--cache", "off"]  # streamed from the files every epoch
    driver = start_driver("jobs.train", argv, tmp_path / "driver.log")
    snapshot = output / "_ray" / "finetune" / "checkpoint_manager_snapshot.json"  # what Ray Train committed

    def committed() -> list[int]:
        try:
            return [r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError):  # not there yet, or being written
            return []

    deadline = time.monotonic() + 240
    while not committed():
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no committed checkpoint within 240 s"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_at = time.time()
    time.sleep(1)
    done = committed()
    assert done and not (output / "metrics.json").exists()

    old = frozenset(alive_actor_pids("RayTrainWorker"))  # the killed driver's worker, until Ray reaps it
    seen: dict[int, float] = {}  # the worker processes of the second run, when first seen

    def training() -> bool:  # its worker has run for a second: past its start, at its epoch
        for pid in set(alive_actor_pids("RayTrainWorker")) - old:
            seen.setdefault(pid, time.monotonic())
        return any(time.monotonic() - t > 1.0 for t in seen.values())

    lines: list[str] = []
    killer = KillWhen(training, actor="RayTrainWorker", spare=old)
    killer.start()
    try:
        metrics = run(parse_args(argv), log=lines.append)
    finally:
        killer.finish()
    history = metrics.finetune
    # stage 1 only, for time: stage 2 runs the same loop and checkpoints (a stage-agnostic
    # StageProgress; test_stage_two_alone_from_a_finetuned_model)
    assert [e["epoch"] for e in history] == [1, 2] and metrics.distill == []
    assert done[-1] < 2, f"the driver was killed too late (committed epochs {done})"
    assert all(e["finished_at"] < killed_at for e in history if e["epoch"] <= done[-1])  # carried over
    assert all(e["finished_at"] > killed_at for e in history if e["epoch"] > done[-1])  # trained after the kill
    assert killer.killed is not None, "the second run finished before its worker could be killed"
    assert killer.killed not in old and process_gone(killer.killed)
    assert killed_at < killer.at < history[1]["finished_at"]
    assert any("suggested for 0.5" in line for line in lines)  # the validation table, printed at the end
    assert any(line.startswith("scoring without --speed runs speed") for line in lines)
    two = trained[1].finetune
    assert [e["workers"] for e in history] == [1, 1] and [e["workers"] for e in two] == [2, 2]
    assert [e["steps"] for e in history] == [e["steps"] for e in two] == [256 // 16] * 2
    assert [e["samples"] for e in history] == [e["samples"] for e in two] == [256] * 2
    assert max(e["teacher_accuracy"] for e in history) > 0.9
    assert (output / "tradeoff.json").exists() and not (output / "state.json").exists()
    model = FastBert.from_pretrained(str(output))
    texts, labels = toy_task(np.random.default_rng(1), 64)
    predicted = Scorer(model, precision="fp32", speed=0.0)(texts).column("prediction").to_pylist()
    assert accuracy(predicted, labels) > 0.9
    with pytest.raises(UserError, match="batch_size 16 is the global batch.*multiple of 3 .e.g. 15 or 18"):
        job(data, tmp_path / "three", workers=3)


def test_two_workers_get_disjoint_shuffled_shards_that_cover_the_data_every_epoch(ray_session, data, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def record_shards(config: dict) -> None:  # nested, so that Ray ships it by value to the workers
        """Each worker writes the rows (token ids) and labels of every training batch it gets, by epoch."""
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            rows, labels = [], []
            for batch in bucketed_batches(shard, batch_size=8, pad_id=0, seed=epoch, batches_per_bucket=2):
                rows += [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
                labels.append(batch["labels"].tolist())
            with open(f"{config['folder']}/{rank}-{epoch}.json", "w") as f:
                json.dump({"rows": rows, "labels": labels}, f)

    texts = [f"w{i % 60} w{i // 60} {'good' if i % 2 else 'bad'}" + " w1" * (i % 7) for i in range(200)]  # unique
    texts = sorted(texts, key=lambda t: "good" in t)  # a file sorted by label
    uri = write(tmp_path / "rows.parquet", text=texts,
                label=[LABELS[1] if "good" in t else LABELS[0] for t in texts])
    config = job(data, tmp_path / "out", batch_size=8)
    tokenizer = tiny_model().tokenizer
    dataset = _shuffled(_cached({"train": (_dataset(uri, config, tokenizer, list(LABELS)), 200)}, config)["train"],
                        config.seed)  # as the job does (the S3 test streams instead: cache="off")
    TorchTrainer(record_shards, train_loop_config={"folder": str(tmp_path)}, datasets={"train": dataset},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="shards")).fit()
    expected = sorted(tokenizer(t)["input_ids"] for t in texts)
    for epoch in range(2):
        seen = [json.loads((tmp_path / f"{rank}-{epoch}.json").read_text()) for rank in range(2)]
        assert len(seen[0]["rows"]) == len(seen[1]["rows"]) == 100  # equal shards: the same number of DDP steps
        assert sorted(seen[0]["rows"] + seen[1]["rows"]) == expected  # together every row once: disjoint shards
        batches = seen[0]["labels"] + seen[1]["labels"]
        mixed = sum(len(set(b)) > 1 for b in batches)
        assert mixed >= 0.8 * len(batches), f"only {mixed} of {len(batches)} batches mix labels: the file's order leaks"
    assert seen[0]["rows"] != json.loads((tmp_path / "0-0.json").read_text())["rows"]  # shuffled anew each epoch


def test_integer_labels_are_named_by_their_strings(data, tmp_path):
    rows = pq.read_table(data / "train.parquet").to_pydict()
    ints = [LABELS.index(label) * 10 + 2 for label in rows["label"]]  # 2 and 12: numeric, not string order
    pq.write_table(pa.table({"text": rows["text"], "label": ints}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": rows["text"][:8], "label": ints[:8]}), tmp_path / "val.parquet")
    inputs = check_inputs(TrainJobConfig(train=str(tmp_path / "train.parquet"), validation=str(tmp_path / "val.parquet"),
                                         output=str(tmp_path / "out")))
    assert inputs.labels == ["2", "12"] and inputs.train_rows == 256 and inputs.validation_rows == 8
    limited = check_inputs(TrainJobConfig(train=str(tmp_path / "train.parquet"), validation=str(tmp_path / "val.parquet"),
                                          output=str(tmp_path / "out"), max_rows=100))
    assert limited.labels == ["2", "12"] and limited.train_rows == 100 and limited.validation_rows == 8


def write(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize(
    "train, validation, message",
    [
        (dict(words=["a b"] * 4, label=["x", "y"] * 2), None, "no column 'text'; it has words: string, label: string"),
        (dict(text=["a b"] * 4, y=["x", "y"] * 2), None, "no column 'label'; it has text: string, y: string"),
        (dict(text=[1, 2, 3, 4], label=["x", "y"] * 2), None, "text column 'text' must hold strings"),
        (dict(text=["a b"] * 4, label=["x"] * 4), None, "single class ['x']"),
        (dict(text=["a"] * 4, label=["x", "y"] * 2), dict(text=["a"], label=["z"]), "never seen in training ['z']"),
        (dict(text=pa.array([], pa.string()), label=pa.array([], pa.string())), None, "no rows"),
        (dict(text=["a", None] * 2, label=["x", "y"] * 2), None, "column 'text' has 2 null values"),
        (dict(text=["a"], label=["x"]), None, "1 rows cannot feed 2 workers"),
    ],
    ids=["no-text", "no-label", "int-text", "one-class", "unseen-label", "empty", "null-text", "too-few-rows"],
)
def test_bad_input_fails_on_the_driver_and_writes_nothing(data, tmp_path, train, validation, message):
    train_uri = write(tmp_path / "train.parquet", **train)
    val_uri = write(tmp_path / "val.parquet", **(validation or dict(text=["a"], label=["x"])))
    output = tmp_path / "out"
    config = TrainJobConfig(train=train_uri, validation=val_uri, output=str(output), backbone=str(data / "backbone"))
    with pytest.raises(ValueError) as info:
        run(config)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert (train_uri in str(info.value)) or (val_uri in str(info.value))
    assert not output.exists()


def test_output_holding_another_model_is_refused_even_with_overwrite(data, tmp_path):
    output = tmp_path / "out"
    tiny_model().save_pretrained(str(output))  # a model jobs.train did not write
    for overwrite in (False, True):
        with pytest.raises(UserError, match="already holds files that jobs.train did not write"):
            check_inputs(job(data, output, overwrite=overwrite))
    # a model an earlier version of jobs.train wrote (its metrics.json names its arguments)
    (output / "metrics.json").write_text(json.dumps({"arguments": {**job(data, output).arguments(), "epochs": 9}}))
    with pytest.raises(UserError, match=r"other arguments \(differing: \['epochs'\]\)"):
        check_inputs(job(data, output))
    assert check_inputs(job(data, output, overwrite=True)).labels == list(LABELS)
    assert (output / "model.safetensors").exists()  # checking alone deletes nothing
    (output / "notes.txt").write_text("mine")  # a file of the user's in it: refused, with overwrite too
    with pytest.raises(UserError, match=r"holds files that jobs.train did not write \(notes.txt\)"):
        check_inputs(job(data, output, overwrite=True))


@pytest.mark.parametrize("where", ["output", "inside", "storage"])
def test_an_output_around_the_training_data_is_refused_and_nothing_deleted(data, tmp_path, where):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train", "validation"):
        (folder / f"{name}.parquet").write_bytes((data / f"{name}.parquet").read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    paths = dict(train=str(folder / "train.parquet"), validation=str(folder / "validation.parquet"))
    output, storage = {"output": (folder, None), "inside": (folder / "train.parquet" / "x", None),
                       "storage": (tmp_path / "model", tmp_path)}[where]
    with pytest.raises(UserError, match="holds the input --train|lies inside the file"):
        run(job(data, output, storage=str(storage) if storage else None, overwrite=True, **paths))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_unfinished_run_of_another_job_is_refused(data, tmp_path):
    output = tmp_path / "out"
    state = output / "_ray" / "finetune" / "checkpoint_1" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"arguments": {**job(data, output).arguments(), "lr": 1.0}}))
    with pytest.raises(ValueError, match=r"differing: \['lr'\]"):
        check_inputs(job(data, output))
    assert check_inputs(job(data, output, lr=1.0)).train_rows == 256  # the same job: resumes
    # a run of an earlier version's baseline modes is no FastBERT run of this job
    for mode in ({"plain_bert": True}, {"student_targets": "labels"}):
        state.write_text(json.dumps({"arguments": {**job(data, output).arguments(), **mode}}))
        with pytest.raises(ValueError, match=rf"differing: \['{next(iter(mode))}'\]"):
            check_inputs(job(data, output))
    # a run of a version before teacher_head had a branch teacher: not the new default's pooler
    earlier = {k: v for k, v in job(data, output).arguments().items() if k != "teacher_head"}
    state.write_text(json.dumps({"arguments": earlier}))
    with pytest.raises(ValueError, match=r"differing: \['teacher_head'\]\) \(runs before .* --teacher-head branch"):
        check_inputs(job(data, output))
    assert check_inputs(job(data, output, teacher_head="branch")).train_rows == 256
    # ... and stage 2 alone from a finetuned model keeps that model's teacher: nothing differs
    stage2 = job(data, output, finetuned=str(tmp_path / "stage1"))
    state.write_text(json.dumps({"arguments": {k: v for k, v in stage2.arguments().items() if k != "teacher_head"}}))
    assert check_inputs(stage2, labels=list(LABELS), labels_from="m").train_rows == 256
    # a run of a version before the views distilled on the training texts alone: it differs where
    # stage 2 runs on them, not where it distils on --distill or does not run
    earlier = {k: v for k, v in job(data, output).arguments().items() if k != "distill_views"}
    state.write_text(json.dumps({"arguments": earlier}))
    with pytest.raises(ValueError, match=r"differing: \['distill_views'\]\) \(runs before .* --distill-views 1"):
        check_inputs(job(data, output))
    assert check_inputs(job(data, output, distill_views=1)).train_rows == 256
    for unused in ({"distill": str(data / "distill.parquet")}, {"distill_epochs": 0}):
        state.write_text(json.dumps({"arguments": {k: v for k, v in job(data, output, **unused).arguments().items()
                                                   if k != "distill_views"}}))
        assert check_inputs(job(data, output, **unused)).train_rows == 256


def test_command_line_mirrors_the_config():
    config = parse_args(["--train", "t", "--validation", "v", "--output", "o", "--no-gpu", "--head-lr", "1e-3",
                         "--max-rows", "5", "--overwrite", "--kl", "paper", "--teacher-head", "branch",
                         "--teacher-width", "96", "--branch-width", "64", "--cache", "off"])
    assert config == TrainJobConfig(train="t", validation="v", output="o", use_gpu=False, head_lr=1e-3, max_rows=5,
                                    overwrite=True, kl="paper", teacher_head="branch", teacher_width=96,
                                    branch_width=64, cache="off")
    with pytest.raises(SystemExit):
        parse_args(["--train", "t", "--validation", "v", "--output", "o", "--teacher-head", "linear"])
    assert parse_args(["--train", "t", "--validation", "v", "--output", "o", "--gpu"]).use_gpu is True
    assert parse_args(["--train", "t", "--validation", "v", "--output", "o"]).use_gpu is None


def test_config_is_validated():
    with pytest.raises(ValueError, match="workers, cpus_per_worker and epochs.* got 0, 1"):
        TrainJobConfig(train="t", validation="v", output="o", workers=0)
    with pytest.raises(ValueError, match="workers, cpus_per_worker and epochs.* got 2, 0"):
        TrainJobConfig(train="t", validation="v", output="o", cpus_per_worker=0)
    with pytest.raises(ValueError, match="workers, cpus_per_worker and epochs .* got 2, 1 and 0"):
        TrainJobConfig(train="t", validation="v", output="o", epochs=0)
    with pytest.raises(ValueError, match="batch_size, log_every and distill_views must be >= 1"):  # TrainConfig's
        TrainJobConfig(train="t", validation="v", output="o", batch_size=0)
    with pytest.raises(ValueError, match="use_gpu"):
        TrainJobConfig(train="t", validation="v", output="o", use_gpu="yes")
    with pytest.raises(ValueError, match="lr"):
        TrainJobConfig(train="t", validation="v", output="o", lr=0.0)
    with pytest.raises(ValueError, match="branch_width must be a positive integer and teacher_width.* got 128 and 0"):
        TrainJobConfig(train="t", validation="v", output="o", teacher_head="branch", teacher_width=0)
    with pytest.raises(ValueError, match="teacher_width sizes a branch teacher"):
        TrainJobConfig(train="t", validation="v", output="o", teacher_width=96)
    with pytest.raises(ValueError, match="teacher_head must be"):
        TrainJobConfig(train="t", validation="v", output="o", teacher_head="linear")
    with pytest.raises(ValueError, match="a finetuned model keeps its own"):
        TrainJobConfig(train="t", validation="v", output="o", finetuned="m", teacher_width=96)
    with pytest.raises(ValueError, match="branch_width must be a positive integer.* got 0 and None"):
        TrainJobConfig(train="t", validation="v", output="o", branch_width=0)
    with pytest.raises(ValueError, match="a finetuned model keeps its own"):
        TrainJobConfig(train="t", validation="v", output="o", finetuned="m", branch_width=64)


@pytest.mark.parametrize("config, field, kind", [
    (lambda: TrainJobConfig(train="t", validation="v", output="o", lr="1e-4"), "TrainJobConfig.lr", "a number"),
    (lambda: TrainJobConfig(train="t", validation="v", output="o", epochs=2.5), "TrainJobConfig.epochs", "an integer"),
    (lambda: TrainJobConfig(train="t", validation="v", output="o", workers=True), "TrainJobConfig.workers", "an integer"),
    (lambda: TrainJobConfig(train="t", validation="v", output="o", distill=""), "TrainJobConfig.distill",
     "a non-empty string or None"),
    (lambda: TrainJobConfig(train="t", validation="v", output="o", kl="forward"), "TrainJobConfig.kl",
     "one of 'paper', 'reverse'"),
    (lambda: ScoreJobConfig(model="m", input="i", output="o", cpus_per_replica="2"),
     "ScoreJobConfig.cpus_per_replica", "a number"),
    (lambda: ScoreJobConfig(model="m", input=["i", 3], output="o"), "ScoreJobConfig.input",
     "a list .a non-empty string each."),
    (lambda: EvaluateConfig(model="m", input="i", output="o", speeds=[0, "fast"]), "EvaluateConfig.speeds",
     "a list .a number each."),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_field(config, field, kind):
    """Every job's config checks each field against its annotation (``cli.check_fields``) before
    its ranges: a string where a number goes is a one-line UserError, not a TypeError later."""
    with pytest.raises(UserError, match=rf"^{field} must be {kind}, got "):
        config()


def test_values_python_code_passes_become_plain_ones():
    """A tuple where a list goes, numpy numbers and paths are taken as the list, int, float and
    string they stand for (what JSON and the flags give), so the job's files can record them."""
    config = EvaluateConfig(model=Path("m"), input="i", output="o", speeds=(0.5, np.float32(0.25)),
                            max_rows=np.int64(5))
    assert (config.model, config.speeds, config.max_rows) == ("m", [0.25, 0.5], 5) and type(config.max_rows) is int
    train = TrainJobConfig(train="t", validation="v", output="o", lr=np.float64(1e-4), epochs=np.int32(3))
    assert type(train.lr) is float and type(train.epochs) is int and json.dumps(train.arguments())
    assert ScoreJobConfig(model="m", input=("a", "b"), output="o", replicas=2).replicas == "2"


def test_the_shuffle_is_new_each_epoch_and_the_same_on_every_run(ray_session):
    """Each run of the dataset (Ray Train runs it once per epoch) gets a new order; a job run
    again with the same seed sees the same orders, so training is reproducible."""
    def orders(seed: int) -> list[list[int]]:
        dataset = _shuffled(ray.data.range(200, override_num_blocks=4), seed)
        return [[row["id"] for row in dataset.take_all()] for _ in range(2)]  # two epochs

    first, second = orders(0)
    assert sorted(first) == sorted(second) == list(range(200)) and first != second
    assert orders(0) == [first, second] and orders(1)[0] != first


def test_the_same_job_run_again_trains_the_same_model(trained, data, tmp_path):
    """Seeded shuffle, blocks in a fixed order through the cache, the shuffle and the split to
    two workers: the module's job run again from scratch (its stage 1, to another output)
    sees the same batches and ends bit for bit equal to the first run's stage-1 model."""
    _, metrics = trained
    again = run(job(data, tmp_path / "again", distill_epochs=0), log=lambda line: None)
    assert [e["loss"] for e in again.finetune] == [e["loss"] for e in metrics.finetune]
    assert again.best_epoch == metrics.best_epoch
    a = FastBert.from_pretrained(metrics.finetuned).state_dict()  # the first run's best stage-1 checkpoint
    b = FastBert.from_pretrained(str(tmp_path / "again")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inputs_are_cached_in_the_object_store_while_they_fit(ray_session, data, monkeypatch):
    """cache="auto" reads and tokenises an input once when its token ids fit in a quarter of
    the object store, and streams it from its files otherwise; "on" and "off" decide alone."""
    from ray.data.dataset import MaterializedDataset

    import pipeline.distributed as distributed

    model = tiny_model()

    def cached(cache: str, names: tuple[str, ...], share: float = distributed.CACHE_SHARE):
        monkeypatch.setattr(distributed, "CACHE_SHARE", share)
        lines: list[str] = []
        j = job(data, data / "unused", cache=cache)
        rows = {"train": 256, "validation": 128}
        out = _cached({name: (_dataset(str(data / f"{name}.parquet"), j, model.tokenizer, list(LABELS)),
                                          rows[name]) for name in names}, j, lines.append)
        return out, lines

    out, lines = cached("auto", ("train",))
    assert isinstance(out["train"], MaterializedDataset) and lines == []
    rows = out["train"].take_all()  # the rows, tokenised
    assert len(rows) == 256 and {int(r["labels"]) for r in rows} == {0, 1}
    # a budget that holds the first input but not both: the second streams from its file
    size = 256 * (32 * 4 + 16)
    share_for_one = size / ray.available_resources()["object_store_memory"] * 1.2  # validation: half as many
    out, lines = cached("auto", ("train", "validation"), share_for_one)
    assert isinstance(out["train"], MaterializedDataset)
    assert not isinstance(out["validation"], MaterializedDataset)
    assert len(lines) == 1 and lines[0].startswith("validation: 128 rows") and "streamed" in lines[0]
    out, lines = cached("on", ("validation",), 0.0)
    assert isinstance(out["validation"], MaterializedDataset) and lines == []
    out, lines = cached("off", ("train",))
    assert not isinstance(out["train"], MaterializedDataset) and lines == []
    with pytest.raises(ValueError, match="cache must be one of 'auto', 'on', 'off'"):
        TrainJobConfig(train="t", validation="v", output="o", cache="always")
