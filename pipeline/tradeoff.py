"""The speed-accuracy trade-off of a FastBERT at many speeds from one forward pass.

A row's outcome at speed ``s`` depends only on its per-layer logits: it leaves at the first
layer whose uncertainty is below ``s`` (the teacher's layer at the latest), and its FLOPs
follow from that layer and its length. So one full-depth pass that keeps every exit's logits
gives the exact accuracy and FLOP speed-up at any number of speeds, the same as scoring at
each speed with the engine (``Scorer``, whose tests check this equality row by row). It
measures accuracy and FLOPs, not wall time: the engine benchmark measures that.

Reading a stored table and choosing a speed from it need no torch (a job's driver does that);
only the pass (``all_exits``) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline import flops as flop_account
from pipeline.config import SPEED_GRID, TRADEOFF_FILE, Point, TradeoffTable, check_speed
from pipeline.outputs import UserError

if TYPE_CHECKING:
    from pipeline.model import FastBert


@dataclass
class AllExits:
    """What every exit said about every row: enough to score at any speed."""

    predictions: np.ndarray  # (L, R) label index of each exit
    uncertainty: np.ndarray  # (L, R) normalised entropy of each exit
    lengths: np.ndarray  # (R,) tokens per row (unpadded, after truncation)
    labels: np.ndarray  # (R,) true label index
    # (L, R) what leaving at each exit is expected to cost in accuracy: the teacher's probability
    # of its own answer minus its probability of the exit's (0 where they agree)
    cost: np.ndarray


def answer_cost(teacher: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """(R,) what each answer (R,) is expected to cost in accuracy: the teacher's probability
    (R, N) of its own answer minus its probability of the answer given, 0 where they agree (the
    expected loss as far as the teacher is calibrated). The trade-off table's expected cost and
    the scoring job's audit both read it."""
    return teacher.max(1) - teacher[np.arange(len(answers)), answers]


def all_exits(model: FastBert, texts: list[str], labels: list[str], batch_size: int = 64,
              precision: str = "fp32") -> AllExits:
    """One full-depth pass over ``texts`` in eval mode, keeping every exit's prediction and
    uncertainty. ``labels`` are label names of ``model.config.labels``. Each exit's
    ``cost`` is kept too (``at_speed``'s ``expected_cost``). ``precision``: that
    of the matrix products (``model.resolve_precision``); uncertainties are computed in fp32."""
    import torch

    from pipeline.model import autocast, resolve_precision, uncertainty
    from pipeline.train import batches

    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)

    _check_labels(texts, labels)
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar lengths pad little
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    predictions, entropies, lengths, truth, costs = [], [], [], [], []
    with torch.no_grad(), autocast(precision, device):
        for batch in batches(model, texts, labels, batch_size=batch_size):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits.float()  # (L, B, N)
            predicted = logits.argmax(-1)  # (L, B)
            teacher = logits[-1].softmax(-1).numpy()  # (B, N)
            predictions.append(predicted.numpy())  # (L, B)
            costs.append(np.stack([answer_cost(teacher, answers) for answers in predictions[-1]]))  # (L, B)
            entropies.append(uncertainty(logits).numpy())  # (L, B)
            lengths.append(batch["attention_mask"].sum(1).numpy())  # (B,)
            truth.append(batch["labels"].numpy())  # (B,)
    back = np.argsort(order)  # (R,) the input order again
    return AllExits(np.concatenate(predictions, 1)[:, back], np.concatenate(entropies, 1)[:, back],
                    np.concatenate(lengths)[back], np.concatenate(truth)[back], np.concatenate(costs, 1)[:, back])


def _check_labels(texts: list[str], labels: list[str]) -> None:
    """One label per text (the rows are reordered by length before ``batches`` could check it)."""
    if len(labels) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")


def exits_at(exits: AllExits, speed: float) -> np.ndarray:
    """(R,) the 0-based layer each row leaves at, with the engine's rule: the first layer
    whose uncertainty is below ``speed``, the teacher's layer at the latest."""
    leaves = exits.uncertainty < speed  # (L, R)
    leaves[-1] = True  # the teacher's layer is the last exit
    return leaves.argmax(0)  # (R,)


def predictions_at(exits: AllExits, exit_at: np.ndarray) -> np.ndarray:
    """(R,) the label index each row gets when it leaves at layer ``exit_at`` (0-based, (R,))."""
    return exits.predictions[exit_at, np.arange(exits.lengths.shape[0])]


def at_speed(exits: AllExits, model: FastBert, speed: float) -> Point:
    """Accuracy and FLOPs at one speed, with the engine's rule (``exits_at``); at speed 0 no
    student runs."""
    layers = exits.predictions.shape[0]
    exit_at = exits_at(exits, speed)  # (R,)
    correct = predictions_at(exits, exit_at) == exits.labels  # (R,)
    spent = flop_account.row_flops(model.config, exits.lengths, exit_at + 1, students=speed > 0)
    full = flop_account.full_depth_flops(model.config, exits.lengths)
    agree = predictions_at(exits, exit_at) == exits.predictions[-1]  # (R,) the teacher's answer
    cost = exits.cost[exit_at, np.arange(exit_at.shape[0])]  # (R,)
    return Point(speed=speed, accuracy=float(correct.mean()), flop_speedup=float(np.sum(full) / np.sum(spent)),
                 agreement=float(agree.mean()), expected_cost=float(cost.mean()),
                 mean_exit_layer=float(exit_at.mean() + 1),
                 exit_counts=np.bincount(exit_at, minlength=layers).tolist())


# -- the exits' temperatures -------------------------------------------------------------------

# what calibrate tries: 0.05 ... 20 on a log scale (a student 20x over- or underconfident)
TEMPERATURES = tuple(float(t) for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 121)))


def calibrate(model: FastBert, texts: list[str], labels: list[str] | None = None, batch_size: int = 64) -> list[float]:
    """Fit the exits' temperatures on held-out ``texts`` and set them in the model's config
    (``exit_temperatures``, saved with it); returns them. A student's temperature is the one of
    ``TEMPERATURES`` under which its softmax gives the teacher's answers the highest likelihood:
    a row should leave where the student is as sure as it is likely to agree with the teacher.
    Uncalibrated, stage 2's students are over- or underconfident by up to 5x, so one speed
    meant different things at different layers, and an overconfident student let out rows it
    got wrong at the lowest speeds (benchmarks/RESULTS.md, "Calibrated exits").

    The teacher's temperature is fitted the same way to ``labels`` (names of
    ``model.config.labels``), 1 without them. It changes no answer and no exit (every row left
    at the teacher's layer leaves there anyway), only the teacher's probabilities: calibrated,
    they are what the expected cost of an answer (``answer_cost``) needs. A fine-tuned teacher's
    own were off either way (T 1.16-2.11 on three bundled sets, 0.71 on R52's 52 labels)."""
    import torch
    import torch.nn.functional as F

    from pipeline.train import batches

    if labels is not None:
        _check_labels(texts, labels)
    model.config.exit_temperatures = None  # fitted on the exits' own logits
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar lengths pad little
    texts = [texts[i] for i in order]
    labels = None if labels is None else [labels[i] for i in order]
    exits, truth = [], []
    with torch.no_grad():
        for batch in batches(model, texts, labels, batch_size=batch_size):
            exits.append(model(batch["input_ids"], batch["attention_mask"]).logits.float())  # (L, B, N)
            truth.append(batch.get("labels"))  # (B,) or None
    logits = torch.cat(exits, 1)  # (L, R, N)
    answers = logits[-1].argmax(-1)  # (R,) the teacher's

    def fitted(z: torch.Tensor, target: torch.Tensor) -> float:  # z (R, N), target (R,)
        return TEMPERATURES[int(np.argmin([float(F.cross_entropy(z / t, target)) for t in TEMPERATURES]))]

    teacher = 1.0 if labels is None else fitted(logits[-1], torch.cat(truth))
    model.config.exit_temperatures = [*(fitted(z, answers) for z in logits[:-1]), teacher]
    return model.config.exit_temperatures


# -- the validation table a trained model carries, and choosing a speed from it ---------------


def tradeoff_table(model: FastBert, texts: list[str], labels: list[str], data: str) -> TradeoffTable:
    """The table of ``model`` on held-out ``texts`` with their ``labels`` (one full-depth pass)."""
    exits = all_exits(model, texts, labels)
    lowest = np.sort(np.minimum.accumulate(exits.uncertainty, axis=0)[:-1], axis=1)  # (L-1, R)
    return TradeoffTable(data=data, rows=len(texts), points=[at_speed(exits, model, s) for s in SPEED_GRID],
                         exit_uncertainty=lowest.astype(np.float32).tolist())


DEFAULT_BUDGET = 0.5  # accuracy points: without a speed or a budget, scoring runs the fastest speed within this
FALLBACK_SPEED = 0.5  # the speed without a speed, a budget or a table (a model trained before tables existed)


def pick_speed(table: TradeoffTable | None, speed: float | None = None, max_accuracy_drop: float | None = None,
               target_speedup: float | None = None) -> tuple[float, Point | None]:
    """The speed to run, and its point of ``table`` when the table chose it: a speed given is
    run as it is; a budget is met from the table (``choose_speed``); with neither, the model's
    own suggestion, the fastest speed within ``DEFAULT_BUDGET`` points of the teacher on its
    validation rows (a weak model's table suggests a low speed, where a fixed one would spend
    more FLOPs than full depth), or ``FALLBACK_SPEED`` for a model without a table."""
    budget = max_accuracy_drop is not None or target_speedup is not None
    if speed is not None:
        if budget:
            raise UserError("give a speed or a budget (max_accuracy_drop, target_speedup), not both")
        return check_speed(speed), None
    if not budget:
        if table is None:
            return FALLBACK_SPEED, None
        max_accuracy_drop = DEFAULT_BUDGET
    point = choose_speed(table, max_accuracy_drop, target_speedup)
    return point.speed, point


def format_table(table: TradeoffTable, speeds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                 marked: dict[float, str] | None = None) -> list[str]:
    """The table as terminal lines at ``speeds`` and the ``marked`` ones ({speed: note})."""
    marked = marked or {}
    wanted = sorted(set(speeds) | set(marked))
    lines = [f"{'speed':>5} {'accuracy':>8} {'drop':>6} {'agrees':>7} {'exp. cost':>9} {'FLOP speed-up':>13} "
             f"{'mean exit':>9}  (validation, {table.rows} rows; drop and expected cost in points)"]
    for p in table.points:
        if any(abs(p.speed - s) < 1e-9 for s in wanted):
            note = next((n for s, n in marked.items() if abs(p.speed - s) < 1e-9), "")
            lines.append(f"{p.speed:5.2f} {100 * p.accuracy:7.2f}% {100 * (table.teacher.accuracy - p.accuracy):6.2f} "
                         f"{100 * p.agreement:6.2f}% {100 * p.expected_cost:9.2f} {p.flop_speedup:12.2f}x "
                         f"{p.mean_exit_layer:9.2f}  {note}".rstrip())
    return lines


def choose_speed(table: TradeoffTable | None, max_accuracy_drop: float | None = None,
                 target_speedup: float | None = None) -> Point:
    """The speed for a budget, from a model's table (give exactly one budget):
    ``max_accuracy_drop`` (accuracy points below the teacher's that may be given up): the
    fastest speed whose expected accuracy cost on the table's rows is within it (``Point.
    expected_cost``: per row, the teacher's probability of its own answer minus its probability
    of the answer given; small where the teacher itself is unsure; the expected accuracy loss
    as far as the teacher's probabilities are calibrated, which ``calibrate`` makes them on
    the validation labels: at T=1 an overconfident teacher made the cost cautious, R52's
    underconfident one made it too low, 0.80 points lost on test for a 0.5-point budget). The
    accuracy within the budget lets luck on a few hundred validation rows pick a speed that
    does not carry (R8, 300 validation rows, 0.5 point: speed 0.70, 2.15 points below the
    teacher on the test rows), and agreement with the teacher on all but budget% of the rows
    gave up most of the speed-up where the teacher is often unsure (R52 after unlabelled
    distillation, 0.5 point: speed 0, 1.00x, where the expected cost picks 3.60x at 0.40
    points on the test rows; ``benchmarks.speed_choice``). Tables written before the expected
    cost was kept use the agreement, and before that the accuracy. ``target_speedup`` (FLOP
    speed-up wanted): the most accurate speed that reaches it. Ties go to the more accurate
    (the faster) point, then the lower speed."""
    if (max_accuracy_drop is None) == (target_speedup is None):
        raise UserError("give exactly one of max_accuracy_drop and target_speedup")
    if table is None:
        raise UserError(f"the model has no {TRADEOFF_FILE} (written by training since the speed-by-budget "
                         "options exist): pass a speed instead, or train the model again")
    if max_accuracy_drop is not None:
        if not 0.0 <= max_accuracy_drop <= 100.0:
            raise UserError(f"max_accuracy_drop is in accuracy points, in [0, 100]; got {max_accuracy_drop}")
        if all(p.expected_cost == p.expected_cost for p in table.points):  # no nan: the cost is kept
            within = [p for p in table.points if p.expected_cost <= max_accuracy_drop / 100.0 + 1e-9]
        elif all(p.agreement == p.agreement for p in table.points):  # no nan: the agreement is kept
            within = [p for p in table.points if p.agreement >= 1.0 - max_accuracy_drop / 100.0 - 1e-9]
        else:
            floor = table.teacher.accuracy - max_accuracy_drop / 100.0 - 1e-9
            within = [p for p in table.points if p.accuracy >= floor]
        return max(within, key=lambda p: (p.flop_speedup, p.accuracy, -p.speed))  # the teacher is always within
    if not target_speedup >= 1.0:
        raise UserError(f"target_speedup is a FLOP speed-up >= 1, got {target_speedup}")
    reaching = [p for p in table.points if p.flop_speedup >= target_speedup]
    if not reaching:
        best = max(table.points, key=lambda p: p.flop_speedup)
        raise UserError(f"no speed reaches a {target_speedup}x FLOP speed-up on {table.data}; the most is "
                         f"{best.flop_speedup:.2f}x at speed {best.speed}")
    return max(reaching, key=lambda p: (p.accuracy, p.flop_speedup, -p.speed))


def describe_choice(point: Point, table: TradeoffTable) -> str:
    """One line: the chosen speed and what the table promises for it."""
    agrees = "" if point.agreement != point.agreement else f", the teacher's answer on {100 * point.agreement:.2f}% of rows"
    if point.expected_cost == point.expected_cost:
        agrees += f", an expected cost of {100 * point.expected_cost:.2f} points"
    return (f"speed {point.speed}: {100 * point.accuracy:.2f}% accuracy (teacher {100 * table.teacher.accuracy:.2f}%"
            f"{agrees}) at {point.flop_speedup:.2f}x FLOP speed-up on {table.rows} rows of {table.data}")


# -- drift: do a job's rows leave the model the way its validation rows did? -------------------

DRIFT_TV = 0.15  # total variation between exit histograms above which scoring warns (benchmarks.drift)


@dataclass
class Drift:
    """A job's exit-layer histogram against the one the model's validation rows gave at the same
    speed. Early exit's thresholds were chosen on the validation rows; rows unlike them leave
    at other layers, and the accuracy the table promised no longer holds."""

    speed: float
    validation_rows: int
    rows: int  # the job's scored rows
    total_variation: float  # half the L1 distance between the two exit-layer distributions, 0 ... 1
    noise: float  # what two samples of these sizes from one distribution differ by, on average
    threshold: float  # DRIFT_TV, or 3x the noise when that is larger (few rows)
    drifted: bool


def exit_drift(table: TradeoffTable, speed: float, exit_counts: list[int]) -> Drift | None:
    """Compare ``exit_counts`` (rows leaving at layer 1..L) with the exits of ``table``'s
    validation rows at ``speed``; None when the table cannot say (a table of an earlier version,
    at a speed off its grid) or either has no rows."""
    validation = table.exit_counts(speed)
    if validation is None:
        return None
    expected = np.asarray(validation, dtype=np.float64)  # (L,)
    seen = np.asarray(exit_counts, dtype=np.float64)  # (L,)
    if expected.sum() == 0 or seen.sum() == 0 or expected.shape != seen.shape:
        return None
    p, q = seen / seen.sum(), expected / expected.sum()  # (L,)
    pooled = (seen + expected) / (seen.sum() + expected.sum())  # (L,)
    # E|X| = sigma * sqrt(2/pi) per layer, for the difference of two shares of one distribution
    sigma = np.sqrt(pooled * (1 - pooled) * (1 / seen.sum() + 1 / expected.sum()))  # (L,)
    noise = float(0.5 * np.sum(sigma) * np.sqrt(2 / np.pi))
    tv = float(0.5 * np.abs(p - q).sum())
    threshold = max(DRIFT_TV, 3 * noise)
    return Drift(speed=speed, validation_rows=int(expected.sum()), rows=int(seen.sum()), total_variation=tv,
                 noise=noise, threshold=threshold, drifted=tv > threshold)
