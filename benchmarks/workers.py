"""Does the number of workers change the model? (issue 28): the training job (Ray Train, the
product's own ``pipeline.distributed.run``) on the same data with the same seed and the same
global ``--batch-size`` on 1 and on 2 workers, stage 1 only; the teacher's accuracy on the
validation rows (model selection) and on the set's test rows. Target: within 0.5 point.

    python -m benchmarks.workers [--dataset r8] [--train-rows 1000] [--test-rows 1000] [--epochs 3]
        [--workers 1 2] [--work DIR] [--json out.json]

Each run is kept under --work (a second call reuses it). On a 2-core machine each worker gets
one core when there are two (``cpus_per_worker = 2 // workers``): the comparison is of the
models, not of the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyarrow.parquet as pq

from pipeline.datasets import write_bundled
from pipeline.distributed import TrainJobConfig
from pipeline.distributed import run as train
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits, at_speed

DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "fastbert-ray", "workers")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="r8", choices=["r8", "r52", "20news", "tweets"])
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--validation-rows", type=int, default=500)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (default: 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0, help="the training seed (classifiers, shuffles)")
    parser.add_argument("--data-seed", type=int, default=0, help="the seed of the data sample")
    parser.add_argument("--work", default=DEFAULT_WORK)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import ray

    from pipeline.ray_init import init_ray

    sample = f"{args.work}/{args.dataset}-{args.train_rows}-{args.validation_rows}-{args.test_rows}-seed{args.data_seed}"
    data = write_bundled(args.dataset, f"{sample}/data", validation_rows=args.validation_rows, seed=args.data_seed,
                         train_rows=args.train_rows, test_rows=args.test_rows or None)
    test = pq.read_table(data["test"])
    texts, labels = test.column("text").to_pylist(), [str(v) for v in test.column("label").to_pylist()]
    init_ray()
    runs = []
    for workers in args.workers:
        output = f"{sample}/e{args.epochs}-b{args.batch_size}-w{workers}" + (f"-seed{args.seed}" if args.seed else "")
        start = time.perf_counter()
        metrics = train(TrainJobConfig(train=data["train"], validation=data["validation"], output=output,
                                       workers=workers, cpus_per_worker=max(1, 2 // workers), epochs=args.epochs,
                                       distill_epochs=0, batch_size=args.batch_size, seed=args.seed, log_every=20),
                        log=lambda line: None)
        model = FastBert.from_pretrained(output)
        test_accuracy = at_speed(all_exits(model, texts, labels), model, 0.0).accuracy
        kept = metrics.kept["finetune"]
        runs.append({"workers": workers, "kept_epoch": kept["epoch"], "validation_accuracy": kept["value"],
                     "test_accuracy": test_accuracy, "steps": [e["steps"] for e in metrics.finetune],
                     "samples": [e["samples"] for e in metrics.finetune], "seconds": time.perf_counter() - start})
        print(f"{workers} worker(s): kept epoch {kept['epoch']}, validation {100 * kept['value']:.2f}%, "
              f"test {100 * test_accuracy:.2f}%, steps per epoch {runs[-1]['steps']}", flush=True)
    ray.shutdown()
    base = runs[0]
    for r in runs[1:]:
        r["test_points_vs_first"] = 100 * (r["test_accuracy"] - base["test_accuracy"])
        r["validation_points_vs_first"] = 100 * (r["validation_accuracy"] - base["validation_accuracy"])
        print(f"{r['workers']} against {base['workers']} worker(s): validation {r['validation_points_vs_first']:+.2f}, "
              f"test {r['test_points_vs_first']:+.2f} points")
    result = {"dataset": args.dataset, "train_rows": args.train_rows, "epochs": args.epochs, "seed": args.seed,
              "batch_size": args.batch_size, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
