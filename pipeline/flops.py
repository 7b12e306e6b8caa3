"""Analytic FLOP counts for FastBERT's backbone layers and branch classifiers.

One FLOP is counted per multiply and per add, so a multiply-accumulate
(MAC) costs 2 FLOPs. Biases, activations, softmax, layer norms and the
embedding lookup are not counted. All counts are per row (one sample).

Symbols: H hidden size, I intermediate (FFN) size, T sequence length,
W branch width (the students' ``branch_width``, the teacher's ``teacher_width``),
N number of labels.

Two conventions are offered:

``"paper"``
    The convention of the FastBERT paper (Liu et al. 2020, Table 1):
    2 x the MACs of the linear layers over all T tokens; attention-score
    products (QK^T and weights x V) are not counted, and neither is the
    branch's last FC W->N.  A BERT-base layer at T=128 gives ~1810M and a
    branch of width 128 ~46.1M, matching the paper.

    * layer:  2*T*(4*H*H + 2*H*I)
    * branch: 2*T*H*W + 2*T*4*W*W + 2*T*W*W

``"executed"`` (default)
    What our implementation actually runs.  A layer adds the attention
    products (2*T*T*H MACs for QK^T plus the same for weights x V).  A branch
    projects keys and values for all T tokens but computes the query, the
    attention and the output projection only for the first (pooled) token,
    then applies FC W->W and FC W->N to that one vector.

    * layer:  2*T*(4*H*H + 2*H*I) + 2*2*T*T*H
    * branch: 2*T*H*W + 2*2*T*W*W + 2*2*W*W + 2*2*T*W + 2*W*W + 2*W*N

A ``teacher_head="pooler"`` teacher (plain BERT's head) runs on the first token alone:

    * executed: 2*H*H + 2*H*N (the pooler's FC H->H, the FC H->N)
    * paper:    2*H*H (the last FC is not counted, as for a branch)

``seq_len`` and ``exit_layer`` may be Python ints (an int is returned) or
numpy integer arrays of one shape (an ``np.int64`` array is returned).
"""

from __future__ import annotations

from typing import Any, Literal, Union

import numpy as np

Convention = Literal["executed", "paper"]
IntOrArray = Union[int, np.ndarray]

_CONVENTIONS = ("executed", "paper")


def _check_convention(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(
            f"convention must be one of {_CONVENTIONS}, got {convention!r}"
        )


def _as_int_or_array(value: Any) -> IntOrArray:
    """Return a Python int for scalars, an int64 array otherwise."""
    if np.ndim(value) == 0:
        return int(value)
    return np.asarray(value, dtype=np.int64)


def _check_seq_len(seq_len: IntOrArray) -> None:
    if np.any(np.asarray(seq_len) < 1):
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")


def _dims(config: Any) -> tuple[int, int, int, int, int, int]:
    """Read (hidden, intermediate, num_layers, student width, teacher width, n_labels)."""
    bb = config.backbone
    return (
        int(bb["hidden_size"]),
        int(bb["intermediate_size"]),
        int(bb["num_hidden_layers"]),
        int(config.branch_width),
        int(config.teacher_width),
        len(config.labels),
    )


def layer_flops(
    hidden: int, intermediate: int, seq_len: IntOrArray, convention: Convention = "executed"
) -> IntOrArray:
    """FLOPs of one Transformer layer (Q, K, V, O projections and FFN) for one row."""
    _check_convention(convention)
    t = _as_int_or_array(seq_len)
    _check_seq_len(t)
    h, i = int(hidden), int(intermediate)
    flops = 2 * t * (4 * h * h + 2 * h * i)
    if convention == "executed":
        flops = flops + 2 * 2 * t * t * h
    return flops


def branch_flops(
    hidden: int,
    width: int,
    n_labels: int,
    seq_len: IntOrArray,
    convention: Convention = "executed",
) -> IntOrArray:
    """FLOPs of one branch classifier (student or teacher) for one row."""
    _check_convention(convention)
    t = _as_int_or_array(seq_len)
    _check_seq_len(t)
    h, w, n = int(hidden), int(width), int(n_labels)
    if convention == "paper":
        return 2 * t * h * w + 2 * t * 4 * w * w + 2 * t * w * w
    return (
        2 * t * h * w  # FC H->W over all tokens
        + 2 * 2 * t * w * w  # K and V projections over all tokens
        + 2 * 2 * w * w  # Q and O projections for the first token
        + 2 * 2 * t * w  # scores and weighted values for one query
        + 2 * w * w  # FC W->W on the pooled vector
        + 2 * w * n  # FC W->N on the pooled vector
    )


def teacher_flops(config: Any, seq_len: IntOrArray, convention: Convention = "executed") -> IntOrArray:
    """FLOPs of the teacher (the classifier after the last layer) for one row: a branch of
    ``teacher_width``, or plain BERT's pooler head (``teacher_head="pooler"``)."""
    _check_convention(convention)
    h, _, _, _, w_teacher, n = _dims(config)
    t = _as_int_or_array(seq_len)
    _check_seq_len(t)
    if getattr(config, "teacher_head", "branch") == "branch":
        return branch_flops(h, w_teacher, n, t, convention)
    pooler = 2 * h * h + (2 * h * n if convention == "executed" else 0)
    return t * 0 + pooler  # the shape of seq_len


def row_flops(
    config: Any,
    seq_len: IntOrArray,
    exit_layer: IntOrArray,
    students: bool = True,
    convention: Convention = "executed",
) -> IntOrArray:
    """FLOPs spent on a row that exits after ``exit_layer`` (1-based) layers.

    With ``students=True`` every branch up to the exit layer was evaluated (the
    students, and the teacher when the row went the full depth); with
    ``students=False`` only the teacher branch ran, which requires
    ``exit_layer`` to equal the number of layers.
    """
    _check_convention(convention)
    h, i, n_layers, w, _, n = _dims(config)
    t = _as_int_or_array(seq_len)
    k = _as_int_or_array(exit_layer)
    _check_seq_len(t)
    k_arr = np.asarray(k)
    if np.any((k_arr < 1) | (k_arr > n_layers)):
        raise ValueError(f"exit_layer must be in [1, {n_layers}], got {exit_layer!r}")
    if not students and np.any(k_arr != n_layers):
        raise ValueError(
            f"students=False means only the teacher ran, so exit_layer must be "
            f"{n_layers}, got {exit_layer!r}"
        )
    teacher = teacher_flops(config, t, convention)
    if not students:
        return k * layer_flops(h, i, t, convention) + teacher
    full = _as_int_or_array(k_arr == n_layers)  # 1 where the teacher ran too
    student_count = k - full  # the students that ran: k, or L - 1 at full depth
    return k * layer_flops(h, i, t, convention) + student_count * branch_flops(h, w, n, t, convention) + full * teacher


def full_depth_flops(
    config: Any, seq_len: IntOrArray, convention: Convention = "executed"
) -> IntOrArray:
    """FLOPs of a plain BERT classifier on a row: all layers plus the teacher."""
    _check_convention(convention)
    h, i, n_layers, _, _, _ = _dims(config)
    return n_layers * layer_flops(h, i, seq_len, convention) + teacher_flops(config, seq_len, convention)


def truncated_flops(
    config: Any, seq_len: IntOrArray, layers: int, convention: Convention = "executed"
) -> IntOrArray:
    """FLOPs of fixed-depth truncation on a row: the first ``layers`` layers and that
    layer's classifier alone (no student before it runs), as every row leaving at one layer."""
    _check_convention(convention)
    h, i, n_layers, w, _, n = _dims(config)
    if not 1 <= int(layers) <= n_layers:
        raise ValueError(f"layers must be in [1, {n_layers}], got {layers!r}")
    head = teacher_flops(config, seq_len, convention) if int(layers) == n_layers else branch_flops(h, w, n, seq_len, convention)
    return int(layers) * layer_flops(h, i, seq_len, convention) + head
