"""A million rows through jobs.score: streaming, memory flat, every row once (issue 30).

Input: ``--rows`` synthetic texts of realistic lengths (words drawn from the Reuters R8 texts,
lengths log-normal around 40 words, 5-300) in ``--files`` Parquet files of 5,000-row row
groups, ids 0..rows-1. Model: a tiny random FastBERT (2 layers, 64 wide, the bundled
backbone's WordPiece tokenizer, max 128 tokens), so that the pipeline (reading,
tokenising, scoring, writing), not the model, is what runs. The job runs as ``python -m
jobs.score`` in its own process with its own local Ray, ``--replicas`` replicas x 1 thread.

Every second the benchmark samples the resident memory (RSS) of the driver and of each
replica process and the rows written so far (the job's ``_pieces`` markers). Reported: the
job's start-up and steady rows/s (its summary), the RSS of the driver and each replica when
10% of the rows were written and at the end (flat: at most +15%), the driver's RSS also in its
parts (its own heap, mapped files, and the shared pages of Ray's object store it touched), that
every id came out exactly once, and the output files' rows (smallest, median).

    python -m benchmarks.million [--rows 1000000] [--files 100] [--replicas 2] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORK = "/tmp/fastbert-million"


def write_model(folder: str) -> None:
    from transformers import AutoTokenizer, BertConfig

    from pipeline.datasets import bundled_backbone_path
    from pipeline.model import FastBert, FastBertConfig

    import torch

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(bundled_backbone_path())
    backbone = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=128).to_dict()
    config = FastBertConfig(backbone=backbone, labels=[f"topic{i}" for i in range(8)], branch_width=32, branch_heads=2,
                            max_length=128)
    FastBert(config, tokenizer=tokenizer).eval().save_pretrained(folder)


def write_inputs(folder: str, rows: int, files: int, seed: int = 0) -> None:
    from pipeline.datasets import load_bundled

    words = np.array(" ".join(load_bundled("r8", "train")["text"].to_pylist()).split())
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    per = rows // files
    for f in range(files):
        lengths = np.clip(rng.lognormal(np.log(40), 0.6, per).astype(int), 5, 300)
        picks = rng.integers(0, len(words), lengths.sum())
        cuts = np.cumsum(lengths)[:-1]
        texts = [" ".join(chunk) for chunk in np.split(words[picks], cuts)]
        table = pa.table({"id": np.arange(f * per, (f + 1) * per), "text": texts})
        pq.write_table(table, os.path.join(folder, f"part-{f:04d}.parquet"), row_group_size=5000)


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory in MB: all of it (``VmRSS``), or one part: ``RssAnon`` (its
    own heap), ``RssFile`` (mapped files: libraries), ``RssShmem`` (shared memory: the pages of
    Ray's object store it has touched, which the node holds once for every process)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def replica_pids() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"MapBatches(Replica)" in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return sorted(out)


class Sampler(threading.Thread):
    """Every second: (seconds, rows written, {pid: RSS MB}) of the driver and the replicas."""

    def __init__(self, driver: int, output: str):
        super().__init__(daemon=True)
        self.driver, self.output = driver, output
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self.rows, self.seen = 0, set()
        self.stop = threading.Event()

    def written(self) -> int:
        folder = os.path.join(self.output, "_pieces")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith("part-") and name.endswith(".json") and name not in self.seen:
                try:
                    with open(os.path.join(folder, name)) as f:
                        self.rows += json.load(f)["rows"]
                    self.seen.add(name)
                except (OSError, ValueError):
                    pass
        return self.rows

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop.is_set():
            memory = {"driver": rss_mb(self.driver)}
            memory.update({f"driver {part}": rss_mb(self.driver, f"Rss{part}") for part in ("Anon", "File", "Shmem")})
            memory.update({f"replica {pid}": rss_mb(pid) for pid in replica_pids()})
            self.samples.append((time.perf_counter() - start, self.written(), {k: v for k, v in memory.items() if v}))
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--work", default=DEFAULT_WORK, help=f"inputs, model and output (default: {DEFAULT_WORK})")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    inputs, model, output = (os.path.join(args.work, name) for name in ("inputs", "model", "output"))
    stamp = os.path.join(args.work, "inputs.json")
    if not os.path.isfile(stamp) or json.load(open(stamp)) != [args.rows, args.files]:
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        write_inputs(inputs, args.rows, args.files)
        write_model(model)
        json.dump([args.rows, args.files], open(stamp, "w"))
        print(f"wrote {args.rows} rows in {args.files} files and the model in {time.perf_counter() - t:.0f} s", flush=True)
    shutil.rmtree(output, ignore_errors=True)

    command = [sys.executable, "-m", "jobs.score", "--model", model, "--input", inputs, "--output", output,
               "--id-column", "id", "--columns", "id", "--speed", "0.5", "--replicas", str(args.replicas),
               "--cpus-per-replica", "1", "--threads-per-replica", "1"]
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(job.pid, output)
    sampler.start()
    log = job.communicate()[0]
    sampler.stop.set()
    sampler.join()
    if job.returncode != 0:
        raise SystemExit(f"jobs.score failed:\n{log[-3000:]}")
    summary = json.load(open(os.path.join(output, "_summary.json")))

    ids = np.concatenate([pq.read_table(os.path.join(output, name), columns=["id"])["id"].to_numpy()
                          for name in sorted(os.listdir(output)) if name.endswith(".parquet")])
    once = len(ids) == args.rows and bool(np.array_equal(np.sort(ids), np.arange(args.rows)))
    sizes = [pq.ParquetFile(os.path.join(output, name)).metadata.num_rows
             for name in sorted(os.listdir(output)) if name.endswith(".parquet")]

    def at(rows: int) -> dict[str, float]:
        """Each process's peak RSS over the samples up to the first with ``rows`` rows written."""
        peak: dict[str, float] = {}
        for _, written, memory in sampler.samples:
            for name, mb in memory.items():
                peak[name] = max(peak.get(name, 0.0), mb)
            if written >= rows:
                break
        return peak

    early, late = at(args.rows // 10), at(args.rows)
    growth = {name: late[name] / early[name] - 1 for name in early if name in late}
    result = {
        "rows": args.rows, "files": args.files, "replicas": args.replicas,
        "wall_seconds": summary["wall_seconds"], "rows_per_s": summary["rows_per_s"],
        "startup_seconds": summary["startup_seconds"], "steady_rows_per_s": summary["steady_rows_per_s"],
        "cpu_seconds_per_million_rows": summary["cpu_seconds_per_million_rows"],
        "every_row_once": once, "output_files": len(sizes), "file_rows_min": min(sizes),
        "file_rows_median": float(np.median(sizes)),
        "rss_mb_at_10pct": early, "rss_mb_at_end": late, "rss_growth": growth,
        # the driver's and each replica's whole RSS (its parts are there to explain it)
        "memory_flat": all(g <= 0.15 for name, g in growth.items() if not name.startswith("driver ")),
        "samples": sampler.samples,
    }
    print(f"{args.rows} rows, {args.files} files, {args.replicas} replicas x 1 thread: "
          f"{summary['wall_seconds']:.0f} s, start-up {summary['startup_seconds']:.1f} s, "
          f"steady {summary['steady_rows_per_s']:.0f} rows/s; every row once: {once}; "
          f"{len(sizes)} output files, rows per file min {min(sizes)}, median {np.median(sizes):.0f}")
    for name in sorted(early):
        print(f"  {name:16} RSS at 10% {early[name]:7.1f} MB, at the end {late.get(name, float('nan')):7.1f} MB "
              f"({100 * growth.get(name, float('nan')):+.1f}%)")
    print(f"memory flat (<= +15%): {result['memory_flat']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
