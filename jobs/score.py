"""Score Parquet with a trained FastBERT on Ray Data: Parquet in, Parquet out, streaming.

Output: OUTPUT/part-*.parquet (the carried input columns plus prediction, probabilities,
exit_layer, uncertainty, error; one row per input row, each input file's rows together and
in order), OUTPUT/_summary.json and OUTPUT/_SUCCESS. --resume finishes an interrupted run.

Local (starts a Ray instance in this process):
    python -m jobs.score --model runs/r8 --input data/r8/test.parquet --output runs/r8-scored --speed 0.3

On a running cluster (RAY_ADDRESS set, or through the job API):
    ray job submit --working-dir . -- python -m jobs.score --model s3://bucket/runs/r8 \\
        --input 's3://bucket/texts/*.parquet' --output s3://bucket/scored --replicas 1-8
"""

from __future__ import annotations

import argparse

from pipeline.ray_init import init_ray
from pipeline.scoring import ScoreJobConfig, run


def parse_args(argv: list[str] | None = None) -> ScoreJobConfig:
    d = ScoreJobConfig(model="m", input=["i"], output="o")  # the defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="FastBERT folder (local path or fsspec URI)")
    p.add_argument("--input", required=True, nargs="+", help="Parquet files, folders or globs")
    p.add_argument("--output", required=True, help="output folder (local path or fsspec URI)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--speed", type=float, default=None, help="0 = full depth ... 1 = leave at layer 1 (default 0.5)")
    budget.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                        help="instead of --speed: the fastest speed whose validation accuracy is within POINTS of "
                             "the teacher's (from the model's tradeoff.json)")
    budget.add_argument("--target-speedup", type=float, default=None, metavar="X",
                        help="instead of --speed: the most accurate speed with at least an X-fold FLOP speed-up")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--id-column", default=None)
    p.add_argument("--columns", nargs="*", default=None, help="input columns to carry (default: all)")
    p.add_argument("--replicas", default=d.replicas, help="N, or MIN-MAX for an autoscaling pool")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    p.add_argument("--threads-per-replica", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows handed to a replica per call")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-bad-files", action="store_true")
    return ScoreJobConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    job = parse_args(argv)
    init_ray(dashboard=False)  # Ray Data needs no dashboard: its processes would take CPU from the replicas
    run(job)


if __name__ == "__main__":
    main()
