"""The embedded demo: bundled backbone + Reuters R8, fine-tune, self-distil, score at several speeds.

Local:   python -m jobs.demo [--output runs/demo] [--train-rows 1200] [--test-rows 1000]
Ray:     ray job submit --working-dir . -- python -m jobs.demo
(Until the Ray Train and Ray Data jobs exist, training and scoring run in this process.)
"""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.demo import DemoConfig, run_demo


def parse_args(argv=None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DemoConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, list):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, nargs="+", default=value)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    return DemoConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run_demo(parse_args())
