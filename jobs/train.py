"""Train a FastBERT on Ray Train: data-parallel fine-tuning, then self-distillation.

Input: Parquet (local path or fsspec URI) with a text column and a label column (strings or
integers). Output: a folder FastBert.from_pretrained loads, plus metrics.json; the Ray runs
(checkpoints of every epoch) go to <output>/_ray unless --storage says otherwise. Running the
same command again resumes from the latest checkpoint.

Local (starts a Ray instance in this process):
    python -m jobs.train --train data/train.parquet --validation data/val.parquet --output runs/model

Baselines for jobs.evaluate (the paper's ablations): --plain-bert trains a plain
BertForSequenceClassification with the same budget; --finetuned <stage-1 checkpoint, named in
metrics.json> --student-targets labels trains students on the labels instead of the teacher.

On a running cluster (RAY_ADDRESS set, or through the job API; paths must be reachable
from every node, e.g. s3://...):
    ray job submit --working-dir . -- python -m jobs.train \\
        --train s3://bucket/train.parquet --validation s3://bucket/val.parquet --output s3://bucket/model
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from pipeline.distributed import TrainJobConfig, run
from pipeline.ray_init import init_ray

REQUIRED = ("train", "validation", "output")


def parse_args(argv: list[str] | None = None) -> TrainJobConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainJobConfig)
    for field in dataclasses.fields(TrainJobConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.name == "use_gpu":
            parser.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                                help="train on GPUs (default: when the cluster has them)")
        elif hints[field.name] is bool:
            parser.add_argument(flag, action="store_true")
        else:
            hint = hints[field.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            kind = str if choices else next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            default = None if field.name in REQUIRED else field.default
            parser.add_argument(flag, type=kind, choices=choices, required=field.name in REQUIRED, default=default)
    return TrainJobConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    init_ray()
    run(config)


if __name__ == "__main__":
    main()
