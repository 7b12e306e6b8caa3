"""What a user could run instead, against our engine, on the same rows, model and threads
(issue 27): the bundled MiniLM fine-tuned on Reuters R8 (benchmarks.engine's cached model),
full depth in plain PyTorch fp32 and bf16 autocast, ONNX Runtime fp32 and int8 (dynamic
quantisation), OpenVINO bf16 (fp32 where the CPU has no bf16), and our engine in fp32 and
bf16 at speed 0 and at the fastest speed within 0.5 point of the teacher on the validation
rows, in bf16 also with ``compile=True`` (its warm-up is left out, as OpenVINO's compile is). Every way scores the same length-sorted batches of pre-tokenised rows (tokenising costs
the same for all and is left out), in ``--rounds`` interleaved rounds; the table gives the
median rows/s with min-max, and for PyTorch the achieved GFLOP/s and its share of a bf16 and
an fp32 matmul peak measured in the same run. Needs the ``bench`` extra (onnxruntime,
openvino, onnx).

    python -m benchmarks.peers [--rows 2000] [--micro-batch 32] [--threads 2] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.engine import DEFAULT_CACHE, load_or_train
from pipeline import flops as flop_account
from pipeline.datasets import load_bundled
from pipeline.train import collate
from pipeline.engine import Scorer
from pipeline.model import FastBert, cpu_has_native_bf16
from pipeline.tradeoff import choose_speed


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n x n matrix product in ``dtype`` on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def batches(ids: list[list[int]], micro_batch: int, pad: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted batches as int64 (input_ids, attention_mask), padded to their longest row."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = []
    for start in range(0, len(order), micro_batch):
        b = collate({"input_ids": [ids[i] for i in order[start : start + micro_batch]]}, pad)
        out.append((b["input_ids"].numpy(), b["attention_mask"].numpy()))
    return out


class Classifier(torch.nn.Module):
    """The model as a user would deploy it at full depth: the encoder and the teacher."""

    def __init__(self, model: FastBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).teacher_logits  # (B, N)


def torch_way(model: FastBert, data, precision: str):
    classifier = Classifier(model).eval()
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else torch.no_grad

    def run() -> np.ndarray:
        out = []
        with torch.inference_mode(), context():
            for ids, mask in data:
                out.append(classifier(torch.from_numpy(ids), torch.from_numpy(mask)).float().argmax(-1).numpy())
        return np.concatenate(out)
    return run


def onnx_file(model: FastBert, folder: str) -> str:
    path = os.path.join(folder, "model.onnx")
    ids = torch.ones((2, 16), dtype=torch.long)
    torch.onnx.export(Classifier(model).eval(), (ids, torch.ones_like(ids)), path, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
                      opset_version=17)
    return path


def onnxruntime_way(path: str, data, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run() -> np.ndarray:
        return np.concatenate([session.run(None, {"input_ids": ids, "attention_mask": mask})[0].argmax(-1)
                               for ids, mask in data])
    return run


def openvino_way(path: str, data, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run() -> np.ndarray:
        out = []
        for ids, mask in data:
            request.infer({"input_ids": ids, "attention_mask": mask})
            out.append(request.get_output_tensor(0).data.argmax(-1))
        return np.concatenate(out)
    return run


def engine_way(model: FastBert, ids, speed: float, micro_batch: int, precision: str, compile: bool = False):
    scorer = Scorer(model, speed=speed, micro_batch=micro_batch, precision=precision, compile=compile)
    index = {name: i for i, name in enumerate(model.config.labels)}

    def run() -> np.ndarray:
        order = np.argsort([len(r) for r in ids], kind="stable")  # predictions in the peers' row order
        table = scorer.score_tokens([ids[i] for i in order])
        return np.array([index[p] for p in table.column("prediction").to_pylist()])
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="R8 test rows (default: 2000)")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per batch (default: 32)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every way (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"the model's cache (default: {DEFAULT_CACHE})")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_or_train(args.cache).eval()
    test = load_bundled("r8", "test")
    texts = test["text"].to_pylist()[: args.rows]
    truth = np.array([model.config.labels.index(str(label)) for label in test["label"].to_pylist()[: args.rows]])
    ids = model.tokenizer(texts, truncation=True, max_length=model.config.max_length, return_attention_mask=False,
                          return_token_type_ids=False)["input_ids"]
    data = batches(ids, args.micro_batch, model.tokenizer.pad_token_id or 0)
    order = np.argsort([len(r) for r in ids], kind="stable")
    truth = truth[order]
    lengths = np.array([len(r) for r in ids])
    full_flops = int(flop_account.full_depth_flops(model.config, lengths).sum())
    fast = choose_speed(model.tradeoff, max_accuracy_drop=0.5)
    bf16 = "bf16" if cpu_has_native_bf16() else "fp32"
    print(f"{len(ids)} rows, mean {lengths.mean():.0f} tokens, batches of {args.micro_batch}, {args.threads} threads; "
          f"CPU bf16 native: {cpu_has_native_bf16()}; speed within 0.5 point on validation: {fast.speed}")

    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_file(model, tmp)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = os.path.join(tmp, "model.int8.onnx")
        quantize_dynamic(path, int8, weight_type=QuantType.QInt8)
        ways = {
            "PyTorch fp32": torch_way(model, data, "fp32"),
            "PyTorch bf16 autocast": torch_way(model, data, "bf16"),
            "ONNX Runtime fp32": onnxruntime_way(path, data, args.threads),
            "ONNX Runtime int8": onnxruntime_way(int8, data, args.threads),
            f"OpenVINO {bf16}": openvino_way(path, data, args.threads, bf16),
            "engine fp32, speed 0": engine_way(model, ids, 0.0, args.micro_batch, "fp32"),
            "engine bf16, speed 0": engine_way(model, ids, 0.0, args.micro_batch, "bf16"),
            f"engine fp32, speed {fast.speed}": engine_way(model, ids, fast.speed, args.micro_batch, "fp32"),
            f"engine bf16, speed {fast.speed}": engine_way(model, ids, fast.speed, args.micro_batch, "bf16"),
            "engine bf16 compiled, speed 0": engine_way(model, ids, 0.0, args.micro_batch, "bf16", compile=True),
            f"engine bf16 compiled, speed {fast.speed}": engine_way(model, ids, fast.speed, args.micro_batch, "bf16",
                                                                    compile=True),
        }
        predictions = {name: run() for name, run in ways.items()}  # warm-up, and what each predicts
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        peaks = {"bf16": [], "fp32": []}
        for _ in range(args.rounds):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
            peaks["bf16"].append(matmul_peak(torch.bfloat16))
            peaks["fp32"].append(matmul_peak(torch.float32))

    peak = {k: statistics.median(v) for k, v in peaks.items()}
    reference = predictions["PyTorch fp32"]
    rows = []
    print(f"matmul peak, {args.threads} threads: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s")
    print(f"{'way':36} {'rows/s (min-max)':>24} {'accuracy':>9} {'agrees':>7} {'GFLOP/s':>8} {'of bf16 peak':>12}")
    for name, secs in seconds.items():
        rates = [len(ids) / s for s in secs]
        row = {"way": name, "rows_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
               "accuracy": float(np.mean(predictions[name] == truth)),
               "agrees_with_fp32": float(np.mean(predictions[name] == reference))}
        if name.startswith("PyTorch") or name.endswith("speed 0"):  # the full-depth ways: model FLOPs utilisation
            row["gflops"] = full_flops / statistics.median(secs) / 1e9
            row["of_bf16_peak"] = row["gflops"] / peak["bf16"]
        rows.append(row)
        print(f"{name:36} {row['rows_per_s']:9.1f} ({row['min']:.1f}-{row['max']:.1f}) {100 * row['accuracy']:8.2f}% "
              f"{100 * row['agrees_with_fp32']:6.2f}% "
              + (f"{row['gflops']:8.0f} {100 * row['of_bf16_peak']:11.1f}%" if "gflops" in row else ""))
    result = {"rows": len(ids), "mean_tokens": float(lengths.mean()), "micro_batch": args.micro_batch,
              "threads": args.threads, "rounds": args.rounds, "speed_within_half_point": fast.speed,
              "cpu_native_bf16": cpu_has_native_bf16(), "matmul_peak_gflops": peak, "ways": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
