"""The Ray jobs in fp32 and bf16 (issue 27): jobs.score's rows/s and jobs.train's samples/s and
final teacher accuracy, each precision run as a user runs it (``python -m jobs...`` in its
own process, its own local Ray), on the same rows and CPUs.

- score: ``--score-rows`` R8 test texts (repeated to that count) in one Parquet file, the
  benchmark model (benchmarks.engine's), 1 replica x ``--threads`` threads, at speed 0 and
  at the model's default speed; ``--rounds`` interleaved rounds; rows/s from _summary.json.
- train: ``--train-rows`` labelled R8 rows (validation: 300 others, test: 1,000 test rows),
  1 worker x ``--threads`` CPUs, ``--epochs`` + ``--distill-epochs``; samples/s of each
  stage from metrics.json (median over epochs) and the teacher's test accuracy.

    python -m benchmarks.precision_jobs [--score-rows 6000] [--rounds 3] [--train-rows 1000] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.engine import DEFAULT_CACHE, load_or_train
from pipeline.datasets import load_bundled, write_bundled
from pipeline.engine import Scorer
from pipeline.model import FastBert


def job(module: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--score-rows", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--distill-epochs", type=int, default=1)
    p.add_argument("--train-args", default="", help="more jobs.train flags, one string: '--lr 2e-4 --head-lr 2e-3'")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-score", action="store_true")
    p.add_argument("--work", default="/tmp/fastbert-precision-jobs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    load_or_train(DEFAULT_CACHE)
    model = os.path.join(DEFAULT_CACHE, "model")
    result: dict = {"threads": args.threads}

    if not args.skip_score:
        texts = load_bundled("r8", "test")["text"].to_pylist()
        rows = [texts[i % len(texts)] for i in np.random.default_rng(0).permutation(args.score_rows)]
        source = os.path.join(args.work, "input.parquet")
        pq.write_table(pa.table({"text": rows}), source, row_group_size=2048)
        default_speed = Scorer(FastBert.from_pretrained(model), precision="fp32").speed
        rates: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for speed in (0.0, default_speed):
                for precision in ("fp32", "bf16"):
                    out = os.path.join(args.work, f"scored-{precision}-{speed}-{r}")
                    job("jobs.score", "--model", model, "--input", source, "--output", out, "--speed", str(speed),
                        "--precision", precision, "--replicas", "1", "--cpus-per-replica", str(args.threads))
                    with open(os.path.join(out, "_summary.json")) as f:
                        summary = json.load(f)
                    rates.setdefault(f"speed {speed} {precision}", []).append(summary["rows_per_s"])
                    shutil.rmtree(out)
        result["score"] = {}
        print(f"jobs.score, {args.score_rows} rows, 1 replica x {args.threads} threads, {args.rounds} rounds (rows/s)")
        for speed in (0.0, default_speed):
            a, b = rates[f"speed {speed} fp32"], rates[f"speed {speed} bf16"]
            ratios = [y / x for x, y in zip(a, b)]
            result["score"][str(speed)] = {"fp32": a, "bf16": b, "ratio": statistics.median(ratios)}
            print(f"  speed {speed}: fp32 {statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f}), bf16 "
                  f"{statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f}); bf16/fp32 {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)

    if not args.skip_train:
        data = write_bundled("r8", os.path.join(args.work, "data"), validation_rows=300, train_rows=args.train_rows,
                             test_rows=1000)
        test = pq.read_table(data["test"])
        result["train"] = {}
        print(f"jobs.train, {args.train_rows} R8 rows, 1 worker x {args.threads} CPUs, {args.epochs} + "
              f"{args.distill_epochs} epochs")
        for precision in ("fp32", "bf16"):
            out = os.path.join(args.work, f"model-{precision}")
            seconds = job("jobs.train", "--train", data["train"], "--validation", data["validation"], "--output", out,
                          "--workers", "1", "--cpus-per-worker", str(args.threads), "--epochs", str(args.epochs),
                          "--distill-epochs", str(args.distill_epochs), "--precision", precision, *shlex.split(args.train_args))
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            trained = FastBert.from_pretrained(out)
            table = Scorer(trained, speed=0.0, precision="fp32")(test["text"].to_pylist())
            accuracy = float(np.mean(np.array(table.column("prediction").to_pylist()) ==
                                     np.array(test["label"].to_pylist())))
            row = {"seconds": seconds, "test_accuracy": accuracy,
                   "finetune_samples_per_s": statistics.median(e["samples_per_s"] for e in metrics["finetune"]),
                   "distill_samples_per_s": statistics.median(e["samples_per_s"] for e in metrics["distill"])}
            result["train"][precision] = row
            print(f"  {precision}: fine-tune {row['finetune_samples_per_s']:.1f} samples/s, distil "
                  f"{row['distill_samples_per_s']:.1f} samples/s, teacher test accuracy {100 * accuracy:.2f}%, "
                  f"{seconds:.0f} s in all", flush=True)
        a, b = result["train"]["fp32"], result["train"]["bf16"]
        print(f"  bf16/fp32: fine-tune {b['finetune_samples_per_s'] / a['finetune_samples_per_s']:.2f}x, distil "
              f"{b['distill_samples_per_s'] / a['distill_samples_per_s']:.2f}x, accuracy "
              f"{100 * (b['test_accuracy'] - a['test_accuracy']):+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
