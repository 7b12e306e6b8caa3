"""Speed-accuracy trade-off of one or more trained FastBERT models on a labelled Parquet set,
and their comparison at equal FLOPs (e.g. self-distilled students against students trained
on the labels, the paper's Table 3 ablation).

Each model runs once at full depth keeping every exit's output (``pipeline.tradeoff``); the
accuracy and FLOP speed-up at every speed follow exactly from that (the same as scoring with
the engine at each speed). Wall time is the engine benchmark's business (benchmarks.engine).

    python -m benchmarks.tradeoff --test data/r8/test.parquet \\
        --model distilled=runs/r8 --model labels=runs/r8-labels [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq

from pipeline.model import FastBert
from pipeline.tradeoff import accuracy_at_speedup, all_exits, at_speed

SPEEDS = [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
          0.9, 1.0]
SPEEDUPS = [1.5, 2.0, 2.5, 3.0, 4.0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", required=True, help="labelled Parquet (local path or fsspec URI)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="repeatable")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    table = pq.read_table(args.test, columns=[args.text_column, args.label_column])
    texts = table.column(args.text_column).to_pylist()
    labels = [str(v) for v in table.column(args.label_column).to_pylist()]
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--model takes NAME=PATH, got {spec!r}")
        model = FastBert.from_pretrained(path)
        start = time.perf_counter()
        exits = all_exits(model, texts, labels)
        points = [at_speed(exits, model, s) for s in SPEEDS]
        results[name] = {"path": path, "rows": len(texts), "seconds": time.perf_counter() - start,
                         "points": [asdict(p) for p in points],
                         "at_speedup": {str(x): accuracy_at_speedup(points, x) for x in SPEEDUPS}}
        print(f"\n{name} ({path}): {len(texts)} rows, teacher accuracy {100 * points[0].accuracy:.2f}%")
        print("  speed  accuracy  FLOP x  mean exit")
        for p in points:
            print(f"  {p.speed:5.3f}  {100 * p.accuracy:7.2f}%  {p.flop_speedup:6.2f}  {p.mean_exit_layer:9.2f}")
        at_2x = [p for p in points if p.flop_speedup >= 2.0]
        if at_2x:
            best = max(at_2x, key=lambda p: p.accuracy)
            print(f"  best at >= 2x FLOP speed-up: speed {best.speed} -> {100 * best.accuracy:.2f}% at "
                  f"{best.flop_speedup:.2f}x ({100 * (best.accuracy - points[0].accuracy):+.2f} points vs teacher)")

    print("\naccuracy at equal FLOP speed-up (interpolated between speeds)")
    print("  " + "model".ljust(16) + "".join(f"{x:>9.1f}x" for x in SPEEDUPS))
    for name, r in results.items():
        cells = "".join(f"{100 * r['at_speedup'][str(x)]:9.2f}%" if np.isfinite(r["at_speedup"][str(x)])
                        else f"{'-':>10}" for x in SPEEDUPS)
        print("  " + name.ljust(16) + cells)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
