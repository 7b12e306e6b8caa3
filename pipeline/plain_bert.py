"""The baseline users run today: a plain Hugging Face ``BertForSequenceClassification`` on
the same backbone (pooler + linear on [CLS], every row at full depth).

``jobs.train --plain-bert`` fine-tunes one with the same data, budget and loop as FastBERT's
stage 1; ``jobs.evaluate --plain-bert PATH`` compares the FastBERT teacher with it (the
paper's check that the teacher is no worse than standard fine-tuning). The folder is a
standard Hugging Face one (config.json with ``id2label``, model.safetensors, tokenizer
files): ``AutoModelForSequenceClassification.from_pretrained`` opens it too.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import torch
from torch import nn

from pipeline.model import FORMAT, _build_backbone, _is_local, _resolve_backbone
from pipeline.outputs import UserError


def new_plain_bert(backbone: str, labels: list[str], max_length: int) -> nn.Module:
    """A ``BertForSequenceClassification`` (or the backbone type's own class) on a pretrained
    backbone (a folder, a Hugging Face name, or ``"bundled"``) with a new random classifier
    for ``labels``; its tokenizer is ``model.tokenizer`` and truncates at ``max_length``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _resolve_backbone(backbone)
    model = _build_backbone(lambda **kw: AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, **{k: v for k, v in kw.items()
                                                                 if k != "add_pooling_layer"}))
    model.tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    return model.eval()


def load_plain_bert(path: str) -> nn.Module:
    """A plain classifier saved by ``save_plain_bert`` (local path or fsspec URI), in eval mode."""
    import fsspec
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.isfile(f"{root}/config.json"):
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json); pass the output of "
                         "jobs.train --plain-bert")
    with fs.open(f"{root}/config.json") as f:
        if json.load(f).get("format") == FORMAT:
            raise UserError(f"{path}: a FastBERT model, not a plain classifier (the output of jobs.train "
                             "--plain-bert)")
    with tempfile.TemporaryDirectory() as tmp:
        local = root
        if not _is_local(fs):
            for entry in fs.ls(root, detail=True):
                if entry["type"] == "file":
                    fs.get_file(entry["name"], f"{tmp}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}")
            local = tmp
        model = AutoModelForSequenceClassification.from_pretrained(local)
        model.tokenizer = AutoTokenizer.from_pretrained(local)
    return model.eval()


def save_plain_bert(model: nn.Module, path: str) -> None:
    """Write the model and its tokenizer to a local folder."""
    model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)


def plain_bert_labels(model: nn.Module) -> list[str]:
    """The label names, in the classifier's output order."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


@torch.no_grad()
def plain_bert_predict(model: nn.Module, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(R,) the label index each text gets; rows are sorted by length so batches pad little."""
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        enc = model.tokenizer([texts[i] for i in rows], truncation=True, padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, N)
        out[rows] = logits.argmax(-1).numpy()
    return out

