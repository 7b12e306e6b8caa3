"""FastBERT's two training stages as a Ray Train job: data-parallel fine-tuning, then
self-distillation, each on its own ``TorchTrainer``.

The driver (``run``) checks the input, builds the Ray Data pipelines (Parquet -> tokenised
rows: token id lists and label ids) and runs two trainers. Each worker (``train_loop``) runs
``pipeline.train.train_stage``, the loop a local ``fit`` runs too; the Ray calls are marked
``# Ray``: its shard of each dataset, the DDP wrapper, the checkpoint it resumes from and the
per-epoch report with a checkpoint (``model.save_pretrained`` output plus ``state.json``;
no pickle).

Stage 1 (``"finetune"``) keeps the epoch with the best validation teacher accuracy; stage 2
(``"distill"``) starts from it with the backbone and teacher frozen. Every epoch is
checkpointed under ``RunConfig(storage_path, name)``: a failed worker restarts from the
latest checkpoint (``FailureConfig(max_failures)``), and running the same job again resumes
where it stopped (epochs already done are skipped; AdamW's moments and the schedule come back
from the checkpoint too). ``finetuned`` skips stage 1 and distils the students of a model
fine-tuned earlier (e.g. the best stage-1 checkpoint of another job, named in its metrics).
The result lands in ``output``: a folder ``FastBert.from_pretrained`` loads, plus
``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import torch

from pipeline.config import (CONFIG_FILE, TRADEOFF_FILE, WEIGHTS_FILE, TradeoffTable,
                             save_table)
from pipeline.model import FastBert, resolve_precision
from pipeline.outputs import (Manifest, UserError, absolute, claim_output, inspect_output, put_file, read_manifest,
                              refuse_unsafe_output, same_or_inside, update_manifest, write_json)
from pipeline.ray_init import check_ray_address, init_ray
from pipeline.text import training_rows, view_rows
from pipeline.tradeoff import calibrate, choose_speed, describe_choice, format_table, tradeoff_table
from pipeline.train import (OPTIMIZER_STATE, OPTIMIZER_TENSORS, STAGES, EpochStats, EvalStats, Stage, StageProgress,
                            TrainConfig, TrainResult, collate, evaluate, load_optimizer, save_optimizer, stage_optimizer, train_stage)

STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_ONLY = (STATE_FILE, OPTIMIZER_STATE, OPTIMIZER_TENSORS)  # in checkpoints, not in the published model
RAY_FOLDER = "_ray"  # default storage of the Ray runs, inside the output folder
# arguments that do not change what is trained: a re-run may change them and still resume
NOT_COMPARED = ("overwrite", "max_failures", "workers", "cpus_per_worker", "use_gpu", "storage", "log_every", "cache",
                "verbose")
# what a training job writes into its output folder (besides _manifest.json and hidden temporary
# files): the Ray runs, the model (tokenizer files as named when published) and its tables
OWNS = [f"{RAY_FOLDER}/**", METRICS_FILE, TRADEOFF_FILE, CONFIG_FILE, WEIGHTS_FILE]
# training modes of earlier versions (the ablation's baselines, now benchmarks.baselines) and their
# value in a FastBERT run: an output trained otherwise is another job's, never resumed as this one
REMOVED_MODES = {"plain_bert": False, "student_targets": "teacher"}
CACHE_SHARE = 0.25  # cache="auto" keeps an input in the object store when its token ids fit in this share of it
# a collective that waits this long is stuck (a worker lost or out of step): it raises, and Ray
# Train's FailureConfig restarts the workers, instead of hanging for torch's default 30 minutes
COLLECTIVE_TIMEOUT_S = 300


@dataclass(kw_only=True)
class TrainJobConfig(TrainConfig):
    """A training job: its inputs, output and resources, and the settings of both stages (those
    of ``pipeline.train.TrainConfig``, which it extends)."""

    train: str  # Parquet file or folder (local path or fsspec URI) with text and label columns
    validation: str  # Parquet with the same columns; evaluated after every epoch
    output: str  # folder for the trained model and metrics.json
    distill: str | None = None  # unlabelled Parquet (text column) for stage 2; none given: the training texts
    text_column: str = "text"  # the input column that holds the texts
    label_column: str = "label"  # the column of labels: strings or integers; the model predicts their string names
    backbone: str = "bundled"  # a BERT-shaped HF folder or name, or "bundled"
    finetuned: str | None = None  # a FastBERT model whose stage 1 is done: skip it, run stage 2 from it
    workers: int = 2  # Ray Train workers (data-parallel)
    cpus_per_worker: int = 1  # Ray CPUs of each worker; also its torch threads when it trains on CPU
    use_gpu: bool | None = None  # train on GPUs; none given: when the cluster has them
    max_length: int = 128  # tokens per text; longer texts are truncated
    branch_width: int = 128  # width of the students (the paper's 128); a new model only
    teacher_head: Literal["pooler", "branch"] = "pooler"  # plain BERT's head, or the paper's branch; a new model only
    teacher_width: int | None = None  # width of a branch teacher; none given: the backbone's hidden size; a new model only
    max_rows: int | None = None  # read at most this many rows of each input (for trials)
    max_failures: int = 2  # worker failures each stage survives (restarts from its last checkpoint)
    overwrite: bool = False  # remove an earlier run's files from the output first (only those)
    storage: str | None = None  # Ray run storage (checkpoints); none given: <output>/_ray
    # read and tokenise each input once and keep it in Ray's object store, so that every epoch only
    # reshuffles it ("auto": when its token ids fit in a quarter of the object store; "off": stream
    # it from the files every epoch, for inputs too large to keep)
    cache: Literal["auto", "on", "off"] = "auto"  # keep the tokenised inputs in Ray's object store (auto: if they fit)
    verbose: bool = False  # show Ray's own logs and progress lines

    def __post_init__(self) -> None:
        super().__post_init__()  # the fields' types (check_fields) and the settings of both stages
        for name in ("train", "validation", "output", "distill", "finetuned", "storage"):  # paths Ray's workers read
            if getattr(self, name):
                setattr(self, name, absolute(getattr(self, name)))
        if self.backbone != "bundled" and os.path.exists(self.backbone):  # a folder, not a Hugging Face name
            self.backbone = os.path.abspath(self.backbone)
        if min(self.workers, self.cpus_per_worker, self.epochs) < 1:  # batch_size, log_every: TrainConfig's
            raise UserError(f"workers, cpus_per_worker and epochs must be >= 1, got {self.workers}, "
                            f"{self.cpus_per_worker} and {self.epochs}")
        if self.batch_size % self.workers:
            near = sorted({max(self.workers, self.batch_size // self.workers * self.workers),
                           -(-self.batch_size // self.workers) * self.workers})
            raise UserError(f"batch_size {self.batch_size} is the global batch, split evenly over the {self.workers} "
                            f"workers: make it a multiple of {self.workers} (e.g. {' or '.join(map(str, near))})")
        if self.branch_width < 1 or (self.teacher_width is not None and self.teacher_width < 1):
            raise UserError(f"branch_width must be a positive integer and teacher_width one or None (the backbone's "
                             f"hidden size), got {self.branch_width!r} and {self.teacher_width!r}")
        shape = ("branch_width", "teacher_head", "teacher_width")
        if self.finetuned is not None and any(
                getattr(self, name) != type(self).__dataclass_fields__[name].default for name in shape):
            raise UserError("branch_width, teacher_head and teacher_width shape the classifiers of a new FastBERT; "
                             "a finetuned model keeps its own")
        if self.teacher_head == "pooler" and self.teacher_width is not None:
            raise UserError("teacher_width sizes a branch teacher: pass teacher_head='branch' with it")
        if self.max_failures < 0 or (self.max_rows is not None and self.max_rows < 1):
            raise UserError(f"max_failures must be >= 0 and max_rows a positive integer or None, got "
                            f"{self.max_failures} and {self.max_rows}")
        if self.text_column == self.label_column:
            raise UserError(f"text_column and label_column are both {self.text_column!r}")
        if self.finetuned is not None and self.distill_epochs == 0:
            raise UserError("finetuned skips stage 1, so distill_epochs must be >= 1 (stage 2 is all there is)")

    def model_fields(self) -> dict[str, Any]:
        """The FastBertConfig fields of a new model (stage 1 builds one on the backbone)."""
        return {"max_length": self.max_length, "branch_width": self.branch_width, "teacher_head": self.teacher_head,
                "teacher_width": self.teacher_width}

    @property
    def worker_batch(self) -> int:
        """Rows per optimizer step on each worker: the global batch split evenly."""
        return self.batch_size // self.workers

    @property
    def storage_path(self) -> str:
        """Where Ray Train keeps the runs: an absolute path or a URI (Ray refuses relative ones)."""
        path = self.storage or f"{self.output.rstrip('/')}/{RAY_FOLDER}"
        return path if "://" in path else os.path.abspath(path)

    def arguments(self) -> dict[str, Any]:
        """The arguments that define what is trained (compared when a job is run again)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_COMPARED}


# -- the driver -------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the driver learnt from checking the input."""

    labels: list[str]  # label names, sorted; the model predicts their index
    train_rows: int
    validation_rows: int
    distill_rows: int | None


def run(job: TrainJobConfig, log=print) -> TrainResult:
    """Run both stages on Ray; returns what ``metrics.json`` holds. Every mistake that
    the arguments and the inputs show raises a one-line ``UserError`` before Ray starts (a
    local instance, unless one is running or ``RAY_ADDRESS`` names a cluster)."""
    check_ray_address()
    if job.finetuned is None:
        inputs = check_inputs(job)
        model = FastBert.from_backbone(job.backbone, labels=inputs.labels, **job.model_fields())  # checks all
    else:
        model = FastBert.from_pretrained(job.finetuned)  # its labels; clear error if it is no FastBERT
        if not 2 <= job.max_length <= model.config.max_positions:
            raise UserError(f"--max-length must be in [2, {model.config.max_positions}] for the finetuned model "
                            f"{job.finetuned}, got {job.max_length}")
        inputs = check_inputs(job, labels=model.config.labels, labels_from=job.finetuned)
    tokenizer = model.tokenizer
    del model
    if job.overwrite and job.storage:  # Ray runs kept outside the output (inside, claim_output removes them)
        _remove_own_runs(job)
    claim_output(job.output, Manifest("jobs.train", OWNS, _comparable(job.arguments())), job.overwrite,
                 adopt=_adopted(job))
    finished = _finished(job)
    if finished is not None:
        log(f"{job.output} already holds the finished model of this job ({METRICS_FILE}): nothing to train")
        return finished
    import ray  # only now: every mistake above is reported without Ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(verbose=job.verbose)
    use_gpu = job.use_gpu if job.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0

    # every input read (and cached) before training starts; stage 2 on the training texts reuses
    # stage 1's rows (the distillation ignores their labels), or reads their views
    distills = job.distill_epochs > 0
    views = job.distill_views if distills and job.distill is None else 1
    inputs_used = {"validation": (job.validation, True, 1, inputs.validation_rows)}
    if job.finetuned is None or (distills and job.distill is None and views == 1):
        inputs_used["train"] = (job.train, True, 1, inputs.train_rows)
    if distills and job.distill is not None:
        inputs_used["distill"] = (job.distill, False, 1, inputs.distill_rows)
    if views > 1:  # the training texts' views, at most ``views`` rows per text
        inputs_used["views"] = (job.train, False, views, inputs.train_rows * views)
    data = _cached({name: (_dataset(uri, job, tokenizer, inputs.labels if with_labels else None, views=n), rows)
                    for name, (uri, with_labels, n, rows) in inputs_used.items()}, job, log)
    validation, train = data["validation"], data.get("train")
    stage2, stage2_rows = (data["distill"], inputs.distill_rows) if "distill" in data else (train, inputs.train_rows)
    if "views" in data:
        # Ray: from the cached blocks' metadata; a streamed input (--cache off) is read once more for it
        stage2, stage2_rows = data["views"], data["views"].count()
    loop_config = {"job": dataclasses.asdict(job), "labels": inputs.labels}

    def trainer(stage: Stage, datasets: dict, rows: int, **extra: Any) -> TorchTrainer:
        from ray.train.torch import TorchConfig

        return TorchTrainer(
            train_loop,
            train_loop_config={**loop_config, "stage": stage, "train_rows": rows, **extra},
            torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),  # Ray: a stuck collective fails, not hangs
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": job.cpus_per_worker}),
            run_config=RunConfig(
                storage_path=job.storage_path,
                name=stage,
                failure_config=FailureConfig(max_failures=job.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None),  # stage 2 starts from stage 1's best
                # Ray Train's own notices (resources, worker group, each checkpoint): with --verbose
                logging_config=LoggingConfig(log_level="INFO" if job.verbose else "WARNING"),
            ),
            datasets={**datasets, "validation": validation},
            # blocks reach the shuffle and the split in a fixed order, not as tasks finish: with the
            # seeded shuffle, a job run again trains on the same orders (Ray's default does not)
            dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        )

    device = "GPU" if use_gpu else "CPU"
    if job.finetuned is None:
        log(f"finetune: {inputs.train_rows} rows on {job.workers} workers ({device})")
        result = trainer("finetune", {"train": _shuffled(train, job.seed)}, inputs.train_rows).fit()
        if stage2 is not train:
            train = data["train"] = None  # stage 1's rows leave the object store
        state = _read_state(result.checkpoint)
        best = final = _checkpoint_of_epoch(result, state.best_epoch)
        start, origin = best, f"epoch {state.best_epoch} of the fine-tuning ({_uri(best)})"
    else:
        state, best, start, origin = StageProgress("finetune"), None, job.finetuned, job.finetuned
    if distills:
        log(f"distill: {stage2_rows} rows on {job.workers} workers ({device}), from {origin}")
        result = trainer("distill", {"train": _shuffled(stage2, job.seed)}, stage2_rows, start=start).fit()
        last_state = _read_state(result.checkpoint)  # the whole stage's history
        final = _checkpoint_of_epoch(result, last_state.best_epoch or last_state.epoch)  # (older runs kept none)
    else:
        last_state = _read_state(final)
    metrics = TrainResult(
        finetune=state.history, distill=last_state.history if distills else [],
        # the epoch each stage kept: stage 1 by validation teacher accuracy, stage 2 by the
        # students' mean validation agreement with the teacher
        kept={p.stage: p.kept() for p in (state, last_state if distills else None)
              if p is not None and p.best_epoch is not None},
        best_epoch=state.best_epoch,
        # what the forward passes ran in ("auto" resolved on the workers)
        precision=", ".join(sorted({e["precision"] for e in state.history + last_state.history
                                    if "precision" in e})) or None,
        labels=inputs.labels, finetuned=_uri(best) if best is not None else job.finetuned, arguments=job.arguments())
    _publish(final, job.output, metrics.to_json())
    table = _validation_tradeoff(job)
    half, one = choose_speed(table, max_accuracy_drop=0.5), choose_speed(table, max_accuracy_drop=1.0)
    log(f"model, {METRICS_FILE} and {TRADEOFF_FILE} written to {job.output}; the trade-off on the validation rows:")
    for line in format_table(table, marked={half.speed: "<- suggested for 0.5 point (scoring's default)",
                                            one.speed: "<- suggested for 1 point"} if half.speed != one.speed else
                             {half.speed: "<- suggested for 0.5 and 1 point (scoring's default)"}):
        log("  " + line)
    log(f"scoring without --speed runs {describe_choice(half, table)} (--max-accuracy-drop 0.5); "
        f"--max-accuracy-drop 1: speed {one.speed}, {one.flop_speedup:.2f}x")
    return metrics


def _validation_tradeoff(job: TrainJobConfig) -> TradeoffTable:
    """On the driver: the published model's exits calibrated on the validation rows (their
    temperatures written into its config.json), then its accuracy and FLOP speed-up at every
    speed there (one full-depth pass), written into the model folder so that scoring can pick a
    speed for an accuracy or speed-up budget. A run stopped between the two files has no table
    yet and does both again."""
    from pipeline.text import parquet_dataset

    model = FastBert.from_pretrained(job.output)
    columns = [job.text_column, job.label_column]
    rows = parquet_dataset(job.validation, columns).to_table(columns=columns)
    rows = rows.slice(0, job.max_rows or rows.num_rows)
    labels = [str(v) for v in rows.column(job.label_column).to_pylist()]
    texts = rows.column(job.text_column).to_pylist()
    calibrate(model, texts, labels)
    table = tradeoff_table(model, texts, labels, data=job.validation)
    model.tradeoff = None
    model.save_pretrained(job.output)  # config.json with the temperatures; an earlier table removed
    save_table(table, job.output)
    return table


def _finished(job: TrainJobConfig) -> TrainResult | None:
    """The metrics of a finished run of this job in ``output``, or None: metrics.json is
    published after the model files and the trade-off table after it, so with both there the
    run had finished. ``check_inputs`` has compared the arguments."""
    import fsspec

    fs, out = fsspec.core.url_to_fs(job.output)
    out = out.rstrip("/")
    needed = [METRICS_FILE, CONFIG_FILE, TRADEOFF_FILE]
    if not all(fs.isfile(f"{out}/{name}") for name in needed):
        return None
    with fs.open(f"{out}/{METRICS_FILE}") as f:
        return TrainResult.from_json(json.load(f))


def check_inputs(job: TrainJobConfig, labels: list[str] | None = None, labels_from: str | None = None) -> Inputs:
    """Check the input and the output folder on the driver; raises a one-line ValueError
    naming the file and column. Reads the text and label columns only. ``labels``: the label
    names of an already fine-tuned model (``labels_from``) that every label must be one of;
    None: the training labels define them."""
    train_labels, train_rows = _read_labels(job.train, job, job.label_column)
    val_labels, val_rows = _read_labels(job.validation, job, job.label_column)
    distill_rows = None if job.distill is None else _read_labels(job.distill, job, None)[1]
    for uri, rows in ((job.train, train_rows), (job.distill, distill_rows)):
        if rows is not None and rows < job.workers:
            raise UserError(f"{uri}: {rows} rows cannot feed {job.workers} workers")
    names = sorted(set(train_labels))
    if labels is None and len(names) < 2:
        raise UserError(f"{job.train}: column {job.label_column!r} has a single class {names}; "
                         "a classifier needs at least 2")
    if labels is None:
        labels, labels_from = [str(name) for name in names], "training"
    for uri, values in ((job.train, names), (job.validation, val_labels)):
        unseen = sorted(set(map(str, values)) - set(labels))
        if unseen:
            raise UserError(f"{uri}: column {job.label_column!r} has labels never seen in {labels_from} "
                             f"{unseen[:10]}; the model's labels are {labels[:10]}")
    _check_output(job)
    return Inputs(labels, train_rows, val_rows, distill_rows)


def _read_labels(uri: str, job: TrainJobConfig, label_column: str | None) -> tuple[list, int]:
    """The label column and the row count (at most ``max_rows``) of a Parquet input, after
    checking its columns. Labels come from every row, so the names cover whichever rows
    ``max_rows`` keeps."""
    import fsspec
    import pyarrow as pa

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        found = fs.exists(path)
    except Exception as e:  # unknown protocol, missing fsspec backend, endpoint unreachable, no credentials
        raise UserError(f"{uri}: cannot be reached ({type(e).__name__}: {e}); check the URI, that its fsspec "
                         "backend is installed (s3fs, gcsfs, ...) and the credentials and network") from e
    if not found:
        raise UserError(f"{uri}: no such file or folder")
    from pipeline.text import describe_columns, is_text_type, parquet_dataset

    try:
        # the Parquet files it names, as in scoring; string, large_string, string_view or
        # dictionary-encoded text (and labels), also mixed between files; files without rows
        # (pandas' empty frames: null-typed) fix no types
        dataset = parquet_dataset(uri, [c for c in (job.text_column, label_column) if c is not None])
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{uri}: not readable as Parquet ({e})") from e
    columns = dataset.schema.names
    listed = describe_columns(dataset.schema)
    for column in (job.text_column, label_column):
        if column is not None and column not in columns:
            raise UserError(f"{uri}: no column {column!r}; it has {listed}")
    text_type = dataset.schema.field(job.text_column).type
    if not (is_text_type(text_type) or pa.types.is_null(text_type)):  # null: refused below as no rows or nulls
        raise UserError(f"{uri}: text column {job.text_column!r} must hold strings, it holds {text_type}")
    read = [job.text_column] + ([label_column] if label_column else [])
    table = dataset.to_table(columns=read)
    if table.num_rows == 0:
        raise UserError(f"{uri}: no rows")
    for column in read:
        if table.column(column).null_count:
            raise UserError(f"{uri}: column {column!r} has {table.column(column).null_count} null values")
    rows = min(table.num_rows, job.max_rows or table.num_rows)
    if label_column is None:
        return [], rows
    label_type = table.schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        raise UserError(f"{uri}: label column {label_column!r} must hold strings or integers, it holds {label_type}")
    return table.column(label_column).to_pylist(), rows


def _check_output(job: TrainJobConfig) -> None:
    """Refuse an output (or storage) that is, holds or lies inside an input, or a folder that
    holds anything but this job's earlier run; reads only (``run`` claims the folder later)."""
    inputs = [("--train", job.train), ("--validation", job.validation), ("--distill", job.distill),
              ("--finetuned", job.finetuned), ("--backbone", job.backbone if job.backbone != "bundled" else None)]
    refuse_unsafe_output(job.output, inputs)
    if job.storage:
        refuse_unsafe_output(job.storage, inputs, flag="--storage")
        if same_or_inside(job.storage, job.output):  # its runs would be files the output's manifest does not own
            raise UserError(f"--storage {job.storage} lies in --output {job.output}: leave --storage out (the runs "
                            f"then go to {RAY_FOLDER}/ inside the output) or choose a folder outside it")
    previous = inspect_output(job.output, "jobs.train", adopt=_adopted(job))
    if previous is None or job.overwrite:
        return
    # an argument added in a later version counts as its default in runs of earlier versions, or
    # as what those versions did where the default changed (their FastBERT teachers were branches)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainJobConfig)}
    arguments = previous.arguments
    if arguments.get("finetuned") is None:  # a finetuned model has no teacher_head of its own
        defaults["teacher_head"] = "branch"
    defaults["distill_views"] = 1  # runs before the views distilled on the training texts alone
    changed = sorted(k for k, v in _comparable(job.arguments()).items() if arguments.get(k, defaults[k]) != v
                     and (k != "distill_views" or (job.distill is None and job.distill_epochs)))  # views unused
    # modes earlier versions had and this one has not: such a folder holds no model this job makes
    changed += sorted(k for k, mine in REMOVED_MODES.items() if arguments.get(k, mine) != mine)
    if changed:
        hint = (" (runs before the teacher_head option had a branch teacher: pass teacher_head='branch', "
                "--teacher-head branch, to resume it)" if "teacher_head" in changed and "teacher_head" not in arguments
                else " (runs before the distill_views option distilled on the training texts alone: pass "
                "distill_views=1, --distill-views 1, to resume it)" if "distill_views" in changed
                and "distill_views" not in arguments else "")
        raise UserError(f"{job.output}: output already holds a model trained with other arguments "
                        f"(differing: {changed}){hint}; pass overwrite=True (--overwrite) to replace it")


def _comparable(arguments: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(arguments))  # as a JSON file holds them


def _adopted(job: TrainJobConfig) -> Manifest | None:
    """The manifest of a folder that an earlier version of this job wrote before manifests
    existed, recognised by the arguments in its metrics.json or in a checkpoint's state.json."""
    import fsspec

    fs, out = fsspec.core.url_to_fs(job.output)
    out = out.rstrip("/")
    previous = None
    if fs.isfile(f"{out}/{METRICS_FILE}"):
        with fs.open(f"{out}/{METRICS_FILE}") as f:
            previous = json.load(f).get("arguments")
    else:
        storage_fs, storage = fsspec.core.url_to_fs(job.storage_path)
        states = sorted(storage_fs.glob(f"{storage.rstrip('/')}/*/checkpoint*/{STATE_FILE}"))
        if states:
            with storage_fs.open(states[-1]) as f:
                previous = json.load(f).get("arguments")
    if previous is None or absolute(str(previous.get("output", job.output))) != job.output:
        return None  # none, or another job's run (a shared --storage): not this folder's
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                       "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"]
    return Manifest("jobs.train", OWNS + tokenizer_files, previous)


def _remove_own_runs(job: TrainJobConfig) -> None:
    """--overwrite with --storage elsewhere: remove ``<storage>/<stage>``, the Ray runs of
    this job, only when every checkpoint there names this output; refuse otherwise."""
    import fsspec

    fs, storage = fsspec.core.url_to_fs(job.storage_path)
    for stage in STAGES:
        run_folder = f"{storage.rstrip('/')}/{stage}"
        if not fs.exists(run_folder):
            continue
        outputs = set()
        for path in fs.glob(f"{run_folder}/checkpoint*/{STATE_FILE}"):
            with fs.open(path) as f:
                outputs.add(json.load(f).get("arguments", {}).get("output"))
        if outputs != {job.output}:
            raise UserError(f"--storage {job.storage}: {stage}/ holds Ray runs that are not this job's (their "
                            f"outputs: {sorted(map(str, outputs)) or 'none recorded'}); nothing was deleted: "
                            "choose another --storage")
        fs.rm(run_folder, recursive=True)


def _shuffled(ds, seed: int):
    """Training rows in a random order, a new one each epoch (Ray Train runs the dataset again
    every epoch, and Ray reseeds each run), the same orders on every run of the job with this
    ``seed``. Files are often sorted (by label, by date): the shard's local shuffle mixes
    only within a bucket, so every batch would hold one label and the teacher collapses
    (20 Newsgroups, label-sorted: 6% validation accuracy after an epoch, chance is 5%)."""
    from ray.data import RandomSeedConfig

    return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))  # Ray


def _cached(datasets: dict[str, tuple[Any, int]], job: TrainJobConfig, log=print) -> dict[str, Any]:
    """Each named (dataset, rows) read and tokenised now and kept in the object store
    (``job.cache``; "auto" while they fit in a quarter of it), or left as it is, to stream
    from its files every epoch.

    A Ray Data pipeline runs again from the files every epoch; on a 2-core machine reading,
    tokenising and splitting a few hundred rows that way costs 7-14 s per epoch and per input,
    while a cached input only reshuffles (under a second)."""
    import ray

    out = {name: ds for name, (ds, _) in datasets.items()}
    if job.cache == "off":
        return out
    free = ray.available_resources().get("object_store_memory", 0)
    keep, total = [], 0
    for name, (_, rows) in datasets.items():
        size = rows * (job.max_length * 4 + 24)  # int32 token ids at most; the label, list offset and shape
        if job.cache == "auto" and total + size > CACHE_SHARE * free:
            beside = f" beside the {total / 2**20:.1f} MiB of the inputs kept" if total else ""
            log(f"{name}: {rows} rows (up to {size / 2**20:.1f} MiB of token ids) do not fit in a quarter of the "
                f"free object store ({free / 2**20:.0f} MiB){beside}: streamed from the files every epoch "
                f"(--cache on keeps it anyway)")
            continue
        keep.append(name)
        total += size
    out.update({name: datasets[name][0].materialize() for name in keep})  # Ray: read and tokenise once
    return out


def _dataset(uri: str, job: TrainJobConfig, tokenizer: Any, labels: list[str] | None, views: int = 1):
    """A Ray Dataset of tokenised rows: ``input_ids`` (token id lists) and, with labels,
    ``labels`` (int64 indices into ``labels``); ``views`` > 1: of each text's
    ``text.distillation_views`` instead (no labels)."""
    import ray

    import pyarrow as pa

    from pipeline.text import expand_inputs, parquet_dataset

    columns = [job.text_column] + ([job.label_column] if labels is not None else [])
    # the files scoring would read, in one schema: files may store the text as string,
    # large_string or dictionary-encoded alike, and an empty file's text as the null type (pandas)
    plain = parquet_dataset(uri, columns).schema
    ds = ray.data.read_parquet(expand_inputs([uri]), schema=pa.schema([plain.field(c) for c in columns]))
    ds = ds.select_columns(columns)
    ds.context.execution_options.preserve_order = True  # this pipeline's own context: rows in file order
    if job.max_rows:
        ds = ds.limit(job.max_rows)
    # the 2.60 Parquet reader may pack a whole input into one block: cut it so every worker gets rows
    ds = ds.repartition(target_num_rows_per_block=max(1, min(1024, job.batch_size * 4)))
    # the Rust tokenizer, not its transformers wrapper, and torch-free functions: the tasks
    # import neither torch nor transformers (a 2-core machine spent ~10 s per run importing them)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if views > 1:
        ds = ds.map_batches(view_rows, batch_format="pyarrow", fn_kwargs={
            "tokenizer": backend, "text_column": job.text_column, "views": views, "max_length": job.max_length,
            "seed": job.seed})
    return ds.map_batches(training_rows, batch_format="pyarrow", fn_kwargs={
        "tokenizer": backend, "text_column": job.text_column, "label_column": job.label_column, "labels": labels,
        "max_length": job.max_length})


def _read_state(checkpoint) -> StageProgress:
    with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE)) as f:
        return StageProgress.from_json(json.load(f))


def _checkpoint_of_epoch(result, epoch: int):
    for checkpoint, metrics in result.best_checkpoints:
        if metrics.get("epoch") == epoch:
            return checkpoint
    raise RuntimeError(f"the checkpoint of fine-tuning epoch {epoch} is missing from {result.path}")


def _uri(checkpoint) -> str:
    """A checkpoint's folder as a URI that ``FastBert.from_pretrained`` (fsspec) opens."""
    kind = checkpoint.filesystem.type_name  # pyarrow: "local", "s3", "gcs", ...
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def _publish(checkpoint, output: str, metrics: dict[str, Any]) -> None:
    """Copy the model files of a checkpoint to ``output`` (config.json last, so it never
    points at missing weights) and write metrics.json. The Ray storage inside is kept."""
    import fsspec

    fs, out = fsspec.core.url_to_fs(output)
    out = out.rstrip("/")
    fs.makedirs(out, exist_ok=True)
    with checkpoint.as_directory() as d:
        names = sorted((n for n in os.listdir(d) if n not in CHECKPOINT_ONLY), key=lambda n: n == CONFIG_FILE)
        manifest = read_manifest(fs, out)
        manifest.owns = sorted(set(manifest.owns) | set(names))  # recorded before they are written
        update_manifest(output, manifest)
        for name in names:
            put_file(fs, os.path.join(d, name), f"{out}/{name}")
    write_json(fs, f"{out}/{METRICS_FILE}", metrics)


# -- the worker -------------------------------------------------------------------------------


def batches_per_worker(rows: int, workers: int, batch_size: int) -> int:
    """Training batches (optimizer steps) of each worker in an epoch of ``rows`` rows:
    Ray's equal split gives each worker ``rows // workers`` of them (it drops the rest), and
    ``bucketed_batches`` cuts them into full batches but the last."""
    return math.ceil(rows // workers / batch_size)


def exact_buckets(chunks: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Columns of rows (name -> values) re-cut into buckets of exactly ``size`` rows in the
    same order, the last one shorter. Ray's local shuffle (``iter_batches`` with
    ``local_shuffle_buffer_size`` equal to its ``batch_size``, 2.60) yields a short batch
    whenever its shuffled generation holds between half and all of a batch (seen: 512, 512,
    306, 512, 512, 396 rows of a 2,750-row shard), and where the short ones fall differs
    from shard to shard: cutting them into batches gave two workers 87 and 86 batches of the
    same number of rows, and DDP waited for the missing step forever."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0  # rows in pending
    for chunk in chunks:
        rows = len(next(iter(chunk.values()), ()))
        if rows == 0:
            continue
        pending.append({name: _row_array(values) for name, values in chunk.items()})
        held += rows
        while held >= size:
            joined = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
            yield {name: values[:size] for name, values in joined.items()}
            held -= size
            pending = [{name: values[size:] for name, values in joined.items()}] if held else []
    if held:
        yield {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}


def _row_array(values: np.ndarray) -> np.ndarray:
    """``values`` as a 1-D array with one entry per row: Ray gives a list column as a 2-D
    array when all its rows have one length and as an object array of arrays otherwise,
    and those two do not concatenate."""
    if values.ndim == 1:
        return values
    rows = np.empty(len(values), dtype=object)  # (N,) of arrays
    rows[:] = list(values)
    return rows


def bucketed_batches(shard, batch_size: int, pad_id: int, seed: int, batches_per_bucket: int = 16):
    """Shuffled training batches of rows of similar length, so they pad little (on 2 CPU
    cores, fine-tuning on R8 ran at 16.7 rather than 11.1 samples/s). The shard
    streams buckets of ``batches_per_bucket`` batches through Ray's local shuffle; each
    bucket is sorted by length and cut into batches, which are yielded in random order. Shards
    of equal length (Ray's equal split) give every worker the same number of batches,
    ``batches_per_worker``: the buckets are re-cut to exactly ``size`` rows (``exact_buckets``),
    as Ray's shuffle hands out short ones mid-stream."""
    rng = np.random.default_rng(seed)
    size = batch_size * batches_per_bucket
    chunks = shard.iter_batches(batch_size=size, batch_format="numpy", local_shuffle_buffer_size=size,
                                local_shuffle_seed=seed)  # Ray
    for bucket in exact_buckets(chunks, size):
        order = np.argsort([len(row) for row in bucket["input_ids"]], kind="stable")
        cuts = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for i in rng.permutation(len(cuts)):
            yield collate({name: values[cuts[i]] for name, values in bucket.items()}, pad_id)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One worker of one stage: ``pipeline.train.train_stage`` on this worker's shards, from
    the stage's latest checkpoint when there is one, writing a checkpoint after every epoch."""
    import ray.train
    import ray.train.torch

    job = TrainJobConfig(**loop_config["job"])
    stage: Stage = loop_config["stage"]
    config: TrainConfig = job
    torch.manual_seed(job.seed)
    if not job.verbose:  # Ray Train's notices in this worker (its reports) go to the log files only
        logging.getLogger().setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()  # Ray
    workers = ray.train.get_context().get_world_size()  # Ray
    device = ray.train.torch.get_device()  # Ray
    if device.type == "cpu":
        torch.set_num_threads(job.cpus_per_worker)

    checkpoint = ray.train.get_checkpoint()  # Ray: set when resuming
    progress = StageProgress(stage)
    source = checkpoint or loop_config.get("start")  # this stage's latest, or stage 1's best (or --finetuned)
    if isinstance(source, str):
        model = FastBert.from_pretrained(source)
    elif source is not None:
        with source.as_directory() as d:
            model = FastBert.from_pretrained(d)
            if checkpoint is not None:
                with open(os.path.join(d, STATE_FILE)) as f:
                    progress = StageProgress.from_json(json.load(f))
    else:
        with warnings.catch_warnings():  # the driver has shown them already, from the same call
            warnings.simplefilter("ignore")
            model = FastBert.from_backbone(job.backbone, labels=loop_config["labels"], **job.model_fields())
    pad_id = model.tokenizer.pad_token_id or 0

    epochs = job.epochs if stage == "finetune" else job.distill_epochs
    # the global batch is split over the workers, so every worker count takes the same optimizer
    # steps of the same number of rows: one schedule, one model, whatever the scale
    batch = job.worker_batch  # rows per step on this worker
    steps_per_epoch = batches_per_worker(loop_config["train_rows"], workers, batch) or 1
    optimizer, scheduler = stage_optimizer(model, stage, config, epochs * steps_per_epoch)
    fastbert, model = model, ray.train.torch.prepare_model(model)  # Ray: to the device, DDP across the workers
    if checkpoint is not None:  # resuming this stage: AdamW's moments and the schedule continue
        with checkpoint.as_directory() as d:
            resumed = load_optimizer(optimizer, scheduler, d)
        if not resumed:  # a checkpoint without optimizer state: fresh moments, the schedule at its step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(progress.epoch * steps_per_epoch):
                    scheduler.step()

    # Ray: this worker's shard; the shards of a dataset are disjoint and of equal length (Ray
    # drops up to workers - 1 rows), which ``bucketed_batches`` cuts into the same number of
    # batches on every worker; ``Lockstep`` keeps the DDP steps together should they differ anyway
    train_shard = ray.train.get_dataset_shard("train")  # Ray
    val_shard = ray.train.get_dataset_shard("validation")  # Ray
    flags = _flag_group()
    current: dict[str, Lockstep] = {}

    def epoch_batches(epoch: int) -> Lockstep:
        current["rows"] = Lockstep(bucketed_batches(train_shard, batch, pad_id, job.seed + epoch), flags)
        return current["rows"]

    def validate() -> EvalStats:  # no collective per batch: the workers meet only in the sums after it
        rows = (collate(b, pad_id) for b in val_shard.iter_batches(batch_size=batch, batch_format="numpy"))
        return _all_workers(evaluate(fastbert, rows, device), device)

    def combine(stats: EpochStats) -> dict[str, Any]:
        """The epoch over all workers: rows, mean loss, throughput, and the spread of steps."""
        neg_steps_min, steps_max, drained_max = _over_workers(
            [-stats.steps, stats.steps, current["rows"].drained], device, op="max")
        if rank == 0 and drained_max:
            _say(f"{stage}: the workers' shards gave unequal numbers of batches; all stopped after {stats.steps} "
                 f"steps, skipping up to {int(drained_max)} batches of a worker")
        samples, loss_sum = _over_workers([stats.samples, stats.loss * stats.samples if stats.samples else 0.0],
                                          device)
        return {"loss": loss_sum / samples if samples else math.nan, "samples": int(samples),
                "samples_per_s": samples / stats.seconds, "steps_min": int(-neg_steps_min), "steps_max": int(steps_max),
                "drained_batches": int(drained_max)}

    def report(progress: StageProgress, best: bool) -> None:
        record = progress.history[-1]
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                fastbert.save_pretrained(tmp)
                save_optimizer(optimizer, scheduler, tmp)
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump({**dataclasses.asdict(progress), "arguments": job.arguments()}, f, indent=2)
                saved = ray.train.Checkpoint.from_directory(tmp)  # Ray
            ray.train.report({"epoch": progress.epoch, "loss": record["loss"],
                              "teacher_accuracy": record["teacher_accuracy"]},
                             checkpoint=saved)  # Ray: every worker reports, rank 0 with the checkpoint

    precision = resolve_precision(job.precision, device)  # auto: bf16 where the chip has it natively
    train_stage(model, progress, epochs, optimizer, scheduler, config, epoch_batches=epoch_batches, validate=validate,
                after_epoch=report, device=device, precision=precision, steps_per_epoch=steps_per_epoch,
                workers=workers, combine=combine, say=_say if rank == 0 else None)


def _say(line: str) -> None:
    """A progress line of rank 0, shown once on the driver: Ray Train patches ``print`` to
    send each line both to stdout and to its logger, which the driver shows twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _all_workers(stats: EvalStats, device: torch.device) -> EvalStats:
    """Each worker evaluated its shard: combine the counts of all workers."""
    if not torch.distributed.is_initialized():
        return stats
    n, layers = stats.samples, len(stats.agreement)
    counts = ([n, *(a * n for a in stats.exit_accuracy), *(g * n for g in stats.agreement)] if n
              else [0.0] * (1 + 2 * layers))
    samples, *sums = _over_workers(counts, device)
    exit_accuracy = [c / samples for c in sums[:layers]] if samples else [math.nan] * layers
    agreement = [c / samples for c in sums[layers:]] if samples else [math.nan] * layers
    return EvalStats(int(samples), exit_accuracy[-1], exit_accuracy, agreement)


class Lockstep:
    """A worker's training batches, passed on while every worker still has one: before
    each step the workers agree (an all-reduce MIN of a "have a batch" flag) and all stop
    at the step where the first runs out. Had they not, one would wait in DDP's all-reduce
    for a step the others never take. The batches a worker has left then are read to the
    end without training (``drained``), so that Ray's split sees this epoch finished."""

    def __init__(self, batches: Iterable[Any], group: Any = None) -> None:
        self.batches = batches
        self.group = group  # the process group of the flags (None: the default one)
        self.steps = 0  # batches passed on
        self.drained = 0  # batches read but not passed on, as another worker had run out

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.batches)
        for batch in batches:
            if not _every_worker(True, self.group):
                self.drained = 1 + sum(1 for _ in batches)
                return
            self.steps += 1
            yield batch
        _every_worker(False, self.group)  # out of batches: the others stop at this step too


def _every_worker(has_batch: bool, group: Any = None) -> bool:
    """Whether every worker has a batch for the next step (each worker calls this once per step)."""
    if not torch.distributed.is_initialized():
        return has_batch
    flag = torch.tensor([int(has_batch)], dtype=torch.int32)  # (1,) on the CPU: the flag group is gloo
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _flag_group() -> Any:
    """The process group for ``Lockstep``'s flags: the default one where it is gloo (CPU);
    beside nccl a gloo group, so that a flag on the CPU does not make every step wait for the GPU."""
    from datetime import timedelta

    if not torch.distributed.is_initialized() or torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _over_workers(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Each value summed over the workers (``op="max"``: its maximum); as they are on one."""
    if not torch.distributed.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)  # (V,)
    reduce = torch.distributed.ReduceOp
    torch.distributed.all_reduce(total, op=reduce.MAX if op == "max" else reduce.SUM)
    return total.tolist()
