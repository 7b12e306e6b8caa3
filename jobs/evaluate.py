"""Evaluate a trained FastBERT on labelled Parquet: accuracy, macro-F1, exit layers and FLOP
speed-up at every speed, against fixed-depth truncation at equal FLOPs; writes
OUTPUT/evaluation.json, evaluation.csv, tradeoff.png and exits.png and prints the table.

Local:
    python -m jobs.evaluate --model runs/r8 --input data/r8/test.parquet --output runs/r8-eval \\
        [--speeds 0 0.1 0.2 0.5 1]

On a running cluster (runs on the driver; paths reachable from it, e.g. s3://...):
    ray job submit --working-dir . -- python -m jobs.evaluate --model s3://bucket/runs/r8 \\
        --input s3://bucket/r8/test.parquet --output s3://bucket/runs/r8-eval

Wall time per speed and the paper's other baselines (a plain classifier, students trained on
the labels): python -m benchmarks.ablation.
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
