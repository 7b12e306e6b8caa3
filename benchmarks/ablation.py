"""The paper's comparison (Table 3) in one command: on one bundled data set, train FastBERT,
its label-trained-students twin and a plain BERT classifier with the same epochs and rates,
then evaluate them all on the test split, time the engine at every speed, and check the
acceptance criteria.

    python -m benchmarks.ablation --dataset r8 [--train-rows 2000] [--test-rows 0] [--distill-on train|unlabelled]
        [--teacher-head pooler|branch] [--repeats 5] [--work DIR] [--json out.json]

Steps:
1. the data set to Parquet (train / validation / test);
2. FastBERT with the product's training job (Ray Train on a local Ray): fine-tuning, then
   self-distillation on the labelled sample's texts (``--distill-on train``, the default: the
   paper's ablation), or on the texts of the whole training split outside validation, their
   labels dropped (``--distill-on unlabelled``: the paper's "any amount of unlabelled text",
   which students trained on labels cannot follow);
3. baseline (c) (``benchmarks.baselines.train_label_students``): from FastBERT's stage-1
   checkpoint, the students trained on the sample's labels, as many optimiser steps as
   FastBERT's stage 2 (with ``unlabelled``, more epochs over the fewer labelled rows);
4. baseline (a) (``benchmarks.baselines.train_plain_bert``): a plain
   ``BertForSequenceClassification``, the same epochs and rates;
5. the product's evaluation (``pipeline.evaluate``: every speed, truncation (b)), the two
   baselines at equal FLOPs and the engine's wall time per speed (``--repeats`` rounds).
Models are kept under --work: a second run reuses every finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.baselines import (label_students_baseline, load_plain_bert, new_plain_bert, plain_bert_baseline,
                                  save_plain_bert, time_speeds, train_label_students, train_plain_bert)
from pipeline.config import TEACHER_HEADS
from pipeline.datasets import write_bundled
from pipeline.distributed import TrainJobConfig
from pipeline.distributed import run as train
from pipeline.evaluate import DEFAULT_SPEEDS, EvaluateConfig, Evaluation, format_table, read_labelled, tabulate, write_evaluation
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits


def checks(result: Evaluation) -> dict:
    """The issue's acceptance criteria, each with the numbers behind it."""
    rows, b = result.speeds, result.baselines
    at_2x = [r for r in rows if r["flop_speedup"] >= 2.0]
    fastest_2x = min(at_2x, key=lambda r: r["flop_speedup"]) if at_2x else None
    by_speedup = sorted(rows, key=lambda r: r["flop_speedup"])
    x = [r["flop_speedup"] for r in by_speedup]
    at_exactly_2x = float(np.interp(2.0, x, [r["accuracy"] for r in by_speedup])) if x[0] <= 2.0 <= x[-1] else None
    timed = [r for r in rows if r.get("wall_speedup") is not None and r["speed"] > 0]
    ratios = {r["speed"]: r["wall_speedup"] / r["flop_speedup"] for r in timed}
    out = {
        "adaptive_beats_truncation": b["truncation"]["never_worse"],
        "truncation_min_gain_points": b["truncation"]["min_gain_points"],
        "truncation_worse_beyond_chance_at": b["truncation"]["worse_beyond_chance_at"],
        "distillation_beats_label_students": b["label_students"]["never_worse"] if b["label_students"] else None,
        "label_students_min_gain_points": b["label_students"]["min_gain_points"] if b["label_students"] else None,
        "label_students_worse_beyond_chance_at": (b["label_students"]["worse_beyond_chance_at"]
                                                  if b["label_students"] else None),
        "speed_at_2x": fastest_2x and fastest_2x["speed"],
        "drop_at_2x_points": fastest_2x and 100 * (result.teacher_accuracy - fastest_2x["accuracy"]),
        "within_1_point_at_2x": bool(fastest_2x) and result.teacher_accuracy - fastest_2x["accuracy"] <= 0.01,
        "drop_at_exactly_2x_points": None if at_exactly_2x is None else 100 * (result.teacher_accuracy
                                                                                - at_exactly_2x),
        "wall_over_flop_speedup": ratios,
        "wall_at_least_0_9_of_flops": bool(ratios) and min(ratios.values()) >= 0.9,
        "teacher_minus_plain_points": b["plain_bert"]["teacher_minus_plain_points"] if b["plain_bert"] else None,
        "teacher_within_half_point_of_plain": b["plain_bert"]["teacher_within_half_point"] if b["plain_bert"] else None,
        "teacher_minus_plain_ci95_points": b["plain_bert"]["teacher_minus_plain_ci95_points"] if b["plain_bert"] else None,
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="r8", choices=["r8", "r52", "20news", "tweets"])
    parser.add_argument("--backbone", default="bundled")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--val-rows", type=int, default=300)
    parser.add_argument("--test-rows", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--distill-on", choices=["train", "unlabelled"], default="train",
                        help="stage 2's texts: the labelled sample's (default), or the whole training split outside "
                             "validation, unlabelled; (c) gets as many optimiser steps either way")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teacher-head", choices=TEACHER_HEADS, default="pooler",
                        help="FastBERT's teacher: plain BERT's head on the pretrained pooler, or the paper's branch")
    parser.add_argument("--cpus-per-worker", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--speeds", default=",".join(f"{s:g}" for s in DEFAULT_SPEEDS))
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of timed passes, every speed once per round; wall speed-up is the median of the "
                             "per-round ratios to speed 0 at the moment of the pass (one pass "
                             "is noisy on a shared machine: with 3 rounds, two slow ones could still decide a median)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="of the evaluation's passes and the timed passes")
    parser.add_argument("--work", default=None, help="default: /tmp/fastbert-ablation-DATASET")
    parser.add_argument("--json", help="also write the evaluation and the checks here")
    args = parser.parse_args(argv)

    import ray

    from pipeline.ray_init import init_ray

    work = os.path.abspath(args.work or f"/tmp/fastbert-ablation-{args.dataset}")
    start = time.perf_counter()
    sample = f"{work}/data/{args.train_rows}-{args.val_rows}-{args.test_rows}"  # models of another sample are not reused
    data = write_bundled(args.dataset, sample, validation_rows=args.val_rows, train_rows=args.train_rows,
                         test_rows=args.test_rows or None, unlabelled=True)
    init_ray()
    common = dict(train=data["train"], validation=data["validation"], backbone=args.backbone, workers=1,
                  cpus_per_worker=args.cpus_per_worker, epochs=args.epochs, distill_epochs=args.distill_epochs,
                  lr=args.lr, head_lr=args.head_lr, distill_lr=args.distill_lr, max_length=args.max_length,
                  log_every=20)
    distill = data["unlabelled"] if args.distill_on == "unlabelled" else None
    # (c) gets the optimiser steps of FastBERT's stage 2: on fewer rows, more epochs
    train_rows = pq.ParquetFile(data["train"]).metadata.num_rows
    distill_rows = pq.ParquetFile(distill).metadata.num_rows if distill else train_rows
    label_epochs = max(1, round(args.distill_epochs * distill_rows / train_rows))
    # (c) starts from this FastBERT's stage-1 checkpoint, so each choice has its own folders
    suffix = ("-distilled-on-unlabelled" if args.distill_on == "unlabelled" else "") + (
        "-branch-teacher" if args.teacher_head == "branch" else "")
    fastbert, label_students = f"{work}/fastbert{suffix}", f"{work}/label-students{suffix}-{label_epochs}-epochs"
    print(f"== FastBERT: fine-tuning + self-distillation on the {args.distill_on} texts "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    metrics = train(TrainJobConfig(output=fastbert, distill=distill, teacher_head=args.teacher_head, **common))
    ray.shutdown()  # the rest runs in this process, and the timed passes get the machine to themselves
    torch.set_num_threads(args.cpus_per_worker)
    train_table = pq.read_table(data["train"])
    texts, labels = train_table.column("text").to_pylist(), [str(v) for v in train_table.column("label").to_pylist()]
    if not os.path.isfile(f"{label_students}/config.json"):
        print(f"== (c) students trained on the labels, from the same stage 1, {label_epochs} epochs of "
              f"{train_rows} rows ({time.perf_counter() - start:.0f} s)", flush=True)
        students = FastBert.from_pretrained(metrics.finetuned)
        train_label_students(students, texts, labels, label_epochs, args.distill_lr)
        students.save_pretrained(label_students)
    # a folder per recipe: another run's plain classifier is never taken for this one's
    plain_path = (f"{work}/plain-bert-{args.train_rows}rows-{args.epochs}e-lr{args.lr:g}-head{args.head_lr:g}"
                  f"-len{args.max_length}-{os.path.basename(args.backbone.rstrip('/'))}")
    if not os.path.isfile(f"{plain_path}/config.json"):
        print(f"== (a) plain BERT classifier, the same budget ({time.perf_counter() - start:.0f} s)", flush=True)
        validation = pq.read_table(data["validation"])
        plain = new_plain_bert(args.backbone, sorted(set(labels)), args.max_length)
        train_plain_bert(plain, texts, labels, validation.column("text").to_pylist(),
                         [str(v) for v in validation.column("label").to_pylist()], args.epochs, args.lr, args.head_lr)
        save_plain_bert(plain, plain_path)
    print(f"== evaluation ({time.perf_counter() - start:.0f} s)", flush=True)
    config = EvaluateConfig(model=fastbert, input=data["test"], output=f"{work}/evaluation{suffix}",
                            speeds=[float(s) for s in args.speeds.split(",")], overwrite=True)
    model = FastBert.from_pretrained(fastbert)
    test_texts, test_labels = read_labelled(config, model.config.labels)
    exits = all_exits(model, test_texts, test_labels, precision=args.precision)
    result = tabulate(model, exits, config.speeds, data=data["test"], model_uri=fastbert, precision=args.precision)
    result.baselines["label_students"] = label_students_baseline(
        FastBert.from_pretrained(label_students), label_students, model, result.speeds, exits, test_texts,
        test_labels, args.precision)
    result.baselines["plain_bert"] = plain_bert_baseline(load_plain_bert(plain_path), plain_path, model, exits,
                                                         test_texts)
    passes = time_speeds(model, test_texts, exits, result.speeds, args.repeats, precision=args.precision)
    result.timing = {"repeats": args.repeats, "torch_threads": torch.get_num_threads(),
                     "passes": [{"speed": sp, "start_s": st, "seconds": sec} for sp, st, sec in passes]}
    write_evaluation(result, config.output)
    for line in format_table(result):
        print(line)
    out = {**result.to_json(), "distill_on": args.distill_on, "distill_rows": distill_rows,
           "label_student_epochs": label_epochs, "checks": checks(result),
           "benchmark_seconds": time.perf_counter() - start}
    print(json.dumps(out["checks"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
