"""Evaluate a trained FastBERT on labelled Parquet: accuracy, macro-F1, exit layers, FLOP and
measured wall speed-up at every speed, against the paper's baselines; writes
OUTPUT/evaluation.json, evaluation.csv, tradeoff.png and exits.png and prints the table.

Local:
    python -m jobs.evaluate --model runs/r8 --input data/r8/test.parquet --output runs/r8-eval \\
        [--speeds 0 0.1 0.2 0.5 1] [--plain-bert runs/r8-plain] [--label-students runs/r8-labels]

On a running cluster (runs on the driver; paths reachable from it, e.g. s3://...):
    ray job submit --working-dir . -- python -m jobs.evaluate --model s3://bucket/runs/r8 \\
        --input s3://bucket/r8/test.parquet --output s3://bucket/runs/r8-eval

Baselines: --plain-bert takes the output of `jobs.train --plain-bert`, --label-students that of
`jobs.train --finetuned <the model's stage-1 checkpoint> --student-targets labels` (see the
README); fixed-depth truncation needs no extra model.
"""

from __future__ import annotations

from pipeline.cli import config_parser, parse_config, run_job
from pipeline.evaluate import EvaluateConfig, run_evaluation


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    return parse_config(config_parser("jobs.evaluate", __doc__, EvaluateConfig), EvaluateConfig, argv)


def main(argv: list[str] | None = None):
    return run_job("jobs.evaluate", lambda: run_evaluation(parse_args(argv)))


if __name__ == "__main__":
    main()
