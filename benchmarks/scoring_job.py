"""The scoring job (jobs.score on Ray Data) against the in-process engine and against the
plain Hugging Face Ray Data job users run today, on the same Parquet, model and threads.

Input: ``--rows`` rows of real newswire text in 5 Parquet files: the Reuters R8 texts that
the benchmark model never saw (its test split and the training rows it was not trained or
validated on), repeated in a shuffled order until there are enough rows. Model: the one ``benchmarks.engine`` trains and
caches (bundled backbone, R8). Speed: the largest one whose accuracy on the R8 test split is
within ``--max-drop`` points of the teacher's (unless ``--speed``).

Measured, each job in its own process with its own local Ray instance (as ``python -m
jobs.score`` runs), the peak memory summed over the job's process tree (the driver, Ray's
daemons and workers; RSS every 0.25 s, PSS every 2.5 s):

The engine, job and job_1x1 run in ``--rounds`` rounds (default 2); a target's ratio is the
median over rounds of the ratio within one round, a rate the best round's, the 5x peak
memory the larger round's.

- engine        the Scorer in this process, ``--threads`` threads, the same Parquet read in
                batches of ``--batch-size`` rows (loading, tokenisation, scoring; nothing written)
- job           jobs.score, 2 replicas x 1 thread (the whole input: also the 5x memory run)
- job_1x2       jobs.score, 1 replica x ``--threads`` threads (the engine's exact threads)
- job_1x1       jobs.score, 1 replica x 1 thread
- job_small     jobs.score like "job" on the first file only (the 1x memory run)
- plain_hf      benchmarks.plain_hf_job: BertForSequenceClassification with the model's
                backbone weights, 2 replicas x 1 thread, full depth

    python -m benchmarks.scoring_job [--rows 20000] [--rounds 2] [--json out.json] [--work /tmp/fastbert-pipeline]
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
import torch

from benchmarks.engine import DEFAULT_CACHE, load_or_train
from pipeline.datasets import load_bundled
from jobs.demo import DemoConfig
from pipeline.engine import Scorer
from pipeline.model import FastBert
from pipeline.tradeoff import choose_speed, describe_choice, tradeoff_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = 5


# -- inputs -----------------------------------------------------------------------------------


def write_inputs(folder: str, rows: int, seed: int = 0) -> list[str]:
    """``rows`` rows (``id``, ``text``) of Reuters R8 text the benchmark model was neither
    trained nor validated on (the test split and the rest of the training split), repeated in
    shuffled order as often as needed, in ``FILES`` files of one row group each."""
    demo = DemoConfig(train_rows=2000, validation_rows=300)  # what benchmarks.engine trains on
    train = load_bundled("r8", "train")["text"].to_pylist()
    order = np.random.default_rng(demo.seed).permutation(len(train))
    pool = [train[i] for i in order[demo.train_rows + demo.validation_rows:]] + load_bundled("r8", "test")["text"].to_pylist()
    picks = np.concatenate([np.random.default_rng(seed + k).permutation(len(pool))
                            for k in range(-(-rows // len(pool)))])[:rows]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(rows), FILES)):
        table = pa.table({"id": pa.array(part, pa.int64()), "text": pa.array([pool[picks[i]] for i in part])})
        paths.append(os.path.join(folder, f"texts-{k}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=len(part))
    print(f"input: {rows} rows ({len(set(picks.tolist()))} distinct R8 texts the model never saw) "
          f"in {FILES} files under {folder}")
    return paths


def pick_speed(model: FastBert, max_drop: float) -> tuple[float, dict]:
    """The fastest speed whose R8 test accuracy is within ``max_drop`` points of the teacher's
    (``pipeline.tradeoff.choose_speed`` on the test split's table)."""
    test = load_bundled("r8", "test")
    table = tradeoff_table(model, test["text"].to_pylist(), test["label"].to_pylist(), data="the R8 test split")
    best = choose_speed(table, max_accuracy_drop=max_drop)
    print(describe_choice(best, table))
    return best.speed, {"teacher_accuracy": table.teacher.accuracy, "accuracy": best.accuracy,
                        "test_flop_speedup": best.flop_speedup}


def plain_hf_folder(model: FastBert, folder: str) -> str:
    """A BertForSequenceClassification with the FastBERT's backbone weights (its classifier
    head is new: the baseline is measured for speed only)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**{k: v for k, v in model.config.backbone.items() if k not in ("architectures",)})
    config.num_labels = len(model.config.labels)
    config.id2label = dict(enumerate(model.config.labels))
    config.label2id = {n: i for i, n in enumerate(model.config.labels)}
    hf = BertForSequenceClassification(config)
    missing, unexpected = hf.bert.load_state_dict(model.backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler") for k in missing), (missing, unexpected)
    hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


# -- measuring ---------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone): /proc/PID/statm, cheap to read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size (shared pages split between their processes): costly to read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


class PeakMemory:
    """Samples the summed RSS of a process tree every ``every`` seconds (and its PSS every 10th
    time, which costs more CPU) in a thread until stopped."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.rss, self.pss, self.processes = pid, every, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            pids = _tree(self.pid)
            self.rss = max(self.rss, sum(_rss(p) for p in pids))
            if tick % 10 == 0:
                self.pss = max(self.pss, sum(_pss(p) for p in pids))
            self.processes, tick = max(self.processes, len(pids)), tick + 1
            self._stop.wait(self.every)

    def stop(self) -> "PeakMemory":
        self._stop.set()
        self._thread.join()
        return self


def run_process(name: str, argv: list[str], work: str) -> tuple[dict, PeakMemory, float]:
    """Run ``python -m ...`` in its own process; returns the last JSON line it printed (or
    the job's _summary.json), its peak memory and its wall time."""
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    log = os.path.join(work, f"{name}.log")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        memory = PeakMemory(proc.pid)
        code = proc.wait()
    memory.stop()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{name} failed with exit code {code}; see {log}")
    if "--output" in argv and os.path.isfile(os.path.join(argv[argv.index("--output") + 1], "_summary.json")):
        with open(os.path.join(argv[argv.index("--output") + 1], "_summary.json")) as f:
            result = json.load(f)
    else:
        with open(log) as f:
            result = json.loads([line for line in f if line.startswith("{")][-1])
    return result, memory, wall


def engine_rows_per_s(model_dir: str, files: list[str], speed: float, threads: int, batch_size: int,
                      micro_batch: int, precision: str) -> tuple[float, float]:
    """The in-process engine over the same Parquet: (rows/s, mean exit layer). Timed like the
    job's own clock: from loading the model to the last row, the Python imports excluded."""
    torch.set_num_threads(threads)
    start, rows, exits = time.perf_counter(), 0, 0
    scorer = Scorer(FastBert.from_pretrained(model_dir), speed=speed, micro_batch=micro_batch, device="cpu",
                    precision=precision)
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["text"]):
            table = scorer(batch.column("text").to_pylist())
            rows += table.num_rows
            exits += int(np.sum(table["exit_layer"].to_numpy()))
    return rows / (time.perf_counter() - start), exits / rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2, help="the engine's threads; also 1 replica x THREADS")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per replica call (and per engine call)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--precision", default="auto", help="of the engine and the job's replicas alike (default: auto)")
    p.add_argument("--speed", type=float, default=None)
    p.add_argument("--max-drop", type=float, default=0.5, help="accuracy points below the teacher the speed may give")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--work", default="/tmp/fastbert-pipeline-benchmark")
    p.add_argument("--rounds", type=int, default=2, help="rounds of engine, job and job_1x1 (the ratios' median)")
    p.add_argument("--skip", nargs="*", default=[], help="measurements to leave out: job_1x2 job_1x1 plain_hf")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    model = load_or_train(args.cache)
    model_dir = os.path.join(args.cache, "model")
    speed, accuracy = (args.speed, {}) if args.speed is not None else pick_speed(model, args.max_drop)
    files = write_inputs(os.path.join(args.work, "input"), args.rows)
    hf_dir = plain_hf_folder(model, os.path.join(args.work, "plain-hf-model"))
    del model
    result: dict = {"rows": args.rows, "speed": speed, **accuracy, "threads": args.threads,
                    "batch_size": args.batch_size, "micro_batch": args.micro_batch, "cores": os.cpu_count()}

    def score(name: str, inputs: list[str], replicas: int, threads: int, round_: int | None = None
              ) -> tuple[dict, PeakMemory, float]:
        argv = ["jobs.score", "--model", model_dir, "--input", *inputs, "--output", os.path.join(args.work, name),
                "--speed", str(speed), "--replicas", str(replicas), "--threads-per-replica", str(threads),
                "--rows-per-call", str(args.batch_size), "--micro-batch", str(args.micro_batch),
                "--precision", args.precision, "--overwrite"]
        summary, memory, wall = run_process(name if round_ is None else f"{name}-round{round_ + 1}", argv, args.work)
        assert summary["rows_out"] == summary["rows_in"], summary
        print(f"{name:9s} {replicas} replica(s) x {threads} thread(s): {summary['rows_per_s']:6.1f} rows/s "
              f"({summary['rows_out']} rows, job {summary['wall_seconds']:.1f} s, process {wall:.1f} s), "
              f"mean exit {summary['mean_exit_layer']:.2f}, FLOP speed-up {summary['flop_speedup']:.2f}x, "
              f"peak RSS {memory.rss / 2**30:.2f} GiB, PSS {memory.pss / 2**30:.2f} GiB ({memory.processes} processes)")
        return summary, memory, wall

    # the rates the targets compare are measured in rounds (engine, job, job_1x1), and each ratio
    # is the median over rounds of the ratio within a round: these machines change speed from
    # one minute to the next, and a pair measured minutes apart mostly measures that
    rounds: list[dict] = []
    for r in range(args.rounds):
        print(f"-- round {r + 1}/{args.rounds}")
        rate, exit_mean = engine_rows_per_s(model_dir, files, speed, args.threads, args.batch_size, args.micro_batch,
                                              args.precision)
        print(f"engine    in-process x {args.threads} threads: {rate:6.1f} rows/s, mean exit {exit_mean:.2f}")
        job, memory_5x, wall = score("job", files, 2, 1, r)
        measured = {"engine_rows_per_s": rate, "job_rows_per_s": job["rows_per_s"], "job_wall_seconds":
                    job["wall_seconds"], "job_process_rows_per_s": args.rows / wall, "peak_rss_5x": memory_5x.rss,
                    "peak_pss_5x": memory_5x.pss,
                    # the job's own split (issue 30): start-up, then steady rows/s; compute per million rows
                    "job_startup_seconds": job["startup_seconds"], "job_steady_rows_per_s": job["steady_rows_per_s"],
                    "job_cpu_seconds_per_million_rows": job["cpu_seconds_per_million_rows"],
                    "job_replica_busy_seconds_per_million_rows": job["replica_busy_seconds_per_million_rows"]}
        print(f"          start-up {job['startup_seconds']:.1f} s, steady {job['steady_rows_per_s']:.1f} rows/s "
              f"({job['steady_rows_per_s'] / rate:.2f}x the engine), {job['cpu_seconds_per_million_rows']:.0f} CPU-s and "
              f"{job['replica_busy_seconds_per_million_rows']:.0f} replica-s (busy) per million rows")
        if "job_1x1" not in args.skip:
            measured["rows_per_s_1_replica"] = score("job_1x1", files, 1, 1, r)[0]["rows_per_s"]
        rounds.append(measured)
        if r == 0:
            result.update(job_flop_speedup=job["flop_speedup"], job_mean_exit_layer=job["mean_exit_layer"])
    result["rounds"] = rounds
    best = {key: max(m[key] for m in rounds) for key in rounds[0] if key.endswith("rows_per_s")}
    result.update(best)  # every *rows_per_s of the rounds: each its best round
    result["rows_per_s_2_replicas"] = result["job_rows_per_s"]
    result.update(peak_rss_5x=max(m["peak_rss_5x"] for m in rounds), peak_pss_5x=max(m["peak_pss_5x"] for m in rounds))
    result["job_over_engine"] = float(np.median([m["job_rows_per_s"] / m["engine_rows_per_s"] for m in rounds]))
    if "job_1x1" not in args.skip:
        result["two_over_one_replica"] = float(np.median([m["job_rows_per_s"] / m["rows_per_s_1_replica"]
                                                          for m in rounds]))

    small, memory_1x, _ = score("job_small", files[:1], 2, 1)
    result.update(peak_rss_1x=memory_1x.rss, peak_pss_1x=memory_1x.pss)
    # the two runs of the same job give its rate once running and its fixed cost (Ray Data's
    # start, the replicas' imports and model loading, the last call's tail)
    # (paired with the last round's job, the nearest in time)
    extra_seconds = rounds[-1]["job_wall_seconds"] - small["wall_seconds"]
    if extra_seconds > 0 and args.rows > small["rows_in"]:
        marginal = (args.rows - small["rows_in"]) / extra_seconds
        result.update(job_marginal_rows_per_s=marginal,
                      job_fixed_seconds=small["wall_seconds"] - small["rows_in"] / marginal)
        print(f"job once running: {marginal:.1f} rows/s; fixed cost {result['job_fixed_seconds']:.1f} s")
    else:
        print("job once running: not measured (the whole input did not take longer than its first file)")
    if "job_1x2" not in args.skip:
        result["job_1x2_rows_per_s"] = score("job_1x2", files, 1, args.threads)[0]["rows_per_s"]
    if "plain_hf" not in args.skip:
        hf, _, _ = run_process("plain_hf", ["benchmarks.plain_hf_job", "--model-dir", hf_dir, "--input",
                                            os.path.join(args.work, "input"), "--output",
                                            os.path.join(args.work, "plain_hf"), "--replicas", "2",
                                            "--threads-per-replica", "1", "--batch-size", str(args.micro_batch),
                                            "--max-length", str(FastBert.from_pretrained(model_dir).config.max_length)],
                               args.work)
        assert hf["rows_out"] == args.rows, hf
        result["plain_hf_job_rows_per_s"] = hf["rows_per_s"]
        print(f"plain_hf  2 replicas x 1 thread: {hf['rows_per_s']:6.1f} rows/s ({hf['rows_out']} rows, "
              f"{hf['wall_seconds']:.1f} s)")

    rate = result["engine_rows_per_s"]
    print(f"targets (job / engine and 2 replicas / 1 replica: the median over {args.rounds} rounds of the ratio "
          "within a round; the others against the best round):")
    print(f"  job / engine                {result['job_over_engine']:5.2f} (>= 0.85); rounds "
          + ", ".join(f"{m['job_rows_per_s'] / m['engine_rows_per_s']:.2f}" for m in rounds)
          + (f"; once running {result['job_marginal_rows_per_s'] / rate:.2f} of the best engine round"
             if "job_marginal_rows_per_s" in result else ""))
    if "job_1x2_rows_per_s" in result:
        print(f"  job 1x{args.threads} / engine              {result['job_1x2_rows_per_s'] / rate:5.2f} (best engine round)")
    if "plain_hf_job_rows_per_s" in result:
        print(f"  job / plain HF job          {result['job_rows_per_s'] / result['plain_hf_job_rows_per_s']:5.2f} (>= 3; "
              "best job round)")
    print(f"  peak RSS 5x / 1x            {result['peak_rss_5x'] / result['peak_rss_1x']:5.2f} (<= 1.15); "
          f"PSS {result['peak_pss_5x'] / result['peak_pss_1x']:.2f}")
    if "two_over_one_replica" in result:
        print(f"  2 replicas / 1 replica      {result['two_over_one_replica']:5.2f} (>= 1.6); rounds "
              + ", ".join(f"{m['job_rows_per_s'] / m['rows_per_s_1_replica']:.2f}" for m in rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"written to {args.json}")
    return result


if __name__ == "__main__":
    main()
