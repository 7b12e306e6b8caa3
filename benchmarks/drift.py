"""Where should the drift alarm go off? (issue 30)

For every model of ``benchmarks.precision``'s cache (the bundled MiniLM fine-tuned and
self-distilled on 2,000 rows of one bundled set; its ``tradeoff.json`` holds the exit
histogram of 300 validation rows at every speed), at the model's own suggested speed (the
fastest within 0.5 point on its validation rows), the exit histograms of 1,000 rows of:
its own test split (no drift), the same rows with their words shuffled (the vocabulary kept,
the sentences gone), and every other bundled set's test split (other text, other labels).
The table gives each case's total variation against the validation histogram
(``pipeline.tradeoff.exit_drift``) and, where the labels are the model's, the accuracy and its
drop against the validation accuracy the table promised.

    python -m benchmarks.drift [--sets r8 r52 20news tweets] [--rows 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.precision import DEFAULT_CACHE, load_or_train
from pipeline.datasets import load_bundled
from pipeline.tradeoff import DRIFT_TV, exit_drift, exits_at, pick_speed, predictions_at, all_exits


def rows_of(dataset: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    test = load_bundled(dataset, "test")
    pick = np.sort(np.random.default_rng(seed).permutation(test.num_rows)[:n])
    texts, labels = test["text"].to_pylist(), test["label"].to_pylist()
    return [texts[i] for i in pick], [labels[i] for i in pick]


def shuffled_words(texts: list[str], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.permutation(t.split()).tolist()) for t in texts]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["r8", "r52", "20news", "tweets"])
    parser.add_argument("--rows", type=int, default=1000, help="rows per case (default: 1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"the models' cache (default: {DEFAULT_CACHE})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    print(f"threshold: total variation > {DRIFT_TV} (or 3x the sampling noise when larger)")
    print(f"{'model':7} {'speed':>5} {'rows of':18} {'TV':>6} {'noise':>6} {'alarm':>5} {'accuracy':>8} {'drop':>6}")
    for dataset in args.sets:
        model = load_or_train(args.cache, dataset)
        speed, point = pick_speed(model.tradeoff)
        own_texts, own_labels = rows_of(dataset, args.rows)
        cases = [(f"{dataset} test", own_texts, own_labels), (f"{dataset} shuffled", shuffled_words(own_texts), own_labels)]
        cases += [(f"{other} test", *rows_of(other, args.rows)) for other in args.sets if other != dataset]
        for name, texts, labels in cases:
            known = set(model.config.labels)
            mapped = [label if label in known else model.config.labels[0] for label in labels]
            exits = all_exits(model, texts, mapped, precision="auto")
            at = exits_at(exits, speed)  # (R,)
            counts = np.bincount(at, minlength=model.config.num_layers).tolist()
            drift = exit_drift(model.tradeoff, speed, counts)
            own = all(label in known for label in labels)
            accuracy = float((predictions_at(exits, at) == exits.labels).mean()) if own else None
            drop = 100 * (point.accuracy - accuracy) if own and point is not None else None
            results.append({"model": dataset, "speed": speed, "rows_of": name, "total_variation": drift.total_variation,
                            "noise": drift.noise, "alarm": drift.drifted, "accuracy": accuracy,
                            "drop_points": drop, "exit_counts": counts})
            print(f"{dataset:7} {speed:5.2f} {name:18} {drift.total_variation:6.3f} {drift.noise:6.3f} "
                  f"{'yes' if drift.drifted else 'no':>5} "
                  + (f"{100 * accuracy:7.2f}% {drop:+6.2f}" if own else f"{'':>8} {'':>6}"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
