"""Score Parquet with a trained FastBERT on Ray Data: Parquet in, Parquet out, streaming.

Output: OUTPUT/part-*.parquet (the carried input columns plus prediction, probabilities,
exit_layer, uncertainty, error; one row per input row, each input file's rows together and
in order), OUTPUT/_summary.json, OUTPUT/_manifest.json and OUTPUT/_SUCCESS. --resume
finishes an interrupted run; the same command run again after it finished does nothing.

Local (starts a Ray instance in this process):
    python -m jobs.score --model runs/r8 --input data/r8/test.parquet --output runs/r8-scored --speed 0.3

On a running cluster (RAY_ADDRESS set, or through the job API):
    ray job submit --working-dir . -- python -m jobs.score --model s3://bucket/runs/r8 \\
        --input 's3://bucket/texts/*.parquet' --output s3://bucket/scored --replicas 1-8
"""

from __future__ import annotations

from pipeline.cli import config_parser, parse_config, run_job
from pipeline.scoring import ScoreJobConfig, run


def parse_args(argv: list[str] | None = None) -> ScoreJobConfig:
    parser = config_parser("jobs.score", __doc__, ScoreJobConfig, flags={
        "speed": {"metavar": "S"}, "max_accuracy_drop": {"metavar": "POINTS"}, "target_speedup": {"metavar": "X"}})
    return parse_config(parser, ScoreJobConfig, argv)


def main(argv: list[str] | None = None):
    return run_job("jobs.score", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
