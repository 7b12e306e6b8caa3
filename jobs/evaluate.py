"""Evaluate a trained FastBERT on labelled Parquet: accuracy, macro-F1, exit layers, FLOP and
measured wall speed-up at every speed, against the paper's baselines; writes
OUTPUT/evaluation.json, evaluation.csv, tradeoff.png and exits.png and prints the table.

Local:
    python -m jobs.evaluate --model runs/r8 --data data/r8/test.parquet --output runs/r8-eval \\
        [--speeds 0,0.1,0.2,0.5,1] [--plain-bert runs/r8-plain] [--label-students runs/r8-labels]

On a running cluster (runs on the driver; paths reachable from it, e.g. s3://...):
    ray job submit --working-dir . -- python -m jobs.evaluate --model s3://bucket/runs/r8 \\
        --data s3://bucket/r8/test.parquet --output s3://bucket/runs/r8-eval

Baselines: --plain-bert takes the output of `jobs.train --plain-bert`, --label-students that of
`jobs.train --finetuned <the model's stage-1 checkpoint> --student-targets labels` (see the
README); fixed-depth truncation needs no extra model.
"""

from __future__ import annotations

import argparse

from pipeline.evaluate import DEFAULT_SPEEDS, EvaluateConfig, run_evaluation


def speeds(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speeds takes numbers separated by commas, e.g. 0,0.1,0.5; "
                                         f"got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    d = EvaluateConfig(model="m", data="d", output="o")  # the defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="FastBERT folder (local path or fsspec URI)")
    p.add_argument("--data", required=True, help="labelled Parquet: a file, folder or glob")
    p.add_argument("--output", required=True, help="folder for the evaluation files")
    p.add_argument("--speeds", type=speeds, default=list(DEFAULT_SPEEDS),
                   help=f"comma-separated speeds in [0, 1] (default {','.join(f'{s:g}' for s in DEFAULT_SPEEDS)})")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--max-rows", type=int, default=None, help="evaluate the first rows only")
    p.add_argument("--plain-bert", default=None, help="baseline (a): output of jobs.train --plain-bert")
    p.add_argument("--label-students", default=None,
                   help="baseline (c): output of jobs.train --finetuned ... --student-targets labels")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="engine rows per layer step (timed passes)")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="skip the timed passes")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="rounds of timed passes, each timing every speed once (speed 0 first, and once more at the "
                        "end); a speed's wall speed-up is the median over rounds of speed 0's time at the moment of "
                        "its pass (interpolated between the passes of speed 0 around it) over its own")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output")
    return EvaluateConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    try:
        return run_evaluation(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, exit code 1
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
