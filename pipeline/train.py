"""FastBERT's two training stages as plain PyTorch: the one training loop of both a local
run (``fit``) and every Ray Train worker (``pipeline.distributed.train_loop``).

1. ``"finetune"``: the backbone and the teacher (last branch) learn the labelled task with
   cross-entropy; the students are frozen.
2. ``"distill"``: the backbone and the teacher are frozen (and in eval mode, so the teacher's
   distribution is deterministic); every student learns the teacher's distribution (the
   paper's self-distillation), which needs no labels.

A stage, locally or on a worker::

    optimizer, scheduler = stage_optimizer(model, stage, config, total_steps)
    train_stage(model, StageProgress(stage), epochs, optimizer, scheduler, config,
                epoch_batches=..., validate=..., after_epoch=...)

``train_stage`` runs the epochs not yet done (``train_epoch``, then ``evaluate`` on the
validation rows), keeps track of the best epoch (``kept_score``) and of patience, and hands
each epoch to ``after_epoch``: ``fit`` keeps the best weights in memory, a worker writes a
checkpoint and reports it to Ray. Batches are dicts with ``input_ids`` (B, T) int64,
``attention_mask`` (B, T) and, when the loss needs them, ``labels`` (B,) int64: ``collate``
pads token id lists into them, from lists of texts (``batches``) or a Ray shard's rows. The
model is called through its ``forward``, so a ``DistributedDataParallel`` wrapper works; wrap
after ``set_stage`` (DDP only tracks the parameters that are trainable when it is built).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.cli import check_fields
from pipeline.losses import distillation_loss, teacher_loss
from pipeline.model import FastBert, autocast, resolve_precision
from pipeline.outputs import UserError
from pipeline.text import distillation_views, encode

Stage = Literal["finetune", "distill"]
STAGES: tuple[str, ...] = ("finetune", "distill")
Batch = dict[str, torch.Tensor]
Label = int | str


# -- configuration ----------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of both stages (``fit``'s; ``pipeline.distributed.TrainJobConfig`` extends them
    with a job's inputs and resources). The learning rates are benchmarks.sweep's best on the
    bundled sets, not the paper's (set for BERT-base on large data)."""

    epochs: int = 5  # stage 1 (fine-tuning) epochs
    lr: float = 2e-4  # stage 1 peak learning rate of the backbone (AdamW, linear warm-up and decay)
    head_lr: float | None = 2e-3  # stage 1 peak learning rate of the new teacher head; none given: lr
    distill_epochs: int = 5  # stage 2 (self-distillation) epochs; 0 skips the stage
    distill_lr: float = 1e-3  # stage 2 peak learning rate of the students
    # stage 2 on the training texts (no unlabelled ones given) distils on up to this many views of
    # each (text.distillation_views: the text, its further windows, random spans of its words)
    distill_views: int = 4  # views of each training text in stage 2 without unlabelled texts (1: the texts alone)
    warmup: float = 0.1  # fraction of each stage's steps with a linear warm-up
    weight_decay: float = 0.01  # AdamW decay of matrices (not of biases and LayerNorm weights)
    batch_size: int = 32  # rows per optimizer step; a job splits them evenly over its workers
    max_grad_norm: float = 1.0  # gradient clipping norm; 0 turns clipping off
    # KL(p_t || p_s), as the official code and Hinton's distillation; "paper": KL(p_s || p_t) as the
    # paper writes it, which teaches the students much less in a short stage 2 (benchmarks/RESULTS.md)
    kl: Literal["paper", "reverse"] = "reverse"  # stage 2 loss: KL(p_t || p_s), or KL(p_s || p_t) ("paper")
    seed: int = 0  # the seed of the new classifiers and of the shuffles
    log_every: int = 50  # steps between progress lines
    patience: int | None = None  # stop a stage after this many epochs without a better validation score (kept: the best)
    # auto: bf16 where the chip has it natively (fp16 with loss scaling on older GPUs), else fp32;
    # weights, updates and losses stay fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # forward passes in bf16/fp16 autocast, or fp32

    def __post_init__(self) -> None:
        check_fields(self)
        if self.patience is not None and self.patience < 1:
            raise UserError(f"patience must be a positive integer or None (no early stopping), got {self.patience!r}")
        if self.epochs < 0 or self.distill_epochs < 0:
            raise UserError(f"epochs and distill_epochs must be >= 0 (0 skips the stage), got "
                            f"{self.epochs} and {self.distill_epochs}")
        if min(self.batch_size, self.log_every, self.distill_views) < 1:
            raise UserError(f"batch_size, log_every and distill_views must be >= 1, got {self.batch_size}, "
                            f"{self.log_every} and {self.distill_views}")
        if not self.lr > 0 or not self.distill_lr > 0 or not (self.head_lr is None or self.head_lr > 0):
            raise UserError(f"lr, head_lr and distill_lr must be > 0, got {self.lr}, {self.head_lr} and "
                            f"{self.distill_lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"warmup is a fraction of each stage's steps in [0, 1), got {self.warmup}")
        if not self.weight_decay >= 0 or not self.max_grad_norm >= 0:
            raise UserError(f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay} and "
                            f"{self.max_grad_norm}")


# -- batches ----------------------------------------------------------------------------------


def batches(
    model: FastBert,
    texts: Sequence[str],
    labels: Sequence[Label] | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[Batch]:
    """Batches over lists of texts (and labels), in order or shuffled with a numpy Generator
    seeded by ``seed`` (shuffled batches group texts of similar length): tokenised with the
    model's tokenizer and max_length (``text.encode``, as the Ray jobs' tasks do) and padded by
    ``collate``. String labels are looked up in ``model.config.labels``. Texts and labels are
    checked here, before the first batch."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: build it with FastBert.from_backbone or from_pretrained")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is not a string (got {type(text).__name__})")
    ids = None if labels is None else _label_ids(labels, model.config.labels)
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(ids)} labels")
    order = _bucketed_order(texts, batch_size, seed) if shuffle else np.arange(len(texts))
    return _iter_batches(model, texts, ids, order, batch_size)


def _bucketed_order(texts: list[str], batch_size: int, seed: int, batches_per_bucket: int = 50) -> np.ndarray:
    """A shuffled order in which each batch holds texts of similar length, so batches pad
    little: shuffle, sort each bucket of ``batches_per_bucket`` batches by length, cut it
    into batches, and shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    size = batch_size * batches_per_bucket
    chunks = []
    for start in range(0, len(order), size):
        bucket = order[start : start + size]
        bucket = bucket[np.argsort([len(texts[i]) for i in bucket], kind="stable")]
        chunks += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))]) if chunks else order


def _iter_batches(
    model: FastBert, texts: list[str], ids: np.ndarray | None, order: np.ndarray, batch_size: int
) -> Iterator[Batch]:
    pad_id = model.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {"input_ids": encode(model.tokenizer, [texts[i] for i in rows], model.config.max_length)[0]}
        if ids is not None:
            batch["labels"] = ids[rows]  # (B,)
        yield collate(batch, pad_id)


def _label_ids(labels: Sequence[Label], names: Sequence[str] | None) -> np.ndarray:
    """Labels (indices or names) as an int64 array of indices, checked against ``names``."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        labels = labels.tolist()
    index = {} if names is None else {name: i for i, name in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if isinstance(label, str):
            if label not in index:
                known = f"known labels: {list(names)}" if names is not None else "no label names were given"
                raise ValueError(f"unknown label {label!r} (row {i}); {known}")
            out[i] = index[label]
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if label < 0 or (names is not None and label >= len(names)):
                raise ValueError(
                    f"label index {label} (row {i}) out of range"
                    + (f" for {len(names)} labels {list(names)}" if names is not None else "")
                )
            out[i] = label
        else:
            raise TypeError(f"labels must be indices (int) or names (str), got {label!r} (row {i})")
    return out


def collate(batch: dict[str, np.ndarray], pad_id: int) -> Batch:
    """Token id lists (``pipeline.text.training_rows``' rows) -> ``input_ids`` (B, T)
    right-padded to the batch's longest row, ``attention_mask`` (B, T) and, when present,
    ``labels`` (B,)."""
    rows = batch["input_ids"]
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(np.asarray(row, dtype=np.int64))
        attention_mask[i, : len(row)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in batch:
        out["labels"] = torch.tensor(np.asarray(batch["labels"]), dtype=torch.long)  # (B,) a copy: Ray's arrays are read-only
    return out


# -- stages and optimiser ---------------------------------------------------------------------


def set_stage(model: FastBert | nn.Module, stage: Stage) -> list[nn.Parameter]:
    """Freeze and set the modes of the model's parts for a stage; returns the trainable
    parameters (for ``make_optimizer``).

    ``"finetune"``: backbone and teacher trainable, train mode; students frozen, eval mode.
    ``"distill"``: backbone and teacher frozen, eval mode (deterministic teacher); students
    trainable, train mode. Accepts the model or a wrapper with ``.module`` (DDP). Either stage
    drops the exits' temperatures: they were fitted to the weights it is about to change.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    fastbert = _unwrap(model)
    fastbert.config.exit_temperatures = None
    teacher, students = fastbert.branches[-1], fastbert.branches[:-1]
    if stage == "distill" and len(students) == 0:
        raise ValueError("a 1-layer FastBert has no students to distil into")
    finetune = stage == "finetune"
    model.train()
    for part in (fastbert.backbone, teacher):
        part.train(finetune).requires_grad_(finetune)
    for student in students:
        student.train(not finetune).requires_grad_(not finetune)
    return [p for p in fastbert.parameters() if p.requires_grad]


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup: float,
    head_params: Iterable[nn.Parameter] = (),
    head_lr: float | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up over ``int(warmup * total_steps)`` steps, then a linear
    decay that reaches 0 exactly after ``total_steps`` steps.

    ``total_steps`` is the number of optimizer steps of this stage alone (for distillation:
    distill epochs x steps per epoch). Weight decay applies to matrices only: biases and
    LayerNorm weights (every parameter with fewer than 2 dimensions) are not decayed. With a
    warm-up, the first step runs at lr 0 (the ``transformers`` schedule). Those of ``params``
    that are also in ``head_params`` peak at ``head_lr`` instead (a new classifier head learns
    faster than the pretrained backbone it sits on); the schedule scales both alike.
    """
    from transformers import get_linear_schedule_with_warmup

    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no trainable parameters (did set_stage run?)")
    if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    head = {id(p) for p in head_params} if head_lr is not None else set()
    groups = [
        {"params": [p for p in params if (id(p) in head) == is_head and (p.ndim >= 2) == decays],
         "weight_decay": weight_decay if decays else 0.0, "lr": head_lr if is_head else lr}
        for is_head in (False, True)
        for decays in (True, False)
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup * total_steps), int(total_steps))
    return optimizer, scheduler


def stage_optimizer(model: FastBert, stage: Stage, config: TrainConfig, total_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``set_stage``, then ``make_optimizer`` with the stage's settings: stage 1 at ``lr``, its
    new teacher head at ``head_lr``; stage 2 at ``distill_lr``."""
    params = set_stage(model, stage)
    finetune = stage == "finetune"
    optimizer, scheduler = make_optimizer(params, config.lr if finetune else config.distill_lr, config.weight_decay,
                                          total_steps, config.warmup,
                                          head_params=model.new_head_parameters() if finetune else (),
                                          head_lr=config.head_lr if finetune else None)
    return optimizer, scheduler


OPTIMIZER_TENSORS = "optimizer.safetensors"  # AdamW's moments and step counts
OPTIMIZER_STATE = "optimizer.json"  # the rest of the optimizer's state and the schedule's


def save_optimizer(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   folder: str) -> None:
    """Write the optimizer's and the schedule's state to ``folder`` without pickle: tensors
    (per parameter, e.g. ``exp_avg``) as safetensors, the rest (parameter groups, schedule
    position) as JSON. ``load_optimizer`` reads it back into a freshly made pair."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, os.path.join(folder, OPTIMIZER_TENSORS))
    with open(os.path.join(folder, OPTIMIZER_STATE), "w") as f:
        json.dump({"param_groups": state["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict()}, f)


def load_optimizer(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   folder: str) -> bool:
    """Restore what ``save_optimizer`` wrote into ``optimizer`` and ``scheduler`` (made the
    same way, over the same parameters). False when ``folder`` holds no optimizer state."""
    from safetensors.torch import load_file

    if not os.path.exists(os.path.join(folder, OPTIMIZER_STATE)):
        return False
    with open(os.path.join(folder, OPTIMIZER_STATE)) as f:
        saved = json.load(f)
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(os.path.join(folder, OPTIMIZER_TENSORS)).items(), *saved["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = saved["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON made the tuple a list
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, optimizer.param_groups)):
        raise ValueError(f"{folder}: the saved optimizer state is for other parameters "
                         f"({[len(g['params']) for g in groups]} per group, this optimizer has "
                         f"{[len(g['params']) for g in optimizer.param_groups]})")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(saved["scheduler"])
    return True


# -- one epoch --------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """What one ``train_epoch`` did."""

    loss: float  # mean loss per row
    steps: int  # optimizer steps
    samples: int  # rows trained on
    seconds: float  # wall-clock time of the epoch
    samples_per_s: float


def train_epoch(
    model: FastBert | nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stage: Stage,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    log: Callable[[int, float, float], None] | None = None,
) -> EpochStats:
    """One pass over ``batches`` for a stage: one optimizer and scheduler step per batch.

    The model must already be on ``device`` (batches are moved there). Calls ``set_stage``
    first, so the parts' modes are right even after an ``evaluate``. ``"finetune"``: the
    teacher's cross-entropy (needs labels). ``"distill"``: ``distillation_loss`` of the
    students against the teacher (``config.kl``); the frozen backbone and teacher build no
    autograd graph and get no gradient. ``precision`` (a resolved one: fp32, bf16 or fp16) runs the
    forward in autocast, mixed precision: the weights, their updates and the losses stay fp32;
    fp16 scales the loss against underflow (``torch.amp.GradScaler``). ``log(step, loss, samples_per_s)`` is called
    every ``config.log_every`` steps.
    """
    set_stage(model, stage)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = torch.device(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    total = torch.zeros((), device=device)  # sum of per-row losses, synced once at the end
    steps = samples = 0
    start = time.perf_counter()
    for batch in batches:
        input_ids = batch["input_ids"].to(device, non_blocking=True)  # (B, T)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, T)
        labels = batch.get("labels")
        if stage == "finetune" and labels is None:
            raise ValueError("the finetune stage needs batches with 'labels'")
        with autocast(precision, device):
            out = model(input_ids, attention_mask)  # logits (L, B, N)
        if stage == "finetune":
            loss = teacher_loss(out.teacher_logits, labels.to(device, non_blocking=True))
        else:
            loss = distillation_loss(out.student_logits, out.teacher_logits, config.kl)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.max_grad_norm > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        rows = input_ids.shape[0]
        total += loss.detach() * rows
        steps += 1
        samples += rows
        if log is not None and steps % config.log_every == 0:
            log(steps, loss.item(), samples / (time.perf_counter() - start))
    mean = total.item() / samples if samples else float("nan")  # .item() syncs the device
    seconds = time.perf_counter() - start
    return EpochStats(mean, steps, samples, seconds, samples / seconds if seconds > 0 else float("nan"))


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class EvalStats:
    """Accuracy of every exit and its agreement with the teacher. Accuracies count the rows
    with labels (nan when none had any); agreement counts every row."""

    samples: int
    teacher_accuracy: float
    exit_accuracy: list[float]  # per layer; the last is the teacher's
    agreement: list[float]  # per layer: fraction of rows whose argmax equals the teacher's


KEPT_BY = {"finetune": "teacher_accuracy", "distill": "mean_agreement"}  # what each stage keeps its best epoch by


def kept_score(stage: Stage, ev: EvalStats) -> float:
    """The validation score a stage keeps its best epoch by: stage 1 the teacher's accuracy,
    stage 2 the students' mean agreement with the teacher (the exits' quality, whatever the
    labels; the teacher itself is frozen in stage 2)."""
    if stage == "finetune":
        return ev.teacher_accuracy
    return float(np.mean(ev.agreement[:-1])) if len(ev.agreement) > 1 else 1.0


def evaluate(model: FastBert | nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu") -> EvalStats:
    """Every exit's accuracy and agreement with the teacher over ``batches``, in eval mode
    under ``torch.inference_mode``; the modules' training flags are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = torch.device(device)
    correct = agree = None
    samples = labelled = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits  # (L, B, N)
                preds = logits.argmax(-1)  # (L, B)
                same = (preds == preds[-1:]).sum(1)  # (L,)
                agree = same if agree is None else agree + same
                samples += preds.shape[1]
                if batch.get("labels") is not None:
                    hits = (preds == batch["labels"].to(device)[None]).sum(1)  # (L,)
                    correct = hits if correct is None else correct + hits
                    labelled += preds.shape[1]
    finally:
        for module, mode in modes:
            module.training = mode
    layers = _unwrap(model).config.num_layers
    agreement = (agree.cpu().double() / samples).tolist() if samples else [math.nan] * layers
    exit_accuracy = (correct.cpu().double() / labelled).tolist() if labelled else [math.nan] * layers
    return EvalStats(samples, exit_accuracy[-1], exit_accuracy, agreement)


# -- a stage --------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Where a stage stands: the epochs done, the best so far, what each epoch measured. A Ray
    Train checkpoint holds it (``state.json``), so a restarted worker goes on from there."""

    stage: Stage
    epoch: int = 0  # epochs done
    best_epoch: int | None = None  # the epoch kept: best ``kept_score``, the later on ties
    best_score: float | None = None  # its kept_score (KEPT_BY[stage])
    best_accuracy: float | None = None  # its validation teacher accuracy
    improved_epoch: int = 0  # the last epoch that strictly improved the score (patience counts from it)
    stopped_early: bool = False  # patience ran out
    history: list[dict[str, Any]] = field(default_factory=list)  # a record per epoch (metrics.json)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StageProgress:
        names = {f.name for f in dataclasses.fields(cls)}
        progress = cls(**{k: v for k, v in raw.items() if k in names})
        if progress.best_score is None and progress.best_epoch is not None:  # state of an earlier version
            progress.best_score = progress.best_accuracy
        return progress

    def add(self, record: dict[str, Any], ev: EvalStats, patience: int | None, epochs: int) -> bool:
        """Record an epoch; returns whether it is the best so far (and so the one to keep)."""
        self.history.append(record)
        self.epoch = record["epoch"]
        score = kept_score(self.stage, ev)
        if self.best_score is None or score > self.best_score:
            self.improved_epoch = self.epoch
        best = self.best_score is None or score >= self.best_score  # on ties the later, more trained epoch
        if best:
            self.best_epoch, self.best_score, self.best_accuracy = self.epoch, score, ev.teacher_accuracy
        if patience and self.epoch - self.improved_epoch >= patience and self.epoch < epochs:
            self.stopped_early = True
        return best

    def kept(self) -> dict[str, Any]:
        """What metrics.json says of the epoch this stage kept."""
        return {"epoch": self.best_epoch, "by": KEPT_BY[self.stage], "value": self.best_score,
                "epochs_run": len(self.history), "stopped_early": self.stopped_early}


def train_stage(
    model: FastBert | nn.Module,
    progress: StageProgress,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    epoch_batches: Callable[[int], Iterable[Batch]],
    validate: Callable[[], EvalStats],
    after_epoch: Callable[[StageProgress, bool], None],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    steps_per_epoch: int | None = None,
    workers: int = 1,
    combine: Callable[[EpochStats], dict[str, Any]] | None = None,
    say: Callable[[str], Any] | None = print,
) -> StageProgress:
    """The epochs of ``progress.stage`` from ``progress.epoch + 1`` to ``epochs``: each trains
    on ``epoch_batches(epoch)``, is evaluated by ``validate()``, recorded in ``progress`` and
    handed to ``after_epoch(progress, is_best)``; ``config.patience`` ends the stage early.

    On several workers, ``combine(stats)`` returns the epoch's record fields summed over the
    workers (loss, samples, ...) and ``validate`` evaluates every worker's share; ``say``
    (rank 0's, or None) gets the progress lines. ``workers`` and ``steps_per_epoch`` only
    shape those lines (throughput of all workers, the stage's ETA)."""
    stage = progress.stage
    log = say or (lambda line: None)
    for epoch in range(progress.epoch + 1, 1 if progress.stopped_early else epochs + 1):
        def step_line(step: int, loss: float, sps: float, epoch: int = epoch) -> None:
            line = f"{stage} epoch {epoch}/{epochs} step {step}"
            if steps_per_epoch:  # the ETA of the stage's training steps at this pace (evaluations not included)
                left = (steps_per_epoch - min(step, steps_per_epoch)) + (epochs - epoch) * steps_per_epoch
                line += f"/{steps_per_epoch}: loss {loss:.4f}, {sps * workers:.1f} samples/s, stage ETA " \
                        f"{_duration(left * config.batch_size / workers / sps)}"
            else:
                line += f": loss {loss:.4f}, {sps * workers:.1f} samples/s"
            log(line)

        stats = train_epoch(model, epoch_batches(epoch), optimizer, scheduler, stage, config, device,
                            precision=precision, log=step_line if say else None)
        ev = validate()
        record = {"epoch": epoch, "loss": stats.loss, "teacher_accuracy": ev.teacher_accuracy,
                  "exit_accuracy": ev.exit_accuracy, "agreement": ev.agreement, "seconds": stats.seconds,
                  "samples_per_s": stats.samples_per_s, "samples": stats.samples, "validation_samples": ev.samples,
                  "workers": workers, "precision": precision, "steps": stats.steps,
                  "lr": scheduler.get_last_lr()[0], "finished_at": time.time()}
        if combine is not None:
            record.update(combine(stats))
        best = progress.add(record, ev, config.patience, epochs)
        log(f"{stage} epoch {epoch}/{epochs}: loss {record['loss']:.4f}, teacher acc {ev.teacher_accuracy:.4f}, "
            f"exit acc {format_values(ev.exit_accuracy)}, agreement {format_values(ev.agreement)}, "
            f"{record['samples_per_s']:.0f} samples/s in {precision}, {stats.seconds:.1f} s")
        after_epoch(progress, best)
        if progress.stopped_early:
            log(f"{stage}: no better {KEPT_BY[stage]} in {config.patience} epochs: stopped after epoch {epoch}")
            break
    return progress


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class TrainResult:
    """What a training returns (``fit``, ``pipeline.distributed.run``) and what a training
    job's ``metrics.json`` holds."""

    finetune: list[dict[str, Any]]  # stage 1: a record per epoch (loss, accuracies, agreement, throughput, lr, ...)
    distill: list[dict[str, Any]]  # stage 2: the same
    kept: dict[str, dict[str, Any]]  # per stage run: the epoch kept, by what, its value, epochs run, stopped early
    best_epoch: int | None  # stage 1's kept epoch (None: no stage 1)
    precision: str | None  # of the forward passes ("auto" resolved)
    labels: list[str] | None = None  # the model's labels, in its output order
    finetuned: str | None = None  # the model stage 2 started from (a job's best stage-1 checkpoint, or --finetuned)
    arguments: dict[str, Any] | None = None  # the job's arguments (what a re-run is compared by)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainResult:
        return cls(**{f.name: raw.get(f.name) for f in dataclasses.fields(cls)})


# -- a local run ------------------------------------------------------------------------------


def fit(
    model: FastBert,
    train_texts: Sequence[str],
    train_labels: Sequence[Label],
    val_texts: Sequence[str],
    val_labels: Sequence[Label],
    config: TrainConfig,
    distill_texts: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] | None = print,
) -> TrainResult:
    """Both stages on lists of texts in this process, evaluating on the validation texts after
    every epoch: what a training job does on each of its workers.

    Stage 1 (``config.epochs``) fine-tunes backbone + teacher on the labelled training texts;
    stage 2 (``config.distill_epochs``) distils the teacher into the students on
    ``distill_texts`` (unlabelled; default: ``config.distill_views`` views of each training
    text). Each stage ends with the weights of its best epoch (``kept_score``; on ties the
    later); ``config.patience`` stops a stage after that many epochs without a better one. Labels may be names
    (``model.config.labels``) or indices. ``log`` gets progress lines (None: silent). The model
    is left on ``device``, in eval mode, every parameter trainable.
    """
    say = log if log is not None else (lambda line: None)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    train_texts, val_texts = list(train_texts), list(val_texts)
    names = model.config.labels
    train_ids, val_ids = _label_ids(train_labels, names), _label_ids(val_labels, names)
    for what, texts, ids in (("train", train_texts, train_ids), ("val", val_texts, val_ids)):
        if len(texts) != len(ids):
            raise ValueError(f"got {len(texts)} {what} texts but {len(ids)} {what} labels")
    if not val_texts:
        raise ValueError("fit needs validation texts: it evaluates (and keeps the best epoch) on them")
    if distill_texts is None and config.distill_epochs:
        distill_texts = distillation_views(model.tokenizer, train_texts, config.distill_views, model.config.max_length,
                                           config.seed)
    distill_texts = train_texts if distill_texts is None else list(distill_texts)
    model.to(device)
    precision = resolve_precision(config.precision, device)  # auto: bf16 where the chip has it natively
    say(f"precision: {precision}")
    result = TrainResult(finetune=[], distill=[], kept={}, best_epoch=None, precision=precision, labels=list(names))
    stages = (("finetune", config.epochs, train_texts, train_ids), ("distill", config.distill_epochs, distill_texts, None))
    for stage, epochs, texts, ids in stages:
        if epochs == 0:
            continue
        if not texts:
            raise ValueError(f"the {stage} stage got no texts")
        steps = math.ceil(len(texts) / config.batch_size)
        optimizer, scheduler = stage_optimizer(model, stage, config, epochs * steps)
        kept: dict[str, Any] = {}

        def keep(progress: StageProgress, best: bool) -> None:
            if best:
                kept["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        progress = train_stage(
            model, StageProgress(stage), epochs, optimizer, scheduler, config,
            epoch_batches=lambda epoch, texts=texts, ids=ids: batches(model, texts, ids, config.batch_size,
                                                                      shuffle=True, seed=config.seed + epoch),
            validate=lambda: evaluate(model, batches(model, val_texts, val_ids, config.batch_size), device),
            after_epoch=keep, device=device, precision=precision, say=say if log is not None else None)
        setattr(result, stage, progress.history)
        result.kept[stage] = progress.kept()
        if stage == "finetune":
            result.best_epoch = progress.best_epoch
        if progress.best_epoch != progress.epoch:
            model.load_state_dict(kept["weights"])
            say(f"{stage}: kept epoch {progress.best_epoch} ({KEPT_BY[stage]} {progress.best_score:.4f})")
    model.requires_grad_(True).eval()
    return result


def _unwrap(model: nn.Module) -> FastBert | nn.Module:
    """The FastBert inside a wrapper such as DistributedDataParallel (``.module``)."""
    return getattr(model, "module", model)


def format_values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
