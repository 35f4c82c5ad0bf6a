"""The on-policy stages' math against hand-computed values and independent formulas:
KL shaping, GAE, group advantages, the clipped policy and value losses, k3, and
safe-rlhf's log-space multiplier update."""

from __future__ import annotations

import math
import statistics

import jax.numpy as jnp
import numpy as np
import pytest

from sacpo_jax.algorithms.lagrangian import (
    Multiplier,
    initial_log_lambda,
    log_lambda_step,
)
from sacpo_jax.algorithms.rl_math import (
    GROUP_STD_EPSILON,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    k3_kl,
    kl_shaped,
    lagrangian_advantages,
    masked_mean,
)

# ----------------------------------------------------------------------------- host side


def test_gae_matches_a_hand_computed_example():
    rewards = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]])
    values = np.array([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])  # row 1 ended after two tokens
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, backwards: delta_2 = 2 + 0 - 1.5 = 0.5 -> A_2 = 0.5
    #   delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35 -> A_1 = 0.35 + 0.45 * 0.5 = 0.575
    #   delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4 -> A_0 = 1.4 + 0.45 * 0.575 = 1.65875
    # row 1: the masked token has r = V = 0, so A_2 = 0; delta_1 = 3 + 0 - 1 = 2 -> A_1 = 2
    #   delta_0 = 0 + 0.9 * 1 - 2 = -1.1 -> A_0 = -1.1 + 0.45 * 2 = -0.2
    np.testing.assert_allclose(advantages, [[1.65875, 0.575, 0.5], [-0.2, 2.0, 0.0]], rtol=1e-6)
    # returns = A + masked V
    np.testing.assert_allclose(returns, [[2.15875, 1.575, 2.0], [1.8, 3.0, 0.0]], rtol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    mask = np.ones((4, 6))
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(advantages, to_go - values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)


def test_kl_shaping_puts_the_end_score_on_the_last_token_and_clips():
    kl = np.array([[0.1, 0.2, 0.3], [0.5, -0.5, 1.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    shaped = kl_shaped(np.array([2.0, -1.0]), kl, mask, kl_weight=-0.1, clip_range=1.5)
    # row 0: -0.01, -0.02, -0.03 + 2 = 1.97 -> clipped to 1.5
    # row 1: -0.05, 0.05 - 1 = -0.95 (its last token), masked 0
    np.testing.assert_allclose(shaped, [[-0.01, -0.02, 1.5], [-0.05, -0.95, 0.0]], rtol=1e-6)


def test_group_advantages_match_numpy_per_group():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=24)
    got = group_advantages(scores, 6)
    for g in range(4):
        group = scores[6 * g : 6 * g + 6]
        want = (group - group.mean()) / (statistics.stdev(group) + GROUP_STD_EPSILON)
        np.testing.assert_allclose(got[6 * g : 6 * g + 6], want, rtol=1e-5)
    # by hand: [1, 2, 3] has mean 2 and Bessel std 1; a constant group gives 0
    np.testing.assert_allclose(
        group_advantages(np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3),
        [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(np.zeros(6), 4)


# ----------------------------------------------------------------------------- in the update


def test_lagrangian_advantages_and_masked_mean():
    combined = lagrangian_advantages(jnp.array([2.0, -1.0]), jnp.array([1.0, 3.0]), 3.0)
    np.testing.assert_allclose(combined, [(2 - 3) / 4, (-1 - 9) / 4])
    values, mask = jnp.array([[1.0, 2.0], [3.0, 100.0]]), jnp.array([[1, 1], [1, 0]])
    assert float(masked_mean(values, mask)) == pytest.approx(2.0)


def test_clipped_surrogate_against_its_formula_token_by_token():
    epsilon = 0.2
    # (ratio, advantage) -> loss by hand, whether the clip took effect
    cases = [
        (1.5, 2.0, -2.4, 1.0),  # max(-3, -2 * 1.2): clipped high, A > 0
        (0.5, 2.0, -1.0, 0.0),  # max(-1, -1.6): ratio low but A > 0: unclipped
        (0.5, -1.0, 0.8, 1.0),  # max(0.5, 0.8): clipped low, A < 0
        (1.1, -1.0, 1.1, 0.0),  # inside the range
        (1.5, -1.0, 1.5, 0.0),  # max(1.5, 1.2): the unclipped term wins
    ]
    ratio = jnp.array([c[0] for c in cases])
    advantages = jnp.array([c[1] for c in cases])
    old = jnp.array([-1.0, -2.0, -0.5, -3.0, -1.5])
    loss, clipped = clipped_surrogate(old + jnp.log(ratio), old, advantages, epsilon, epsilon)
    np.testing.assert_allclose(loss, [c[2] for c in cases], rtol=1e-5)
    np.testing.assert_array_equal(clipped, [c[3] for c in cases])
    # asymmetric range (DAPO's clip-higher): 1.25 is inside [0.8, 1.28]
    high, _ = clipped_surrogate(jnp.log(jnp.array([1.25])), jnp.zeros(1), jnp.ones(1), 0.2, 0.28)
    np.testing.assert_allclose(high, [-1.25], rtol=1e-6)


def test_clipped_value_loss_against_its_formula():
    values = jnp.array([[3.0, 0.0, 1.5, 7.0]])
    old = jnp.array([[1.0, 0.5, 0.0, 0.0]])
    returns = jnp.array([[2.0, 1.0, 2.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, fraction = clipped_value_loss(values, old, returns, mask, 1.0)
    # V_clip = [2, 0, 1]; plain errors [1, 1, 0.25], clipped [0, 1, 1]; max [1, 1, 1]
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 1) / 3)
    assert float(fraction) == pytest.approx(1 / 3)  # only the third token's clip is larger


def test_k3_is_its_formula_and_zero_at_equality():
    logp, ref = jnp.log(jnp.array([0.5, 0.3])), jnp.log(jnp.array([0.25, 0.3]))
    np.testing.assert_allclose(k3_kl(logp, ref), [0.5 - math.log(0.5) - 1, 0.0], atol=1e-7)


# ----------------------------------------------------------------------------- the multiplier


def test_log_lambda_update_by_hand():
    # violated (J_c = 2 > d = 0): log lambda rises by lr * lambda * 2
    first = log_lambda_step(0.0, 2.0, 0.0, 0.1, 5.0)
    assert first == pytest.approx(0.2)
    second = log_lambda_step(first, 2.0, 0.0, 0.1, 5.0)
    assert second == pytest.approx(0.2 + 0.1 * math.exp(0.2) * 2)  # 0.44428
    # slack (J_c = -1 < d = 0.5): it falls
    assert log_lambda_step(0.0, -1.0, 0.5, 0.1, 5.0) == pytest.approx(-0.15)
    # clipped at lambda_max: log(4.9) + 0.1 * 4.9 * 2 > log 5
    assert log_lambda_step(math.log(4.9), 2.0, 0.0, 0.1, 5.0) == math.log(5.0)
    assert log_lambda_step(math.log(4.9), 2.0, 0.0, 0.1, None) == pytest.approx(
        math.log(4.9) + 0.98
    )
    # lambda = 0 stays 0 (the unconstrained run)
    assert log_lambda_step(initial_log_lambda(0.0), 10.0, 0.0, 0.1, 5.0) == -math.inf


def test_multiplier_window_schedule_and_checkpoint_state():
    multiplier = Multiplier(0.0, [], threshold=1.0, lr=0.5, lambda_max=5.0, window=4)
    multiplier.observe([1.0, 2.0, 3.0])
    multiplier.observe([4.0, 5.0])
    assert multiplier.costs == [2.0, 3.0, 4.0, 5.0] and multiplier.episode_cost == 3.5
    # J_c - d = 2.5: 0 -> 1.25 -> 1.25 + 0.5 e^1.25 2.5 = 5.61 > log 5 -> log 5, then stays
    schedule = multiplier.schedule(3)
    assert schedule[0] == pytest.approx(1.25)
    assert schedule[1:] == [math.log(5.0), math.log(5.0)]
    assert multiplier.log_lambda == 0.0  # schedule() leaves the state alone
    lambdas = [math.exp(v) for v in schedule]
    assert lambdas == sorted(lambdas) and lambdas[-1] == pytest.approx(5.0)
    # slack: lambda falls towards 0 but stays positive
    slack = Multiplier(0.0, [-5.0], threshold=1.0, lr=0.5, lambda_max=3.0, window=4)
    falling = [math.exp(v) for v in slack.schedule(20)]
    assert all(a > b > 0 for a, b in zip(falling, falling[1:]))
    # the checkpoint state round-trips, lambda = 0 included
    zero = Multiplier(initial_log_lambda(0.0), [1.0], 0.0, 0.1, 5.0, 8)
    for m in (multiplier, zero):
        restored = Multiplier(7.0, [], m.threshold, m.lr, m.lambda_max, m.window).restored(
            m.to_meta()
        )
        assert restored == m
    assert zero.value == 0.0 and zero.schedule(2) == [-math.inf, -math.inf]
