"""Does the speed chosen on the validation rows keep its promise on the test rows? (issue 28)

For models of ``benchmarks.sweep`` (``--sweep SET-SIZE/RUN``: its 500 validation rows and
``--test-rows`` test rows, the sweep's own draws; the exits calibrated as the training job
does, where the model has no temperatures yet), the speed each rule picks on the validation
rows for an accuracy budget, and what that speed gives on the test rows:

- ``accuracy``: the fastest speed whose accuracy is within the budget of the teacher's;
- ``agreement``: the fastest whose answers differ from the teacher's on at most budget% of the
  rows (what ``choose_speed`` did before the expected cost);
- ``expected cost``: the fastest whose expected accuracy cost is within the budget, the mean
  over rows of the teacher's probability of its own answer minus its probability of the
  answer given (0 where they agree; what ``choose_speed`` does, and what the scoring job's
  audit estimates on a job's own rows), with the teacher's probabilities as they come (``T=1``,
  before the job fitted the teacher's temperature) and calibrated on the validation labels
  (``calibrated teacher``, what ``calibrate`` now does); and that cost plus one standard error
  of its mean over the validation rows (a margin for their noise; not the product's rule);
- ``cost and accuracy``: both of the two above;
- ``oracle``: the fastest within the budget on the test rows themselves.

    python -m benchmarks.speed_choice --sweep r52-1000/s2-s1-lr0.0002-head0.002-e5-w0.1-dlr0.001-de3-unlabelled ...
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.sweep import DEFAULT_WORK, sample
from pipeline.config import SPEED_GRID
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits, at_speed, calibrate, exits_at


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", nargs="+", required=True, help="runs of benchmarks.sweep: SET-SIZE/RUN")
    p.add_argument("--work", default=DEFAULT_WORK)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []
    for key in args.sweep:
        name, size = key.split("/")[0].rsplit("-", 1)
        _, (va_t, va_l), (te_t, te_l), _, _ = sample(name, int(size), args.test_rows)
        model = FastBert.from_pretrained(os.path.join(args.work, key, "model")).eval()
        calibrate(model, va_t)  # the students, as the job does; the teacher at T=1
        val_exits, test_exits = all_exits(model, va_t, va_l), all_exits(model, te_t, te_l)
        val = [at_speed(val_exits, model, s) for s in SPEED_GRID]
        on_test = [at_speed(test_exits, model, s) for s in SPEED_GRID]
        teacher_t = calibrate(model, va_t, va_l)[-1]  # the same students; the teacher fitted to the labels
        val_cal_exits = all_exits(model, va_t, va_l)  # only the costs differ
        val_cal = [at_speed(val_cal_exits, model, s) for s in SPEED_GRID]
        rows = np.arange(len(va_t))
        # the standard error of each speed's mean cost over the validation rows
        cost_se = [float(val_cal_exits.cost[exits_at(val_cal_exits, s), rows].std(ddof=1) / np.sqrt(len(rows)))
                   for s in SPEED_GRID]
        print(f"{key.split('/')[0]}: the teacher's temperature {teacher_t:.2f}", flush=True)
        for budget in args.budgets:
            b = budget / 100 + 1e-9
            picks = {"accuracy": [q for q in val if q.accuracy >= val[0].accuracy - b],
                     "agreement": [q for q in val if q.agreement >= 1 - b],
                     "expected cost, T=1": [q for q in val if q.expected_cost <= b],
                     "expected cost, calibrated teacher": [q for q in val_cal if q.expected_cost <= b],
                     "calibrated teacher, cost + 1 s.e.": [q for q, se in zip(val_cal, cost_se)
                                                           if q.expected_cost + se <= b],
                     "cost and accuracy": [q for q in val if q.expected_cost <= b and q.accuracy >= val[0].accuracy - b],
                     "oracle (test)": [q for q in on_test if q.accuracy >= on_test[0].accuracy - b]}
            for rule, within in picks.items():
                q = max(within, key=lambda q: (q.flop_speedup, q.accuracy, -q.speed))  # choose_speed's ties
                t = on_test[SPEED_GRID.index(q.speed)]
                row = {"run": key, "budget": budget, "rule": rule, "speed": q.speed, "teacher_temperature": teacher_t,
                       "test_speedup": t.flop_speedup,
                       "test_drop_points": 100 * (on_test[0].accuracy - t.accuracy)}
                out.append(row)
                print(f"{key.split('/')[0]:12} {budget:3.1f} {rule:34} speed {q.speed:.2f} -> test "
                      f"{t.flop_speedup:.2f}x, {row['test_drop_points']:+.2f} points below the teacher", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
