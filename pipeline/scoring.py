"""Streaming Parquet-in/Parquet-out scoring with a trained FastBERT on Ray Data.

The driver (``run``) lists the input files, checks their footers (columns, types, a corrupt
file) and cuts the work into chunks, one per Parquet row group. The Ray Data pipeline then
streams the chunks through four stages:

1. read (CPU tasks): a chunk's rows, the carried columns plus the text, tagged with the
   chunk and each row's index in its file;
2. tokenise (CPU tasks): token ids, or the reason a row cannot be scored (``text.tokenize``,
   on the Rust tokenizer: these tasks import neither torch nor transformers);
3. score (an actor pool of ``Replica``: the model loaded once, on its GPU when it has one;
   each call runs the engine's early exit with dynamic re-batching on a batch of rows);
4. write (CPU tasks): each run of rows of one chunk becomes a Parquet file
   ``part-FFFFF-GGGGG-RRRRRRRRRR.parquet`` (file, row group, first row), written under a
   hidden temporary name and then moved into place, followed by a small JSON marker in
   ``_pieces/``.

Row order is preserved (``preserve_order``), so the output files sorted by name hold the rows
of every input file together and in input order, one output row per input row. A chunk is
done when its markers count all its rows; ``resume`` skips done chunks and redoes the others
from scratch (their partial pieces are removed first), so nothing is duplicated or lost. At the
end ``_summary.json`` and ``_SUCCESS`` are written; readers of the folder (pyarrow.dataset,
Spark) skip names starting with ``_`` or ``.``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import flops as flop_account
from pipeline.config import SCHEMA as ENGINE_SCHEMA
from pipeline.config import load_config
from pipeline.heap import release_freed_memory
from pipeline.text import load_tokenizer, tokenize
from pipeline.tradeoff import choose_speed, describe_choice, load_table

# torch, transformers and the modules that import them (engine, model) are imported in the
# replicas alone: the driver and the read, tokenise and write tasks (which import this module
# in their own Ray workers) never need them, and on 2 cores those imports (about 2
# CPU-seconds per process) delayed the replicas' start

RESULT_COLUMNS = ("prediction", "probabilities", "exit_layer", "uncertainty", "error")
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
PIECES = "_pieces"
# fields of the job that decide what the output holds: a resumed job must match them
IDENTITY = ("model", "speed", "text_column", "id_column", "columns", "max_length")


@dataclass
class ScoreJobConfig:
    """A scoring job: inputs, model, speed, output, and the replicas' resources."""

    model: str  # a FastBERT folder (local path or fsspec URI) written by save_pretrained or jobs.train
    input: list[str]  # Parquet files, folders or globs (local paths or fsspec URIs)
    output: str  # folder for the scored Parquet files, _summary.json and _SUCCESS
    speed: float | None = None  # 0 = full depth; a row leaves at the first layer less uncertain than this (default 0.5)
    max_accuracy_drop: float | None = None  # instead of speed: the fastest speed within this many accuracy points
    target_speedup: float | None = None  # instead of speed: the most accurate speed with this FLOP speed-up
    text_column: str = "text"
    id_column: str | None = None  # optional: a column that identifies rows (always carried)
    columns: list[str] | None = None  # input columns carried to the output; None: all of them
    replicas: str = "1"  # actors scoring in parallel: "N", or "MIN-MAX" for an autoscaling pool
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else CPU replicas
    cpus_per_replica: float = 1.0
    threads_per_replica: int | None = None  # torch threads in a CPU replica; None: cpus_per_replica
    batch_size: int = 1024  # rows handed to a replica per call
    micro_batch: int = 32  # rows per layer step inside a replica (the engine's)
    max_length: int | None = None  # tokens per text; None: the model's
    resume: bool = False  # finish an interrupted run of the same job
    overwrite: bool = False  # delete whatever the output folder holds first
    skip_bad_files: bool = False  # record unreadable input files in the summary instead of failing

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input or not all(isinstance(i, str) and i for i in self.input):
            raise ValueError(f"input must name at least one Parquet file, folder or glob, got {self.input!r}")
        for name in ("model", "output", "text_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"ScoreJobConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        budgets = [b for b in (self.max_accuracy_drop, self.target_speedup) if b is not None]
        if len(budgets) > 1 or (budgets and self.speed is not None):
            raise ValueError("give one of speed, max_accuracy_drop and target_speedup")
        if not budgets and self.speed is None:
            self.speed = 0.5
        # with a budget the speed stays None until run() picks it from the model's trade-off table
        if self.speed is not None and (isinstance(self.speed, bool) or not isinstance(self.speed, (int, float))
                                       or not 0.0 <= self.speed <= 1.0):
            raise ValueError(f"speed must be a number in [0, 1] (0 = full depth), got {self.speed!r}")
        for name in ("batch_size", "micro_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume keeps the output, overwrite deletes it")
        self.replica_range()  # checks replicas
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")

    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas from "N" or "MIN-MAX"."""
        text = str(self.replicas).strip()
        try:
            low, _, high = text.partition("-")
            bounds = (int(low), int(high or low))
        except ValueError:
            bounds = (0, 0)
        if not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(f"replicas must be N or MIN-MAX with 1 <= MIN <= MAX, got {self.replicas!r}")
        return bounds

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in IDENTITY}


# -- the driver: inputs and plan --------------------------------------------------------------


@dataclass
class Chunk:
    """One row group of one input file: the unit of reading, resuming and bookkeeping."""

    file: int  # index of the input file (sorted URIs)
    uri: str
    row_group: int
    first_row: int  # index in its file of the row group's first row
    rows: int

    @property
    def key(self) -> str:
        return f"{self.file:05d}-{self.row_group:05d}"


@dataclass
class Plan:
    chunks: list[Chunk]
    carried: pa.Schema  # the input columns the output carries, with their types
    bad_files: dict[str, str] = field(default_factory=dict)  # uri -> why it was skipped

    @property
    def output_schema(self) -> pa.Schema:
        result = [ENGINE_SCHEMA.field(name) for name in RESULT_COLUMNS]
        return pa.schema(list(self.carried) + result)


def expand_inputs(specs: list[str]) -> list[str]:
    """Files named by ``specs`` (files, folders searched recursively for ``*.parquet``, or
    globs) as sorted URIs; names starting with ``_`` or ``.`` are skipped, as Parquet readers do."""
    import fsspec

    found = set()
    for spec in specs:
        try:
            fs, path = fsspec.core.url_to_fs(spec)
            if any(c in path for c in "*?["):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.find(path) if p.endswith(".parquet")]
            elif fs.exists(path):
                paths = [path]
            else:
                paths = []
        except Exception as e:  # unknown protocol, missing backend, unreachable endpoint
            raise ValueError(f"{spec}: cannot be reached ({type(e).__name__}: {e}); check the URI, that its fsspec "
                             "backend is installed (s3fs, gcsfs, ...) and the credentials and network") from e
        for p in paths:
            if not p.rsplit("/", 1)[-1].startswith(("_", ".")) and not fs.isdir(p):
                found.add(fs.unstrip_protocol(p) if "://" in spec else p)
    if not found:
        raise ValueError(f"no input files matched {specs}")
    return sorted(found)


def plan(job: ScoreJobConfig) -> Plan:
    """Read every input's Parquet footer and cut the work into chunks; raises a one-line
    ValueError naming the file and column for bad input (a corrupt file is skipped and
    recorded instead with ``skip_bad_files``)."""
    import fsspec

    chunks: list[Chunk] = []
    carried: pa.Schema | None = None
    bad: dict[str, str] = {}
    for index, uri in enumerate(expand_inputs(job.input)):
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # not Parquet, truncated, unreadable
            if job.skip_bad_files:
                bad[uri] = f"{type(e).__name__}: {e}"
                continue
            raise ValueError(f"{uri}: not a readable Parquet file ({type(e).__name__}: {e}); fix or remove it, "
                             "or pass --skip-bad-files to record it in the summary and go on") from e
        if job.text_column not in schema.names:
            raise ValueError(f"{uri}: no text column {job.text_column!r}; it has {schema.names}")
        text_type = schema.field(job.text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise ValueError(f"{uri}: text column {job.text_column!r} must hold strings, it holds {text_type}")
        if carried is None:
            names = list(schema.names if job.columns is None else job.columns)
            if job.id_column is not None and job.id_column not in names:
                names.insert(0, job.id_column)
            clash = sorted(set(names) & set(RESULT_COLUMNS))
            if clash:
                raise ValueError(f"{uri}: input columns {clash} would clash with the output's; leave them out "
                                 "with --columns")
            missing = [n for n in names if n not in schema.names]
            if missing:
                raise ValueError(f"{uri}: no column(s) {missing} to carry; it has {schema.names}")
            carried = pa.schema([schema.field(n) for n in names])
        for f in carried:
            if f.name not in schema.names or not schema.field(f.name).type.equals(f.type):
                have = schema.field(f.name).type if f.name in schema.names else "nothing"
                raise ValueError(f"{uri}: column {f.name!r} must be {f.type} like in the first input, it has {have}")
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                chunks.append(Chunk(index, uri, g, first, rows))
            first += rows
    if carried is None:
        raise ValueError(f"no readable input among {job.input}: {bad}")
    return Plan(chunks, carried, bad)


# -- the pipeline's stages ----------------------------------------------------------------------


def read_chunk(batch: dict[str, np.ndarray], columns: list[str], text_column: str, rows_per_block: int):
    """Ray Data: the rows of the chunks in ``batch`` (one row per chunk), the carried columns,
    the text as ``__text`` and the bookkeeping ``__file``, ``__group``, ``__row``; yielded in
    blocks of at most ``rows_per_block`` rows, so a huge row group is never held whole."""
    import fsspec

    for i in range(len(batch["uri"])):
        fs, path = fsspec.core.url_to_fs(str(batch["uri"][i]))
        first = int(batch["first_row"][i])
        with fs.open(path, "rb") as f:
            for record_batch in pq.ParquetFile(f).iter_batches(
                    batch_size=rows_per_block, row_groups=[int(batch["row_group"][i])],
                    columns=sorted(set(columns) | {text_column})):
                table = pa.Table.from_batches([record_batch])
                n = table.num_rows
                table = table.select(columns).append_column("__text", table.column(text_column))
                table = table.append_column("__file", pa.array(np.full(n, batch["file"][i], dtype=np.int32)))
                table = table.append_column("__group", pa.array(np.full(n, batch["row_group"][i], dtype=np.int32)))
                yield table.append_column("__row", pa.array(np.arange(first, first + n, dtype=np.int64)))
                first += n


def tokenize_rows(batch: pa.Table, model: str, max_length: int) -> pa.Table:
    """Ray Data: ``__text`` -> ``__ids`` (token ids, or null), ``__error``, ``__truncated``.
    The tokenizer is loaded once per worker process."""
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_tokenizer(model)
    ids, errors, truncated = tokenize(_TOKENIZERS[model], batch.column("__text").to_pylist(), max_length)
    batch = batch.drop_columns(["__text"])
    batch = batch.append_column("__ids", pa.array(ids, type=pa.list_(pa.int32())))
    batch = batch.append_column("__error", pa.array(errors, type=pa.string()))
    return batch.append_column("__truncated", pa.array(truncated, type=pa.bool_()))


_TOKENIZERS: dict[str, Any] = {}  # model URI -> its tokenizer, per worker process


class Replica:
    """One scoring replica: the model loaded once, on its GPU when it has one. A plain class
    (Ray Data's callable-class pattern): ``Replica(...)(batch)`` works without Ray too."""

    def __init__(self, model: str, speed: float, micro_batch: int = 32, max_length: int | None = None,
                 device: str | None = None, threads: int | None = None, kill_once: str | None = None):
        import torch

        from pipeline.engine import Scorer
        from pipeline.model import FastBert

        self.kill_once, self.calls = kill_once, 0  # test-only fault injection, see ``run``
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.scorer = Scorer(FastBert.from_pretrained(model, map_location=device), speed=speed,
                             micro_batch=micro_batch, max_length=max_length, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows with ``__ids``, ``__error``, ``__truncated`` -> the same rows with the engine's
        columns (``prediction`` ... ``error``, ``flops``) and, for the summary, what a
        full-depth BERT would have spent (``__full_flops``) and ``__truncated_out``."""
        self.calls += 1
        if self.kill_once and self.calls == 2 and not os.path.exists(f"{self.kill_once}/killed"):
            open(f"{self.kill_once}/killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # this replica's process dies in the middle of the job
        ids = batch.column("__ids").to_pylist()
        truncated = batch.column("__truncated").to_numpy(zero_copy_only=False)
        scored = self.scorer.score_tokens(ids, batch.column("__error").to_pylist(), truncated)
        lengths = np.array([len(row) if row else 0 for row in ids], dtype=np.int64)
        full = np.zeros(len(ids), dtype=np.int64)
        ok = (lengths > 0) & np.array([e is None for e in scored.column("error").to_pylist()], dtype=bool)
        if ok.any():
            full[ok] = flop_account.full_depth_flops(self.scorer.model.config, lengths[ok])
        batch = batch.drop_columns(["__ids", "__error", "__truncated"])
        for name in scored.column_names:
            batch = batch.append_column(name, scored.column(name))
        batch = batch.append_column("__full_flops", pa.array(full))
        release_freed_memory()
        return batch.append_column("__truncated_out", pa.array(truncated & ok))


# glibc malloc settings of a CPU replica's process, read when it starts (so they travel as an
# environment variable): blocks of 4 MiB and more get their own mapping, in transparent huge
# pages, and go back to the OS when freed. With glibc's floating threshold the layers' tensors
# came from a heap that fragmented more with every call, and a replica's peak climbed over its
# calls; the numbers are in benchmarks/RESULTS.md (the scoring job: Memory).
REPLICA_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_replica_env() -> dict[str, Any] | None:
    """The runtime environment of CPU replicas: ``REPLICA_GLIBC_TUNABLES``, followed by the
    driver's own ``GLIBC_TUNABLES`` when it has some (glibc takes the last value of a tunable,
    so the user's settings win). None where this machine could not give the big blocks huge
    pages (not glibc >= 2.35, or transparent huge pages off): there the threshold alone made a
    replica 15% slower, and glibc's defaults are kept. Checked on the driver, for replicas on
    machines like it."""
    libc, version = platform.libc_ver()
    try:
        huge_pages = libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
        with open(THP_SETTING) as f:
            huge_pages = huge_pages and "[never]" not in f.read()
    except (OSError, ValueError):  # no THP setting to read (not Linux), an odd version string
        huge_pages = False
    if not huge_pages:
        return None
    tunables = ":".join(t for t in (REPLICA_GLIBC_TUNABLES, os.environ.get("GLIBC_TUNABLES")) if t)
    return {"env_vars": {"GLIBC_TUNABLES": tunables}}


def write_pieces(batch: pa.Table, output: str, schema: pa.Schema, layers: int) -> pa.Table:
    """Ray Data: write each run of rows of one chunk in ``batch`` as a Parquet piece (hidden
    temporary name, then moved into place) and then its JSON marker (rows, errors by kind,
    exit histogram, FLOPs); returns the markers, one row per piece."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    files, groups = batch.column("__file").to_numpy(), batch.column("__group").to_numpy()
    cuts = (np.flatnonzero((np.diff(files) != 0) | (np.diff(groups) != 0)) + 1).tolist()
    markers = []
    for start, stop in zip([0, *cuts], [*cuts, batch.num_rows]):
        part = batch.slice(start, stop - start)
        first = int(part.column("__row")[0].as_py())
        name = f"part-{int(files[start]):05d}-{int(groups[start]):05d}-{first:010d}.parquet"
        exits = part.column("exit_layer").drop_null().to_numpy().astype(np.int64)
        marker = {
            "file": int(files[start]), "row_group": int(groups[start]), "first_row": first, "rows": part.num_rows,
            "name": name, "errors": dict(Counter(e for e in part.column("error").to_pylist() if e is not None)),
            "exit_counts": np.bincount(exits, minlength=layers + 1)[1:].tolist(),
            "truncated": int(np.sum(part.column("__truncated_out").to_numpy(zero_copy_only=False))),
            "flops": int(np.sum(part.column("flops").fill_null(0).to_numpy())),
            "full_depth_flops": int(np.sum(part.column("__full_flops").to_numpy())),
        }
        table = pa.table([part.column(f.name).cast(f.type) for f in schema], schema=schema)
        with fs.open(f"{root}/.{name}.tmp", "wb") as f:
            pq.write_table(table, f)
        fs.mv(f"{root}/.{name}.tmp", f"{root}/{name}")
        with fs.open(f"{root}/{PIECES}/.{name}.json.tmp", "w") as f:
            json.dump(marker, f)
        fs.mv(f"{root}/{PIECES}/.{name}.json.tmp", f"{root}/{PIECES}/{name}.json")
        markers.append(json.dumps(marker))
    return pa.table({"marker": pa.array(markers, type=pa.string())})


# -- the driver -----------------------------------------------------------------------------------


def run(job: ScoreJobConfig, log=print, kill_once: str | None = None) -> dict[str, Any]:
    """Score the inputs into ``job.output`` on Ray (``ray.init`` first, or Ray starts a local
    instance); returns the summary also written to ``_summary.json``. Bad input raises a
    one-line ValueError before anything is written.

    ``kill_once=folder`` is for fault-tolerance tests: the first replica to reach its second
    batch kills its own process (SIGKILL) once, and marks ``folder/killed``."""
    import fsspec
    import ray

    start = time.perf_counter()
    config = load_config(job.model)  # a clear error when it is no FastBERT folder; the weights stay where they are
    choice = None
    if job.speed is None:  # a budget: the speed comes from the model's trade-off table
        table = load_table(job.model)
        point = choose_speed(table, job.max_accuracy_drop, job.target_speedup)
        choice = {"max_accuracy_drop": job.max_accuracy_drop, "target_speedup": job.target_speedup,
                  "table": {"data": table.data, "rows": table.rows}, "promised": dataclasses.asdict(point)}
        log(f"chose {describe_choice(point, table)}")
        job = dataclasses.replace(job, speed=point.speed, max_accuracy_drop=None, target_speedup=None)
    max_length = job.max_length or config.max_length
    if not 2 <= max_length <= config.max_positions:
        raise ValueError(f"max_length must be in [2, {config.max_positions}] for {job.model}, got {max_length}")
    layers = config.num_layers
    work = plan(job)
    fs, root = fsspec.core.url_to_fs(job.output)
    root = root.rstrip("/")
    done = _prepare_output(job, work, fs, root)
    todo = [c for c in work.chunks if c.key not in done]
    rows_todo = sum(c.rows for c in todo)
    log(f"scoring {rows_todo} rows in {len(todo)} row groups of {len({c.file for c in todo})} files"
        + (f" ({len(done)} row groups already done)" if done else "") + f" at speed {job.speed}")
    if todo:
        context = ray.data.DataContext.get_current()
        preserve = context.execution_options.preserve_order
        context.execution_options.preserve_order = True  # each file's rows stay in order
        try:
            _stream(job, work, todo, max_length, layers, kill_once)
        finally:
            context.execution_options.preserve_order = preserve
    seconds = time.perf_counter() - start
    summary = _summarise(job, work, fs, root, layers, seconds, rows_todo)
    summary["speed_choice"] = choice
    with fs.open(f"{root}/{SUMMARY_FILE}", "w") as f:
        json.dump(summary, f, indent=2)
    with fs.open(f"{root}/{SUCCESS_FILE}", "w") as f:
        f.write("")
    log(f"{summary['rows_out']} rows written to {job.output} in {seconds:.0f} s ({summary['rows_per_s']:.1f} rows/s); "
        f"mean exit layer {summary['mean_exit_layer']:.2f}, FLOP speed-up {summary['flop_speedup']:.2f}x, "
        f"{summary['error_rows']} rows with an error")
    return summary


def _stream(job: ScoreJobConfig, work: Plan, todo: list[Chunk], max_length: int, layers: int,
            kill_once: str | None) -> None:
    """The Ray Data pipeline over the chunks still to do: read, tokenise, score, write."""
    import ray

    gpus = job.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    low, high = job.replica_range()
    threads = job.threads_per_replica or max(1, int(job.cpus_per_replica))
    ds = ray.data.from_items([dataclasses.asdict(c) for c in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(read_chunk, batch_size=1, batch_format="numpy",
                        fn_kwargs={"columns": work.carried.names, "text_column": job.text_column,
                                   "rows_per_block": job.batch_size})
    ds = ds.map_batches(tokenize_rows, batch_format="pyarrow", batch_size=job.batch_size,
                        fn_kwargs={"model": job.model, "max_length": max_length})
    # the read task's output is coalesced into big blocks: cut it back into replica calls, so that
    # every replica gets work and a failed call redoes little
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(
        Replica, batch_format="pyarrow", batch_size=job.batch_size,
        fn_constructor_kwargs={"model": job.model, "speed": job.speed, "micro_batch": job.micro_batch,
                               "max_length": max_length, "device": "cuda" if gpus else "cpu",
                               "threads": None if gpus else threads, "kill_once": kill_once},
        # each replica holds its next call while it computes: with one call in flight a CPU
        # replica waited 0.1-0.25 s between calls for Ray Data to hand it the next (measured on
        # 2 cores: 1.6 s per replica over 10 calls, against 0.1 s with two in flight)
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2),
        # Ray Data's actors default to max_restarts=-1 and max_task_retries=-1: a replica that dies
        # is replaced and its batch retried (tests/test_scoring.py kills one)
        num_gpus=gpus, num_cpus=job.cpus_per_replica, runtime_env=None if gpus else cpu_replica_env())
    ds = ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"output": job.output, "schema": work.output_schema, "layers": layers})
    for _ in ds.iter_batches(batch_size=None):  # drives the stream; the pieces are written as it goes
        pass


def _markers(fs, root: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(fs.glob(f"{root}/{PIECES}/part-*.json")):
        with fs.open(path) as f:
            out.append(json.load(f))
    return out


def _prepare_output(job: ScoreJobConfig, work: Plan, fs, root: str) -> set[str]:
    """Refuse an output that holds another job's results (or this job's, without resume);
    on resume, return the chunks already done and remove the pieces of the others."""
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    if entries and job.overwrite:
        fs.rm(root, recursive=True)
        entries = []
    identity = {**job.identity(), "inputs": sorted({c.uri for c in work.chunks})}
    if entries:
        if JOB_FILE not in entries:
            raise ValueError(f"{job.output}: output folder already holds {sorted(entries)[:5]}, not from a scoring "
                             "job; pass --overwrite to replace it")
        with fs.open(f"{root}/{JOB_FILE}") as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(identity)):
            changed = sorted(k for k in identity if previous.get(k) != json.loads(json.dumps(identity[k])))
            raise ValueError(f"{job.output}: output holds the results of another job (differing: {changed}); "
                             "pass --overwrite to replace them")
        if not job.resume:
            raise ValueError(f"{job.output}: output already holds results of this job; pass --resume to finish "
                             "an interrupted run or --overwrite to start over")
    fs.makedirs(f"{root}/{PIECES}", exist_ok=True)
    with fs.open(f"{root}/{JOB_FILE}", "w") as f:
        json.dump(identity, f, indent=2)
    for name in (SUCCESS_FILE, SUMMARY_FILE):  # written again at the end
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    rows = Counter()
    for marker in _markers(fs, root):
        rows[f"{marker['file']:05d}-{marker['row_group']:05d}"] += marker["rows"]
    done = {c.key for c in work.chunks if rows[c.key] == c.rows}
    for path in fs.glob(f"{root}/part-*.parquet") + fs.glob(f"{root}/{PIECES}/part-*.json"):
        key = "-".join(path.rsplit("/", 1)[-1].split("-")[1:3])
        if key not in done:  # a piece of an unfinished row group: redone from scratch
            fs.rm(path)
    for path in fs.glob(f"{root}/.part-*.tmp") + fs.glob(f"{root}/{PIECES}/.part-*.tmp"):
        fs.rm(path)
    return done


def _summarise(job: ScoreJobConfig, work: Plan, fs, root: str, layers: int, seconds: float,
               rows_this_run: int) -> dict[str, Any]:
    markers = _markers(fs, root)
    rows_in = sum(c.rows for c in work.chunks)
    rows_out = sum(m["rows"] for m in markers)
    if rows_out != rows_in:
        raise RuntimeError(f"{job.output}: {rows_out} rows written for {rows_in} input rows; run again with --resume")
    errors = Counter()
    exits = np.zeros(layers, dtype=np.int64)
    for m in markers:
        errors.update(m["errors"])
        exits += np.asarray(m["exit_counts"], dtype=np.int64)
    flops, full = sum(m["flops"] for m in markers), sum(m["full_depth_flops"] for m in markers)
    scored = int(exits.sum())
    return {
        "model": job.model, "speed": job.speed, "output": job.output,
        "files": len({c.uri for c in work.chunks}), "bad_files": work.bad_files,
        "rows_in": rows_in, "rows_out": rows_out, "error_rows": sum(errors.values()), "errors": dict(errors),
        "truncated_rows": sum(m["truncated"] for m in markers),
        "mean_exit_layer": float((np.arange(1, layers + 1) * exits).sum() / scored) if scored else float("nan"),
        "exit_counts": exits.tolist(), "flop_speedup": full / flops if flops else float("nan"),
        "rows_this_run": rows_this_run, "wall_seconds": seconds,
        "rows_per_s": rows_this_run / seconds if seconds > 0 else float("nan"),
    }
