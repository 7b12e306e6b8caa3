"""Do exit decisions and predictions stay right in bf16? (issue 27)

For every bundled text set (R8, R52, 20 Newsgroups): the bundled MiniLM fine-tuned and
self-distilled on 2,000 training rows (cached under ``--cache/<set>``, trained on first use,
the same recipe as benchmarks.engine's R8 model), then its whole test split scored by the
engine in fp32 and in bf16 at speeds 0 and 0.5. The table gives each precision's accuracy,
the share of rows whose prediction and exit layer agree across precisions, and the mean exit
layer. Timing is not the point here (benchmarks.peers times them).

    python -m benchmarks.precision [--sets r8 r52 20news] [--speeds 0 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from pipeline.datasets import load_bundled
from benchmarks.models import DemoConfig, train_model
from pipeline.engine import Scorer
from pipeline.model import FastBert

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastbert-ray", "benchmark-precision")


def load_or_train(cache: str, dataset: str) -> FastBert:
    model_dir = os.path.join(cache, dataset, "model")
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        print(f"{dataset}: model cached at {model_dir}", flush=True)
        return FastBert.from_pretrained(model_dir)
    print(f"{dataset}: training, to be cached at {model_dir}", flush=True)
    return train_model(DemoConfig(output=os.path.join(cache, dataset), dataset=dataset, train_rows=2000,
                                  validation_rows=300, epochs=2, distill_epochs=3), log=lambda *_: None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["r8", "r52", "20news"], help="bundled sets (default: all three)")
    parser.add_argument("--speeds", nargs="+", type=float, default=[0.0, 0.5], help="speeds (default: 0 0.5)")
    parser.add_argument("--rows", type=int, default=0, help="test rows per set (default: 0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"the models' cache (default: {DEFAULT_CACHE})")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    print(f"{'set':8} {'speed':>5} {'rows':>6} {'acc fp32':>9} {'acc bf16':>9} {'diff':>6} {'pred agree':>10} "
          f"{'exit agree':>10} {'exit fp32':>9} {'exit bf16':>9}")
    for dataset in args.sets:
        model = load_or_train(args.cache, dataset)
        test = load_bundled(dataset, "test")
        n = test.num_rows if args.rows <= 0 else min(args.rows, test.num_rows)
        texts, truth = test["text"].to_pylist()[:n], np.array(test["label"].to_pylist()[:n], dtype=object)
        for speed in args.speeds:
            out = {}
            for precision in ("fp32", "bf16"):
                table = Scorer(model, speed=speed, precision=precision)(texts)
                out[precision] = (np.array(table.column("prediction").to_pylist(), dtype=object),
                                  table.column("exit_layer").to_numpy(zero_copy_only=False))
            (p32, e32), (p16, e16) = out["fp32"], out["bf16"]
            row = {"set": dataset, "speed": speed, "rows": n,
                   "accuracy_fp32": float(np.mean(p32 == truth)), "accuracy_bf16": float(np.mean(p16 == truth)),
                   "prediction_agreement": float(np.mean(p32 == p16)), "exit_agreement": float(np.mean(e32 == e16)),
                   "mean_exit_fp32": float(e32.mean()), "mean_exit_bf16": float(e16.mean())}
            results.append(row)
            print(f"{dataset:8} {speed:5.2f} {n:6d} {100 * row['accuracy_fp32']:8.2f}% {100 * row['accuracy_bf16']:8.2f}% "
                  f"{100 * (row['accuracy_bf16'] - row['accuracy_fp32']):+6.2f} {100 * row['prediction_agreement']:9.2f}% "
                  f"{100 * row['exit_agreement']:9.2f}% {row['mean_exit_fp32']:9.2f} {row['mean_exit_bf16']:9.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
