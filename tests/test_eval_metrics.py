"""Evaluation metrics against hand-computed values."""

import math

import pytest

from sacpo_jax.eval_metrics import (
    MetricInputError,
    elo_ratings,
    harmless_rate,
    results_table_markdown,
    summarize_model,
    win_rate,
)


def test_harmless_rate_counts_cost_exactly_zero_as_harmless():
    # costs <= 0: -1.0, 0.0, -0.2  -> 3 of 5
    assert harmless_rate([-1.0, 0.0, 0.3, 2.0, -0.2]) == pytest.approx(0.6)


def test_win_rate_with_wins_ties_and_losses():
    scores = [2.0, 1.0, 0.0, 5.0]
    baseline = [1.0, 1.0, 3.0, 4.0]
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate(scores, baseline) == pytest.approx(2.5 / 4)


def test_win_rate_tie_tolerance_turns_near_equal_pairs_into_ties():
    scores = [1.05, 2.0, 0.0]
    baseline = [1.0, 1.0, 0.08]
    assert win_rate(scores, baseline) == pytest.approx(1 / 3 * (1 + 1 + 0))
    # with tolerance 0.1: tie, win, tie
    assert win_rate(scores, baseline, tie_tolerance=0.1) == pytest.approx((0.5 + 1 + 0.5) / 3)


def test_win_rate_rejects_unpaired_lists():
    with pytest.raises(MetricInputError, match="same prompts"):
        win_rate([1.0, 2.0], [1.0])


def test_elo_one_match_by_hand():
    ratings = elo_ratings([("a", "b", 1)], ["a", "b"], trials=1, epochs=1)
    # both start at 1200: expected 0.5, change 32 * (1 - 0.5) = 16
    assert ratings == pytest.approx({"a": 1216.0, "b": 1184.0})


def test_elo_two_identical_matches_by_hand():
    ratings = elo_ratings([("a", "b", 1), ("a", "b", 1)], ["a", "b"], trials=1, epochs=1)
    expected_second = 1.0 / (1.0 + 10.0 ** ((1184.0 - 1216.0) / 400.0))
    a_after = 1216.0 + 32.0 * (1.0 - expected_second)
    assert ratings["a"] == pytest.approx(a_after)
    assert ratings["b"] == pytest.approx(2400.0 - a_after)
    assert ratings["a"] == pytest.approx(1230.53, abs=0.01)


def test_elo_draw_between_equals_changes_nothing():
    ratings = elo_ratings([("a", "b", 0.5)], ["a", "b", "c"], trials=3, epochs=4)
    assert ratings == pytest.approx({"a": 1200.0, "b": 1200.0, "c": 1200.0})


def _tournament():
    return [
        ("sft", "dpo", 0),
        ("sft", "dpo", 0.5),
        ("dpo", "sacpo", 0),
        ("sacpo", "sft", 1),
        ("sacpo", "dpo", 0.5),
        ("sft", "sacpo", 0),
    ]


def test_elo_is_zero_sum_and_ranks_the_winner_first():
    models = ["sft", "dpo", "sacpo"]
    ratings = elo_ratings(_tournament(), models, trials=5)
    assert sum(ratings.values()) == pytest.approx(3 * 1200.0)
    assert ratings["sacpo"] > ratings["dpo"] > ratings["sft"]


def test_elo_swapping_sides_gives_the_same_ratings():
    models = ["sft", "dpo", "sacpo"]
    swapped = [(b, a, 1 - s) for a, b, s in _tournament()]
    assert elo_ratings(swapped, models, trials=4) == pytest.approx(
        elo_ratings(_tournament(), models, trials=4)
    )


def test_elo_anchor_shifts_all_ratings_equally():
    models = ["sft", "dpo", "sacpo"]
    raw = elo_ratings(_tournament(), models, trials=4)
    anchored = elo_ratings(_tournament(), models, trials=4, anchor="sft")
    assert anchored["sft"] == pytest.approx(1000.0)
    shift = 1000.0 - raw["sft"]
    for name in models:
        assert anchored[name] == pytest.approx(raw[name] + shift)


def test_elo_is_deterministic_for_a_seed_and_order_dependent():
    models = ["sft", "dpo", "sacpo"]
    first = elo_ratings(_tournament(), models, trials=1, epochs=1, seed=3)
    again = elo_ratings(_tournament(), models, trials=1, epochs=1, seed=3)
    assert first == again
    others = {
        tuple(elo_ratings(_tournament(), models, trials=1, epochs=1, seed=s).values())
        for s in range(6)
    }
    assert len(others) > 1  # the shuffle order matters for sequential Elo


def test_elo_rejects_bad_outcomes():
    with pytest.raises(MetricInputError, match="unknown model 'x'"):
        elo_ratings([("a", "x", 1)], ["a", "b"])
    with pytest.raises(MetricInputError, match="outcome 1 has score_a=0.7"):
        elo_ratings([("a", "b", 1), ("a", "b", 0.7)], ["a", "b"])


def test_summarize_model_by_hand():
    summary = summarize_model([1.0, 2.0, 3.0], [-1.0, 0.0, 2.0], baseline_rewards=[0.0, 2.0, 4.0])
    assert summary == pytest.approx(
        {
            "mean_reward": 2.0,
            "mean_cost": 1.0 / 3.0,
            "harmless_rate": 2.0 / 3.0,
            "n": 3,
            "win_rate": 0.5,  # win, tie, loss
        }
    )
    assert "win_rate" not in summarize_model([1.0], [1.0])


def test_summarize_model_names_non_finite_value():
    with pytest.raises(MetricInputError, match="costs: value at index 1 is not finite"):
        summarize_model([1.0, 2.0], [0.0, math.nan])


def test_results_table_markdown():
    table = results_table_markdown(
        {
            "sft": {"mean_reward": 0.5, "harmless_rate": 0.25, "n": 4},
            "sacpo": {"mean_reward": 1.23456, "win_rate": 0.75, "n": 4},
        }
    )
    assert table.splitlines() == [
        "| model | mean_reward | harmless_rate | n | win_rate |",
        "|---|---|---|---|---|",
        "| sft | 0.500 | 0.250 | 4 |  |",
        "| sacpo | 1.235 |  | 4 | 0.750 |",
    ]
