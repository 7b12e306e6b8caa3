"""Streaming Parquet-in/Parquet-out scoring with a trained FastBERT on Ray Data.

The driver (``run``) lists the input files, checks their footers (columns, types, a corrupt
file) and cuts the work into chunks, one per Parquet row group. The Ray Data pipeline then
streams the chunks through four stages:

1. read (CPU tasks, one per chunk): a chunk's rows, the carried columns plus the text, tagged
   with the chunk and each row's index in its file;
2. tokenise (in the same task): token ids, or the reason a row cannot be scored
   (``text.tokenize``, on the Rust tokenizer: these tasks import neither torch nor
   transformers); the chunk is cut into calls of ``rows_per_call`` rows and one with the rest;
3. score (an actor pool of ``Replica``: the model loaded once, on its GPU when it has one;
   each call runs the engine's early exit with dynamic re-batching on a batch of rows);
4. write (CPU tasks): each call's rows become a Parquet file
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

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import platform
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import flops as flop_account
from pipeline.cli import check_fields
from pipeline.config import SCHEMA as ENGINE_SCHEMA
from pipeline.config import MIN_DIFFERING_ROWS, check_speed, load_config, load_table
from pipeline.outputs import Manifest, UserError, absolute, claim_output, refuse_unsafe_output, write_file, write_json
from pipeline.ray_init import check_ray_address, init_ray
from pipeline.text import describe_columns, expand_inputs, load_tokenizer, tokenize
from pipeline.tradeoff import DEFAULT_BUDGET, answer_cost, describe_choice, exit_drift, pick_speed

# torch, transformers and the modules that import them (engine, model) are imported in the
# replicas alone: the driver and the read, tokenise and write tasks (which import this module
# in their own Ray workers) never need them, and on 2 cores those imports (about 2
# CPU-seconds per process) delayed the replicas' start

RESULT_COLUMNS = ("prediction", "probabilities", "exit_layer", "uncertainty", "error")
# with --audit: whether a row was also scored at full depth, and the teacher's answer for it
AUDIT_FIELDS = (pa.field("audited", pa.bool_()), pa.field("teacher_prediction", pa.string()))
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
PIECES = "_pieces"
ATTEMPT = "call"  # _pieces/call-FFFFF-GGGGG-RRRRR-<random>: a replica call began (the retry count)
# fields of the job that decide what the output holds: a resumed job must match them
IDENTITY = ("model", "speed", "text_column", "id_column", "columns", "max_length", "precision")


@dataclass
class ScoreJobConfig:
    """A scoring job: inputs, model, speed, output, and the replicas' resources."""

    model: str  # a FastBERT folder (local path or fsspec URI) written by save_pretrained or jobs.train
    input: list[str]  # Parquet files, folders or globs (local paths or fsspec URIs)
    output: str  # folder for the scored Parquet files, _summary.json and _SUCCESS
    speed: float | None = None  # 0 = full depth ... 1 = leave at layer 1; none given (nor a budget): the model's suggestion, the fastest within 0.5 point
    max_accuracy_drop: float | None = None  # instead of speed: the fastest speed within this many accuracy points
    target_speedup: float | None = None  # instead of speed: the most accurate speed with this FLOP speed-up
    text_column: str = "text"  # the input column that holds the texts
    id_column: str | None = None  # optional: a column that identifies rows (always carried)
    columns: list[str] | None = None  # input columns carried to the output; none given: all of them
    replicas: str = "1"  # actors scoring in parallel: "N", or "MIN-MAX" for an autoscaling pool
    gpus_per_replica: float | None = None  # GPUs of each replica; none given: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0  # Ray CPUs of each replica
    threads_per_replica: int | None = None  # torch threads in a CPU replica; none given: cpus_per_replica
    rows_per_call: int = 1024  # rows handed to a replica per call, all of one row group: one output file
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto (bf16 where the chip has it natively, else fp32), fp32, bf16 or fp16
    micro_batch: int = 32  # rows per layer step inside a replica (the engine's batch)
    max_length: int | None = None  # tokens per text; none given: the model's
    compile: bool = False  # torch.compile the encoder layers: 1.04-1.1x rows/s on CPU after a 20-45 s warm-up per replica (long jobs)
    resume: bool = False  # finish an interrupted run of the same job
    overwrite: bool = False  # remove an earlier run's files from the output first (only those)
    skip_bad_files: bool = False  # record unreadable input files in the summary instead of failing
    audit: float = 0.0  # also score this share of rows at full depth (the teacher), e.g. 0.01: the summary gives the speed's agreement with the teacher and its estimated accuracy cost
    price_per_hour: float | None = None  # what one replica costs per hour (its share of a node, or its GPU): the summary gives the cost per million rows
    verbose: bool = False  # show Ray's own logs and progress lines

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if isinstance(self.replicas, int) and not isinstance(self.replicas, bool):
            self.replicas = str(self.replicas)
        check_fields(self)
        if not self.input:
            raise UserError("input must name at least one Parquet file, folder or glob")
        self.model, self.output = absolute(self.model), absolute(self.output)
        self.input = [absolute(spec) for spec in self.input]
        budgets = [b for b in (self.max_accuracy_drop, self.target_speedup) if b is not None]
        if len(budgets) > 1 or (budgets and self.speed is not None):
            raise UserError("give one of speed, max_accuracy_drop and target_speedup")
        # without a speed, it stays None until run() picks it from the model's trade-off table
        if self.speed is not None:
            check_speed(self.speed)
        if self.resume and self.overwrite:
            raise UserError("resume and overwrite exclude each other: resume keeps the output, overwrite deletes it")
        self.replica_range()  # checks replicas
        if min(self.rows_per_call, self.micro_batch, self.threads_per_replica or 1) < 1 or \
                not self.cpus_per_replica > 0 or not (self.gpus_per_replica or 0) >= 0:
            raise UserError(f"rows_per_call, micro_batch and threads_per_replica must be >= 1, cpus_per_replica > 0 "
                            f"and gpus_per_replica >= 0, got {self.rows_per_call}, {self.micro_batch}, "
                            f"{self.threads_per_replica}, {self.cpus_per_replica} and {self.gpus_per_replica}")
        if not 0.0 <= self.audit <= 1.0:
            raise UserError(f"audit must be a share of rows in [0, 1] (0.01 audits 1%), got {self.audit!r}")
        if self.price_per_hour is not None and not self.price_per_hour >= 0:
            raise UserError(f"price_per_hour must be >= 0, got {self.price_per_hour!r}")

    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas from "N" or "MIN-MAX"."""
        text = str(self.replicas).strip()
        try:
            low, _, high = text.partition("-")
            bounds = (int(low), int(high or low))
        except ValueError:
            bounds = (0, 0)
        if not 1 <= bounds[0] <= bounds[1]:
            raise UserError(f"replicas must be N or MIN-MAX with 1 <= MIN <= MAX, got {self.replicas!r}")
        return bounds

    def identity(self) -> dict[str, Any]:
        identity = {name: getattr(self, name) for name in IDENTITY}
        if self.audit:  # it adds columns; without it, outputs of versions that had no audit still match
            identity["audit"] = self.audit
        return identity


# -- the driver: inputs and plan --------------------------------------------------------------


@dataclass
class Chunk:
    """One row group of one input file: the unit of reading, resuming and bookkeeping. (Cut
    into runs of calls, a large row group would be decoded again by each run's task: Parquet
    has no cheaper way into a row group.)"""

    file: int  # index of the input file (sorted URIs)
    uri: str
    row_group: int
    first_row: int  # index in its file of the row group's first row
    rows: int

    @property
    def key(self) -> str:
        return chunk_key(self.file, self.row_group)


def chunk_key(file: int, row_group: int) -> str:
    """A chunk's name in the output's piece names: ``FFFFF-GGGGG``."""
    return f"{file:05d}-{row_group:05d}"


# the output's schema metadata key (and the ``probabilities`` field's): the model's label names
# as a JSON list, entry i the label of probabilities[i]
LABELS_METADATA = "fastbert.labels"


@dataclass
class Plan:
    chunks: list[Chunk]
    carried: pa.Schema  # the input columns the output carries, in plain types (text.plain_type)
    bad_files: dict[str, str] = field(default_factory=dict)  # uri -> why it was skipped
    labels: list[str] | None = None  # the model's label names, in the order of the probabilities
    audit: bool = False  # the output has the audit's columns

    @property
    def output_schema(self) -> pa.Schema:
        """The carried columns and the results (and ``AUDIT_FIELDS`` with ``audit``); with
        ``labels``, the output names the label of each entry of ``probabilities``
        (``LABELS_METADATA``, on the schema and on that field)."""
        result = [ENGINE_SCHEMA.field(name) for name in RESULT_COLUMNS] + (list(AUDIT_FIELDS) if self.audit else [])
        if self.labels is None:
            return pa.schema(list(self.carried) + result)
        labels = json.dumps(list(self.labels))
        result = [f.with_metadata({LABELS_METADATA: labels}) if f.name == "probabilities" else f for f in result]
        return pa.schema(list(self.carried) + result, metadata={LABELS_METADATA: labels})


def plan(job: ScoreJobConfig, labels: list[str] | None = None) -> Plan:
    """Read every input's Parquet footer and cut the work into chunks; raises a one-line
    UserError naming the file and column for bad input (a corrupt file is skipped and
    recorded instead with ``skip_bad_files``). ``labels``: the model's label names, for the
    output's metadata; None: read from the model's config.json.

    Types are taken the way Spark reads a folder: the text may be ``string``, ``large_string``,
    ``string_view`` or dictionary-encoded (a pandas categorical), and differ so between files;
    the carried columns get their plain types (``text.plain_type``: files that differ only in
    such flavours carry one column, text-like columns come out as ``string``), and a column
    of nulls (the null type) fits any type. A file without rows (pandas writes an empty frame's
    columns as null or double) adds no work and is held to nothing but having the text column."""
    import fsspec

    from pipeline.text import is_text_type, plain_type

    chunks: list[Chunk] = []
    carried: list[pa.Field] | None = None  # fixed by the first file with rows
    source: dict[str, str] = {}  # carried column -> the file that fixed its type
    empty: tuple[str, pa.Schema] | None = None  # the first file without rows: the columns when no file has any
    bad: dict[str, str] = {}

    def columns_of(uri: str, schema: pa.Schema) -> list[pa.Field]:
        names = list(schema.names if job.columns is None else job.columns)
        if job.id_column is not None and job.id_column not in names:
            names.insert(0, job.id_column)
        clash = sorted(set(names) & {*RESULT_COLUMNS, *(f.name for f in AUDIT_FIELDS if job.audit)})
        if clash:
            raise UserError(f"{uri}: input columns {clash} would clash with the output's; leave them out "
                            "with --columns")
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise UserError(f"{uri}: no column(s) {missing} to carry; it has {schema.names}")
        # the text is carried as string, also from a file whose texts are all null (the null type)
        return [schema.field(n).with_type(pa.string() if n == job.text_column else plain_type(schema.field(n).type))
                for n in names]

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
            raise UserError(f"{uri}: not a readable Parquet file ({type(e).__name__}: {e}); fix or remove it, "
                            "or pass --skip-bad-files to record it in the summary and go on") from e
        if job.text_column not in schema.names:
            raise UserError(f"{uri}: no text column {job.text_column!r}; it has {describe_columns(schema)} "
                            "(pass --text-column)")
        if not meta.num_rows:  # no chunk; its types (any) neither fix the carried columns nor are checked
            empty = empty or (uri, schema)
            continue
        text_type = schema.field(job.text_column).type
        if not (is_text_type(text_type) or pa.types.is_null(text_type)):  # null type: every text is null
            raise UserError(f"{uri}: text column {job.text_column!r} must hold strings, it holds {text_type}")
        if carried is None:
            carried = columns_of(uri, schema)
            source = {f.name: uri for f in carried}
        for i, f in enumerate(carried):
            if f.name not in schema.names:
                raise UserError(f"{uri}: column {f.name!r} must be {f.type} like in {source[f.name]}, it has nothing")
            have = schema.field(f.name).type
            kind = plain_type(have)
            if f.name == job.text_column or pa.types.is_null(kind):
                continue  # the text was checked above; a column of nulls fits any type
            if pa.types.is_null(f.type):  # only nulls so far: this file fixes the type
                carried[i], source[f.name] = f.with_type(kind), uri
            elif kind != f.type:
                raise UserError(f"{uri}: column {f.name!r} must be {f.type} like in {source[f.name]}, it has {have}")
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                chunks.append(Chunk(index, uri, g, first, rows))
            first += rows
    if carried is None:
        if empty is None:
            raise UserError(f"no readable input among {job.input}: {bad}")
        carried = columns_of(*empty)  # only files without rows: nothing to score, the columns of the first
    if labels is None:
        labels = load_config(job.model).labels
    return Plan(chunks, pa.schema(carried), bad, list(labels), audit=job.audit > 0)


# -- the pipeline's stages ----------------------------------------------------------------------


def read_chunk(batch: dict[str, np.ndarray], columns: list[str], text_column: str, rows_per_block: int,
               schema: pa.Schema | None = None):
    """Ray Data: the rows of the chunks in ``batch`` (one row per chunk), the carried columns,
    the text as ``__text`` and the bookkeeping ``__file``, ``__group``, ``__row``; yielded in
    blocks of at most ``rows_per_block`` rows, so a huge row group is never held whole.

    Every block has the same types whichever flavour its file stores (Ray Data could not
    concatenate a dictionary-encoded or ``large_string`` block with a ``string`` one): the
    text as ``string``, a carried column as in ``schema`` (the plan's ``carried``) or, without
    it, in its plain type (``text.plain_type``)."""
    import fsspec

    from pipeline.text import plain_type

    def plain(field: pa.Field) -> pa.Field:
        if schema is not None and field.name in schema.names:
            return field.with_type(schema.field(field.name).type)
        return field.with_type(pa.string() if field.name == text_column else plain_type(field.type))

    for i in range(len(batch["uri"])):
        fs, path = fsspec.core.url_to_fs(str(batch["uri"][i]))
        first = int(batch["first_row"][i])
        with fs.open(path, "rb") as f:
            for record_batch in pq.ParquetFile(f).iter_batches(
                    batch_size=rows_per_block, row_groups=[int(batch["row_group"][i])],
                    columns=sorted(set(columns) | {text_column})):
                table = pa.Table.from_batches([record_batch])
                n = table.num_rows
                text = table.column(text_column).cast(pa.string())
                table = table.select(columns).replace_schema_metadata(None)  # e.g. pandas': it differs by file
                for j, f in enumerate(table.schema):  # column by column: a table of no columns keeps its rows
                    table = table.set_column(j, plain(f), table.column(j).cast(plain(f).type))
                table = table.append_column("__text", text)
                table = table.append_column("__file", pa.array(np.full(n, batch["file"][i], dtype=np.int32)))
                table = table.append_column("__group", pa.array(np.full(n, batch["row_group"][i], dtype=np.int32)))
                yield table.append_column("__row", pa.array(np.arange(first, first + n, dtype=np.int64)))
                first += n


def tokenize_rows(batch: pa.Table, model: str, max_length: int) -> pa.Table:
    """Ray Data: ``__text`` -> ``__ids`` (token ids, or null), ``__error``, ``__truncated``, and
    each row's share of the CPU time spent on it (``__cpu_s``; the replica adds its own).
    The tokenizer is loaded once per worker process."""
    cpu = time.process_time()
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_tokenizer(model)
    ids, errors, truncated = tokenize(_TOKENIZERS[model], batch.column("__text").to_pylist(), max_length)
    batch = batch.drop_columns(["__text"])
    batch = batch.append_column("__ids", pa.array(ids, type=pa.list_(pa.int32())))
    batch = batch.append_column("__error", pa.array(errors, type=pa.string()))
    batch = batch.append_column("__truncated", pa.array(truncated, type=pa.bool_()))
    share = (time.process_time() - cpu) / max(1, batch.num_rows)
    return batch.append_column("__cpu_s", pa.array(np.full(batch.num_rows, share)))


_TOKENIZERS: dict[str, Any] = {}  # model URI -> its tokenizer, per worker process


def read_and_tokenize(batch: dict[str, np.ndarray], columns: list[str], text_column: str, rows_per_block: int,
                      schema: pa.Schema, model: str, max_length: int):
    """Ray Data: ``read_chunk`` then ``tokenize_rows``, block by block, in one function: one
    task per chunk, so that no block downstream holds rows of two chunks (as separate
    stages, Ray Data fuses them into tasks of several chunks and batches across them)."""
    for block in read_chunk(batch, columns, text_column, rows_per_block, schema):
        yield tokenize_rows(block, model, max_length)


class Replica:
    """One scoring replica: the model loaded once, on its GPU when it has one. A plain class
    (Ray Data's callable-class pattern): ``Replica(...)(batch)`` works without Ray too.
    ``audit``: the share of rows also scored at full depth (``audited_rows``)."""

    def __init__(self, model: str, speed: float, micro_batch: int = 32, max_length: int | None = None,
                 device: str | None = None, threads: int | None = None,
                 precision: str = "auto", compile: bool = False, audit: float = 0.0, output: str | None = None):
        import fsspec
        import torch

        from pipeline.engine import Scorer
        from pipeline.model import FastBert

        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        fastbert = FastBert.from_pretrained(model, map_location=device)
        self.scorer = Scorer(fastbert, speed=speed, micro_batch=micro_batch, max_length=max_length, device=device,
                             precision=precision, compile=compile)
        self.audit = audit
        # the audit's full-depth pass: the same weights, no students (speed 0)
        self.teacher = Scorer(fastbert, speed=0.0, micro_batch=micro_batch, max_length=max_length, device=device,
                              precision=precision) if audit and speed > 0 else None
        # the job's output folder: each call starts by leaving a mark there, so that the summary
        # counts the calls that were tried again after a replica or its node was lost
        self.output = fsspec.core.url_to_fs(output) if output is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows with ``__ids``, ``__error``, ``__truncated``, ``__cpu_s`` -> the same rows with
        the engine's columns (``prediction`` ... ``error``, ``flops``), the audit's
        (``audited``, ``teacher_prediction``, ``__audit_cost``) with ``audit``, and, for the
        summary, what a full-depth BERT would have spent (``__full_flops``),
        ``__truncated_out``, the precision the replica runs in (``__precision``) and each
        row's share of the call's time (``__busy_s``) and CPU time (added to ``__cpu_s``)."""
        wall, cpu = time.perf_counter(), time.process_time()
        if self.output is not None and batch.num_rows:
            fs, root = self.output
            first = "-".join(f"{int(batch.column(c)[0].as_py()):05d}" for c in ("__file", "__group", "__row"))
            try:
                with fs.open(f"{root.rstrip('/')}/{PIECES}/{ATTEMPT}-{first}-{uuid.uuid4().hex[:12]}", "wb"):
                    pass  # an empty file: one request
            except OSError:  # a count, not the job: a store that refuses it fails no call
                pass
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
        if self.audit:
            where = [batch.column(c).to_numpy() if c in batch.column_names else np.arange(batch.num_rows) * (c == "__row")
                     for c in ("__file", "__row")]  # (file, row); without them (no Ray), the rows' positions
            audited = ok & audited_rows(*where, self.audit)
            teacher, cost = self._audit(scored, [ids[i] for i in np.flatnonzero(audited)], audited)
            batch = batch.append_column("audited", pa.array(audited))
            batch = batch.append_column("teacher_prediction", pa.array(teacher, pa.string()))
            batch = batch.append_column("__audit_cost", pa.array(cost))
        batch = batch.append_column("__full_flops", pa.array(full))
        release_freed_memory()
        batch = batch.append_column("__precision", pa.array([self.scorer.precision] * batch.num_rows, pa.string()))
        batch = batch.append_column("__truncated_out", pa.array(truncated & ok))
        n = max(1, batch.num_rows)
        batch = batch.append_column("__busy_s", pa.array(np.full(batch.num_rows, (time.perf_counter() - wall) / n)))
        cpu_s = (time.process_time() - cpu) / n
        if "__cpu_s" not in batch.column_names:
            return batch.append_column("__cpu_s", pa.array(np.full(batch.num_rows, cpu_s)))
        cpu_s = batch.column("__cpu_s").to_numpy() + cpu_s  # the tokeniser's share and the replica's
        return batch.set_column(batch.schema.get_field_index("__cpu_s"), "__cpu_s", pa.array(cpu_s))

    def _audit(self, scored: pa.Table, ids: list[list[int]], audited: np.ndarray) -> tuple[list, np.ndarray]:
        """The teacher's answer for the ``audited`` rows (None elsewhere) and, per row, the
        accuracy the chosen speed is expected to lose against the teacher
        (``tradeoff.answer_cost``; its mean estimates the accuracy difference when the teacher
        is calibrated)."""
        rows = np.flatnonzero(audited)  # (A,)
        teacher = [None] * scored.num_rows
        cost = np.zeros(scored.num_rows)
        if not len(rows):
            return teacher, cost
        chosen = [scored.column("prediction")[int(i)].as_py() for i in rows]
        if self.teacher is None:  # speed 0: every answer is the teacher's
            for i, label in zip(rows, chosen):
                teacher[i] = label
            return teacher, cost
        full = self.teacher.score_tokens(ids)
        probs = np.asarray(full.column("probabilities").to_pylist(), dtype=np.float64)  # (A, C)
        index = {label: k for k, label in enumerate(self.scorer.labels)}
        cost[rows] = answer_cost(probs, np.array([index[label] for label in chosen]))  # (A,)
        for j, i in enumerate(rows):
            teacher[i] = full.column("prediction")[j].as_py()
        return teacher, cost


def audited_rows(files: np.ndarray, rows: np.ndarray, share: float) -> np.ndarray:
    """Which rows the audit scores at full depth: a pseudo-random ``share`` of them, fixed by
    each row's (input file, row) so that a retried call or a resumed job audits the same rows
    (a splitmix64 hash of the two, as a uniform number in [0, 1))."""
    x = (files.astype(np.uint64) << np.uint64(40)) ^ rows.astype(np.uint64)  # (N,)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < share  # (N,) bool


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Every call's tensors have other shapes, and without this a replica's memory grew with the
    rows it had scored (478 -> 1,139 MB over 8 calls of 1,024 rows; flat at 574 MB with it)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _load_libc()


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
    exit histogram, FLOPs); returns the markers, one row per piece. ``schema``: the plan's
    ``output_schema``, its metadata (the labels) included; every piece is written in it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    files, groups = batch.column("__file").to_numpy(), batch.column("__group").to_numpy()
    cuts = (np.flatnonzero((np.diff(files) != 0) | (np.diff(groups) != 0)) + 1).tolist()
    markers = []
    for start, stop in zip([0, *cuts], [*cuts, batch.num_rows]):
        cpu = time.process_time()
        part = batch.slice(start, stop - start)
        first = int(part.column("__row")[0].as_py())
        name = f"part-{chunk_key(int(files[start]), int(groups[start]))}-{first:010d}.parquet"
        exits = part.column("exit_layer").drop_null().to_numpy().astype(np.int64)
        marker = {
            "file": int(files[start]), "row_group": int(groups[start]), "first_row": first, "rows": part.num_rows,
            "name": name, "errors": dict(Counter(e for e in part.column("error").to_pylist() if e is not None)),
            "exit_counts": np.bincount(exits, minlength=layers + 1)[1:].tolist(),
            "truncated": int(np.sum(part.column("__truncated_out").to_numpy(zero_copy_only=False))),
            "flops": int(np.sum(part.column("flops").fill_null(0).to_numpy())),
            "full_depth_flops": int(np.sum(part.column("__full_flops").to_numpy())),
            "precision": part.column("__precision")[0].as_py(),
            "busy_seconds": float(np.sum(part.column("__busy_s").to_numpy())),  # the replica's time on these rows
        }
        if "audited" in part.column_names:
            audited = part.column("audited").to_numpy(zero_copy_only=False)
            agree = pc.fill_null(pc.equal(part.column("prediction"), part.column("teacher_prediction")), False)
            agree = agree.to_numpy(zero_copy_only=False)  # (rows,) bool: null where not audited
            cost = part.column("__audit_cost").to_numpy()
            marker["audit"] = {"rows": int(audited.sum()), "agree": int((agree & audited).sum()),
                               "cost": float(cost.sum()), "cost_squared": float((cost ** 2).sum())}
        table = pa.table([part.column(f.name).cast(f.type) for f in schema], schema=schema)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        write_file(fs, f"{root}/{name}", buffer.getvalue().to_pybytes())  # whole, under a hidden name first
        # CPU time: the tokeniser's, the replica's and this piece's writing
        marker["cpu_seconds"] = float(np.sum(part.column("__cpu_s").to_numpy())) + time.process_time() - cpu
        write_file(fs, f"{root}/{PIECES}/{name}.json", json.dumps(marker))
        markers.append(json.dumps(marker))
    return pa.table({"marker": pa.array(markers, type=pa.string())})


# -- the driver -----------------------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(f"jobs.score: {line}", file=sys.stderr, flush=True)


def run(job: ScoreJobConfig, log=print, warn=_stderr) -> dict[str, Any]:
    """Score the inputs into ``job.output`` on Ray; returns the summary also written to
    ``_summary.json``. Every mistake that the arguments, the model's config and the inputs'
    Parquet footers show raises a one-line ``UserError`` before Ray starts or anything is
    written. Ray starts a local instance unless one is running or ``RAY_ADDRESS`` names a
    cluster. A job that already finished with the same arguments is not run again: its
    summary is returned."""
    import fsspec

    check_ray_address()
    start, started_at = time.perf_counter(), time.time()
    config = load_config(job.model)  # a clear error when it is no FastBERT folder; the weights stay where they are
    choice = None
    if job.speed is None:  # the speed comes from the model's table: a broken one is an error
        table = load_table(job.model)
    else:  # only for the drift check: a table that cannot be read skips it
        try:
            table = load_table(job.model)
        except (OSError, ValueError, KeyError, TypeError):
            table = None
    speed, point = pick_speed(table, job.speed, job.max_accuracy_drop, job.target_speedup)
    if point is not None:  # a budget, or none given: the speed comes from the model's trade-off table
        budget = job.max_accuracy_drop if job.max_accuracy_drop is not None or job.target_speedup is not None \
            else DEFAULT_BUDGET
        choice = {"max_accuracy_drop": budget, "target_speedup": job.target_speedup,
                  "table": {"data": table.data, "rows": table.rows}, "promised": dataclasses.asdict(point)}
        log(f"chose {describe_choice(point, table)}")
    job = dataclasses.replace(job, speed=speed, max_accuracy_drop=None, target_speedup=None)
    max_length = job.max_length or config.max_length
    layers = config.num_layers
    if not 2 <= max_length <= config.max_positions:
        raise UserError(f"--max-length must be in [2, {config.max_positions}] for {job.model}, got {max_length}")
    refuse_unsafe_output(job.output, [*(("--input", spec) for spec in job.input), ("--model", job.model)])
    work = plan(job, labels=config.labels)
    fs, root = fsspec.core.url_to_fs(job.output)
    root = root.rstrip("/")
    done = _prepare_output(job, work, fs, root)
    if done is None:  # finished earlier with these arguments
        with fs.open(f"{root}/{SUMMARY_FILE}") as f:
            summary = json.load(f)
        log(f"{job.output} already holds the complete output of this job ({summary['rows_out']} rows): nothing to do")
        return summary
    todo = [c for c in work.chunks if c.key not in done]
    rows_todo = sum(c.rows for c in todo)
    log(f"scoring {rows_todo} rows in {len(todo)} row groups of {len({c.file for c in todo})} files"
        + (f" ({len(done)} row groups already done)" if done else "") + f" at speed {job.speed}")
    gpus, arrivals = 0.0, []  # the GPUs of each replica; when this run's pieces reached the driver
    if todo:
        import ray

        init_ray(dashboard=False, verbose=job.verbose, worker_output=False)  # only now: every mistake above is reported without Ray
        context = ray.data.DataContext.get_current()
        preserve = context.execution_options.preserve_order
        context.execution_options.preserve_order = True  # each file's rows stay in order
        try:
            gpus, arrivals = _stream(job, work, todo, max_length, layers)
        finally:
            context.execution_options.preserve_order = preserve
    seconds = time.perf_counter() - start
    markers = _markers(fs, root)
    calls = fs.glob(f"{root}/{PIECES}/{ATTEMPT}-*")
    summary = _summarise(job, work, markers, layers, seconds, rows_todo)
    # replica calls begun more than once: a replica (or its node) was lost and Ray Data tried them again
    summary["retried_calls"] = len(calls) - len({c.rsplit("/", 1)[-1].rsplit("-", 1)[0] for c in calls})
    if calls:
        fs.rm(calls)  # counted: they have done their part
    ours = [m for m in markers if chunk_key(m["file"], m["row_group"]) not in done]  # this run's pieces
    summary.update(_costs(job, ours, arrivals, started_at, gpus))
    summary["speed_choice"] = choice
    summary["audit"] = _audit_summary(job, markers) if job.audit else None
    drift = exit_drift(table, job.speed, list(summary["exit_counts"].values())) if table is not None else None
    summary["drift"] = dataclasses.asdict(drift) if drift is not None else None
    if drift is not None and drift.drifted:
        summary["drift"]["warning"] = (
            f"these rows leave the model at other layers than its {drift.validation_rows} validation rows did at "
            f"speed {drift.speed} (total variation {drift.total_variation:.2f} > {drift.threshold:.2f}): the "
            "accuracy its trade-off table promised may not hold on them; audit a sample (--audit 0.01) or score at "
            "full depth (--speed 0) to see")
        warn(f"warning: {summary['drift']['warning']}")
    if summary["flop_speedup"] < 1:
        summary["note"] = (f"at speed {job.speed} few rows leave before the last layer, and every layer a row "
                           "passes also runs its student classifier, so this costs more than full depth"
                           + (": choose a higher --speed, or a budget (--max-accuracy-drop)" if job.speed < 1 else
                              ": the model's students are not confident enough to save anything here"))
    write_json(fs, f"{root}/{SUMMARY_FILE}", summary)
    write_file(fs, f"{root}/{SUCCESS_FILE}", "")
    log(f"{summary['rows_out']} rows written to {job.output} in {seconds:.0f} s ({summary['rows_per_s']:.1f} rows/s); "
        f"mean exit layer {summary['mean_exit_layer']:.2f}, FLOP speed-up {summary['flop_speedup']:.2f}x, "
        f"{summary['precision']}, {summary['error_rows']} rows with an error, {summary['truncated_rows']} texts truncated to "
        f"{max_length} tokens" + (f"; {summary['note']}" if "note" in summary else ""))
    if summary["startup_seconds"] is not None:
        log(f"start-up {summary['startup_seconds']:.1f} s (Ray, replicas, model load, the first call)"
            + (f", then {summary['steady_rows_per_s']:.1f} rows/s" if summary["steady_rows_per_s"] else "")
            + f"; {summary['cpu_seconds_per_million_rows']:.0f} CPU-s"
            + (f" and {summary['gpu_seconds_per_million_rows']:.0f} GPU-s" if summary["gpu_seconds_per_million_rows"] else "")
            + " per million rows"
            + (f", {summary['cost_per_million_rows']:.4g} per million rows at {job.price_per_hour:g} per replica-hour "
               "of work" if summary["cost_per_million_rows"] is not None else ""))
    audit = summary["audit"]
    if audit is not None and audit["rows"]:
        cost = audit["estimated_cost_ci95"]
        log(f"audit of {audit['rows']} rows at full depth: {100 * audit['agreement']:.2f}% agree with the teacher "
            f"(95% interval {100 * audit['agreement_ci95'][0]:.2f}-{100 * audit['agreement_ci95'][1]:.2f}%); "
            f"estimated accuracy cost {audit['estimated_cost_points']:.2f} points"
            + (f" (95% interval {cost[0]:.2f} to {cost[1]:.2f})" if cost else "")
            + f", at most {audit['max_cost_points']:.2f} (95%)")
    return summary


def _stream(job: ScoreJobConfig, work: Plan, todo: list[Chunk], max_length: int, layers: int
            ) -> tuple[float, list[tuple[float, int]]]:
    """The Ray Data pipeline over the chunks still to do: read, tokenise, score, write; returns
    the GPUs of each replica and when the driver got the pieces written (the time, how many)."""
    import ray

    gpus = job.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    low, high = job.replica_range()
    threads = job.threads_per_replica or max(1, int(job.cpus_per_replica))
    ds = ray.data.from_items([dataclasses.asdict(c) for c in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(read_and_tokenize, batch_size=1, batch_format="numpy",
                        fn_kwargs={"columns": work.carried.names, "text_column": job.text_column,
                                   "rows_per_block": job.rows_per_call, "schema": work.carried,
                                   "model": job.model, "max_length": max_length})
    # a read task's output is coalesced into big blocks: cut it back into replica calls, so that
    # every replica gets work and a failed call redoes little. A replica call is one block
    # (batch_size None), all of one chunk: with a batch size, Ray Data joined a chunk's last block
    # to the next one's first, and the write split that call into two pieces, one of them a
    # sliver (files of 8 rows in benchmarks.million)
    ds = ds.repartition(target_num_rows_per_block=job.rows_per_call)
    ds = ds.map_batches(
        Replica, batch_format="pyarrow", batch_size=None,
        fn_constructor_kwargs={"model": job.model, "speed": job.speed, "micro_batch": job.micro_batch,
                               "max_length": max_length, "device": "cuda" if gpus else "cpu",
                               "threads": None if gpus else threads,
                               "precision": job.precision, "compile": job.compile, "audit": job.audit,
                               "output": job.output},
        # each replica holds its next call while it computes: with one call in flight a CPU
        # replica waited 0.1-0.25 s between calls for Ray Data to hand it the next (measured on
        # 2 cores: 1.6 s per replica over 10 calls, against 0.1 s with two in flight)
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2),
        # Ray Data's actors default to max_restarts=-1 and max_task_retries=-1: a replica that dies
        # is replaced and its batch retried (tests/test_scoring.py kills one)
        num_gpus=gpus, num_cpus=job.cpus_per_replica, runtime_env=None if gpus else cpu_replica_env())
    ds = ds.map_batches(write_pieces, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"output": job.output, "schema": work.output_schema, "layers": layers})
    # drive the stream without fetching its output (the pieces' markers, also on storage): a driver
    # that fetched every block touched ever more of the object store's shared pages (its RSS grew
    # +14-17% over a million rows in benchmarks.million; +5% without the fetches)
    arrivals = []  # (when the driver got it, pieces in it), on the driver's clock
    for bundle in ds.iter_internal_ref_bundles():
        arrivals.append((time.time(), bundle.num_rows() or 0))  # a block of unknown size counts none
    return float(gpus), arrivals


def _markers(fs, root: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(fs.glob(f"{root}/{PIECES}/part-*.json")):
        with fs.open(path) as f:
            out.append(json.load(f))
    return out


# what a scoring job writes into its output folder (besides _manifest.json and hidden temporary files)
OWNS = ["part-*.parquet", f"{PIECES}/part-*.json", f"{PIECES}/{ATTEMPT}-*", SUMMARY_FILE, SUCCESS_FILE]


def _prepare_output(job: ScoreJobConfig, work: Plan, fs, root: str) -> set[str] | None:
    """Make the output this job's folder (``outputs.claim_output``: a folder holding anything
    else is refused). For a folder of an earlier run of this job: None when it finished with
    the same arguments; on resume, the chunks already done (the pieces of the others are
    removed); without resume, refused."""
    identity = json.loads(json.dumps({**job.identity(), "inputs": sorted({c.uri for c in work.chunks})}))
    previous = claim_output(job.output, Manifest("jobs.score", OWNS, identity), job.overwrite)
    if previous is not None:
        if previous.arguments != identity:
            changed = sorted(k for k in identity if previous.arguments.get(k) != identity[k])
            raise UserError(f"--output {job.output} holds the results of a scoring job with other arguments "
                            f"(differing: {', '.join(changed)}); run it with those, or pass --overwrite to replace "
                            "its files, or choose another --output")
        if fs.exists(f"{root}/{SUCCESS_FILE}") and fs.exists(f"{root}/{SUMMARY_FILE}"):
            return None
        if not job.resume:
            raise UserError(f"--output {job.output} holds an unfinished run of this job: pass --resume to finish it "
                            "or --overwrite to start over")
    fs.makedirs(f"{root}/{PIECES}", exist_ok=True)
    for name in (SUCCESS_FILE, SUMMARY_FILE):  # written again at the end
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    written = {path.rsplit("/", 1)[-1] for path in fs.glob(f"{root}/part-*.parquet")}
    rows = Counter()
    for marker in _markers(fs, root):
        if marker["name"] in written:  # else its piece is gone (a run stopped while removing pieces)
            rows[chunk_key(marker["file"], marker["row_group"])] += marker["rows"]
    done = {c.key for c in work.chunks if rows[c.key] == c.rows}
    # markers first: a run stopped half way through leaves no marker without its piece
    for path in fs.glob(f"{root}/{PIECES}/part-*.json") + fs.glob(f"{root}/part-*.parquet"):
        key = "-".join(path.rsplit("/", 1)[-1].split("-")[1:3])
        if key not in done:  # a piece of an unfinished row group: redone from scratch
            fs.rm(path)
    for path in fs.glob(f"{root}/.part-*.tmp-*") + fs.glob(f"{root}/{PIECES}/.part-*.tmp-*"):  # write_file's
        fs.rm(path)
    for path in fs.glob(f"{root}/{PIECES}/{ATTEMPT}-*"):  # the calls' marks: this run counts its own
        fs.rm(path)
    return done


def _summarise(job: ScoreJobConfig, work: Plan, markers: list[dict[str, Any]], layers: int, seconds: float,
               rows_this_run: int) -> dict[str, Any]:
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
        "model": job.model, "labels": work.labels, "speed": job.speed, "output": job.output,
        "files": len({c.uri for c in work.chunks}), "bad_files": work.bad_files,
        "rows_in": rows_in, "rows_out": rows_out, "error_rows": sum(errors.values()), "errors": dict(errors),
        "truncated_rows": sum(m["truncated"] for m in markers),
        # what the replicas ran in ("auto" resolved on each: bf16 where the chip has it natively)
        "precision": ", ".join(sorted({m["precision"] for m in markers if m.get("precision")})) or None,
        "mean_exit_layer": float((np.arange(1, layers + 1) * exits).sum() / scored) if scored else float("nan"),
        # rows by the layer they left at, keyed "1" .. "L" (the markers keep a plain list)
        "exit_counts": {str(k): int(n) for k, n in enumerate(exits, start=1)},
        "flop_speedup": full / flops if flops else float("nan"),
        "rows_this_run": rows_this_run, "wall_seconds": seconds,
        "rows_per_s": rows_this_run / seconds if seconds > 0 else float("nan"),
    }


def _costs(job: ScoreJobConfig, pieces: list[dict[str, Any]], arrivals: list[tuple[float, int]],
           started_at: float, gpus: float) -> dict[str, Any]:
    """Start-up apart from the steady state, and the compute per million rows, of this run's
    ``pieces`` (markers) and their ``arrivals`` at the driver (time, pieces; one clock). Start-up
    is the time to the first arrival (Ray, the replicas, the model's load and the first call);
    the steady rows/s count the rows that arrived after it over the time to the last, the pieces
    taken in the stream's order (chunks, then rows: ``preserve_order``), and are None where the
    arrivals do not count the pieces. CPU-seconds: the tokenisers', replicas' and writers'
    processes; replica-seconds: the replicas' busy time (inside calls, the audit's full-depth
    pass included; not their start or idle time), and from it the GPU-seconds (times each
    replica's GPUs) and the cost (times ``price_per_hour``)."""
    rows = sum(m["rows"] for m in pieces)
    out: dict[str, Any] = {"startup_seconds": None, "steady_rows_per_s": None, "cpu_seconds_per_million_rows": None,
                           "gpu_seconds_per_million_rows": None, "replica_busy_seconds_per_million_rows": None,
                           "cost_per_million_rows": None}
    if not rows:
        return out
    busy, per_million = sum(m["busy_seconds"] for m in pieces), 1e6 / rows
    out.update(cpu_seconds_per_million_rows=sum(m["cpu_seconds"] for m in pieces) * per_million,
               gpu_seconds_per_million_rows=busy * gpus * per_million,
               replica_busy_seconds_per_million_rows=busy * per_million)
    if job.price_per_hour is not None:
        out["cost_per_million_rows"] = busy * per_million / 3600 * job.price_per_hour
    if arrivals:
        out["startup_seconds"] = arrivals[0][0] - started_at
        first, last = arrivals[0][0], arrivals[-1][0]
        if sum(n for _, n in arrivals) == len(pieces) and last > first:
            ordered = sorted(pieces, key=lambda m: (m["file"], m["row_group"], m["first_row"]))
            after = sum(m["rows"] for m in ordered[arrivals[0][1]:])  # the rows of every arrival but the first
            out["steady_rows_per_s"] = after / (last - first)
    return out


def _audit_summary(job: ScoreJobConfig, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The audit over the whole output: the share of audited rows whose answer is the
    teacher's, with a 95% Wilson interval; the estimated accuracy cost (points: the mean of
    ``Replica._audit``'s per-row costs, right when the teacher is calibrated; a normal 95%
    interval once ``MIN_DIFFERING_ROWS`` rows disagree, None before: fewer decide nothing); and
    its bound, the disagreement at the upper end of its interval (were every disagreement a row
    the teacher had right)."""
    n = sum(m["audit"]["rows"] for m in markers if "audit" in m)
    agree = sum(m["audit"]["agree"] for m in markers if "audit" in m)
    cost = sum(m["audit"]["cost"] for m in markers if "audit" in m)
    squared = sum(m["audit"]["cost_squared"] for m in markers if "audit" in m)
    out: dict[str, Any] = {"share": job.audit, "rows": n}
    if not n:
        return {**out, "agreement": None, "agreement_ci95": None, "estimated_cost_points": None,
                "estimated_cost_ci95": None, "max_cost_points": None}
    z = 1.959964
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = max(0.0, centre - half)
    mean = cost / n
    interval = None
    if n - agree >= MIN_DIFFERING_ROWS:
        spread = z * math.sqrt(max(squared - n * mean * mean, 0.0) / (n - 1) / n)  # sample variance
        interval = [100 * max(0.0, mean - spread), 100 * (mean + spread)]
    return {**out, "agreement": p, "agreement_ci95": [low, min(1.0, centre + half)],
            "estimated_cost_points": 100 * mean, "estimated_cost_ci95": interval, "max_cost_points": 100 * (1 - low)}
