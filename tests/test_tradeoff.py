"""pipeline.tradeoff: the trade-off computed from one pass equals scoring with the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import Scorer
from pipeline.tradeoff import Point, accuracy_at_speedup, all_exits, at_speed
from test_train import LABELS, toy_task
from tiny import tiny_model


def test_every_speed_matches_the_engine_row_for_row():
    model = tiny_model(labels=LABELS, seed=3).eval()
    texts, labels = toy_task(np.random.default_rng(0), 150)
    exits = all_exits(model, texts, labels, batch_size=16)
    assert exits.predictions.shape == exits.uncertainty.shape == (3, 150)
    # speeds half-way between the students' sorted uncertainties: no row sits on a threshold
    values = np.unique(exits.uncertainty[:-1])
    speeds = [0.0] + [float((values[i] + values[i + 1]) / 2) for i in np.linspace(0, len(values) - 2, 6).astype(int)]
    seen_exits = set()
    for speed in speeds:
        point = at_speed(exits, model, speed)
        scorer = Scorer(model, speed=speed, micro_batch=7)
        table = scorer(texts)
        predicted = table.column("prediction").to_pylist()
        assert point.accuracy == pytest.approx(np.mean([p == y for p, y in zip(predicted, labels)]))
        assert point.exit_counts == scorer.stats.exit_counts
        assert point.flop_speedup == pytest.approx(scorer.stats.flop_speedup, rel=1e-12)
        assert point.mean_exit_layer == pytest.approx(scorer.stats.mean_exit_layer)
        seen_exits |= {k for k, c in enumerate(point.exit_counts) if c}
    assert seen_exits == {0, 1, 2}  # the speeds made rows leave at every layer
    assert at_speed(exits, model, 0.0).flop_speedup == pytest.approx(1.0)  # speed 0: the full-depth classifier


def test_accuracy_at_speedup_interpolates_inside_the_measured_range():
    points = [Point(0.0, 0.9, 1.0, 3.0, []), Point(0.5, 0.8, 3.0, 1.5, []), Point(0.2, 0.88, 2.0, 2.0, [])]
    assert accuracy_at_speedup(points, 2.5) == pytest.approx(0.84)
    assert accuracy_at_speedup(points, 1.0) == pytest.approx(0.9)
    assert math.isnan(accuracy_at_speedup(points, 3.5))
