"""pipeline.tradeoff: the trade-off computed from one pass equals scoring with the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import Scorer
from pipeline.config import Point, TradeoffTable
from pipeline.tradeoff import DRIFT_TV, all_exits, at_speed, choose_speed, exit_drift, tradeoff_table
from test_train import LABELS, toy_task
from tiny import tiny_model


def test_every_speed_matches_the_engine_row_for_row():
    model = tiny_model(labels=[*LABELS, "other"], seed=4).eval()  # three: a cost read off the wrong class shows
    texts, labels = toy_task(np.random.default_rng(0), 150)
    exits = all_exits(model, texts, labels, batch_size=16)
    assert exits.predictions.shape == exits.uncertainty.shape == (3, 150)
    # speeds half-way between the students' sorted uncertainties: no row sits on a threshold
    values = np.unique(exits.uncertainty[:-1])
    speeds = [0.0] + [float((values[i] + values[i + 1]) / 2) for i in np.linspace(0, len(values) - 2, 6).astype(int)]
    teacher_scorer = Scorer(model, precision="fp32", speed=0.0)
    probabilities = np.array(teacher_scorer(texts).column("probabilities").to_pylist())  # (R, N) the teacher's
    seen_exits, costs = set(), []
    for speed in speeds:
        point = at_speed(exits, model, speed)
        scorer = Scorer(model, precision="fp32", speed=speed, micro_batch=7)
        table = scorer(texts)
        predicted = table.column("prediction").to_pylist()
        assert point.accuracy == pytest.approx(np.mean([p == y for p, y in zip(predicted, labels)]))
        assert point.exit_counts == scorer.stats.exit_counts
        assert point.flop_speedup == pytest.approx(scorer.stats.flop_speedup, rel=1e-12)
        assert point.mean_exit_layer == pytest.approx(scorer.stats.mean_exit_layer)
        teacher = np.array(exits.predictions[-1])
        got = np.array([model.config.labels.index(p) for p in predicted])
        assert point.agreement == pytest.approx(float(np.mean(got == teacher)))
        # the expected cost: the teacher's probability of its answer minus that of the answer given
        lost = probabilities.max(1) - probabilities[np.arange(len(got)), got]  # (R,)
        assert point.expected_cost == pytest.approx(float(lost.mean()), abs=1e-6)
        assert (point.expected_cost > 0) == bool(np.any(got != teacher))
        costs.append(point.expected_cost)
        seen_exits |= {k for k, c in enumerate(point.exit_counts) if c}
    assert seen_exits == {0, 1, 2}  # the speeds made rows leave at every layer
    assert costs[0] == 0.0 and max(costs) > 0  # some speed gave answers the teacher would not
    assert at_speed(exits, model, 0.0).flop_speedup == pytest.approx(1.0)  # speed 0: the full-depth classifier
    # the table's exit uncertainties give the exits at any speed, off its grid too
    stored = TradeoffTable.from_json(json.loads(json.dumps(tradeoff_table(model, texts, labels, "toy").to_json())))
    for speed in speeds:
        assert stored.exit_counts(speed) == at_speed(exits, model, speed).exit_counts


def _table() -> TradeoffTable:
    points = [Point(0.0, 0.950, 1.0, 6.0, []), Point(0.1, 0.948, 1.8, 3.0, []), Point(0.2, 0.946, 2.5, 2.4, []),
              Point(0.3, 0.951, 2.5, 2.4, []), Point(0.4, 0.930, 3.6, 1.7, []), Point(0.5, 0.900, 4.0, 1.5, [])]
    return TradeoffTable(data="val.parquet", rows=1000, points=points)


def test_a_budget_picks_the_fastest_speed_within_it_or_the_most_accurate_reaching_it():
    table = _table()
    assert choose_speed(table, max_accuracy_drop=0.5).speed == 0.3  # 2.5x at both 0.2 and 0.3: the more accurate
    assert choose_speed(table, max_accuracy_drop=0.0).speed == 0.3  # 95.1% beats the teacher's 95.0%
    assert choose_speed(table, max_accuracy_drop=2.0).speed == 0.4
    assert choose_speed(table, max_accuracy_drop=100).speed == 0.5
    assert choose_speed(table, target_speedup=2.0).speed == 0.3
    assert choose_speed(table, target_speedup=3.0).speed == 0.4
    assert choose_speed(table, target_speedup=1.0).speed == 0.3
    assert TradeoffTable.from_json(table.to_json()) == table


def test_an_accuracy_budget_is_kept_by_agreement_with_the_teacher():
    """Where the table keeps each speed's agreement with the teacher, a budget of d points
    allows speeds whose answers differ from the teacher's on at most d% of the rows: a speed
    whose accuracy looks within the budget only because its gains cancel its losses on these
    rows is not chosen."""
    points = [Point(0.0, 0.950, 1.0, 6.0, [], 1.000), Point(0.1, 0.952, 1.8, 3.0, [], 0.996),
              Point(0.2, 0.949, 2.5, 2.4, [], 0.980), Point(0.3, 0.930, 3.6, 1.7, [], 0.975)]
    table = TradeoffTable(data="val.parquet", rows=1000, points=points)
    assert choose_speed(table, max_accuracy_drop=0.5).speed == 0.1  # 0.2 is within 0.1 point but differs on 2%
    assert choose_speed(table, max_accuracy_drop=2.0).speed == 0.2
    assert choose_speed(table, max_accuracy_drop=0.0).speed == 0.0
    assert TradeoffTable.from_json(table.to_json()) == table


def test_an_accuracy_budget_is_kept_by_the_expected_cost():
    """Where the table keeps each speed's expected cost (the teacher's probability of its own
    answer minus that of the answer given, averaged), a budget of d points allows speeds whose
    expected cost is at most d points, however often they disagree with the teacher on rows it
    is unsure of, and however lucky their accuracy on these rows."""
    points = [Point(0.0, 0.950, 1.0, 6.0, [], 1.000, 0.000), Point(0.1, 0.940, 1.8, 3.0, [], 0.960, 0.003),
              Point(0.2, 0.960, 2.5, 2.4, [], 0.950, 0.008), Point(0.3, 0.930, 3.6, 1.7, [], 0.900, 0.019)]
    table = TradeoffTable(data="val.parquet", rows=1000, points=points)
    assert choose_speed(table, max_accuracy_drop=0.5).speed == 0.1  # 4% disagree, but where the teacher is unsure
    assert choose_speed(table, max_accuracy_drop=1.0).speed == 0.2  # more accurate than the teacher here: not what decides
    assert choose_speed(table, max_accuracy_drop=2.0).speed == 0.3
    assert choose_speed(table, max_accuracy_drop=0.0).speed == 0.0
    assert TradeoffTable.from_json(json.loads(json.dumps(table.to_json()))) == table


def test_a_budget_that_cannot_be_met_or_a_missing_table_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no speed reaches a 5.0x FLOP speed-up on val.parquet; the most is 4.00x"):
        choose_speed(_table(), target_speedup=5.0)
    with pytest.raises(ValueError, match="exactly one"):
        choose_speed(_table(), max_accuracy_drop=1.0, target_speedup=2.0)
    with pytest.raises(ValueError, match="accuracy points"):
        choose_speed(_table(), max_accuracy_drop=-1)
    with pytest.raises(ValueError, match="no tradeoff.json .* pass a speed"):
        choose_speed(None, target_speedup=2.0)


def test_drift_is_the_total_variation_of_exit_histograms_above_noise():
    table = TradeoffTable(data="v", rows=1000, points=[
        Point(speed=s, accuracy=0.9, flop_speedup=1.0, mean_exit_layer=2.0, exit_counts=[500, 300, 200])
        for s in (0.0, 0.5)])
    assert exit_drift(table, 0.49, [1000, 600, 400]) is None  # off the grid of a table without exit uncertainties
    same = exit_drift(table, 0.5, [1000, 600, 400])  # the same shares
    assert same.total_variation == pytest.approx(0.0) and not same.drifted
    moved = exit_drift(table, 0.5, [200, 300, 500])  # 0.3 of the rows moved from layer 1 to layer 3
    assert moved.total_variation == pytest.approx(0.3) and moved.drifted and moved.threshold == DRIFT_TV
    few = exit_drift(table, 0.5, [1, 0, 2])  # three rows: the threshold rises with the noise, no alarm
    assert few.threshold > DRIFT_TV and few.total_variation < few.threshold and not few.drifted
    assert exit_drift(table, 0.5, [0, 0, 0]) is None
