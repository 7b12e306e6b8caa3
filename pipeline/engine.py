"""Adaptive early-exit inference on batches, with compaction and dynamic re-batching.

One call of a ``Scorer`` on a list of texts:

1. tokenises, and sorts the rows by length; each micro-batch is padded only to its own
   longest row;
2. runs a micro-batch through layer 1 and its branch; rows whose uncertainty is below
   ``speed`` leave with that branch's answer and are removed from the batch (real
   compaction: no later layer or branch computes anything for them);
3. the survivors wait in the pool of the next layer; a pool that holds ``micro_batch`` rows
   runs them as one full batch (dynamic re-batching), so deeper layers run full batches
   again however many rows left before;
4. at the end, the pools are flushed from shallow to deep; the teacher answers for every
   row that reaches the last layer.

Survivors are not copied out of their step's output: they are gathered once, straight into
the batch that runs them next. A step where fewer than half stay copies them out at once, so
the step outputs a pool keeps alive hold at most twice its rows (plus one micro-batch, for a
chunk that a take split); each pool holds fewer than ``micro_batch`` rows between steps, so
memory is bounded by ``3 x L x micro_batch`` rows of hidden states whatever the call's size.
Every step makes one host sync (the copy of its uncertainties and probabilities); at speed 0
no student branch runs, so the machinery costs nothing when nobody can exit.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline import flops as flop_account
from pipeline.config import SCHEMA
from pipeline.model import FastBert, autocast, resolve_precision, uncertainty
from pipeline.text import tokenize
from pipeline.tradeoff import pick_speed


@dataclass
class ScorerStats:
    """Running totals over every call of a Scorer."""

    rows: int = 0  # rows seen, errors included
    errors: int = 0  # rows that could not be scored (null, empty or non-string text)
    truncated: int = 0  # texts longer than max_length, cut to it
    flops: int = 0  # FLOPs spent on the scored rows
    full_depth_flops: int = 0  # FLOPs a full-depth BERT classifier would spend on them
    exit_counts: list[int] = field(default_factory=list)  # rows that left at layer k+1

    @property
    def flop_speedup(self) -> float:
        return self.full_depth_flops / self.flops if self.flops else float("nan")

    @property
    def mean_exit_layer(self) -> float:
        n = sum(self.exit_counts)
        return sum((k + 1) * c for k, c in enumerate(self.exit_counts)) / n if n else float("nan")


@dataclass
class _Chunk:
    """Rows waiting at one depth: rows ``pick`` of a step's output ``hidden``. The rows that
    left at that step are not copied out: the survivors are gathered once, straight into the
    batch that runs them next (``Scorer._take``)."""

    hidden: torch.Tensor  # (b_src, T_src, H) on the scoring device: the step's output
    pick: np.ndarray  # (b,) int64, this chunk's rows of hidden, in order
    lengths: np.ndarray  # (b,) int64, real tokens per row (each <= T_src)
    rows: np.ndarray  # (b,) int64, positions in the call's input

    @property
    def whole(self) -> bool:
        """Every row of ``hidden``, in order: runs as it is, no copy."""
        return len(self.pick) == self.hidden.shape[0] and bool((self.pick == np.arange(len(self.pick))).all())


@dataclass
class _Call:
    """One call's state (kept off the Scorer, so that threads may share one): what each row
    got, and the rows waiting at each depth."""

    probs: np.ndarray  # (n, N) float32, the answer of the exit each row left at
    uncertainty: np.ndarray  # (n,) float32, at that exit
    exit: np.ndarray  # (n,) int16, 1-based exit layer (0: not scored)
    pools: list[deque]  # per layer: _Chunks waiting to run it
    pool_rows: list[int]  # per layer: rows waiting


class Scorer:
    """Early-exit scoring of texts with a FastBert; see the module docstring.

    ``speed`` in [0, 1]: a row leaves at the first layer whose uncertainty is below it (0 =
    full depth). Instead of a speed, a budget picks one from the trade-off table that training
    stores with the model: ``max_accuracy_drop`` (accuracy points below the teacher that may
    be given up) or ``target_speedup`` (FLOP speed-up wanted); the choice is in
    ``speed_choice``. With neither, the model's own suggestion: the fastest speed within 0.5
    point on its validation rows (0.5 for a model without a table). ``micro_batch``: rows per layer step. ``max_length``: tokens per text
    (default: the model's). ``device``: default CUDA when available, else CPU. ``precision``:
    ``auto`` (bf16 where the chip multiplies it natively, fp16 on older GPUs, else fp32),
    ``fp32``, ``bf16`` or ``fp16``, in autocast (the weights stay as they are); the one
    chosen is ``self.precision``. Exit decisions and probabilities are computed in fp32 from
    the logits. ``compile=True`` runs the encoder layers through ``torch.compile`` (inductor,
    dynamic shapes, frozen weights): on a 2-core AVX512-BF16 CPU in bf16, 1.04-1.10x the
    rows/s after a warm-up of 20-45 s on the first calls; it needs a C++ compiler on CPU
    machines and pays on long jobs only. ``regroup=False`` turns dynamic re-batching off (each micro-batch only shrinks
    as it goes deeper): for benchmarks.
    Like a Hugging Face pipeline, it moves the model to ``device`` and puts it in eval mode.
    A call's state lives in the call, so threads may share one Scorer (``stats`` add up).
    """

    def __init__(
        self,
        model: FastBert,
        speed: float | None = None,
        micro_batch: int = 32,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        regroup: bool = True,
        max_accuracy_drop: float | None = None,
        target_speedup: float | None = None,
        precision: str = "auto",
        compile: bool = False,
    ):
        # the table's point when the speed came from it (a budget, or the model's own suggestion)
        speed, self.speed_choice = pick_speed(model.tradeoff, speed, max_accuracy_drop, target_speedup)
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: load it with FastBert.from_pretrained or from_backbone")
        max_length = model.config.max_length if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= model.config.max_positions:
            raise ValueError(f"max_length must be an integer in [2, {model.config.max_positions}], got {max_length!r}")
        self.speed = float(speed)
        self.micro_batch = micro_batch
        self.max_length = max_length
        self.regroup = regroup
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.labels = model.config.labels
        self.stats = ScorerStats(exit_counts=[0] * model.config.num_layers)
        self._stats_lock = threading.Lock()
        self._pad_id = model.tokenizer.pad_token_id or 0
        self._students = self.speed > 0.0  # at speed 0 no student can exit: skip their branches
        self._positions = torch.arange(max_length, device=self.device)  # (max_length,)
        self.precision = resolve_precision(precision, self.device)
        self.compiled = bool(compile)
        self._layers = list(model.layers)  # the encoder layers the steps call: compiled ones with compile=True
        if compile:
            self._layers = _compiled(self._layers, self.device)

    # -- the call ---------------------------------------------------------------------------

    def __call__(self, texts: Sequence[str | None]) -> pa.Table:
        """Score ``texts``; returns one row per text, in input order (see ``SCHEMA``)."""
        token_ids, errors, truncated = tokenize(self.model.tokenizer, texts, self.max_length)
        return self.score_tokens(token_ids, errors, truncated)

    def score_tokens(self, token_ids: Sequence[Sequence[int] | None], errors: Sequence[str | None] | None = None,
                     truncated: Sequence[bool] | None = None) -> pa.Table:
        """Score rows tokenised elsewhere (``pipeline.text.tokenize``, e.g. in other processes): token ids
        with the special tokens, at most ``max_length`` of them; None for a row that has an
        ``errors`` entry. Returns one row per input row, in order (see ``SCHEMA``)."""
        n = len(token_ids)
        errors = [None] * n if errors is None else list(errors)
        truncated = np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool)
        for i, ids in enumerate(token_ids):
            if errors[i] is None and (ids is None or not 2 <= len(ids) <= self.max_length):
                errors[i] = f"token ids must be 2 to {self.max_length} long (tokenize with max_length={self.max_length})"
        valid = np.array([i for i, e in enumerate(errors) if e is None], dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        lengths[valid] = [len(token_ids[i]) for i in valid.tolist()]

        layers = self.model.config.num_layers
        call = _Call(probs=np.zeros((n, len(self.labels)), dtype=np.float32), uncertainty=np.zeros(n, dtype=np.float32),
                     exit=np.zeros(n, dtype=np.int16), pools=[deque() for _ in range(layers)], pool_rows=[0] * layers)
        ids_of = {i: token_ids[i] for i in valid.tolist()}

        order = valid[np.argsort(lengths[valid], kind="stable")]  # rows, shortest first
        with torch.inference_mode(), autocast(self.precision, self.device):
            for start in range(0, len(order), self.micro_batch):
                rows = order[start : start + self.micro_batch]
                self._step(call, 0, self._embed(rows, lengths[rows], ids_of), rows, lengths[rows])
                self._drain(call, final=not self.regroup)
            self._drain(call, final=True)

        return self._table(call, n, errors, valid, lengths, truncated)

    # -- layer steps ------------------------------------------------------------------------

    def _embed(self, rows: np.ndarray, lengths: np.ndarray, ids_of: dict[int, list[int]]) -> torch.Tensor:
        T = int(lengths.max())
        ids = np.full((len(rows), T), self._pad_id, dtype=np.int64)  # (b, T) right-padded
        for j, r in enumerate(rows.tolist()):
            ids[j, : lengths[j]] = ids_of[r]
        input_ids = self._to_device(ids)  # (b, T)
        return self.model.embed(input_ids)  # (b, T, H)

    def _step(self, call: _Call, k: int, hidden: torch.Tensor, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Layer k (0-based) and its branch on one batch, hidden (b, T, H) with T = the longest
        of ``lengths``; exited rows are recorded, survivors join the pool of layer k+1."""
        b, T = hidden.shape[:2]
        mask = None  # (b, T) bool, True at real tokens; None when nothing is padded
        if int(lengths.min()) < T:
            real = self._to_device(lengths)  # (b,)
            mask = self._positions[:T][None, :] < real[:, None]  # (b, T)
        hidden = self.model.run_layer(k, hidden, self.model.layer_mask(mask, hidden.dtype), self._layers[k])  # (b, T, H)

        last = k == len(call.pools) - 1
        if not last and not self._students:
            self._push(call, k + 1, _Chunk(hidden, np.arange(b), lengths, rows))
            return
        logits = self.model.exit_logits(k, hidden, mask)  # (b, N) fp32, whatever the precision
        probs = torch.softmax(logits, dim=-1)  # (b, N)
        host = torch.cat([uncertainty(logits)[:, None], probs], dim=1).cpu().numpy()  # (b, 1+N): the step's one sync
        leave = np.ones(b, dtype=bool) if last else host[:, 0] < self.speed  # (b,)
        out = rows[leave]
        call.uncertainty[out] = host[leave, 0]
        call.probs[out] = host[leave, 1:]
        call.exit[out] = k + 1
        if leave.all():
            return
        stay = np.flatnonzero(~leave)  # (b',)
        rows, lengths = rows[stay], lengths[stay]
        if 2 * len(stay) < b:  # few stay: copy them out now, so a pool never holds much more than its rows
            hidden = hidden[:, : int(lengths.max())].index_select(0, self._to_device(stay))  # (b', T', H)
            stay = np.arange(len(stay))
        self._push(call, k + 1, _Chunk(hidden, stay, lengths, rows))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the scoring device. On CUDA through pinned memory, so the copy is
        queued without a host sync (a copy from pageable memory would wait for the stream)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _push(self, call: _Call, k: int, chunk: _Chunk) -> None:
        call.pools[k].append(chunk)
        call.pool_rows[k] += len(chunk.rows)

    def _drain(self, call: _Call, final: bool) -> None:
        """Run every pool that holds a full micro-batch (all of them when ``final``), shallow to
        deep: a step at layer k only feeds the pool of layer k+1, so one pass suffices."""
        for k in range(1, len(call.pools)):
            while call.pool_rows[k] >= self.micro_batch or (final and call.pool_rows[k] > 0):
                self._step(call, k, *self._take(call, k, self.micro_batch))

    def _take(self, call: _Call, k: int, n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Pop up to n rows from the pool of layer k, oldest first, as one batch (hidden (n, T, H)
        with T its longest row, rows, lengths); a chunk that does not fit whole is split and its
        rest stays in front. A whole step's output runs as it is (a view); otherwise each row is
        copied once, straight into the new batch."""
        pool, taken, count = call.pools[k], [], 0
        while pool and count < n:
            taken.append(pool.popleft())
            count += len(taken[-1].rows)
        if count > n:
            head, tail = _split(taken[-1], len(taken[-1].rows) - (count - n))
            taken[-1] = head
            pool.appendleft(tail)
            count = n
        call.pool_rows[k] -= count
        rows = np.concatenate([c.rows for c in taken])  # (n,)
        lengths = np.concatenate([c.lengths for c in taken])  # (n,)
        T = int(lengths.max())
        if len(taken) == 1 and taken[0].whole:
            return taken[0].hidden[:, :T], rows, lengths  # (n, T, H) view
        H = taken[0].hidden.shape[2]
        hidden = taken[0].hidden.new_empty((count, T, H))  # (n, T, H)
        flat = hidden.view(count * T, H)  # (n*T, H)
        start = 0
        for c in taken:
            # row j of c, position t <- c.hidden[pick[j], min(t, T_src - 1)]: positions past a row's
            # length are masked keys, so any finite hidden state will do for them
            b_src, T_src = c.hidden.shape[:2]
            index = c.pick[:, None] * T_src + np.minimum(np.arange(T), T_src - 1)[None, :]  # (b, T)
            b = len(c.pick)
            torch.index_select(c.hidden.reshape(b_src * T_src, H), 0, self._to_device(index.reshape(-1)),
                               out=flat[start * T : (start + b) * T])  # (b*T, H)
            start += b
        return hidden, rows, lengths

    # -- input and output -------------------------------------------------------------------

    def _table(self, call: _Call, n, errors, valid, lengths, truncated) -> pa.Table:
        config = self.model.config
        ok = np.zeros(n, dtype=bool)
        ok[valid] = True
        row_flops = np.zeros(n, dtype=np.int64)
        full_flops = np.zeros(n, dtype=np.int64)
        if len(valid):
            row_flops[valid] = flop_account.row_flops(config, lengths[valid], call.exit[valid], students=self._students)
            full_flops[valid] = flop_account.full_depth_flops(config, lengths[valid])

        with self._stats_lock:  # calls from several threads add up
            self.stats.rows += n
            self.stats.errors += n - len(valid)
            self.stats.truncated += int(truncated.sum())
            self.stats.flops += int(row_flops.sum())
            self.stats.full_depth_flops += int(full_flops.sum())
            for k, c in enumerate(np.bincount(call.exit[valid], minlength=config.num_layers + 1)[1:]):
                self.stats.exit_counts[k] += int(c)

        labels = np.array(self.labels, dtype=object)
        null = ~ok
        offsets = np.arange(n + 1, dtype=np.int32) * len(self.labels)
        probabilities = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(call.probs.reshape(-1)), mask=pa.array(null)
        )
        table = pa.table(
            [
                pa.array(labels[call.probs.argmax(axis=1)], type=pa.string(), mask=null),
                probabilities,
                pa.array(call.exit, type=pa.int16(), mask=null),
                pa.array(call.uncertainty, type=pa.float32(), mask=null),
                pa.array(row_flops, type=pa.int64(), mask=null),
                pa.array(errors, type=pa.string()),
            ],
            schema=SCHEMA,
        )
        return table


def _compiled(layers: list[torch.nn.Module], device: torch.device) -> list[torch.nn.Module]:
    """``torch.compile`` of each layer with dynamic batch and sequence sizes and frozen weights
    (inductor constant-folds and prepacks them for the matrix library: most of the gain on
    CPU). The layers share one forward, so the recompile limit is raised to let each keep its
    own graphs."""
    import shutil

    import torch._dynamo.config

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("compile=True needs a C++ compiler (g++ or clang++) on CPU machines: install one, "
                         "or score without compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(layers))
    return [torch.compile(layer, dynamic=True, options={"freezing": True}) for layer in layers]


def _split(chunk: _Chunk, cut: int) -> tuple[_Chunk, _Chunk]:
    """The first ``cut`` rows and the rest (the same hidden states, no copy)."""
    return (_Chunk(chunk.hidden, chunk.pick[:cut], chunk.lengths[:cut], chunk.rows[:cut]),
            _Chunk(chunk.hidden, chunk.pick[cut:], chunk.lengths[cut:], chunk.rows[cut:]))
