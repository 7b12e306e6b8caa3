"""Which training defaults? A sweep of stage 1 (fine-tuning) and stage 2 (distillation)
settings over the bundled text sets (issue 28).

For every set (``--sets``) and training size (``--sizes``): a labelled sample of that many
training rows (every label at least once), 500 other training rows for validation, and the
set's own test split (``--test-rows`` of it, drawn once). Stage 1 runs for every
(lr, head_lr, epochs) of the grid; each run keeps its epoch of best validation accuracy (as
the job does) and is then scored on the test rows: model selection sees validation rows
only. The stage-1 model with a pooler teacher is a plain ``BertForSequenceClassification``
(the same head, started from the same pretrained pooler; the students are not trained in
stage 1), so its test accuracy is the plain classifier's at that setting. Stage 2 then runs
from each set's best stage-1 model (by validation) for every (distill_lr, distill_epochs),
and the trade-off is measured on the test rows: the FLOP speed-up at the fastest speed within
0.5 point of the teacher on the *validation* rows, and the test accuracy there.

Runs train with ``pipeline.train.fit`` (one process: the model a job on any number of
workers trains, now that --batch-size is the global batch) and are cached one JSON per run
under ``--work``: a sweep stopped half way goes on where it stopped.

    python -m benchmarks.sweep [--sets r8 r52 20news tweets] [--sizes 1000] [--lrs 2e-5 5e-5 1e-4 2e-4]
        [--head-lrs same 2e-3] [--epochs 4] [--seeds 0 1] [--distill-lrs 2e-4 1e-3] [--distill-epochs 3] [--distill-on unlabelled]
        [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import numpy as np
import torch

from pipeline.datasets import load_bundled
from pipeline.model import FastBert
from pipeline.tradeoff import all_exits, at_speed, calibrate, choose_speed, tradeoff_table
from pipeline.train import TrainConfig, batches, evaluate, fit

DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "fastbert-ray", "sweep")
VALIDATION_ROWS = 500


def sample(dataset: str, size: int, test_rows: int, seed: int = 0):
    """(train texts, labels), (validation ...), (test ...), the label names: seeded draws."""
    train, test = load_bundled(dataset, "train"), load_bundled(dataset, "test")
    texts, labels = train["text"].to_pylist(), train["label"].to_pylist()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    val, rest = order[:VALIDATION_ROWS], order[VALIDATION_ROWS:]
    names = sorted(set(labels))
    first = [next(i for i in rest if labels[i] == n) for n in names]  # every label at least once
    others = [i for i in rest if i not in set(first)]
    chosen = first + others[: max(0, size - len(first))]
    pick = lambda idx, t, l: ([t[i] for i in idx], [l[i] for i in idx])  # noqa: E731
    test_texts, test_labels = test["text"].to_pylist(), test["label"].to_pylist()
    test_idx = np.sort(np.random.default_rng(seed + 1).permutation(len(test_texts))[:test_rows]) \
        if 0 < test_rows < len(test_texts) else np.arange(len(test_texts))
    unlabelled = [texts[i] for i in rest]  # every training text outside validation, the sample's included
    return (pick(chosen, texts, labels), pick(val, texts, labels), pick(test_idx, test_texts, test_labels), names,
            unlabelled)


def accuracy(model: FastBert, texts, labels) -> float:
    return evaluate(model, batches(model, texts, labels, batch_size=64)).teacher_accuracy


def run_cached(path: str, make) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["r8", "r52", "20news", "tweets"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000], help="labelled training rows (default: 1000)")
    parser.add_argument("--test-rows", type=int, default=1000, help="test rows per set (default: 1000; 0 = all)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4, 2e-4])
    parser.add_argument("--head-lrs", nargs="+", default=["same", "2e-3"], help="'same' = the lr")
    parser.add_argument("--epochs", nargs="+", type=int, default=[4])
    parser.add_argument("--warmups", nargs="+", type=float, default=[0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds of stage 1 (the classifiers' start, the shuffles; the data sample stays)")
    parser.add_argument("--distill-lrs", nargs="*", type=float, default=[2e-4, 1e-3], help="none: stage 1 only")
    parser.add_argument("--distill-epochs", nargs="+", type=int, default=[3])
    parser.add_argument("--distill-on", choices=["train", "unlabelled"], default="train",
                        help="stage 2's texts: the labelled sample's, or every training text outside validation "
                             "without its label (the paper's unlabelled distillation)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="stage 2's models without the exits' temperatures (as before the job calibrated them)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=DEFAULT_WORK, help=f"run cache (default: {DEFAULT_WORK})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    stage1, stage2 = [], []
    for dataset in args.sets:
        for size in args.sizes:
            (tr_t, tr_l), (va_t, va_l), (te_t, te_l), names, unlabelled = sample(dataset, size, args.test_rows)
            best = None
            for lr in args.lrs:
                for head in args.head_lrs:
                    head_lr = lr if head == "same" else float(head)
                    for epochs, warmup, seed in itertools.product(args.epochs, args.warmups, args.seeds):
                        key = f"{dataset}-{size}/s1-lr{lr:g}-head{head_lr:g}-e{epochs}-w{warmup:g}" + (
                            f"-seed{seed}" if seed else "")

                        def make(lr=lr, head_lr=head_lr, epochs=epochs, warmup=warmup, key=key, seed=seed):
                            model = FastBert.from_backbone("bundled", labels=names, max_length=args.max_length)
                            start = time.perf_counter()
                            history = fit(model, tr_t, tr_l, va_t, va_l, TrainConfig(
                                epochs=epochs, lr=lr, head_lr=head_lr, warmup=warmup, distill_epochs=0,
                                batch_size=args.batch_size, seed=seed), log=None)
                            model.save_pretrained(os.path.join(args.work, key, "model"))
                            kept = history.kept["finetune"]
                            return {"set": dataset, "size": size, "lr": lr, "head_lr": head_lr, "epochs": epochs,
                                    "warmup": warmup, "seed": seed, "kept_epoch": kept["epoch"],
                                    "validation_accuracy": kept["value"],
                                    "test_accuracy": accuracy(model, te_t, te_l),
                                    "validation_by_epoch": [e["teacher_accuracy"] for e in history.finetune],
                                    "seconds": time.perf_counter() - start}

                        r = run_cached(os.path.join(args.work, key, "result.json"), make)
                        stage1.append(r)
                        print(f"{key:48} kept e{r['kept_epoch']} val {100 * r['validation_accuracy']:6.2f} "
                              f"test {100 * r['test_accuracy']:6.2f} ({r['seconds']:.0f} s)", flush=True)
                        if seed == args.seeds[0] and (
                                best is None or r["validation_accuracy"] > best[0]["validation_accuracy"]):
                            best = (r, key)
            for distill_lr in args.distill_lrs:
                for distill_epochs in args.distill_epochs:
                    key = (f"{dataset}-{size}/s2-{best[1].split('/')[1]}-dlr{distill_lr:g}-de{distill_epochs}"
                           + ("-unlabelled" if args.distill_on == "unlabelled" else f"-views{TrainConfig().distill_views}")
                           + ("" if args.calibrate else "-uncalibrated"))

                    def make2(distill_lr=distill_lr, distill_epochs=distill_epochs, key=key, source=best[1]):
                        model = FastBert.from_pretrained(os.path.join(args.work, source, "model"))
                        start = time.perf_counter()
                        fit(model, tr_t, tr_l, va_t, va_l, TrainConfig(
                            epochs=0, distill_epochs=distill_epochs, distill_lr=distill_lr,
                            batch_size=args.batch_size), log=None,
                            distill_texts=unlabelled if args.distill_on == "unlabelled" else None)
                        if args.calibrate:
                            calibrate(model, va_t, va_l)  # as the training job does
                        table = tradeoff_table(model, va_t, va_l, data="validation")
                        test_exits = all_exits(model, te_t, te_l)
                        out = {"set": dataset, "size": size, "from": source, "distill_lr": distill_lr,
                               "distill_on": args.distill_on,
                               "distill_epochs": distill_epochs, "seconds": time.perf_counter() - start,
                               "test_teacher": at_speed(test_exits, model, 0.0).accuracy}
                        for budget in (0.5, 1.0):
                            chosen = choose_speed(table, max_accuracy_drop=budget)
                            on_test = at_speed(test_exits, model, chosen.speed)
                            out[f"budget_{budget}"] = {"speed": chosen.speed, "validation_speedup": chosen.flop_speedup,
                                                       "test_speedup": on_test.flop_speedup,
                                                       "test_accuracy": on_test.accuracy}
                        test_points = [at_speed(test_exits, model, s / 10) for s in range(11)]
                        out["test_by_speed"] = [(p.speed, p.accuracy, p.flop_speedup) for p in test_points]
                        # every speed of the table's grid, on both row sets: rules of choice compared offline
                        out["validation_grid"] = [(p.speed, p.accuracy, p.agreement, p.flop_speedup, p.expected_cost)
                                                  for p in table.points]
                        out["test_grid"] = [(p.speed, p.accuracy, p.agreement, p.flop_speedup, p.expected_cost)
                                            for p in (at_speed(test_exits, model, q.speed) for q in table.points)]
                        model.save_pretrained(os.path.join(args.work, key, "model"))
                        return out

                    r = run_cached(os.path.join(args.work, key, "result.json"), make2)
                    stage2.append(r)
                    h = r["budget_0.5"]
                    print(f"{key:48} teacher {100 * r['test_teacher']:6.2f}; 0.5 pt on validation -> speed {h['speed']}: "
                          f"test {100 * h['test_accuracy']:6.2f} at {h['test_speedup']:.2f}x", flush=True)

    # the defaults: the stage-1 setting best on average over sets and sizes (validation, then test)
    settings: dict[tuple, list[dict]] = {}
    for r in stage1:
        settings.setdefault((r["lr"], r["head_lr"] if r["head_lr"] != r["lr"] else "same", r["epochs"], r["warmup"]),
                            []).append(r)
    print("\nstage 1, mean over sets and sizes:")
    print(f"{'lr':>8} {'head_lr':>8} {'epochs':>6} {'warmup':>6} {'val acc':>8} {'test acc':>8}  per set (test)")
    summary = []
    for setting, runs in sorted(settings.items(), key=lambda kv: -statistics.mean(r["validation_accuracy"] for r in kv[1])):
        val = statistics.mean(r["validation_accuracy"] for r in runs)
        test = statistics.mean(r["test_accuracy"] for r in runs)
        summary.append({"lr": setting[0], "head_lr": setting[1], "epochs": setting[2], "warmup": setting[3],
                        "validation_accuracy": val, "test_accuracy": test})
        print(f"{setting[0]:8g} {str(setting[1]):>8} {setting[2]:6d} {setting[3]:6g} {100 * val:7.2f}% {100 * test:7.2f}%  "
              + " ".join(f"{r['set']}-{r['size']}:{100 * r['test_accuracy']:.1f}" for r in runs))
    result = {"stage1": stage1, "stage2": stage2, "stage1_by_setting": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
