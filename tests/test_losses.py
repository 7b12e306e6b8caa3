"""Tests for pipeline.losses (and the ablation's label loss, in benchmarks.baselines): hand computations
on small examples, properties, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.baselines import student_label_loss
from pipeline.losses import distillation_loss, teacher_loss

# Two students, a batch of two rows, three labels; deliberately asymmetric distributions.
STUDENTS = [
    [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
    [[0.0, 3.0, 0.0], [-2.0, 1.0, 4.0]],
]
TEACHER = [[1.0, 1.0, -3.0], [0.0, 2.0, 1.0]]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with explicit sums."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def hand_loss(direction: str) -> float:
    """Sum over students of the batch-mean KL, computed with Python floats."""
    total = 0.0
    for student in STUDENTS:
        per_row = []
        for s_row, t_row in zip(student, TEACHER):
            p_s, p_t = softmax(s_row), softmax(t_row)
            per_row.append(kl(p_s, p_t) if direction == "paper" else kl(p_t, p_s))
        total += sum(per_row) / len(per_row)
    return total


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(STUDENTS, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["paper", "reverse"])
def test_distillation_matches_hand_computation(direction):
    students, teacher = tensors()
    loss = distillation_loss(students, teacher, direction)
    expected = torch.tensor(hand_loss(direction), dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)  # float64 kept


def test_paper_is_the_default_and_differs_from_reverse():
    students, teacher = tensors()
    paper = distillation_loss(students, teacher, "paper")
    assert abs(hand_loss("paper") - hand_loss("reverse")) > 0.1  # the example is asymmetric
    assert abs(paper.item() - distillation_loss(students, teacher, "reverse").item()) > 0.1


@pytest.mark.parametrize("direction", ["paper", "reverse"])
def test_zero_when_students_equal_teacher(direction):
    teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    students = teacher.expand(5, 4, 3).clone()
    assert distillation_loss(students, teacher, direction).abs().item() < 1e-6


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(2, 5),
    st.integers(0, 2**31 - 1),
    st.floats(0.1, 50.0),
    st.sampled_from(["paper", "reverse"]),
)
def test_non_negative(S, B, N, seed, scale, direction):
    g = torch.Generator().manual_seed(seed)
    students = torch.randn(S, B, N, generator=g) * scale
    teacher = torch.randn(B, N, generator=g) * scale
    loss = distillation_loss(students, teacher, direction)
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-5


@pytest.mark.parametrize("direction", ["paper", "reverse"])
def test_no_gradient_reaches_the_teacher(direction):
    students, teacher = tensors()
    students.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(students, teacher, direction).backward()
    assert teacher.grad is None
    assert students.grad is not None and students.grad.abs().sum() > 0


@pytest.mark.parametrize("direction", ["paper", "reverse"])
def test_finite_when_a_probability_underflows(direction):
    students = torch.tensor([[[100.0, -100.0]]], requires_grad=True)  # p_s = [1, e^-200]: underflows
    teacher = torch.tensor([[-100.0, 100.0]])  # p_t = [e^-200, 1]
    loss = distillation_loss(students, teacher, direction)
    assert torch.isfinite(loss)
    # paper: 1 * (0 - (-200)) = 200; reverse: 1 * (0 - (-200)) = 200, both finite and exact
    torch.testing.assert_close(loss, torch.tensor(200.0))
    loss.backward()
    assert torch.isfinite(students.grad).all()


def test_low_precision_logits_give_a_float32_loss():
    students, teacher = tensors()
    loss = distillation_loss(students.bfloat16(), teacher.bfloat16(), "paper")
    assert loss.dtype == torch.float32
    assert abs(loss.item() - hand_loss("paper")) < 0.1


def test_bad_direction():
    students, teacher = tensors()
    with pytest.raises(ValueError, match="direction must be one of"):
        distillation_loss(students, teacher, "forward")


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [((2, 2, 3), (2, 4)), ((2, 2, 3), (3, 3)), ((2, 3), (2, 3)), ((1, 2, 3), (1, 2, 3))],
)
def test_mismatched_shapes(student_shape, teacher_shape):
    with pytest.raises(ValueError, match=r"\(S, B, N\).*" + re.escape(str(student_shape))):
        distillation_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), "reverse")


def test_teacher_loss_is_cross_entropy():
    logits = torch.tensor(TEACHER)
    labels = torch.tensor([0, 2])
    hand = -(math.log(softmax(TEACHER[0])[0]) + math.log(softmax(TEACHER[1])[2])) / 2
    torch.testing.assert_close(teacher_loss(logits, labels), torch.tensor(hand))
    with pytest.raises(ValueError, match=r"logits \(B, N\) and labels \(B,\)"):
        teacher_loss(logits, torch.tensor([0, 1, 2]))


def test_student_label_loss_sums_per_student_cross_entropies():
    g = torch.Generator().manual_seed(1)
    students = torch.randn(3, 5, 4, generator=g)
    labels = torch.randint(0, 4, (5,), generator=g)
    expected = sum(F.cross_entropy(students[s], labels) for s in range(3))
    torch.testing.assert_close(student_label_loss(students, labels), expected)
    with pytest.raises(ValueError, match=r"\(S, B, N\) and labels \(B,\)"):
        student_label_loss(students, labels[:4])
    with pytest.raises(ValueError, match=r"\(S, B, N\)"):
        student_label_loss(students[0], labels)

