"""Train a FastBERT on Ray Train: data-parallel fine-tuning, then self-distillation.

Input: Parquet (local path or fsspec URI) with a text column and a label column (strings or
integers). Output: a folder FastBert.from_pretrained loads, plus metrics.json and
_manifest.json; the Ray runs (checkpoints of every epoch) go to <output>/_ray unless --storage
says otherwise. Running the same command again resumes from the latest checkpoint, or does
nothing when the model is finished.

Local (starts a Ray instance in this process):
    python -m jobs.train --train data/train.parquet --validation data/val.parquet --output runs/model

--finetuned <a FastBERT model> skips stage 1 and distils its students (e.g. the best stage-1
checkpoint of another run, named in its metrics.json).

On a running cluster (RAY_ADDRESS set, or through the job API; paths must be reachable
from every node, e.g. s3://...):
    ray job submit --working-dir . -- python -m jobs.train \\
        --train s3://bucket/train.parquet --validation s3://bucket/val.parquet --output s3://bucket/model
"""

from __future__ import annotations

from pipeline.cli import config_parser, parse_config, run_job
from pipeline.distributed import TrainJobConfig, run


def parse_args(argv: list[str] | None = None) -> TrainJobConfig:
    parser = config_parser("jobs.train", __doc__, TrainJobConfig, flags={"use_gpu": {"names": ["--gpu"]}})
    return parse_config(parser, TrainJobConfig, argv)


def main(argv: list[str] | None = None):
    return run_job("jobs.train", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
