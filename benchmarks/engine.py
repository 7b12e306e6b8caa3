"""Early-exit inference five ways on the same rows, model and threads (issue: the engine).

(a) full      full depth, batched, rows sorted by length (the BERT baseline)
(b) batch1    early exit one row at a time (how the public FastBERT, DeeBERT, PABEE evaluate)
(c) masked    early exit on batches that run until all their rows have exited
(d) compact   exited rows leave the batch, but batches only shrink (no regrouping)
(e) engine    compaction + dynamic re-batching (pipeline.Scorer)
plus (e) at speed 0, which must cost what (a) costs.

The model is the bundled backbone after a short fine-tune and self-distillation on Reuters
R8 (cached under --cache, printed); the speed is the one whose FLOP speed-up is closest to
2.5x within [2, 3], unless --speed is given. Every timing includes tokenisation.

    python -m benchmarks.engine [--rows 2189] [--micro-batch 32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from pipeline import flops as flop_account
from pipeline.datasets import load_bundled
from benchmarks.models import DemoConfig, train_model
from pipeline.train import collate
from pipeline.engine import Scorer
from pipeline.model import FastBert, uncertainty

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastbert-ray", "benchmark-r8")


def load_or_train(cache: str) -> FastBert:
    model_dir = os.path.join(cache, "model")
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        print(f"model: cached at {model_dir}")
        return FastBert.from_pretrained(model_dir)
    print(f"model: training on R8, to be cached at {model_dir}")
    return train_model(DemoConfig(output=cache, train_rows=2000, validation_rows=300, epochs=2, distill_epochs=3))


def tokenize(model: FastBert, texts: list[str]) -> list[list[int]]:
    return model.tokenizer(texts, truncation=True, max_length=model.config.max_length,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate({"input_ids": ids}, pad)
    return batch["input_ids"], batch["attention_mask"].bool()  # (B, T), (B, T) bool


def sorted_batches(ids: list[list[int]], micro_batch: int):
    order = np.argsort([len(r) for r in ids], kind="stable")
    for start in range(0, len(order), micro_batch):
        rows = order[start : start + micro_batch]
        yield rows, [ids[i] for i in rows]


@torch.inference_mode()
def full_depth(model: FastBert, texts: list[str], micro_batch: int) -> np.ndarray:
    """(a): every row through every layer and the teacher, sorted batches. Returns exit layers."""
    pad = model.tokenizer.pad_token_id
    for rows, batch in sorted_batches(tokenize(model, texts), micro_batch):
        input_ids, mask = padded(batch, pad)
        hidden = model.embed(input_ids)  # (B, T, H)
        extended = model.layer_mask(mask, hidden.dtype)
        for k in range(model.config.num_layers):
            hidden = model.run_layer(k, hidden, extended)  # (B, T, H)
        model.branches[-1](hidden, mask).softmax(-1)  # (B, N)
    return np.full(len(texts), model.config.num_layers)


@torch.inference_mode()
def masked(model: FastBert, texts: list[str], speed: float, micro_batch: int) -> np.ndarray:
    """(c): a batch runs layer after layer, all rows included, until every row has exited."""
    pad, L = model.tokenizer.pad_token_id, model.config.num_layers
    exits = np.zeros(len(texts), dtype=np.int64)
    for rows, batch in sorted_batches(tokenize(model, texts), micro_batch):
        input_ids, mask = padded(batch, pad)
        hidden = model.embed(input_ids)  # (B, T, H)
        extended = model.layer_mask(mask, hidden.dtype)
        done = np.zeros(len(rows), dtype=bool)
        for k in range(L):
            hidden = model.run_layer(k, hidden, extended)  # (B, T, H) exited rows still computed
            u = uncertainty(model.branches[k](hidden, mask)).numpy()  # (B,)
            leaving = ~done & ((u < speed) if k < L - 1 else True)
            exits[rows[leaving]] = k + 1
            done |= leaving
            if done.all():
                break
    return exits


def exits_for_speed(model: FastBert, texts: list[str], speeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's uncertainty for every row (one full pass) -> exit layers per speed."""
    ids = tokenize(model, texts)
    u_all = np.zeros((len(texts), model.config.num_layers), dtype=np.float32)
    with torch.inference_mode():
        for rows, batch in sorted_batches(ids, 64):
            input_ids, mask = padded(batch, model.tokenizer.pad_token_id)
            u_all[rows] = uncertainty(model(input_ids, mask.long()).logits).T.numpy()  # (B, L)
    below = u_all[None, :, :-1] < speeds[:, None, None]  # (S, R, L-1)
    first = np.where(below.any(-1), below.argmax(-1) + 1, model.config.num_layers)  # (S, R)
    return first, np.array([len(r) for r in ids])


def flop_speedup(model: FastBert, lengths: np.ndarray, exits: np.ndarray, speed: float = 1.0) -> float:
    """Full-depth FLOPs over the FLOPs of these exits; at speed 0 no student branch runs."""
    full = flop_account.full_depth_flops(model.config, lengths).sum()
    return float(full / flop_account.row_flops(model.config, lengths, exits, students=speed > 0).sum())


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=0, help="test rows of R8 to score (0 = all 2189)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", type=float, default=None, help="default: FLOP speed-up closest to 2.5x")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per way")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the trained model is kept")
    parser.add_argument("--model", default=None, help="a trained FastBert folder instead of the cached one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the table here as a list of objects")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = FastBert.from_pretrained(args.model) if args.model else load_or_train(args.cache)
    test = load_bundled("r8", "test")
    texts, truth = test["text"].to_pylist(), np.array(test["label"].to_pylist(), dtype=object)
    if args.rows:
        texts, truth = texts[: args.rows], truth[: args.rows]

    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    exits_by_speed, lengths = exits_for_speed(model, texts, grid)
    speedups = np.array([flop_speedup(model, lengths, e) for e in exits_by_speed])
    speed = args.speed
    if speed is None:
        in_range = np.flatnonzero((speedups >= 2.0) & (speedups <= 3.0))
        pick = in_range[np.argmin(np.abs(speedups[in_range] - 2.5))] if len(in_range) else np.argmin(np.abs(speedups - 2.5))
        speed = float(grid[pick])
    print(f"{len(texts)} rows, mean {lengths.mean():.0f} tokens; speed {speed} "
          f"(FLOP speed-up {flop_speedup(model, lengths, exits_for_speed(model, texts, np.array([speed]))[0][0]):.2f}x); "
          f"micro-batch {args.micro_batch}; {args.threads} threads; device {args.device}")

    def scorer_way(s: float, mb: int, regroup: bool = True):
        # fp32 like the hand-written ways (a)-(d); benchmarks.peers measures the precisions
        scorer = Scorer(model, speed=s, micro_batch=mb, device=args.device, regroup=regroup, precision="fp32")
        def run():
            table = scorer(texts)
            return np.array(table["exit_layer"].to_pylist()), np.array(table["prediction"].to_pylist(), dtype=object)
        return run

    ways = [
        ("full", 0.0, args.micro_batch, lambda: (full_depth(model, texts, args.micro_batch), None)),
        ("batch1", speed, 1, scorer_way(speed, 1)),
        ("masked", speed, args.micro_batch, lambda: (masked(model, texts, speed, args.micro_batch), None)),
        ("compact", speed, args.micro_batch, scorer_way(speed, args.micro_batch, regroup=False)),
        ("engine", speed, args.micro_batch, scorer_way(speed, args.micro_batch)),
        ("engine", 0.0, args.micro_batch, scorer_way(0.0, args.micro_batch)),
    ]
    scorer_way(speed, args.micro_batch)()  # warm-up
    results, exits_seen = [], {}
    for way, s, mb, fn in ways:
        seconds, (exits, predictions) = timed(fn, args.repeats)
        rows_per_s = len(texts) / seconds
        row = {
            "way": way, "speed": s, "micro_batch": mb, "device": args.device, "rows_per_s": rows_per_s,
            "mean_exit_layer": float(exits.mean()), "flop_speedup": flop_speedup(model, lengths, exits, s),
        }
        if predictions is not None:
            row["accuracy"] = float((predictions == truth).mean())
        row["wall_speedup"] = rows_per_s / results[0]["rows_per_s"] if results else 1.0
        row["wall_over_flop"] = row["wall_speedup"] / row["flop_speedup"]
        results.append(row)
        exits_seen[(way, s)] = exits
        print(f"{way:8s} speed {s:4.2f} mb {mb:3d}: {rows_per_s:7.1f} rows/s  mean exit {row['mean_exit_layer']:4.2f}  "
              f"FLOP speed-up {row['flop_speedup']:5.2f}x  wall speed-up {row['wall_speedup']:5.2f}x  "
              f"wall/FLOP {row['wall_over_flop']:4.2f}" + (f"  acc {100 * row['accuracy']:.2f}%" if "accuracy" in row else ""))
    same = all(np.array_equal(exits_seen[(w, speed)], exits_seen[("engine", speed)]) for w in ("batch1", "masked", "compact"))
    print(f"all early-exit ways agree on every row's exit layer: {same}")

    rate = {(r["way"], r["speed"]): r["rows_per_s"] for r in results}
    engine = rate[("engine", speed)]
    print("targets: (e) wall/FLOP {:.3f} (>= 0.95); (e)/(b) {:.3f} (>= 1.5); (e)/(c) {:.3f} (>= 1.3); "
          "(e)/(d) {:.3f} (>= 1.0); (e) at speed 0 / (a) {:.3f} (>= 0.95)".format(
              results[4]["wall_over_flop"], engine / rate[("batch1", speed)], engine / rate[("masked", speed)],
              engine / rate[("compact", speed)], rate[("engine", 0.0)] / rate[("full", 0.0)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"table written to {args.json}")
    return results


if __name__ == "__main__":
    main()
