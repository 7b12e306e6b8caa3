"""Evaluation of a trained FastBERT on labelled Parquet: the speed-accuracy trade-off, the
exit-layer distribution, and fixed-depth truncation as the baseline.

One full-depth pass keeps every exit's prediction and uncertainty
(``pipeline.tradeoff.all_exits``). Accuracy, macro-F1, mean exit layer, exit-layer
histogram, FLOPs per row and FLOP speed-up at every speed follow from it exactly, and so does
the paper's baseline (b): every row leaving at layer k, against adaptive exit at equal FLOPs
(the other curve's accuracy interpolated at each speed's FLOP speed-up, with the 95% interval
of the paired gain). The other baselines of the paper (a plain classifier, students trained on
labels) and the engine's wall time are the lab's: ``python -m benchmarks.ablation``.

Output folder (local path or fsspec URI): ``evaluation.json``, ``evaluation.csv`` (a row per
speed), ``tradeoff.png`` and ``exits.png``; ``evaluation.json`` is written last.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline import flops as flop_account
from pipeline.cli import check_fields
from pipeline.config import MIN_DIFFERING_ROWS, check_speed
from pipeline.model import FastBert, resolve_precision
from pipeline.outputs import Manifest, UserError, claim_output, inspect_output, put_file, refuse_unsafe_output
from pipeline.tradeoff import AllExits, all_exits, at_speed, exits_at, predictions_at

EVALUATION_FILE = "evaluation.json"
CSV_FILE = "evaluation.csv"
TRADEOFF_PLOT = "tradeoff.png"
EXITS_PLOT = "exits.png"
OWNS = [EVALUATION_FILE, CSV_FILE, TRADEOFF_PLOT, EXITS_PLOT]  # what an evaluation writes into its output folder
DEFAULT_SPEEDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EQUAL = 1e-9  # accuracy differences below this count as ties


@dataclass
class EvaluateConfig:
    model: str  # a FastBERT folder (local path or fsspec URI)
    input: str  # labelled Parquet: a file, a folder or a glob (local path or fsspec URI)
    output: str  # folder for evaluation.json, evaluation.csv and the plots
    speeds: list[float] = field(default_factory=lambda: list(DEFAULT_SPEEDS))  # speeds in [0, 1] to tabulate
    text_column: str = "text"  # the input column that holds the texts
    label_column: str = "label"  # the column of labels (strings or integers)
    max_rows: int | None = None  # evaluate the first rows only (quick runs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # of the passes: auto is bf16 where the chip has it
    overwrite: bool = False  # remove an earlier evaluation's files from the output first (only those)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.text_column == self.label_column:
            raise UserError(f"text_column and label_column are both {self.text_column!r}")
        if not self.speeds:
            raise UserError("speeds: give at least one speed in [0, 1]")
        self.speeds = sorted({check_speed(s, "each of speeds") for s in self.speeds})
        if self.max_rows is not None and self.max_rows < 1:
            raise UserError(f"max_rows must be a positive integer or None, got {self.max_rows!r}")


@dataclass
class Evaluation:
    """What ``run_evaluation`` returns and ``evaluation.json`` holds."""

    model: str  # the evaluated FastBERT folder
    data: str  # the labelled Parquet
    rows: int  # rows evaluated
    labels: list[str]  # the model's labels
    layers: int
    precision: str  # of the full pass ("auto" resolved)
    teacher_accuracy: float
    teacher_macro_f1: float
    # a row per speed: speed, accuracy, macro_f1, mean_exit_layer, exit_counts, flops_per_row,
    # flop_speedup (benchmarks.ablation adds wall_speedup, rows_per_s and engine_agreement)
    speeds: list[dict[str, Any]]
    # "truncation": baseline (b) at equal FLOPs; "label_students" (c) and "plain_bert" (a): the lab's, or None
    baselines: dict[str, Any]
    files: list[str] = field(default_factory=lambda: [EVALUATION_FILE, CSV_FILE, TRADEOFF_PLOT, EXITS_PLOT])
    full_pass_seconds: float | None = None
    seconds: float | None = None  # the whole job's wall time
    config: dict[str, Any] | None = None  # the job's EvaluateConfig
    timing: dict[str, Any] | None = None  # benchmarks.ablation's timed passes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Evaluation:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


# -- metrics ----------------------------------------------------------------------------------


def macro_f1(truth: np.ndarray, predicted: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of the per-label F1 over the labels that occur in ``truth`` (both (R,)
    label indices): the same labels at every speed and for every model on the same rows."""
    tp = np.bincount(truth[truth == predicted], minlength=num_labels)  # (N,)
    in_truth = np.bincount(truth, minlength=num_labels)  # (N,) TP + FN
    in_predicted = np.bincount(predicted, minlength=num_labels)  # (N,) TP + FP
    present = in_truth > 0
    f1 = 2 * tp[present] / (in_truth[present] + in_predicted[present])
    return float(f1.mean()) if f1.size else float("nan")


def speed_row(exits: AllExits, model: FastBert, speed: float) -> dict:
    """Accuracy, macro-F1, exits and FLOPs at one speed, from the full pass."""
    point = at_speed(exits, model, speed)
    exit_at = exits_at(exits, speed)  # (R,)
    predicted = predictions_at(exits, exit_at)  # (R,)
    spent = flop_account.row_flops(model.config, exits.lengths, exit_at + 1, students=speed > 0)  # (R,)
    return {"speed": speed, "accuracy": point.accuracy,
            "macro_f1": macro_f1(exits.labels, predicted, model.config.num_labels),
            "mean_exit_layer": point.mean_exit_layer, "exit_counts": point.exit_counts,
            "flops_per_row": float(np.mean(spent)), "flop_speedup": point.flop_speedup}


def correct_at(exits: AllExits, speeds) -> np.ndarray:
    """(S, R) bool: whether each speed gets each row right, from the full pass."""
    return np.stack([predictions_at(exits, exits_at(exits, s)) == exits.labels for s in speeds])


def truncation_curve(exits: AllExits, model: FastBert) -> list[dict]:
    """Baseline (b): every row leaves at layer k, k = 1..L, with that layer's classifier alone."""
    full = np.sum(flop_account.full_depth_flops(model.config, exits.lengths))
    curve = []
    for k in range(1, model.config.num_layers + 1):
        predicted = exits.predictions[k - 1]  # (R,)
        spent = np.sum(flop_account.truncated_flops(model.config, exits.lengths, k))
        curve.append({"layer": k, "accuracy": float(np.mean(predicted == exits.labels)),
                      "macro_f1": macro_f1(exits.labels, predicted, model.config.num_labels),
                      "flop_speedup": float(full / spent)})
    return curve


def at_equal_flops(rows: list[dict], curve: list[dict], correct: np.ndarray, curve_correct: np.ndarray
                   ) -> list[dict]:
    """Each speed's accuracy against the other curve's at the same FLOP speed-up (interpolated
    between its two neighbouring points; None where the speed-up lies outside that curve), with
    a 95% interval of the gain.

    correct: (speeds, R) whether each speed gets each row right; curve_correct: (points, R) the
    same for the other curve's points. Both are measured on the same rows, so the gain is the
    mean of a per-row difference, ``correct - ((1 - w) * lower + w * upper)`` with the
    interpolation weight ``w``, and its interval is that of a paired mean (``paired_interval``).
    ``differing_rows`` counts the rows on which the difference is not 0.
    """
    x = np.array([p["flop_speedup"] for p in curve])
    order = np.argsort(x, kind="stable")
    x, y, hits = x[order], np.array([curve[i]["accuracy"] for i in order]), curve_correct[order].astype(float)
    out = []
    for row, ours in zip(rows, correct.astype(float)):
        at = row["flop_speedup"]
        other, interval, differing = None, None, None
        if x[0] - EQUAL <= at <= x[-1] + EQUAL:
            # the last point at or below ``at`` and the one after it (with equal speed-ups, the last)
            upper = int(np.clip(np.searchsorted(x, at, side="right"), 1, len(x) - 1)) if len(x) > 1 else 0
            lower = max(upper - 1, 0)
            span = x[upper] - x[lower]
            w = float(np.clip((at - x[lower]) / span, 0.0, 1.0)) if span > 0 else float(at >= x[upper])
            other = float((1 - w) * y[lower] + w * y[upper])
            diff = ours - ((1 - w) * hits[lower] + w * hits[upper])  # (R,)
            interval, differing = paired_interval(diff), int(np.count_nonzero(diff))
        out.append({"speed": row["speed"], "flop_speedup": at, "accuracy": row["accuracy"],
                    "one_exit_layer": max(row["exit_counts"]) == sum(row["exit_counts"]),
                    "baseline_accuracy": other,
                    "gain_points": None if other is None else 100 * (row["accuracy"] - other),
                    "gain_ci95_points": interval, "differing_rows": differing})
    return out


def paired_interval(diff: np.ndarray) -> list[float] | None:
    """The 95% interval, in points, of the mean of per-row differences between two models on
    the same rows (diff: (R,), each in [-1, 1]): the mean +- 1.96 standard errors (None for
    fewer than 2 rows). A row both models get right, or both wrong, adds no spread, so two
    models that agree on most rows get a narrow interval. The normal approximation needs
    enough rows that differ: with 4 rows lost and none won, the interval lies below 0 while an
    exact sign test gives p = 0.125, so verdicts also ask for ``MIN_DIFFERING_ROWS``."""
    if len(diff) < 2:
        return None
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    return [100 * (float(diff.mean()) - half), 100 * (float(diff.mean()) + half)]


def _verdict(comparison: list[dict]) -> dict:
    """Whether adaptive exit is at least as accurate at every speed that can be compared, and
    the speeds where it is worse beyond chance (the gain's 95% interval below 0, on at least
    ``MIN_DIFFERING_ROWS`` rows that differ). A speed whose rows all leave at one layer runs
    what truncation at that layer runs (and, at speed 0, the same teacher as baseline (c)): a
    tie by construction, left out."""
    compared = [c for c in comparison if c["baseline_accuracy"] is not None and not c["one_exit_layer"]]
    return {"speeds_compared": len(compared),
            "never_worse": all(c["gain_points"] >= -100 * EQUAL for c in compared),
            "min_gain_points": min((c["gain_points"] for c in compared), default=None),
            "worse_beyond_chance_at": [c["speed"] for c in compared if c["gain_ci95_points"] is not None
                                       and c["gain_ci95_points"][1] < 0
                                       and c["differing_rows"] >= MIN_DIFFERING_ROWS]}


# -- reading the data -------------------------------------------------------------------------


def read_labelled(config: EvaluateConfig, known: list[str]) -> tuple[list[str], list[str]]:
    """Texts and label names of the evaluation data, checked: a one-line ValueError names the
    file, column or row when a label column is missing, a row has no text or no label, or a
    label is not one the model knows (``known``)."""
    import pyarrow as pa

    from pipeline.text import describe_columns, is_text_type, parquet_dataset

    uri = config.input
    try:
        # the Parquet files it names, as in scoring; string, large_string, string_view or
        # dictionary-encoded texts and labels, also mixed between files; files without rows
        # (pandas' empty frames: null-typed) fix no types
        dataset = parquet_dataset(uri, [config.text_column, config.label_column])
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{uri}: not readable as Parquet ({e})") from e
    columns = dataset.schema.names
    listed = describe_columns(dataset.schema)
    if config.text_column not in columns:
        raise UserError(f"{uri}: no text column {config.text_column!r}; it has {listed} (pass --text-column)")
    text_type = dataset.schema.field(config.text_column).type
    if not (is_text_type(text_type) or pa.types.is_null(text_type)):  # null: refused below, row by row
        raise UserError(f"{uri}: text column {config.text_column!r} must hold strings, it holds {text_type}")
    if config.label_column not in columns:
        raise UserError(f"{uri}: no label column {config.label_column!r}; it has {listed}. Evaluation needs "
                         "labelled rows: pass --label-column, or score unlabelled data with jobs.score")
    table = dataset.head(config.max_rows, columns=[config.text_column, config.label_column]) if config.max_rows \
        else dataset.to_table(columns=[config.text_column, config.label_column])
    if table.num_rows == 0:
        raise UserError(f"{uri}: no rows")
    texts = table.column(config.text_column).to_pylist()
    labels = table.column(config.label_column).to_pylist()
    for i, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{uri}: row {i} has no text in column {config.text_column!r} ({text!r}); "
                             "evaluation needs a text in every row: drop such rows first")
        if label is None:
            missing = sum(v is None for v in labels)
            raise UserError(f"{uri}: column {config.label_column!r} has {missing} null labels (first: row {i}); "
                             "evaluation needs every row labelled")
    names = [str(v) for v in labels]
    unknown = sorted(set(names) - set(known))
    if unknown:
        first = next(i for i, n in enumerate(names) if n not in set(known))
        raise UserError(f"{uri}: column {config.label_column!r} has labels the model does not know: "
                         f"{unknown[:10]} ({sum(n in set(unknown) for n in names)} rows, first: row {first}); "
                         f"the model's labels are {known[:20]}")
    return texts, names


# -- the evaluation ---------------------------------------------------------------------------


def run_evaluation(config: EvaluateConfig, log=print) -> Evaluation:
    """Evaluate ``config.model`` on ``config.input``, write the output folder and print the
    table; returns the contents of evaluation.json."""
    import fsspec

    start = time.perf_counter()
    fs, out = fsspec.core.url_to_fs(config.output)
    out = out.rstrip("/")
    refuse_unsafe_output(config.output, [("--input", config.input), ("--model", config.model)])
    arguments = json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "overwrite"}))
    previous = inspect_output(config.output, "jobs.evaluate")
    if previous is not None and not config.overwrite:
        if previous.arguments == arguments and fs.isfile(f"{out}/{EVALUATION_FILE}"):
            with fs.open(f"{out}/{EVALUATION_FILE}") as f:
                result = Evaluation.from_json(json.load(f))
            log(f"{config.output} already holds this evaluation ({EVALUATION_FILE}): nothing to do")
            return result
        changed = sorted(k for k in set(arguments) | set(previous.arguments)  # (an earlier version's too)
                         if previous.arguments.get(k) != arguments.get(k))
        raise UserError(f"--output {config.output} holds an earlier evaluation"
                        + (f" with other arguments (differing: {', '.join(changed)})" if changed else " that did not finish")
                        + "; pass --overwrite to replace it or choose another --output")
    model = FastBert.from_pretrained(config.model)
    texts, labels = read_labelled(config, model.config.labels)
    log(f"evaluating {config.model} on {len(texts)} rows of {config.input}: one full-depth pass keeping "
        "every exit's output")
    precision = resolve_precision(config.precision, next(model.parameters()).device)
    log(f"precision: {precision}" + (" (auto)" if config.precision == "auto" else ""))
    tick = time.perf_counter()
    exits = all_exits(model, texts, labels, precision=precision)
    full_pass_s = time.perf_counter() - tick
    log(f"full pass: {full_pass_s:.1f} s ({len(texts) / full_pass_s:.0f} rows/s)")
    result = tabulate(model, exits, config.speeds, data=config.input, model_uri=config.model, precision=precision)
    result.full_pass_seconds, result.config = full_pass_s, asdict(config)
    claim_output(config.output, Manifest("jobs.evaluate", OWNS, arguments), overwrite=True)  # checked above
    result.seconds = time.perf_counter() - start  # all but writing the files
    write_evaluation(result, config.output)
    for line in format_table(result):
        log(line)
    log(f"written to {config.output}: {', '.join(result.files)} ({result.seconds:.0f} s)")
    return result


def tabulate(model: FastBert, exits: AllExits, speeds: list[float], data: str, model_uri: str,
             precision: str) -> Evaluation:
    """What the full pass says: the teacher, a row per speed, baseline (b) at equal FLOPs.
    ``baselines`` also has room for the lab's (a) ``plain_bert`` and (c) ``label_students``
    (``benchmarks.baselines``), which the table, the CSV and the plot show when present."""
    teacher = at_speed(exits, model, 0.0)
    rows = [speed_row(exits, model, s) for s in speeds]
    curve = truncation_curve(exits, model)
    comparison = at_equal_flops(rows, curve, correct_at(exits, speeds), exits.predictions == exits.labels[None])
    return Evaluation(
        model=model_uri, data=data, rows=len(exits.labels), labels=model.config.labels, layers=model.config.num_layers,
        precision=precision, teacher_accuracy=teacher.accuracy,
        teacher_macro_f1=macro_f1(exits.labels, exits.predictions[-1], model.config.num_labels), speeds=rows,
        baselines={"truncation": {"curve": curve, "at_speeds": comparison, **_verdict(comparison)},
                   "label_students": None, "plain_bert": None})


# -- output -----------------------------------------------------------------------------------


def format_table(result: Evaluation) -> list[str]:
    """The terminal table: a row per speed, then the baselines."""
    lines = [f"teacher accuracy {100 * result.teacher_accuracy:.2f}%, macro-F1 "
             f"{100 * result.teacher_macro_f1:.2f}% on {result.rows} rows",
             " speed  accuracy  macro-F1  mean exit  FLOP x  wall x  trunc. acc.  label-stud. acc."]
    truncation = {c["speed"]: c for c in result.baselines["truncation"]["at_speeds"]}
    students = {c["speed"]: c for c in (result.baselines["label_students"] or {}).get("at_speeds", [])}

    def pct(value) -> str:
        return "       -" if value is None else f"{100 * value:7.2f}%"

    for row in result.speeds:
        wall = "     -" if row.get("wall_speedup") is None else f"{row['wall_speedup']:5.2f}x"
        lines.append(f" {row['speed']:5.2f}  {pct(row['accuracy'])}  {pct(row['macro_f1'])}  "
                     f"{row['mean_exit_layer']:9.2f}  {row['flop_speedup']:5.2f}x  {wall}  "
                     f"{pct(truncation[row['speed']]['baseline_accuracy'])}     "
                     f"{pct(students.get(row['speed'], {}).get('baseline_accuracy'))}")
    b = result.baselines
    for tag, key, what, ours in (("(b)", "truncation", "fixed-depth truncation", "adaptive exit"),
                                 ("(c)", "label_students", "label-trained students", "self-distillation")):
        if b[key] and not b[key]["speeds_compared"]:  # every speed ran one exit layer: nothing to compare
            lines.append(f"{tag} {what} at equal FLOPs: no speed to compare (at every speed asked, all rows "
                         "left at one layer, which is what the baseline runs)")
        elif b[key]:
            worse = b[key]["worse_beyond_chance_at"]
            lines.append(f"{tag} {what} at equal FLOPs: {ours} "
                         f"{'never worse' if b[key]['never_worse'] else 'WORSE at some speed'} "
                         f"(min gain {_points(b[key]['min_gain_points'])} over {b[key]['speeds_compared']} speeds; "
                         + (f"worse beyond chance at speed {', '.join(f'{s:g}' for s in worse)})" if worse
                            else "nowhere worse beyond chance: 95% intervals of the paired gain)"))
    if b["plain_bert"]:
        interval = b["plain_bert"]["teacher_minus_plain_ci95_points"]
        lines.append(f"(a) plain BERT classifier: {100 * b['plain_bert']['accuracy']:.2f}%; teacher "
                     f"{b['plain_bert']['teacher_minus_plain_points']:+.2f} points"
                     + ("" if interval is None else f" (95% interval {interval[0]:+.2f} to {interval[1]:+.2f})"))
    return lines


def _points(value) -> str:
    return "n/a" if value is None else f"{value:+.2f} points"


def to_csv(result: Evaluation) -> str:
    """A row per speed: the metrics, the exit histogram and the baselines at equal FLOPs."""
    layers = result.layers
    truncation = {c["speed"]: c["baseline_accuracy"] for c in result.baselines["truncation"]["at_speeds"]}
    students = {c["speed"]: c["baseline_accuracy"]
                for c in (result.baselines["label_students"] or {}).get("at_speeds", [])}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = ["speed", "accuracy", "macro_f1", "mean_exit_layer", "flops_per_row", "flop_speedup", "wall_speedup",
             "rows_per_s", "engine_agreement"]
    writer.writerow(names + [f"exits_layer_{k}" for k in range(1, layers + 1)]
                    + ["truncation_accuracy_equal_flops", "label_students_accuracy_equal_flops"])
    for row in result.speeds:
        writer.writerow([row.get(n) for n in names] + row["exit_counts"]
                        + [truncation.get(row["speed"]), students.get(row["speed"])])
    return buffer.getvalue()


def plot_tradeoff(result: Evaluation, path: str) -> None:
    """Accuracy against FLOP speed-up: the teacher as a line, each speed a labelled point with
    its measured wall speed-up when benchmarks.ablation timed it, and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(100 * result.teacher_accuracy, color="grey", linestyle="--", linewidth=1,
               label=f"teacher (full depth) {100 * result.teacher_accuracy:.2f}%")
    b = result.baselines
    if b["plain_bert"]:
        ax.axhline(100 * b["plain_bert"]["accuracy"], color="tab:purple", linestyle=":", linewidth=1,
                   label=f"plain BERT classifier {100 * b['plain_bert']['accuracy']:.2f}%")
    trunc = sorted(b["truncation"]["curve"], key=lambda p: p["flop_speedup"])
    ax.plot([p["flop_speedup"] for p in trunc], [100 * p["accuracy"] for p in trunc], "s-", color="tab:orange",
            markersize=4, linewidth=1, label="fixed-depth truncation (layer k)")
    for p in trunc:
        ax.annotate(f"L{p['layer']}", (p["flop_speedup"], 100 * p["accuracy"]), fontsize=7, color="tab:orange",
                    xytext=(3, -9), textcoords="offset points")
    if b["label_students"]:
        curve = sorted(b["label_students"]["curve"], key=lambda p: p["flop_speedup"])
        ax.plot([p["flop_speedup"] for p in curve], [100 * p["accuracy"] for p in curve], "-", color="tab:green",
                linewidth=1, label="students trained on labels")
    rows = sorted(result.speeds, key=lambda r: r["flop_speedup"])
    ax.plot([r["flop_speedup"] for r in rows], [100 * r["accuracy"] for r in rows], "o-", color="tab:blue",
            label="FastBERT, adaptive exit (speed" + ("; measured wall speed-up)" if any(
                r.get("wall_speedup") is not None for r in rows) else ")"))
    shown = ([100 * r["accuracy"] for r in rows] + [100 * p["accuracy"] for p in trunc]
             + [100 * result.teacher_accuracy] + ([100 * b["plain_bert"]["accuracy"]] if b["plain_bert"] else [])
             + ([100 * p["accuracy"] for p in b["label_students"]["curve"]] if b["label_students"] else []))
    ax.set_ylim(max(0.0, min(shown) - 2), min(100.0, max(shown) + 2))
    _label_points(ax, [(r["flop_speedup"], 100 * r["accuracy"],
                        f"{r['speed']:g}" + ("" if r.get("wall_speedup") is None else f": wall {r['wall_speedup']:.2f}x"))
                       for r in rows])
    ax.set_xlabel("FLOP speed-up over a full-depth BERT classifier")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_short(result.model)} on {result.rows} rows of {_short(result.data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(uri: str) -> str:
    """The last two parts of a path: enough to tell runs apart in a title."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Label each point beside it, moving a label up or down where it would cover one placed
    before (points close on the curve); a label that fits nowhere is left out."""
    ax.figure.canvas.draw()  # fixes the data -> pixel transform
    scale = ax.figure.dpi / 72  # pixels per point
    placed: list[tuple[float, float, float, float]] = []  # pixel boxes (x0, y0, x1, y1)
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        width, height = (4.1 * len(text) + 2) * scale, 9 * scale  # 7-point text
        for dy in (3, -12, 15, -24, 27, -36, 39, -48):
            box = (px + 4 * scale, py + dy * scale, px + 4 * scale + width, py + dy * scale + height)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                placed.append(box)
                leader = None if dy == 3 else {"arrowstyle": "-", "lw": 0.5, "color": "tab:blue", "alpha": 0.6}
                ax.annotate(text, (x, y), xytext=(4, dy), textcoords="offset points", fontsize=7,
                            color="tab:blue", arrowprops=leader)
                break


def plot_exits(result: Evaluation, path: str) -> None:
    """The share of rows leaving at each layer, one panel per speed (the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.speeds
    columns = min(4, len(rows))
    lines = -(-len(rows) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.1 * lines), sharey=True, squeeze=False)
    layers = np.arange(1, result.layers + 1)
    for ax, row in zip(axes.flat, rows):
        share = 100 * np.array(row["exit_counts"]) / max(1, sum(row["exit_counts"]))
        ax.bar(layers, share, color="tab:blue")
        ax.set_title(f"speed {row['speed']:g}: {row['flop_speedup']:.2f}x FLOPs", fontsize=8)
        ax.set_xticks(layers)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 100)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("rows leaving (%)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("exit layer", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_evaluation(result: Evaluation, output: str) -> None:
    """The four files, built in a local temporary folder and copied to ``output`` with
    evaluation.json last, so its presence means the others are complete."""
    import fsspec

    fs, out = fsspec.core.url_to_fs(output)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, CSV_FILE), "w", newline="") as f:
            f.write(to_csv(result))
        plot_tradeoff(result, os.path.join(tmp, TRADEOFF_PLOT))
        plot_exits(result, os.path.join(tmp, EXITS_PLOT))
        with open(os.path.join(tmp, EVALUATION_FILE), "w") as f:
            json.dump(result.to_json(), f, indent=2)
        for name in (CSV_FILE, TRADEOFF_PLOT, EXITS_PLOT, EVALUATION_FILE):
            put_file(fs, os.path.join(tmp, name), f"{out.rstrip('/')}/{name}")
