"""Tests for pipeline.flops, checked against the FastBERT paper's Table 1."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.flops import branch_flops, full_depth_flops, layer_flops, row_flops, teacher_flops, truncated_flops

H, I, T, W = 768, 3072, 128, 128
N_LAYERS = 12

# FastBERT paper, Table 1 (BERT-base, sequence length 128), in FLOPs.
PAPER_ATTENTION = 603.0e6
PAPER_FFN = 1207.9e6
PAPER_LAYER = 1809.9e6
PAPER_BRANCH = 46.1e6
PAPER_FULL = 21785e6


def make_config(layers: int = N_LAYERS, n_labels: int = 2, teacher_width: int = W) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        backbone={"hidden_size": H, "intermediate_size": I, "num_hidden_layers": layers},
        labels=[f"l{j}" for j in range(n_labels)],
        branch_width=W,
        teacher_width=teacher_width,
    )


def close(value: float, reference: float, rel: float = 0.02) -> bool:
    return abs(value - reference) <= rel * reference


def test_layer_matches_paper() -> None:
    total = layer_flops(H, I, T, "paper")
    attention = layer_flops(H, 0, T, "paper")  # no FFN: only the Q, K, V, O projections
    ffn = total - attention
    assert close(total, PAPER_LAYER)
    assert close(attention, PAPER_ATTENTION)
    assert close(ffn, PAPER_FFN)
    assert close(attention + ffn, PAPER_ATTENTION + PAPER_FFN)


def test_branch_matches_paper() -> None:
    # The paper does not count FC W->N, so the label count must not matter.
    b2 = branch_flops(H, W, 2, T, "paper")
    b10 = branch_flops(H, W, 10, T, "paper")
    assert b2 == b10
    assert close(b2, PAPER_BRANCH)
    # Its parts: FC 768->128 25.1M, self-attention 16.8M, FC 128->128 4.2M.
    assert close(2 * T * H * W, 25.1e6)
    assert close(b2 - 2 * T * H * W, 16.8e6 + 4.2e6)


def test_full_depth_matches_paper() -> None:
    cfg = make_config()
    full = full_depth_flops(cfg, T, "paper")
    assert close(full, N_LAYERS * PAPER_LAYER + PAPER_BRANCH)
    assert close(full, PAPER_FULL)


def test_executed_vs_paper() -> None:
    lay_exec, lay_paper = layer_flops(H, I, T), layer_flops(H, I, T, "paper")
    assert lay_exec >= lay_paper
    assert lay_exec - lay_paper == 4 * T * T * H
    br_exec, br_paper = branch_flops(H, W, 2, T), branch_flops(H, W, 2, T, "paper")
    assert br_exec < br_paper
    # One-token query saves Q, O and FC W->W on T-1 tokens; the executed branch
    # pays instead for one query's scores/weighted values and for FC W->N.
    assert br_paper - br_exec == 2 * 3 * (T - 1) * W * W - 2 * 2 * T * W - 2 * W * 2


@pytest.mark.parametrize("convention", ["executed", "paper"])
def test_row_flops_monotone(convention: str) -> None:
    cfg = make_config()
    by_exit = [row_flops(cfg, T, k, convention=convention) for k in range(1, N_LAYERS + 1)]
    assert all(a < b for a, b in zip(by_exit, by_exit[1:]))
    by_len = [row_flops(cfg, t, 5, convention=convention) for t in (1, 2, 16, 128, 512)]
    assert all(a < b for a, b in zip(by_len, by_len[1:]))
    # Exiting at layer k costs k layers plus k branches.
    assert by_exit[3] == 4 * layer_flops(H, I, T, convention) + 4 * branch_flops(
        H, W, 2, T, convention
    )


@pytest.mark.parametrize("convention", ["executed", "paper"])
def test_teacher_only_equals_full_depth(convention: str) -> None:
    cfg = make_config()
    for t in (1, 64, 128):
        teacher = row_flops(cfg, t, N_LAYERS, students=False, convention=convention)
        assert teacher == full_depth_flops(cfg, t, convention)
        assert teacher < row_flops(cfg, t, N_LAYERS, students=True, convention=convention)


def test_truncation_runs_k_layers_and_one_classifier() -> None:
    cfg = make_config()
    lengths = np.array([5, 64, 128])
    assert np.array_equal(truncated_flops(cfg, lengths, N_LAYERS), full_depth_flops(cfg, lengths))
    for k in (1, 4, 11):  # the students before layer k do not run
        saved = (k - 1) * branch_flops(H, W, 2, lengths)
        assert np.array_equal(truncated_flops(cfg, lengths, k), row_flops(cfg, lengths, k) - saved)
    with pytest.raises(ValueError, match="layers must be in"):
        truncated_flops(cfg, 10, 0)


@pytest.mark.parametrize("convention", ["executed", "paper"])
def test_a_wider_teacher_counts_only_where_the_teacher_runs(convention: str) -> None:
    narrow, wide = make_config(), make_config(teacher_width=H)
    teacher_extra = branch_flops(H, H, 2, T, convention) - branch_flops(H, W, 2, T, convention)
    assert teacher_extra > 0
    for k in range(1, N_LAYERS):  # the students before the teacher: the same cost
        assert row_flops(wide, T, k, convention=convention) == row_flops(narrow, T, k, convention=convention)
        assert truncated_flops(wide, T, k, convention) == truncated_flops(narrow, T, k, convention)
    for f in (lambda c: row_flops(c, T, N_LAYERS, convention=convention), lambda c: full_depth_flops(c, T, convention),
              lambda c: truncated_flops(c, T, N_LAYERS, convention),
              lambda c: row_flops(c, T, N_LAYERS, students=False, convention=convention)):
        assert f(wide) - f(narrow) == teacher_extra
    exits = np.array([1, N_LAYERS, 3, N_LAYERS])  # vectorised: the teacher only in rows 2 and 4
    assert (row_flops(wide, T, exits, convention=convention) - row_flops(narrow, T, exits, convention=convention)
            ).tolist() == [0, teacher_extra, 0, teacher_extra]


def test_vectorised_matches_scalar() -> None:
    cfg = make_config(n_labels=3)
    rng = np.random.default_rng(0)
    seq = rng.integers(1, 513, size=50)
    exits = rng.integers(1, N_LAYERS + 1, size=50)
    out = row_flops(cfg, seq, exits)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (50,)
    expected = [row_flops(cfg, int(t), int(k)) for t, k in zip(seq, exits)]
    assert all(isinstance(e, int) for e in expected)
    assert out.tolist() == expected
    full = full_depth_flops(cfg, seq, "paper")
    assert isinstance(full, np.ndarray) and full.dtype == np.int64
    assert full.tolist() == [full_depth_flops(cfg, int(t), "paper") for t in seq]
    teacher = row_flops(cfg, seq, np.full(50, N_LAYERS), students=False)
    assert teacher.tolist() == full_depth_flops(cfg, seq).tolist()


def test_errors() -> None:
    cfg = make_config()
    with pytest.raises(ValueError, match="exit_layer"):
        row_flops(cfg, T, 0)
    with pytest.raises(ValueError, match="exit_layer"):
        row_flops(cfg, T, N_LAYERS + 1)
    with pytest.raises(ValueError, match="exit_layer"):
        row_flops(cfg, T, np.array([1, 13]))
    with pytest.raises(ValueError, match="seq_len"):
        row_flops(cfg, 0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        full_depth_flops(cfg, np.array([5, 0]))
    with pytest.raises(ValueError, match="seq_len"):
        layer_flops(H, I, 0)
    with pytest.raises(ValueError, match="'fast'"):
        row_flops(cfg, T, 1, convention="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="convention"):
        branch_flops(H, W, 2, T, convention="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="students=False"):
        row_flops(cfg, T, N_LAYERS - 1, students=False)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 16).map(lambda m: 64 * m),
    i=st.integers(1, 4096),
    t=st.integers(1, 512),
)
def test_layer_scaling_property(h: int, i: int, t: int) -> None:
    paper = layer_flops(h, i, t, "paper")
    assert paper == t * layer_flops(h, i, 1, "paper")
    assert layer_flops(h, i, 2 * t, "paper") == 2 * paper
    assert layer_flops(h, i, t, "executed") - paper == 4 * t * t * h


@pytest.mark.parametrize("convention", ["executed", "paper"])
def test_a_pooler_teacher_costs_its_two_linear_layers_on_one_token(convention: str) -> None:
    branch, pooler = make_config(teacher_width=H), make_config(n_labels=3)
    pooler.teacher_head = "pooler"
    head = 2 * H * H + (2 * H * 3 if convention == "executed" else 0)  # FC H->H (+ FC H->N) on the first token
    assert teacher_flops(pooler, T, convention) == head
    assert full_depth_flops(pooler, T, convention) == N_LAYERS * layer_flops(H, I, T, convention) + head
    assert teacher_flops(pooler, 5, convention) == teacher_flops(pooler, 500, convention)  # no token but the first
    assert teacher_flops(branch, T, convention) == branch_flops(H, H, 2, T, convention)
    lengths = np.array([5, 64, 128])
    assert teacher_flops(pooler, lengths, convention).tolist() == [head] * 3
    exits = np.array([1, N_LAYERS, N_LAYERS])
    layers = layer_flops(H, I, lengths, convention)
    students = branch_flops(H, W, 3, lengths, convention)
    assert row_flops(pooler, lengths, exits, convention=convention).tolist() == [
        layers[0] + students[0], N_LAYERS * layers[1] + (N_LAYERS - 1) * students[1] + head,
        N_LAYERS * layers[2] + (N_LAYERS - 1) * students[2] + head]
    assert truncated_flops(pooler, T, N_LAYERS, convention) == full_depth_flops(pooler, T, convention)


def test_the_pooler_teachers_count_is_what_torch_executes() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import PoolerHead

    config = types.SimpleNamespace(backbone={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2},
                                   labels=["a", "b", "c", "d"], branch_width=16, teacher_width=48,
                                   teacher_head="pooler")
    head = PoolerHead(48, 4, 0.0).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        head(torch.randn(3, 7, 48), None)  # 3 rows of 7 tokens
    assert counter.get_total_flops() == 3 * teacher_flops(config, 7)
