"""The FastBert model: shapes, the paper's branch, checkpoints and their errors, backbones."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

from pipeline import FastBert, FastBertConfig, Scorer, uncertainty
from pipeline.model import Branch, PoolerHead, load_config
from tiny import random_texts, tiny_model, tiny_tokenizer


def encode(model, texts):
    return model.tokenizer(texts, truncation=True, max_length=model.config.max_length, padding=True,
                           return_tensors="pt")


def test_forward_returns_every_exit():
    model = tiny_model(labels=("a", "b", "c"), num_layers=3)
    enc = encode(model, ["good movie", "the movie was awful w1 w2 w3"])
    out = model(enc["input_ids"], enc["attention_mask"])
    assert out.logits.shape == (3, 2, 3)
    assert torch.equal(out.teacher_logits, out.logits[-1])
    assert out.student_logits.shape == (2, 2, 3)


def test_branch_equals_full_self_attention_then_first_token_pooling():
    torch.manual_seed(0)
    branch = Branch(hidden=24, width=16, heads=2, num_labels=5, dropout=0.0).eval()
    hidden = torch.randn(3, 7, 24)  # (B, T, H)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)  # (B, T)

    # the paper's classifier written out in full: attention for every token, then pool token 0
    x = torch.tanh(branch.down(hidden))  # (B, T, W)
    heads = lambda t: t.view(3, 7, 2, 8).transpose(1, 2)  # (B, nh, T, W/nh)
    q, k, v = heads(branch.query(x)), heads(branch.key(x)), heads(branch.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)  # (B, nh, T, T)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 16)  # (B, T, W)
    pooled = torch.tanh(branch.pool(branch.out(attended)[:, 0]))  # (B, W)
    expected = branch.classifier(pooled)  # (B, N)

    torch.testing.assert_close(branch(hidden, mask), expected, atol=1e-5, rtol=1e-5)
    # padding is invisible: row 2 alone, unpadded, gives the same logits
    torch.testing.assert_close(branch(hidden[2:, :2], None), expected[2:], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_rows_logits():
    model = tiny_model()
    texts = ["good", "the movie was great w1 w2 w3 w4 w5 w6 w7 w8"]
    together = model(**{k: v for k, v in encode(model, texts).items() if k != "token_type_ids"}).logits
    alone = model(**{k: v for k, v in encode(model, texts[:1]).items() if k != "token_type_ids"}).logits
    torch.testing.assert_close(together[:, :1], alone, atol=1e-5, rtol=1e-5)


def test_the_eval_embedding_is_berts_own_and_other_backbones_keep_theirs():
    model = tiny_model(seed=3)
    with torch.no_grad():  # a token-type-0 row and positions far from their random start
        model.backbone.embeddings.token_type_embeddings.weight.mul_(5.0)
        model.backbone.embeddings.position_embeddings.weight.add_(1.0)
    ids = encode(model, ["good movie", "the movie was awful w1 w2 w3 w4"])["input_ids"]  # (2, T) padded
    assert model._bert_embeddings  # BERT's own: the summed path runs
    with torch.inference_mode():
        torch.testing.assert_close(model.embed(ids), model.backbone.embeddings(input_ids=ids))
        torch.testing.assert_close(model.embed(ids[:, :3]), model.backbone.embeddings(input_ids=ids[:, :3]))
    model.train()  # training: BERT's module, dropout included
    assert not torch.equal(model.embed(ids), model.embed(ids))

    roberta = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=66, pad_token_id=1)
    other = FastBert(FastBertConfig(backbone=roberta.to_dict(), labels=["a", "b"], max_length=64),
                     backbone=RobertaModel(roberta, add_pooling_layer=False)).eval()
    assert not other._bert_embeddings  # RoBERTa's positions depend on padding: its own module runs
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(other.embed(ids), other.backbone.embeddings(input_ids=ids))


def test_uncertainty_is_normalised_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, -100.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
    u = uncertainty(logits)
    assert u[0] == pytest.approx(1.0) and u[1] == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(logits[2], -1)
    assert u[2] == pytest.approx(float((p * p.log()).sum() / math.log(1 / 4)), abs=1e-6)


# -- checkpoints ----------------------------------------------------------------------------


def assert_same_model(a: FastBert, b: FastBert, texts):
    assert a.config == b.config
    ea, eb = encode(a, texts), encode(b, texts)
    assert torch.equal(ea["input_ids"], eb["input_ids"])
    with torch.inference_mode():
        torch.testing.assert_close(a(ea["input_ids"], ea["attention_mask"]).logits,
                                   b(eb["input_ids"], eb["attention_mask"]).logits, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["", "file://", "memory://"])
def test_save_and_load_round_trip(tmp_path, scheme):
    model = tiny_model(labels=("neg", "pos", "mixed"))
    path = f"{scheme}{tmp_path}/model" if scheme != "memory://" else f"memory://ckpt-{os.getpid()}/model"
    model.save_pretrained(path)
    if not scheme:
        assert sorted(os.listdir(path)) >= ["config.json", "model.safetensors"]
        assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in os.listdir(path))
        assert json.load(open(os.path.join(path, "config.json")))["labels"] == ["neg", "pos", "mixed"]
    loaded = FastBert.from_pretrained(path)
    assert_same_model(model, loaded, ["good movie", "w1 w2 awful"])


def test_save_replaces_an_old_checkpoint_whole(tmp_path):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    a.save_pretrained(str(tmp_path / "m"))
    b.save_pretrained(str(tmp_path / "m"))
    assert_same_model(b, FastBert.from_pretrained(str(tmp_path / "m")), ["good"])
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging folder left behind


def test_the_teacher_is_as_wide_as_the_backbone_and_older_checkpoints_still_load(tmp_path):
    model = tiny_model(teacher_head="branch")  # hidden 32, students 16 wide
    assert [b.query.out_features for b in model.branches] == [16, 16, 32] and model.config.teacher_width == 32
    # a checkpoint written before the teacher had its own width or head: config.json has
    # neither, and its teacher is a branch as wide as the students
    old = FastBert(dataclasses.replace(model.config, teacher_width=16), tokenizer=model.tokenizer).eval()
    old.save_pretrained(str(tmp_path / "old"))
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    del raw["teacher_width"], raw["teacher_head"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    loaded = FastBert.from_pretrained(str(tmp_path / "old"))
    assert loaded.config.teacher_width == 16 and loaded.config.teacher_head == "branch"
    assert_same_model(old, loaded, ["good movie", "w1 w2 awful"])


def test_the_pooler_teacher_is_plain_berts_head(tmp_path):
    model = tiny_model()  # teacher_head="pooler", the default
    teacher = model.branches[-1]
    assert isinstance(teacher, PoolerHead) and all(isinstance(b, Branch) for b in model.branches[:-1])
    assert teacher.dense.weight.shape == (32, 32) and teacher.classifier.weight.shape == (2, 32)
    assert {id(p) for p in model.new_head_parameters()} == {id(teacher.classifier.weight), id(teacher.classifier.bias)}
    # its logits: the first token's last hidden state through tanh(dense), then the classifier
    enc = encode(model, ["good movie w3", "w1"])
    with torch.inference_mode():
        hidden = model.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        expected = teacher.classifier(torch.tanh(teacher.dense(hidden[:, 0])))  # (B, N)
        got = model(enc["input_ids"], enc["attention_mask"]).teacher_logits
    torch.testing.assert_close(got, expected)
    model.save_pretrained(str(tmp_path / "m"))
    assert_same_model(model, FastBert.from_pretrained(str(tmp_path / "m")), ["good movie", "w1 w2 awful"])
    branch = tiny_model(teacher_head="branch")
    assert {id(p) for p in branch.new_head_parameters()} == {id(p) for p in branch.branches[-1].parameters()}


def test_from_backbone_starts_the_pooler_teacher_from_the_pretrained_pooler(tmp_path):
    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    pretrained = BertModel(config)  # with its pooler
    pretrained.save_pretrained(str(tmp_path / "with-pooler"))
    tokenizer.save_pretrained(str(tmp_path / "with-pooler"))
    model = FastBert.from_backbone(str(tmp_path / "with-pooler"), labels=["x", "y"], max_length=24)
    torch.testing.assert_close(model.branches[-1].dense.weight, pretrained.pooler.dense.weight)
    torch.testing.assert_close(model.branches[-1].dense.bias, pretrained.pooler.dense.bias)
    assert model.backbone.pooler is None  # the backbone itself keeps no pooler
    branch = FastBert.from_backbone(str(tmp_path / "with-pooler"), labels=["x", "y"], max_length=24,
                                    teacher_head="branch")
    assert isinstance(branch.branches[-1], Branch) and branch.config.teacher_width == 32
    # a checkpoint without a pooler: the teacher's pooler starts random, and it says so
    BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path / "no-pooler"))
    tokenizer.save_pretrained(str(tmp_path / "no-pooler"))
    with pytest.warns(UserWarning, match="no pretrained pooler"):
        random = FastBert.from_backbone(str(tmp_path / "no-pooler"), labels=["x", "y"], max_length=24)
    assert model.config.pretrained_pooler and not random.config.pretrained_pooler
    # a random pooler learns at the new head's rate, and the saved config keeps it so after a resume
    assert {id(p) for p in random.new_head_parameters()} == {id(p) for p in random.branches[-1].parameters()}
    random.save_pretrained(str(tmp_path / "saved"))
    assert len(FastBert.from_pretrained(str(tmp_path / "saved")).new_head_parameters()) == 4
    assert len(model.new_head_parameters()) == 2


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FastBert.from_pretrained(str(tmp_path / "nowhere"))
    tiny_model().save_pretrained(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FastBert.from_pretrained(str(tmp_path / "m"))


def test_config_loads_without_the_weights(tmp_path):
    model = tiny_model(labels=("neg", "pos"))
    model.save_pretrained(str(tmp_path / "m"))
    assert load_config(str(tmp_path / "m")) == model.config
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_config(str(tmp_path / "m"))


def test_a_checkpoint_for_another_label_count_is_refused(tmp_path):
    tiny_model(labels=("a", "b")).save_pretrained(str(tmp_path / "m"))
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["labels"] = ["a", "b", "c"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape .*another label count"):
        FastBert.from_pretrained(str(tmp_path / "m"))


def test_a_plain_bert_folder_is_not_a_fastbert_checkpoint(tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="not a FastBert checkpoint.*from_backbone"):
        FastBert.from_pretrained(str(tmp_path / "bert"))


def test_missing_tokenizer_is_named(tmp_path):
    tiny_model().save_pretrained(str(tmp_path / "m"))
    for name in os.listdir(tmp_path / "m"):
        if name.startswith("tokenizer") or name in ("vocab.txt", "special_tokens_map.json"):
            os.remove(tmp_path / "m" / name)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        FastBert.from_pretrained(str(tmp_path / "m"))


# -- config and backbones -------------------------------------------------------------------


TINY_BERT = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=16, max_position_embeddings=64).to_dict()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"labels": ["only"]}, "at least 2 labels"),
        ({"labels": ["a", "a"]}, "unique"),
        ({"labels": ["a", "b"], "branch_width": 10, "branch_heads": 3}, "multiple"),
        ({"labels": ["a", "b"], "teacher_head": "branch", "teacher_width": 15},
         r"teacher_width \(15\) must be a positive multiple"),
        ({"labels": ["a", "b"], "teacher_width": 8}, r"teacher_width \(8\) sizes a teacher_head='branch'"),
        ({"labels": ["a", "b"], "teacher_head": "linear"}, "teacher_head must be one of"),
        ({"labels": ["a", "b"], "teacher_head": "branch", "branch_width": 15, "branch_heads": 5, "max_length": 32},
         r"teacher_width \(16\) must be a positive multiple of branch_heads \(5\)"),
        ({"labels": ["a", "b"], "max_length": 100}, "max_length"),
        ({"labels": ["a", "b"], "max_length": 32, "dropout": 1.0}, "dropout"),
        ({"labels": ["a", "b"], "max_length": 32, "exit_temperatures": [1.0]}, "exit_temperatures must be"),
        ({"labels": ["a", "b"], "max_length": 32, "exit_temperatures": [0.0, 1.0]}, "exit_temperatures must be"),
        ({"labels": ["a", "b"], "max_length": 32, "exit_temperatures": [float("inf"), 1.0]}, "exit_temperatures must be"),
    ],
)
def test_config_is_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        FastBertConfig(backbone=TINY_BERT, **fields)


def test_a_pooler_teacher_needs_no_width_that_branch_heads_divide():
    config = FastBertConfig(backbone=TINY_BERT, labels=["a", "b"], branch_width=15, branch_heads=5,
                            max_length=32)  # 16 % 5 != 0
    assert config.teacher_head == "pooler" and config.teacher_width == 16


def test_a_backbone_that_is_not_bert_shaped_is_refused(tmp_path):
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16)
    DistilBertModel(config).save_pretrained(str(tmp_path / "distil"))
    with pytest.raises(ValueError, match=r"not BERT-shaped.*\.encoder\.layer"):
        FastBert.from_backbone(str(tmp_path / "distil"), labels=["a", "b"])


def test_from_backbone_on_a_local_folder_and_roberta(tmp_path):
    tokenizer = tiny_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=32, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(str(tmp_path / "roberta"))
    tokenizer.save_pretrained(str(tmp_path / "roberta"))
    model = FastBert.from_backbone(str(tmp_path / "roberta"), labels=["x", "y"], max_length=24).eval()
    assert model.config.backbone["model_type"] == "roberta" and model.config.num_layers == 2
    texts = random_texts(np.random.default_rng(0), 12, max_words=30)
    table = Scorer(model, precision="fp32", speed=0.0, micro_batch=4)(texts)
    enc = encode(model, texts)
    with torch.inference_mode():
        teacher = torch.softmax(model(enc["input_ids"], enc["attention_mask"]).teacher_logits, -1)
    np.testing.assert_allclose(np.array(table["probabilities"].to_pylist()), teacher.numpy(), atol=1e-4)


def test_roberta_positions_start_after_the_pad_id():
    roberta = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, max_position_embeddings=66, pad_token_id=1).to_dict()
    assert FastBertConfig(backbone=roberta, labels=["a", "b"], max_length=64).max_positions == 64
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 64\]"):
        FastBertConfig(backbone=roberta, labels=["a", "b"], max_length=65)


def test_eager_attention_backbones_match_sdpa():
    sdpa = tiny_model(seed=4)
    config = BertConfig(**{**sdpa.config.backbone, "attn_implementation": "eager"})
    eager_backbone = BertModel(config, add_pooling_layer=False)
    eager_backbone.load_state_dict(sdpa.backbone.state_dict())
    eager = FastBert(sdpa.config, backbone=eager_backbone, tokenizer=sdpa.tokenizer).eval()
    eager.branches.load_state_dict(sdpa.branches.state_dict())
    assert eager.backbone.config._attn_implementation == "eager"
    texts = random_texts(np.random.default_rng(1), 10, max_words=30)
    a, b = Scorer(sdpa, precision="fp32", speed=0.0, micro_batch=4)(texts), Scorer(eager, precision="fp32", speed=0.0, micro_batch=4)(texts)
    np.testing.assert_allclose(np.array(a["probabilities"].to_pylist()), np.array(b["probabilities"].to_pylist()),
                               atol=1e-5)


@pytest.mark.slow
def test_bundled_backbone(tmp_path):
    model = FastBert.from_backbone("bundled", labels=["earn", "acq"])
    assert model.config.backbone["hidden_size"] == 384 and model.config.num_layers == 6
    assert model.config.backbone["model_type"] == "bert"
    model.save_pretrained(str(tmp_path / "m"))
    assert_same_model(model.eval(), FastBert.from_pretrained(str(tmp_path / "m")).eval(),
                      ["Champion Products approves stock split", "oil prices fell sharply"])


def test_a_backbone_s_own_error_is_raised_not_retried_away():
    from pipeline.model import _build_backbone

    calls = []

    def broken(**kwargs):
        calls.append(kwargs)
        raise ValueError("vocab_size must be positive")

    with pytest.raises(ValueError, match="vocab_size"):
        _build_backbone(broken)
    assert calls == [{"add_pooling_layer": False, "attn_implementation": "sdpa"}]  # the first try, no other

    def without_pooler_and_sdpa(**kwargs):  # how transformers refuses a keyword or an attention it lacks
        if "add_pooling_layer" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'add_pooling_layer'")
        if kwargs.get("attn_implementation") == "sdpa":
            raise ValueError("XModel does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet.")
        return kwargs

    assert _build_backbone(without_pooler_and_sdpa) == {"attn_implementation": "eager"}
