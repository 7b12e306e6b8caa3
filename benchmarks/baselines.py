"""The lab's half of the evaluation (``benchmarks.ablation``): the paper's baselines (a) and
(c), trained here, and the engine's wall time per speed.

(a) A plain Hugging Face ``BertForSequenceClassification`` on the same backbone (pooler and a
    linear layer on [CLS], every row at full depth), fine-tuned with FastBERT's stage-1
    budget: the paper's check that the teacher is no worse than standard fine-tuning. Its
    folder is a standard Hugging Face one (``AutoModelForSequenceClassification`` opens it).
(c) Students trained on the labels instead of the teacher (the backbone and teacher of a
    FastBERT's stage 1, frozen): the paper's ablation of self-distillation, compared with it at
    equal FLOPs.
Wall time: ``time_speeds`` runs the engine at every speed in interleaved rounds and
``wall_speedups`` compares each pass with speed 0 at the moment it ran.

(b), fixed-depth truncation, needs nothing but the evaluated model's full pass: it stays in
``pipeline.evaluate``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine import Scorer
from pipeline.config import SPEED_GRID
from pipeline.evaluate import EQUAL, _verdict, at_equal_flops, correct_at, macro_f1, paired_interval
from pipeline.losses import _upcast, teacher_loss
from pipeline.model import FORMAT, FastBert, _build_backbone, _resolve_backbone
from pipeline.outputs import UserError
from pipeline.text import tokenize
from pipeline.tradeoff import AllExits, all_exits, at_speed, exits_at, predictions_at
from pipeline.train import batches, make_optimizer, set_stage

# -- (a) the plain classifier -----------------------------------------------------------------


def new_plain_bert(backbone: str, labels: list[str], max_length: int) -> nn.Module:
    """A ``BertForSequenceClassification`` (or the backbone type's own class) on a pretrained
    backbone (a folder, a Hugging Face name, or ``"bundled"``) with a new random classifier
    for ``labels``; its tokenizer is ``model.tokenizer`` and truncates at ``max_length``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _resolve_backbone(backbone)
    model = _build_backbone(lambda **kw: AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, **{k: v for k, v in kw.items()
                                                                 if k != "add_pooling_layer"}))
    model.tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    return model.eval()


def load_plain_bert(path: str) -> nn.Module:
    """A plain classifier saved by ``save_plain_bert`` (a local folder), in eval mode."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json)")
    with open(os.path.join(path, "config.json")) as f:
        if json.load(f).get("format") == FORMAT:
            raise UserError(f"{path}: a FastBERT model, not a plain classifier")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval()


def save_plain_bert(model: nn.Module, path: str) -> None:
    """Write the model and its tokenizer to a local folder."""
    model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)


def plain_bert_labels(model: nn.Module) -> list[str]:
    """The label names, in the classifier's output order."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


@torch.no_grad()
def plain_bert_predict(model: nn.Module, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(R,) the label index each text gets; rows are sorted by length so batches pad little."""
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        enc = model.tokenizer([texts[i] for i in rows], truncation=True, padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, N)
        out[rows] = logits.argmax(-1).numpy()
    return out


def _plain_batches(model: nn.Module, texts: list[str], ids: np.ndarray, batch_size: int, seed: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    order = np.random.default_rng(seed).permutation(len(texts))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = model.tokenizer([texts[i] for i in rows], truncation=True, padding=True, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],  # (B, T)
               "labels": torch.from_numpy(ids[rows])}  # (B,)


def train_plain_bert(model: nn.Module, texts: Sequence[str], labels: Sequence[str], val_texts: Sequence[str],
                     val_labels: Sequence[str], epochs: int, lr: float, head_lr: float | None, batch_size: int = 32,
                     warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 0,
                     log: Callable[[str], None] = print) -> list[float]:
    """Fine-tune the plain classifier as FastBERT's stage 1 trains backbone and teacher (AdamW,
    the head at ``head_lr``, linear warm-up and decay, clipping at 1), keeping the epoch of best
    validation accuracy; returns the validation accuracy of every epoch."""
    torch.manual_seed(seed)
    names = plain_bert_labels(model)
    ids, val_ids = (np.array([names.index(str(n)) for n in ls]) for ls in (labels, val_labels))
    texts, val_texts = list(texts), list(val_texts)
    steps = epochs * math.ceil(len(texts) / batch_size)
    head = list(model.classifier.parameters())
    optimizer, scheduler = make_optimizer(model.parameters(), lr, weight_decay, steps, warmup, head_params=head,
                                          head_lr=head_lr)
    best, best_state, accuracies = -1.0, None, []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in _plain_batches(model, texts, ids, batch_size, seed + epoch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, N)
            loss = teacher_loss(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        accuracy = float(np.mean(plain_bert_predict(model, val_texts) == val_ids))
        accuracies.append(accuracy)
        log(f"plain BERT epoch {epoch}/{epochs}: validation accuracy {accuracy:.4f}")
        if accuracy >= best:  # on ties the later epoch, as the jobs keep
            best, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return accuracies


def plain_bert_baseline(plain: nn.Module, path: str, model: FastBert, exits: AllExits, texts: list[str]) -> dict:
    """Baseline (a) on the evaluation's rows: the plain classifier's accuracy against the
    teacher's, with the 95% interval of the paired difference."""
    if sorted(plain_bert_labels(plain)) != sorted(model.config.labels):
        raise UserError(f"{path}: its labels are not the evaluated model's; a baseline must be trained on the same data")
    plain.tokenizer.model_max_length = model.config.max_length  # the same truncation as FastBERT's
    index = [model.config.labels.index(n) for n in plain_bert_labels(plain)]
    predicted = np.array(index)[plain_bert_predict(plain, texts)]  # (R,) in FastBERT's label order
    accuracy = float(np.mean(predicted == exits.labels))
    teacher = float(np.mean(exits.predictions[-1] == exits.labels))
    diff = (exits.predictions[-1] == exits.labels).astype(float) - (predicted == exits.labels)  # (R,) teacher - plain
    return {"model": path, "accuracy": accuracy, "macro_f1": macro_f1(exits.labels, predicted, model.config.num_labels),
            "teacher_minus_plain_points": 100 * (teacher - accuracy),
            "teacher_minus_plain_ci95_points": paired_interval(diff),
            "teacher_within_half_point": teacher >= accuracy - 0.005 - EQUAL}


# -- (c) students trained on the labels -------------------------------------------------------


def student_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every student with the labels (the ablation without self-distillation).

    student_logits: (S, B, N); labels: (B,) int64. Returns a scalar: the sum over students of
    the batch-mean cross-entropy.
    """
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[1:2]:
        raise ValueError(
            f"student_label_loss expects student_logits (S, B, N) and labels (B,), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    S, B, _ = student_logits.shape
    targets = labels[:, None].expand(B, S)  # (B, S)
    ce = F.cross_entropy(_upcast(student_logits).permute(1, 2, 0), targets, reduction="none")  # (B, S)
    return ce.mean(dim=0).sum()  # ()


# speeds of the label-students curve: the table's grid and the small speeds where accuracy moves most
COMPARISON_SPEEDS = tuple(sorted(set(SPEED_GRID) | {0.001, 0.002, 0.003, 0.005, 0.007}))


def train_label_students(model: FastBert, texts: Sequence[str], labels: Sequence[str], epochs: int, lr: float,
                         batch_size: int = 32, warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 0) -> None:
    """Train the students of a fine-tuned FastBERT on the labels (cross-entropy of every student),
    its backbone and teacher frozen as in stage 2: the paper's ablation of self-distillation."""
    torch.manual_seed(seed)
    params = set_stage(model, "distill")
    steps = epochs * math.ceil(len(texts) / batch_size)
    optimizer, scheduler = make_optimizer(params, lr, weight_decay, steps, warmup)
    for epoch in range(1, epochs + 1):
        set_stage(model, "distill")
        for batch in batches(model, texts, labels, batch_size, shuffle=True, seed=seed + epoch):
            out = model(batch["input_ids"], batch["attention_mask"])  # logits (L, B, N)
            loss = student_label_loss(out.student_logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
    model.requires_grad_(True).eval()


def label_students_baseline(other: FastBert, path: str, model: FastBert, rows: list[dict], exits: AllExits,
                            texts: list[str], labels: list[str], precision: str) -> dict:
    """Baseline (c) on the evaluation's rows: each speed's accuracy against the label-trained
    students' at the same FLOP speed-up."""
    if sorted(other.config.labels) != sorted(model.config.labels):
        raise UserError(f"{path}: its labels are not the evaluated model's; a baseline must be trained on the same data")
    other_exits = all_exits(other, texts, labels, precision=precision)
    curve = [asdict(at_speed(other_exits, other, s)) for s in COMPARISON_SPEEDS]
    correct = correct_at(exits, [r["speed"] for r in rows])  # (S, R)
    comparison = at_equal_flops(rows, curve, correct, correct_at(other_exits, COMPARISON_SPEEDS))
    return {"model": path, "teacher_accuracy": curve[0]["accuracy"],
            "curve": [{k: p[k] for k in ("speed", "accuracy", "flop_speedup")} for p in curve],
            "at_speeds": comparison, **_verdict(comparison)}


# -- wall time --------------------------------------------------------------------------------


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@contextlib.contextmanager
def steady_heap():
    """glibc keeps what the timed passes allocate for the next: with its defaults, freeing a
    pass's tensors trims the heap, and the next pass at another speed (other shapes) took
    0.2-1.2 million minor page faults (0.5-3 s) on the R8 test split, charged to whichever
    speed met them first. Blocks under 32 MiB come from the heap and nothing is trimmed until
    the passes end; then the freed pages go back. Elsewhere than glibc, nothing changes."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 2**10)  # glibc's default
        libc.malloc_trim(0)


def time_speeds(model: FastBert, texts: list[str], exits: AllExits, rows: list[dict], repeats: int,
                micro_batch: int = 32, precision: str = "auto", log: Callable[[str], None] = print
                ) -> list[tuple[float, float, float]]:
    """Add ``rows_per_s``, ``wall_speedup`` (against speed 0) and ``engine_agreement`` (the
    engine's predictions against the full pass's) to each speed's row; returns the passes
    ``(speed, start, seconds)`` in the order run.

    ``Scorer.score_tokens`` on rows tokenised once (tokenising costs the same at every speed),
    in ``repeats`` rounds, each timing every speed once, speed 0 first, and one more pass of
    speed 0 at the end: every pass of another speed lies between two of speed 0
    (``wall_speedups``). rows/s is from a speed's fastest pass."""
    token_ids, _, _ = tokenize(model.tokenizer, texts, model.config.max_length)
    speeds = [0.0] + [r["speed"] for r in rows if r["speed"] != 0.0]
    row_of = {r["speed"]: r for r in rows}
    index = {name: i for i, name in enumerate(model.config.labels)}
    passes: list[tuple[float, float, float]] = []
    order = [*speeds * repeats, 0.0]
    with steady_heap():
        Scorer(model, speed=0.0, micro_batch=micro_batch, precision=precision).score_tokens(token_ids)  # warm-up
        tick = time.perf_counter()
        for done, speed in enumerate(order, start=1):
            scorer = Scorer(model, speed=speed, micro_batch=micro_batch, precision=precision)
            t0 = time.perf_counter()
            table = scorer.score_tokens(token_ids)
            seconds = time.perf_counter() - t0
            passes.append((speed, t0 - tick, seconds))
            row = row_of.get(speed)
            if row is not None and row.get("engine_agreement") is None:
                engine = np.array([index[p] for p in table.column("prediction").to_pylist()])
                row["engine_agreement"] = float(np.mean(engine == predictions_at(exits, exits_at(exits, speed))))
            log(f"timed speed {speed:.2f} (pass {done}/{len(order)}): {len(texts) / seconds:.1f} rows/s")
    walls = wall_speedups(passes)
    for row in rows:
        row["rows_per_s"] = len(texts) / min(sec for p, _, sec in passes if p == row["speed"])
        row["wall_speedup"] = walls[row["speed"]]
    return passes


def wall_speedups(passes: list[tuple[float, float, float]]) -> dict[float, float]:
    """Timed passes ``(speed, start, seconds)`` in the order run, speed 0 first and last ->
    each speed's wall speed-up: the median over its passes of speed 0's time at the moment
    of the pass over the pass's own time. Speed 0's time at a moment is interpolated linearly
    between the passes of speed 0 before and after it (by their midpoints): when the machine
    speeds up or slows down over a round, the reference follows."""
    reference = [(start + seconds / 2, seconds) for speed, start, seconds in passes if speed == 0.0]
    if not reference or passes[0][0] != 0.0 or passes[-1][0] != 0.0:
        raise ValueError("the timed passes must begin and end with a pass of speed 0")
    middles, times = np.array([m for m, _ in reference]), np.array([t for _, t in reference])  # (P0,), (P0,)
    ratios: dict[float, list[float]] = {}
    for speed, start, seconds in passes:
        expected = float(np.interp(start + seconds / 2, middles, times))  # speed 0's time at this moment
        ratios.setdefault(speed, []).append(1.0 if speed == 0.0 else expected / seconds)
    return {speed: float(np.median(r)) for speed, r in ratios.items()}
