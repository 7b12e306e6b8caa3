"""Does per-layer temperature calibration of the students make their uncertainty a better exit
signal (issue 28, item 4)? Measured post hoc on models ``benchmarks.sweep`` trained and cached.

Per set: stage 2 with the training defaults (``TrainConfig()``; ``--distill-views``: the views
of each labelled text it distils on, 1 = the texts alone) from the sweep's stage-1 model at the
default setting, trained here once and cached beside it (``s2-defaults-viewsN-from-s1-...``,
the models ``benchmarks.speed_choice`` compares). Then one full-depth pass over the sweep's validation and test rows keeps
every exit's logits. Each student layer gets a temperature T_l fitted on the validation rows
(grid search of the negative log-likelihood of ``target``: the true labels, or the teacher's
answers, which are what the exit decision has to agree with: ``pipeline.tradeoff.calibrate``,
what the training job does); exits then read the entropy of
softmax(z_l / T_l). For each variant: the speed the validation rows pick for a 0.5-point
budget (by agreement with the teacher, as ``choose_speed``) and the test FLOP speed-up and
accuracy there, and the number of distinct FLOP speed-ups above 1.2x on the speed grid.

    python -m benchmarks.calibration [--sets r8 r52 20news tweets] [--distill-views 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch

from benchmarks.sweep import DEFAULT_WORK, sample
from pipeline import flops as flop_account
from pipeline.config import SPEED_GRID
from pipeline.model import FastBert
from pipeline.tradeoff import TEMPERATURES, calibrate
from pipeline.train import TrainConfig, batches, fit


def logits_of(model: FastBert, texts: list[str], labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, R, N) every exit's fp32 logits, (R,) lengths, (R,) label indices, in input order."""
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out, lengths, truth = [], [], []
    with torch.no_grad():
        for batch in batches(model, [texts[i] for i in order], [labels[i] for i in order], batch_size=64):
            out.append(model(batch["input_ids"], batch["attention_mask"]).logits.float().numpy())  # (L, B, N)
            lengths.append(batch["attention_mask"].sum(1).numpy())
            truth.append(batch["labels"].numpy())
    back = np.argsort(order)
    return np.concatenate(out, 1)[:, back], np.concatenate(lengths)[back], np.concatenate(truth)[back]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def fit_temperature(z: np.ndarray, target: np.ndarray) -> float:
    """The grid temperature (``calibrate``'s) minimising the mean NLL of ``target`` (R,) under
    softmax(z / T); z (R, N). ``calibrate`` does this with the teacher's answers as target."""
    nll = [-log_softmax(z / t)[np.arange(len(target)), target].mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def entropy(z: np.ndarray) -> np.ndarray:
    """(L, R) normalised entropy of logits (L, R, N)."""
    logp = log_softmax(z)
    return -(np.exp(logp) * logp).sum(-1) / np.log(z.shape[-1])


def curve(model: FastBert, unc: np.ndarray, pred: np.ndarray, lengths: np.ndarray, truth: np.ndarray):
    """(speed, accuracy, agreement, FLOP speed-up) at every grid speed."""
    full = np.sum(flop_account.full_depth_flops(model.config, lengths))
    points = []
    for s in SPEED_GRID:
        leaves = unc < s
        leaves[-1] = True
        at = leaves.argmax(0)  # (R,)
        chosen = pred[at, np.arange(len(truth))]
        spent = np.sum(flop_account.row_flops(model.config, lengths, at + 1, students=s > 0))
        points.append((s, float((chosen == truth).mean()), float((chosen == pred[-1]).mean()), float(full / spent)))
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["tweets", "r8", "r52", "20news"])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--distill-views", type=int, default=TrainConfig().distill_views)
    parser.add_argument("--work", default=DEFAULT_WORK)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| set | stage 2 | calibration | temperatures (layers 1-5) | speed | test accuracy (teacher) | "
          "test FLOP speed-up | distinct speed-ups > 1.2x |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.sets:
        (tr_t, tr_l), (va_t, va_l), (te_t, te_l), _, _ = sample(dataset, args.size, args.test_rows)
        d = TrainConfig(distill_views=args.distill_views)
        source = os.path.join(args.work, f"{dataset}-{args.size}",
                              f"s1-lr{d.lr:g}-head{d.head_lr:g}-e{d.epochs}-w{d.warmup:g}", "model")
        for folder in [source.replace("/s1-", f"/s2-defaults-views{d.distill_views}-from-s1-")]:
            if not os.path.isdir(folder):
                model = FastBert.from_pretrained(source)
                fit(model, tr_t, tr_l, va_t, va_l, dataclasses.replace(d, epochs=0), log=None)
                model.save_pretrained(folder)
            model = FastBert.from_pretrained(folder)
            zv, lv, tv = logits_of(model, va_t, va_l)
            zt, lt, tt = logits_of(model, te_t, te_l)
            pv, pt = zv.argmax(-1), zt.argmax(-1)  # (L, R)
            variants = {"none": np.ones(zv.shape[0]),
                        "labels": np.array([fit_temperature(zv[k], tv) for k in range(zv.shape[0] - 1)] + [1.0]),
                        "teacher (calibrate, the job's)": np.array(calibrate(model, va_t))}
            for name, temps in variants.items():
                val = curve(model, entropy(zv / temps[:, None, None]), pv, lv, tv)
                test = curve(model, entropy(zt / temps[:, None, None]), pt, lt, tt)
                within = [i for i, p in enumerate(val) if p[2] >= 1 - args.budget / 100 - 1e-9]
                i = max(within, key=lambda i: (val[i][3], val[i][1], -val[i][0]))
                distinct = len({round(p[3], 2) for p in test if p[3] > 1.2})
                print(f"| {dataset} | {'defaults'} | {name} | "
                      f"{' '.join(f'{t:.2f}' for t in temps[:-1])} | {val[i][0]:.2f} | "
                      f"{100 * test[i][1]:.2f}% ({100 * test[0][1]:.2f}%) | {test[i][3]:.2f}x | {distinct} |",
                      flush=True)


if __name__ == "__main__":
    main()
