"""The speed-accuracy trade-off of a FastBERT at many speeds from one forward pass.

A row's outcome at speed ``s`` depends only on its per-layer logits: it leaves at the first
layer whose uncertainty is below ``s`` (the teacher's layer at the latest), and its FLOPs
follow from that layer and its length. So one full-depth pass that keeps every exit's logits
gives the exact accuracy and FLOP speed-up at any number of speeds, the same as scoring at
each speed with the engine (``Scorer``, whose tests check this equality row by row). It
measures accuracy and FLOPs, not wall time: the engine benchmark measures that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import flops as flop_account
from pipeline.model import FastBert, uncertainty
from pipeline.train import batches


@dataclass
class AllExits:
    """What every exit said about every row: enough to score at any speed."""

    predictions: np.ndarray  # (L, R) label index of each exit
    uncertainty: np.ndarray  # (L, R) normalised entropy of each exit
    lengths: np.ndarray  # (R,) tokens per row (unpadded, after truncation)
    labels: np.ndarray  # (R,) true label index


@dataclass
class Point:
    speed: float
    accuracy: float
    flop_speedup: float  # full-depth BERT classifier FLOPs / FastBERT FLOPs, at real lengths
    mean_exit_layer: float
    exit_counts: list[int]  # rows leaving at layer 1..L


@torch.no_grad()
def all_exits(model: FastBert, texts: list[str], labels: list[str], batch_size: int = 64) -> AllExits:
    """One full-depth pass over ``texts`` in eval mode, keeping every exit's prediction and
    uncertainty. ``labels`` are label names of ``model.config.labels``."""
    model.eval()
    predictions, entropies, lengths, truth = [], [], [], []
    for batch in batches(model, texts, labels, batch_size=batch_size):
        logits = model(batch["input_ids"], batch["attention_mask"]).logits  # (L, B, N)
        predictions.append(logits.argmax(-1).numpy())  # (L, B)
        entropies.append(uncertainty(logits).numpy())  # (L, B)
        lengths.append(batch["attention_mask"].sum(1).numpy())  # (B,)
        truth.append(batch["labels"].numpy())  # (B,)
    return AllExits(np.concatenate(predictions, 1), np.concatenate(entropies, 1), np.concatenate(lengths),
                    np.concatenate(truth))


def at_speed(exits: AllExits, model: FastBert, speed: float) -> Point:
    """Accuracy and FLOPs at one speed, with the engine's rule: leave at the first layer whose
    uncertainty is below ``speed``; at speed 0 no student runs."""
    layers = exits.predictions.shape[0]
    leaves = exits.uncertainty < speed  # (L, R)
    leaves[-1] = True  # the teacher's layer is the last exit
    exit_index = leaves.argmax(0)  # (R,) first layer that lets the row leave, 0-based
    rows = np.arange(exits.lengths.shape[0])
    correct = exits.predictions[exit_index, rows] == exits.labels  # (R,)
    spent = flop_account.row_flops(model.config, exits.lengths, exit_index + 1, students=speed > 0)
    full = flop_account.full_depth_flops(model.config, exits.lengths)
    return Point(speed=speed, accuracy=float(correct.mean()), flop_speedup=float(np.sum(full) / np.sum(spent)),
                 mean_exit_layer=float(exit_index.mean() + 1),
                 exit_counts=np.bincount(exit_index, minlength=layers).tolist())


def accuracy_at_speedup(points: list[Point], speedup: float) -> float:
    """Accuracy at a FLOP speed-up, linearly interpolated between the measured points (nan
    outside their range): compares two models at equal FLOPs."""
    ordered = sorted(points, key=lambda p: p.flop_speedup)
    x = np.array([p.flop_speedup for p in ordered])
    if not x[0] <= speedup <= x[-1]:
        return float("nan")
    return float(np.interp(speedup, x, [p.accuracy for p in ordered]))
