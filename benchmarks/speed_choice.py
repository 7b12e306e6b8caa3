"""Does the speed chosen on the validation rows keep its promise on the test rows? (issue 28)

For a trained model and its bundled set: the 300 validation rows its training held out (the
benchmark models' recipe: rows 2,000-2,299 of the seeded permutation of the training split)
and the first ``--test-rows`` test rows. For each accuracy budget, the speed two rules pick on
the validation rows: ``accuracy`` (the fastest speed whose accuracy is within the budget of the
teacher's) and ``agreement`` (the fastest whose answers differ from the teacher's on at most
budget% of the rows, what ``choose_speed`` does), and what that speed gives on the test rows,
against the best speed chosen on the test rows themselves (the oracle).

    python -m benchmarks.speed_choice --model ~/.cache/fastbert-ray/benchmark-r8/model --set r8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline.datasets import load_bundled
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits, at_speed

SPEEDS = [round(float(s), 2) for s in np.linspace(0, 1, 101)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--set", required=True)
    p.add_argument("--test-rows", type=int, default=2000)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = FastBert.from_pretrained(args.model).eval()
    train = load_bundled(args.set, "train")
    order = np.random.default_rng(0).permutation(train.num_rows)[2000:2300]
    texts, labels = train["text"].to_pylist(), train["label"].to_pylist()
    validation = all_exits(model, [texts[i] for i in order], [labels[i] for i in order])
    test = load_bundled(args.set, "test")
    tested = all_exits(model, test["text"].to_pylist()[: args.test_rows], test["label"].to_pylist()[: args.test_rows])
    val = [at_speed(validation, model, s) for s in SPEEDS]
    on_test = [at_speed(tested, model, s) for s in SPEEDS]
    out = []
    for budget in args.budgets:
        b = budget / 100 + 1e-9
        picks = {"accuracy": max((q for q in val if q.accuracy >= val[0].accuracy - b), key=lambda q: q.flop_speedup),
                 "agreement": max((q for q in val if q.agreement >= 1 - b), key=lambda q: q.flop_speedup),
                 "oracle (test)": max((q for q in on_test if q.accuracy >= on_test[0].accuracy - b),
                                      key=lambda q: q.flop_speedup)}
        for rule, q in picks.items():
            t = on_test[SPEEDS.index(q.speed)]
            row = {"set": args.set, "budget": budget, "rule": rule, "speed": q.speed, "test_speedup": t.flop_speedup,
                   "test_drop_points": 100 * (on_test[0].accuracy - t.accuracy)}
            out.append(row)
            print(f"{args.set} budget {budget}: {rule:13} speed {q.speed:.2f} -> test {t.flop_speedup:.2f}x, "
                  f"{row['test_drop_points']:+.2f} points below the teacher", flush=True)
    return out


if __name__ == "__main__":
    main()
