"""The engine against the definition: a row leaves at the first layer whose uncertainty is
below the speed, whatever rows, batch size or micro-batch size it is scored with."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import Scorer, uncertainty
from pipeline.engine import SCHEMA
from tiny import random_texts, tiny_model

NEAR = 1e-4  # a row whose uncertainty is this close to the speed may exit either way


@pytest.fixture(scope="module")
def model():
    """A tiny random model whose branches are confident enough for exits to spread over layers."""
    m = tiny_model(labels=("a", "b", "c"), num_layers=4, seed=1)
    with torch.no_grad():
        for scale, branch in zip((60.0, 20.0, 60.0, 20.0), m.branches):  # at speed 0.3 rows leave at every layer
            branch.classifier.weight.mul_(scale)
            branch.classifier.bias.zero_()
    return m


def reference(model, text: str, speed: float, max_length: int | None = None):
    """What the paper defines, computed alone for one row with a plain full-depth forward:
    (probabilities, exit layer 1-based, uncertainty, per-layer uncertainties)."""
    enc = model.tokenizer([text], truncation=True, max_length=max_length or model.config.max_length,
                          return_tensors="pt")
    with torch.inference_mode():
        logits = model(enc["input_ids"], enc["attention_mask"]).logits[:, 0]  # (L, N)
    u = uncertainty(logits)  # (L,)
    exit_layer = len(u)
    if speed > 0:
        exit_layer = next((k + 1 for k in range(len(u) - 1) if u[k] < speed), len(u))
    probs = torch.softmax(logits[exit_layer - 1].float(), -1)
    return probs.numpy(), exit_layer, float(u[exit_layer - 1]), u.numpy()


def assert_matches_reference(model, table: pa.Table, texts, speed, max_length=None):
    got = table.to_pydict()
    compared = 0
    for i, text in enumerate(texts):
        probs, exit_layer, u, us = reference(model, text, speed, max_length)
        if speed > 0 and np.any(np.abs(us[: exit_layer] - speed) < NEAR):
            continue  # a tie at the threshold: float noise may decide either way
        compared += 1
        assert got["exit_layer"][i] == exit_layer, f"row {i}: exit {got['exit_layer'][i]} != {exit_layer}"
        np.testing.assert_allclose(got["probabilities"][i], probs, atol=1e-5, rtol=0)
        assert got["uncertainty"][i] == pytest.approx(u, abs=1e-5)
        assert got["prediction"][i] == model.config.labels[int(np.argmax(probs))]
        assert got["error"][i] is None
    return compared


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 30),
    speed=st.floats(0.0, 1.0),
    micro_batch=st.integers(1, 9),
    regroup=st.booleans(),
)
def test_engine_equals_per_row_definition(model, seed, n, speed, micro_batch, regroup):
    texts = random_texts(np.random.default_rng(seed), n, max_words=45)  # some longer than max_length
    table = Scorer(model, precision="fp32", speed=speed, micro_batch=micro_batch, regroup=regroup)(texts)
    assert table.schema == SCHEMA and table.num_rows == n
    assert_matches_reference(model, table, texts, speed)


def test_speed_zero_is_the_plain_full_depth_forward(model):
    texts = random_texts(np.random.default_rng(0), 40, max_words=45)
    table = Scorer(model, precision="fp32", speed=0.0, micro_batch=8)(texts)
    enc = model.tokenizer(texts, truncation=True, max_length=model.config.max_length, padding=True,
                          return_tensors="pt")
    with torch.inference_mode():
        teacher = torch.softmax(model(enc["input_ids"], enc["attention_mask"]).teacher_logits, -1)  # (B, N)
    np.testing.assert_allclose(np.array(table["probabilities"].to_pylist()), teacher.numpy(), atol=1e-4, rtol=0)
    assert set(table["exit_layer"].to_pylist()) == {model.config.num_layers}


def test_a_row_does_not_depend_on_its_company(model):
    rng = np.random.default_rng(3)
    texts = random_texts(rng, 60, max_words=45)
    speed = 0.3
    alone = [Scorer(model, precision="fp32", speed=speed, micro_batch=1)([t]) for t in texts[:10]]
    together = Scorer(model, precision="fp32", speed=speed, micro_batch=7)(texts)
    shuffled_order = rng.permutation(len(texts))
    shuffled = Scorer(model, precision="fp32", speed=speed, micro_batch=16)([texts[i] for i in shuffled_order])
    back = shuffled.take(pa.array(np.argsort(shuffled_order)))
    for name in ("exit_layer", "prediction"):
        assert together[name].to_pylist() == back[name].to_pylist()
        assert together[name].to_pylist()[:10] == [a[name][0].as_py() for a in alone]
    np.testing.assert_allclose(np.array(together["probabilities"].to_pylist()),
                               np.array(back["probabilities"].to_pylist()), atol=1e-5)
    exits = set(together["exit_layer"].to_pylist())
    assert len(exits) >= 3, f"the fixture should spread exits over layers, got {exits}"


class LayerRecorder:
    """Forward hooks on every layer and branch that record the batch shapes they ran on."""

    def __init__(self, model):
        self.layers = [[] for _ in model.layers]
        self.branches = [[] for _ in model.branches]
        self.handles = [
            m.register_forward_hook(lambda mod, args, out, log=log: log.append(tuple(args[0].shape[:2])))
            for mods, logs in ((model.layers, self.layers), (model.branches, self.branches))
            for m, log in zip(mods, logs)
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def test_exited_rows_are_removed_and_survivors_regrouped(model):
    texts = random_texts(np.random.default_rng(5), 200, max_words=45)
    micro_batch = 16
    recorder = LayerRecorder(model)
    try:
        table = Scorer(model, precision="fp32", speed=0.3, micro_batch=micro_batch)(texts)
    finally:
        recorder.close()
    exits = np.array(table["exit_layer"].to_pylist())
    for k, shapes in enumerate(recorder.layers):
        rows = sum(b for b, _ in shapes)
        # compaction: layer k+1 and its branch ran on exactly the rows that had not left yet
        assert rows == int((exits >= k + 1).sum()), f"layer {k + 1} computed {rows} rows"
        assert sum(b for b, _ in recorder.branches[k]) == rows
        # re-batching: full micro-batches everywhere, but for one flush per layer
        partial = [b for b, _ in shapes if b != micro_batch]
        assert len(partial) <= (len(texts) % micro_batch != 0 if k == 0 else 1), (k, shapes)
    assert 0 < (exits == 1).sum() < len(texts), "some rows should leave early, some stay"


def test_waiting_rows_keep_at_most_as_many_other_rows_alive(model):
    """Survivors wait in their step's output without a copy, unless fewer than half stay: the
    hidden states a pool keeps alive are at most twice its rows, so memory stays bounded."""
    texts = random_texts(np.random.default_rng(6), 300, max_words=45)
    scorer = Scorer(model, precision="fp32", speed=0.3, micro_batch=16)
    held = []  # (rows in the pool, rows of the step outputs it keeps alive), after every push
    push = scorer._push

    def recording_push(call, k, chunk):
        push(call, k, chunk)
        alive = {id(c.hidden): c.hidden.shape[0] for c in call.pools[k]}
        held.append((call.pool_rows[k], sum(alive.values())))

    scorer._push = recording_push
    table = scorer(texts)
    assert held and all(alive <= 2 * rows + 16 for rows, alive in held), max(held, key=lambda h: h[1] - h[0])
    assert any(alive > rows for rows, alive in held), "some survivors should wait without a copy"
    scorer._push = push
    np.testing.assert_array_equal(table["exit_layer"].to_numpy(), scorer(texts)["exit_layer"].to_numpy())


def test_without_regrouping_batches_only_shrink(model):
    texts = random_texts(np.random.default_rng(5), 200, max_words=45)
    recorder = LayerRecorder(model)
    try:
        Scorer(model, precision="fp32", speed=0.3, micro_batch=16, regroup=False)(texts)
    finally:
        recorder.close()
    deep = recorder.layers[1]  # layer 2: about half of the rows reach it
    assert len([b for b, _ in deep if b != 16]) > 3  # many shrunken batches: what regrouping avoids


def test_micro_batches_are_sorted_and_padded_to_their_own_longest_row(model):
    texts = random_texts(np.random.default_rng(7), 50, max_words=45)
    lengths = sorted(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=32)["input_ids"])
    recorder = LayerRecorder(model)
    try:
        Scorer(model, precision="fp32", speed=0.0, micro_batch=8)(texts)
    finally:
        recorder.close()
    expected = [(len(lengths[i:i + 8]), max(lengths[i:i + 8])) for i in range(0, 50, 8)]
    assert recorder.layers[0] == expected
    assert all(not shapes for shapes in recorder.branches[:-1]), "speed 0 must not run student branches"


def test_flops_follow_exits(model):
    texts = random_texts(np.random.default_rng(9), 80, max_words=45)
    full = Scorer(model, precision="fp32", speed=0.0, micro_batch=8)
    fast = Scorer(model, precision="fp32", speed=0.3, micro_batch=8)
    t_full, t_fast = full(texts), fast(texts)
    assert full.stats.flops == full.stats.full_depth_flops == sum(t_full["flops"].to_pylist())
    assert fast.stats.flops == sum(t_fast["flops"].to_pylist()) < full.stats.flops
    assert fast.stats.flop_speedup > 1.0
    assert fast.stats.mean_exit_layer == pytest.approx(np.mean(t_fast["exit_layer"].to_pylist()))
    assert sum(fast.stats.exit_counts) == len(texts)


def test_speed_one_leaves_at_the_first_layer(model):
    table = Scorer(model, precision="fp32", speed=1.0)(random_texts(np.random.default_rng(11), 20))
    assert set(table["exit_layer"].to_pylist()) == {1}


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("speed", [-0.1, 1.01, float("nan"), "0.5", True])
def test_speed_outside_0_1_is_refused(model, speed):
    with pytest.raises(ValueError, match="speed"):
        Scorer(model, precision="fp32", speed=speed)


def test_no_speed_means_0_5_and_a_speed_excludes_a_budget(model):
    assert Scorer(model, precision="fp32").speed == 0.5 and Scorer(model, precision="fp32").speed_choice is None
    with pytest.raises(ValueError, match="not both"):
        Scorer(model, precision="fp32", speed=0.3, target_speedup=2.0)


@pytest.mark.parametrize("micro_batch", [0, -3, 2.5])
def test_non_positive_micro_batch_is_refused(model, micro_batch):
    with pytest.raises(ValueError, match="micro_batch"):
        Scorer(model, precision="fp32", micro_batch=micro_batch)


def test_max_length_beyond_the_backbone_is_refused(model):
    with pytest.raises(ValueError, match="max_length"):
        Scorer(model, precision="fp32", max_length=10_000)


def test_bad_rows_get_an_error_and_never_fail_the_batch(model):
    good = random_texts(np.random.default_rng(13), 5)
    texts = [good[0], None, "", "   ", good[1], 42, b"bytes", good[2], float("nan"), good[3], good[4]]
    table = Scorer(model, precision="fp32", speed=0.5, micro_batch=2)(texts)
    rows = table.to_pylist()
    assert len(rows) == len(texts)
    errors = {i: r["error"] for i, r in enumerate(rows) if r["error"] is not None}
    assert errors == {1: "text is null", 2: "text is empty", 3: "text is empty",
                      5: "text is not a string (got int)", 6: "text is not a string (got bytes)",
                      8: "text is not a string (got float)"}
    for i in errors:
        assert rows[i]["prediction"] is None and rows[i]["probabilities"] is None
        assert rows[i]["exit_layer"] is None and rows[i]["flops"] is None
    clean = Scorer(model, precision="fp32", speed=0.5, micro_batch=2)(good).to_pylist()
    kept = [r for i, r in enumerate(rows) if i not in errors]
    assert [r["prediction"] for r in kept] == [r["prediction"] for r in clean]
    assert [r["exit_layer"] for r in kept] == [r["exit_layer"] for r in clean]


def test_long_text_is_truncated_and_counted(model):
    words = random_texts(np.random.default_rng(17), 1, min_words=400, max_words=400)[0]
    scorer = Scorer(model, precision="fp32", speed=0.3, max_length=16)
    table = scorer([words, "good movie"])
    assert scorer.stats.truncated == 1 and table["error"].null_count == 2
    probs, exit_layer, _, _ = reference(model, words, 0.3, max_length=16)
    assert table["exit_layer"][0].as_py() == exit_layer
    np.testing.assert_allclose(table["probabilities"][0].as_py(), probs, atol=1e-5)


def test_empty_input_returns_an_empty_table(model):
    table = Scorer(model, precision="fp32")([])
    assert table.num_rows == 0 and table.schema == SCHEMA


def test_a_single_string_is_refused(model):
    with pytest.raises(TypeError, match="list of texts"):
        Scorer(model, precision="fp32")("just one text")


def test_arrow_input_with_nulls(model):
    texts = pa.array(["good movie", None, "bad movie"])
    table = Scorer(model, precision="fp32", speed=0.2)(texts)
    assert table["error"].to_pylist() == [None, "text is null", None]
    assert not math.isnan(table["uncertainty"][0].as_py())


# -- reduced precision ------------------------------------------------------------------------------

# bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%): a matrix product's inputs are
# rounded to it, so hidden states move by about 1% after a few layers and a batch of other rows
# (other kernel blocking, other accumulation order) moves a row's result by as much. Probabilities
# and uncertainties are computed in fp32 from the logits, so they differ by a few hundredths at
# most, and an exit decision can only flip for a row whose uncertainty is that close to the speed.
BF16_PROBS = 0.05  # absolute, on probabilities in [0, 1]
BF16_NEAR = 0.05  # a row this close to the speed may exit either way in bf16


def test_precision_auto_resolves_to_what_the_chip_has(model):
    from pipeline.model import cpu_has_native_bf16, resolve_precision

    assert Scorer(model, precision="auto").precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp16", "cpu") == "fp16" and Scorer(model, precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        Scorer(model, precision="int8")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), speed=st.floats(0.05, 0.95),
       micro_batch=st.integers(1, 9))
def test_bf16_compaction_and_regrouping_equal_masked_full_batches(model, seed, n, speed, micro_batch):
    """In bf16 the engine (rows leaving, survivors regrouped) gives each row what one masked
    full-depth forward of the whole batch in bf16 gives it, within the stated tolerances."""
    texts = random_texts(np.random.default_rng(seed), n, max_words=45)
    table = Scorer(model, precision="bf16", speed=speed, micro_batch=micro_batch)(texts).to_pydict()
    enc = model.tokenizer(texts, truncation=True, max_length=model.config.max_length, padding=True,
                          return_tensors="pt")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(enc["input_ids"], enc["attention_mask"]).logits.float()  # (L, B, N)
    us = uncertainty(logits)  # (L, B)
    for i in range(n):
        u = us[:, i].numpy()
        if np.any(np.abs(u[:-1] - speed) < BF16_NEAR):
            continue  # near the threshold: bf16 noise may decide either way
        exit_layer = next((k + 1 for k in range(len(u) - 1) if u[k] < speed), len(u))
        assert table["exit_layer"][i] == exit_layer
        probs = torch.softmax(logits[exit_layer - 1, i], -1).numpy()
        np.testing.assert_allclose(table["probabilities"][i], probs, atol=BF16_PROBS, rtol=0)
        assert abs(table["uncertainty"][i] - u[exit_layer - 1]) < BF16_NEAR


def test_bf16_agrees_with_fp32_and_keeps_the_flop_account(model):
    texts = random_texts(np.random.default_rng(3), 200, max_words=45)
    for speed in (0.0, 0.3):
        full, half = Scorer(model, precision="fp32", speed=speed), Scorer(model, precision="bf16", speed=speed)
        a, b = full(texts).to_pydict(), half(texts).to_pydict()
        agree = np.mean(np.array(a["prediction"]) == np.array(b["prediction"]))
        assert agree >= 0.95, agree  # a tiny random model's margins are small; real models agree on >= 99.5%
        same_exit = np.array(a["exit_layer"]) == np.array(b["exit_layer"])
        # FLOPs are counted from the exits alone, whatever the precision
        assert np.array_equal(np.array(a["flops"])[same_exit], np.array(b["flops"])[same_exit])
        assert half.stats.full_depth_flops == full.stats.full_depth_flops


def test_bf16_bad_rows_get_an_error_and_never_fail_the_batch(model):
    texts = ["good w1 w2", None, "", 7, "bad w3"]
    table = Scorer(model, precision="bf16", speed=0.5, micro_batch=2)(texts).to_pydict()
    assert [e is None for e in table["error"]] == [True, False, False, False, True]
    assert table["prediction"][1] is None and table["prediction"][0] in model.config.labels


def test_compiled_layers_give_the_eager_engine_s_answers(model):
    """compile=True (torch.compile, dynamic shapes, frozen weights) changes no exit and no
    probability beyond float noise, across batch and sequence sizes (one compile serves them)."""
    texts = random_texts(np.random.default_rng(5), 40, max_words=45)
    eager = Scorer(model, precision="fp32", speed=0.3, micro_batch=8)(texts).to_pydict()
    compiled = Scorer(model, precision="fp32", speed=0.3, micro_batch=8, compile=True)
    assert compiled.compiled
    for _ in range(2):  # the second call runs the graphs the first one built
        got = compiled(texts).to_pydict()
        assert got["exit_layer"] == eager["exit_layer"]
        np.testing.assert_allclose(np.array(got["probabilities"]), np.array(eager["probabilities"]), atol=1e-4)
    assert model.layers[0].training is False and not isinstance(model.layers[0], torch._dynamo.eval_frame.OptimizedModule)


def test_one_scorer_serves_threads_at_once(model):
    """Calls from several threads at once (a threaded Ray actor, a web service) each get what
    a call alone gets, and the stats add up."""
    from concurrent.futures import ThreadPoolExecutor

    scorer = Scorer(model, precision="fp32", speed=0.3, micro_batch=4)
    inputs = [random_texts(np.random.default_rng(seed), 25, max_words=45) for seed in range(6)]
    alone = [Scorer(model, precision="fp32", speed=0.3, micro_batch=4)(texts).to_pydict() for texts in inputs]
    with ThreadPoolExecutor(3) as pool:
        together = [t.to_pydict() for t in pool.map(scorer, inputs)]
    for a, b in zip(alone, together):
        assert a["exit_layer"] == b["exit_layer"] and a["prediction"] == b["prediction"]
        np.testing.assert_allclose(np.array(a["probabilities"]), np.array(b["probabilities"]), atol=1e-6)
    assert scorer.stats.rows == 150 and sum(scorer.stats.exit_counts) == 150
