"""What a job's driver needs to know of a FastBERT, without torch: the checkpoint's config
(what ``config.json`` holds, and reading it) and the columns scoring returns.

``pipeline.model`` and ``pipeline.engine`` import these from here. They are apart so that a
driver (the scoring job's, on a Ray head node say) checks a checkpoint and plans its output
without importing torch: it needs only this module and the table functions of
``pipeline.tradeoff``, and on 2 cores an import of torch in the driver takes CPU-seconds from
the replicas' own start.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.outputs import MissingFile, UserError, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fastbert-ray/1"
TEACHER_HEADS = ("pooler", "branch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of the engine and training; see model.resolve_precision
# model types whose position ids start after pad_token_id, so they embed fewer tokens
ROBERTA_STYLE_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert", "luke"}


@dataclass
class FastBertConfig:
    """Everything needed to rebuild a FastBert, stored as ``config.json`` beside its weights."""

    backbone: dict[str, Any]  # the backbone's Hugging Face config, as ``PretrainedConfig.to_dict()``
    labels: list[str]  # label names; the classifiers predict their index
    branch_width: int = 128  # width of the students, the branches after layers 1..L-1 (the paper's 128)
    branch_heads: int = 2  # attention heads of every branch classifier (the paper's 2)
    # the teacher's classifier after layer L. "pooler": plain BERT's head (BertForSequenceClassification's),
    # the first token through the backbone's pretrained pooler, then Linear(H->N). "branch": the
    # paper's branch at teacher_width. On 20 Newsgroups (4,000 rows, 2 epochs, same test rows) the
    # branch teacher trailed plain BERT by 2 points (76.08% against 78.08%), the pooler head did not
    # (77.98%): the pretrained pooler is a head start a new branch has to learn from scratch
    teacher_head: str = "pooler"
    # a "pooler" teacher's dense layer started from the backbone's pretrained pooler (it then
    # fine-tunes at the backbone's rate); False: the backbone had none, it started random and
    # learns at the new head's rate
    pretrained_pooler: bool = True
    # width of a "branch" teacher; None: the backbone's hidden size (a "pooler" teacher has that
    # width). The teacher runs once per full-depth row, where a wide one costs little (MiniLM-L6 at
    # 384: +4% of the FLOPs) and learns faster: 2,000 R8 rows, 2 epochs, 97.75% at 384 against 95.5%
    # at 128 (the plain BertForSequenceClassification: 97.0%)
    teacher_width: int | None = None
    max_length: int = 128  # tokens per text, [CLS] and [SEP] included; longer texts are truncated
    dropout: float = 0.1  # dropout inside the branches while training
    # per exit, what its logits are divided by before the softmax: fitted after training on the
    # validation rows (pipeline.tradeoff.calibrate): the students' to the teacher's answers, the
    # teacher's to the labels (it changes no answer, only the probabilities); None: 1 everywhere
    exit_temperatures: list[float] | None = None

    def __post_init__(self) -> None:
        self.backbone = json.loads(json.dumps(self.backbone))  # as config.json will hold it
        for key in ("hidden_size", "num_hidden_layers", "model_type"):
            if key not in self.backbone:
                raise UserError(f"backbone config lacks {key!r}: is it a Hugging Face BERT-shaped config dict?")
        self.labels = [str(label) for label in self.labels]
        if len(self.labels) < 2:
            raise UserError(f"FastBertConfig needs at least 2 labels, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise UserError(f"FastBertConfig labels must be unique, got {self.labels!r}")
        if self.teacher_head not in TEACHER_HEADS:
            raise UserError(f"teacher_head must be one of {TEACHER_HEADS}, got {self.teacher_head!r}")
        hidden = int(self.backbone["hidden_size"])
        if self.teacher_head == "pooler" and self.teacher_width not in (None, hidden):
            raise UserError(f"teacher_width ({self.teacher_width}) sizes a teacher_head='branch'; the 'pooler' "
                             f"teacher has the backbone's width ({hidden}): leave teacher_width unset")
        if self.teacher_width is None:
            self.teacher_width = hidden
        for name in ("branch_width", "teacher_width") if self.teacher_head == "branch" else ("branch_width",):
            width = getattr(self, name)
            if width < 1 or self.branch_heads < 1 or width % self.branch_heads:
                raise UserError(f"{name} ({width}) must be a positive multiple of branch_heads ({self.branch_heads})")
        if self.max_length < 2 or self.max_length > self.max_positions:
            raise UserError(
                f"max_length must be in [2, {self.max_positions}] (the positions the backbone "
                f"can embed), got {self.max_length}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.exit_temperatures is not None:
            self.exit_temperatures = [float(t) for t in self.exit_temperatures]
            if len(self.exit_temperatures) != self.num_layers or not all(0 < t < float("inf") for t in self.exit_temperatures):
                raise UserError(f"exit_temperatures must be {self.num_layers} positive numbers (one per exit) or None, "
                                f"got {self.exit_temperatures!r}")

    @property
    def max_positions(self) -> int:
        """Tokens per text the backbone can embed. RoBERTa-style embeddings number positions
        from pad_token_id + 1, so they lose that many of max_position_embeddings."""
        positions = int(self.backbone.get("max_position_embeddings") or 512)
        if self.backbone.get("model_type") in ROBERTA_STYLE_POSITIONS:
            positions -= int(self.backbone.get("pad_token_id") or 0) + 1
        return positions

    @property
    def num_layers(self) -> int:
        return int(self.backbone["num_hidden_layers"])

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def load_config(path: str) -> FastBertConfig:
    """The config of a folder written by ``FastBert.save_pretrained`` (local path or fsspec
    URI), without loading the weights; a one-line ``UserError`` saying what was found when the
    folder is no FastBERT checkpoint (no such folder, a file missing, a plain BERT's config)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        found = "a file" if fs.isfile(root) else "nothing"
        raise MissingFile(f"FastBert checkpoint {path!r}: no such folder (found {found} there); --model takes "
                          "a folder written by jobs.train or FastBert.save_pretrained")
    root = root.rstrip("/")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not fs.isfile(f"{root}/{name}"):
            entries = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
            shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "") if entries else "nothing"
            raise MissingFile(f"FastBert checkpoint {path!r} is missing {name} (it holds {shown}): is it a folder "
                              "written by jobs.train or FastBert.save_pretrained?")
    with fs.open(f"{root}/{CONFIG_FILE}") as f:
        try:
            raw = json.load(f)
        except ValueError as e:
            raise UserError(f"{path!r}/{CONFIG_FILE} is not valid JSON ({e}): the model folder is damaged") from None
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(
            f"{path!r}/{CONFIG_FILE} is not a FastBert checkpoint (no \"format\": \"{FORMAT}\""
            + (f"; it is a plain {kind} model's config" if kind else "")
            + "); to start from a plain BERT train one with jobs.train --backbone, or use FastBert.from_backbone"
        )
    # checkpoints written before the teacher had its own width: it had the students'
    raw.setdefault("teacher_width", raw.get("branch_width", 128))
    raw.setdefault("teacher_head", "branch")  # written before the pooler head: the paper's branch
    try:
        return FastBertConfig(**raw)
    except TypeError as e:  # fields this version does not know (a later version's checkpoint)
        raise UserError(f"{path!r}/{CONFIG_FILE} does not describe a FastBert this version can build ({e})") from None


def check_speed(speed: Any, what: str = "speed") -> float:
    """A speed as a float in [0, 1] (0 = full depth, 1 = every row leaves at layer 1), or a
    one-line UserError: the one check of a speed, wherever one is given."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.0 <= speed <= 1.0:
        raise UserError(f"{what} must be a number in [0, 1] (0 = full depth, 1 = leave at layer 1), got {speed!r}")
    return float(speed)


# -- the validation trade-off a trained model carries (tradeoff.json) ----------------------------
# computed by pipeline.tradeoff; kept here so that a model folder's files are read without torch

@dataclass
class Point:
    speed: float
    accuracy: float
    flop_speedup: float  # full-depth BERT classifier FLOPs / FastBERT FLOPs, at real lengths
    mean_exit_layer: float
    exit_counts: list[int]  # rows leaving at layer 1..L
    agreement: float = float("nan")  # rows whose answer is the teacher's (nan in tables written before it was kept)
    # the accuracy the speed is expected to lose (tradeoff.AllExits.cost's mean; nan in older tables)
    expected_cost: float = float("nan")


TRADEOFF_FILE = "tradeoff.json"  # in the model folder, beside config.json
# fewer rows on which two models differ decide nothing: a normal interval on them is too narrow
# (evaluate.paired_interval; the scoring audit's estimated cost)
MIN_DIFFERING_ROWS = 10
SPEED_GRID = tuple(round(float(s), 2) for s in np.linspace(0.0, 1.0, 101))  # speeds the table holds


@dataclass
class TradeoffTable:
    """Accuracy and FLOP speed-up of a trained model at every speed of ``SPEED_GRID``,
    measured on ``rows`` rows of held-out ``data`` (training writes it into the model folder)."""

    data: str  # where the rows came from, e.g. the validation Parquet's URI
    rows: int
    points: list[Point]  # ascending speed; points[0] is speed 0, the teacher
    # per layer but the last, each row's lowest uncertainty up to that layer, ascending: the rows
    # that have left by layer l at speed s are those below s, so the exits at any speed follow
    # (the scoring job's drift check); None in tables written before it was kept
    exit_uncertainty: list[list[float]] | None = None

    @property
    def teacher(self) -> Point:
        return self.points[0]

    def to_json(self) -> dict:
        return {"data": self.data, "rows": self.rows, "points": [dataclasses.asdict(p) for p in self.points],
                "exit_uncertainty": self.exit_uncertainty}

    @classmethod
    def from_json(cls, raw: dict) -> TradeoffTable:
        known = {f.name for f in dataclasses.fields(Point)}  # fields a later version adds are left out
        return cls(data=raw["data"], rows=int(raw["rows"]), points=[Point(**{k: v for k, v in p.items() if k in known})
                                                                   for p in raw["points"]],
                   exit_uncertainty=raw.get("exit_uncertainty"))

    def exit_counts(self, speed: float) -> list[int] | None:
        """Rows leaving at layer 1..L at ``speed``: at any speed from ``exit_uncertainty``, else
        at the speeds of the grid; None elsewhere."""
        if self.exit_uncertainty is not None:
            left = [int(np.searchsorted(u, speed, side="left")) for u in self.exit_uncertainty]  # rows below speed
            return np.diff([0, *left, self.rows]).tolist()
        return next((p.exit_counts for p in self.points if abs(p.speed - speed) < 1e-9), None)


def load_table(model: str) -> TradeoffTable | None:
    """The table stored in a model folder (local path or fsspec URI), None if it has none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(model)
    path = f"{root.rstrip('/')}/{TRADEOFF_FILE}"
    if not fs.isfile(path):
        return None
    with fs.open(path) as f:
        return TradeoffTable.from_json(json.load(f))


def save_table(table: TradeoffTable, model: str) -> None:
    """Write ``table`` into a model folder (local path or fsspec URI)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(model)
    path = f"{root.rstrip('/')}/{TRADEOFF_FILE}"
    write_json(fs, path, table.to_json())  # whole or not at all: a finished job is one whose table is whole


# -- what scoring returns -----------------------------------------------------------------------

# the columns the engine gives every row (and the scoring job writes, all but flops)
SCHEMA = pa.schema(
    [
        ("prediction", pa.string()),
        ("probabilities", pa.list_(pa.float32())),
        ("exit_layer", pa.int16()),
        ("uncertainty", pa.float32()),
        ("flops", pa.int64()),
        ("error", pa.string()),
    ]
)
