"""One-shot dual solver against a closed form and brute-force grid searches."""

import math

import numpy as np
import pytest

from sacpo_jax.algorithms.dual import (
    DualInputError,
    InfeasibleConstraintError,
    constraint_margins,
    dual_gradient,
    dual_value,
    expected_constraint,
    solve_dual,
)


def naive_dual(lams: np.ndarray, r: np.ndarray, h: np.ndarray, beta: float) -> np.ndarray:
    """Independent D over a batch of multipliers lams (G, M): plain exp / mean / log."""
    tilted = (r[None] + np.einsum("xkm,gm->gxk", h, lams)) / beta
    return beta * np.mean(np.log(np.mean(np.exp(tilted), axis=2)), axis=1)


def grid_minimise(r, h, beta, low, high, points, rounds):
    """Brute-force box grid search, refined `rounds` times around the best point."""
    low = np.array(low, dtype=float)
    high = np.array(high, dtype=float)
    for _ in range(rounds):
        axes = [np.linspace(lo, hi, points) for lo, hi in zip(low, high, strict=True)]
        grid = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)
        best = grid[np.argmin(naive_dual(grid, r, h, beta))]
        width = (high - low) / (points - 1)
        low, high = np.maximum(best - 2 * width, 0.0), best + 2 * width
    return best


def synthetic(prompts, samples, constraints, seed=0):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(prompts, samples))
    # utilities that trade off against the reward, so constraints bind
    g = -0.6 * r[..., None] + rng.normal(size=(prompts, samples, constraints))
    return r, g


def beaver_scale(constraints, seed=0, prompts=100, samples=64):
    """Scores in beaver reward/cost-model units (magnitudes ~5-20): costs rise with the
    reward, so the safety constraint binds when the policy tilts towards reward."""
    rng = np.random.default_rng(seed)
    r = 10 + 4 * rng.normal(size=(prompts, 1)) + 5 * rng.normal(size=(prompts, samples))
    noise = 8 * rng.normal(size=(prompts, samples, constraints))
    cost = 0.8 * (r - 10)[..., None] + noise + 2
    return r, -cost


@pytest.mark.parametrize("constraints, b", [(1, [5.0]), (2, [5.0, 3.0])])
@pytest.mark.parametrize("lam_init, lr", [(1.0, 2.0), (0.0, 2.0), (10.0, 50.0)])
def test_pgd_converges_at_beaver_scale(constraints, b, lam_init, lr):
    """beta 0.1 on rewards/costs of ~10: D'' ~ Var/beta is in the hundreds, so a fixed
    step of 2 oscillates; the backtracking step converges to the exact minimiser within
    the default 200 iterations from any start and initial step."""
    r, g = beaver_scale(constraints)
    exact = solve_dual(r, g, b, 0.1, method="exact", tol=1e-10)
    assert np.all(exact.lam > 0.1)  # every constraint binds
    solution = solve_dual(r, g, b, 0.1, method="pgd", lam_init=lam_init, lr=lr)
    assert solution.converged and solution.iterations < 200
    np.testing.assert_allclose(solution.lam, exact.lam, atol=1e-5)
    assert np.max(np.abs(solution.gradient)) <= 1e-5
    assert solution.value == pytest.approx(exact.value, abs=1e-9)


def test_relative_margins_by_hand():
    g = np.array([[[1.0, 0.0], [3.0, 4.0]]])  # one prompt, two samples, two constraints
    h = constraint_margins(g, [0.5, 1.0])
    # per-prompt means: (2, 2) -> h = g - 2 - b
    np.testing.assert_allclose(h, [[[-1.5, -3.0], [0.5, 1.0]]])
    np.testing.assert_allclose(constraint_margins(g, 1.0, relative=False), g - 1.0)


@pytest.mark.parametrize("method", ["pgd", "exact"])
@pytest.mark.parametrize("a, c, d, beta", [(1.0, 0.5, 1.0, 1.0), (2.0, 1.5, 0.5, 0.5)])
def test_closed_form_two_responses(method, a, c, d, beta):
    # r = (0, a), h = (c, -d): E_tilted[h] = 0 when exp(lam (c + d) - a) / beta) = d / c
    lam_star = (a + beta * math.log(d / c)) / (c + d)
    r = np.array([[0.0, a]])
    g = np.array([[c, -d]])
    solution = solve_dual(r, g, 0.0, beta, relative=False, method=method, lr=1.0, max_iters=2000)
    assert solution.converged
    assert solution.lam[0] == pytest.approx(lam_star, abs=1e-3)
    assert abs(solution.gradient[0]) < 1e-3


def test_closed_form_small_beta_exact_and_auto():
    a, c, d, beta = 1.0, 0.5, 1.0, 0.1
    lam_star = (a + beta * math.log(d / c)) / (c + d)
    r, g = np.array([[0.0, a]]), np.array([[c, -d]])
    for method in ("exact", "auto"):
        solution = solve_dual(r, g, 0.0, beta, relative=False, method=method, tol=1e-9)
        assert solution.lam[0] == pytest.approx(lam_star, abs=1e-6)


@pytest.mark.parametrize("method, lr", [("pgd", 0.5), ("exact", None)])
def test_one_constraint_matches_grid_search(method, lr):
    r, g = synthetic(prompts=30, samples=16, constraints=1)
    b, beta = 0.3, 1.0
    h = g - g.mean(axis=1, keepdims=True) - b
    grid_best = grid_minimise(r, h, beta, [0.0], [10.0], points=2001, rounds=3)
    assert grid_best[0] > 0.1  # the constraint binds
    solution = solve_dual(r, g, b, beta, method=method, lr=lr or 2.0, max_iters=5000)
    assert solution.converged
    assert solution.lam[0] == pytest.approx(grid_best[0], abs=1e-3)
    assert solution.value == pytest.approx(naive_dual(grid_best[None], r, h, beta)[0], abs=1e-8)


@pytest.mark.parametrize("method", ["pgd", "exact"])
def test_slack_constraint_gives_zero(method):
    r, g = synthetic(prompts=20, samples=8, constraints=1, seed=1)
    b = -1.0  # far below the reference mean: the reward-tilted policy already meets it
    h = g - g.mean(axis=1, keepdims=True) - b
    assert expected_constraint(0.0, r, h, 1.0)[0] > 0
    solution = solve_dual(r, g, b, 1.0, method=method, lr=0.5)
    assert solution.lam[0] == 0.0
    assert solution.converged


@pytest.mark.parametrize("method", ["pgd", "exact"])
def test_two_constraints_match_grid_search(method):
    r, g = synthetic(prompts=20, samples=8, constraints=2, seed=2)
    b, beta = np.array([0.2, 0.4]), 1.0
    h = g - g.mean(axis=1, keepdims=True) - b
    grid_best = grid_minimise(r, h, beta, [0.0, 0.0], [5.0, 5.0], points=101, rounds=5)
    assert np.all(grid_best > 0.05)  # both constraints bind
    solution = solve_dual(r, g, b, beta, method=method, lr=0.3, max_iters=5000, tol=1e-7)
    assert solution.converged
    np.testing.assert_allclose(solution.lam, grid_best, atol=1e-3)
    assert solution.value <= naive_dual(grid_best[None], r, h, beta)[0] + 1e-9
    np.testing.assert_allclose(solution.gradient, 0.0, atol=1e-4)


def test_value_matches_naive_formula_and_gradient_matches_finite_differences():
    r, g = synthetic(prompts=10, samples=6, constraints=2, seed=3)
    h = constraint_margins(g, [0.1, -0.2])
    beta, lam = 0.7, np.array([0.8, 1.3])
    assert dual_value(lam, r, h, beta) == pytest.approx(naive_dual(lam[None], r, h, beta)[0])
    eps = 1e-6
    numeric = [
        (dual_value(lam + eps * e, r, h, beta) - dual_value(lam - eps * e, r, h, beta)) / (2 * eps)
        for e in np.eye(2)
    ]
    np.testing.assert_allclose(dual_gradient(lam, r, h, beta), numeric, rtol=1e-6, atol=1e-9)


def test_dual_value_is_stable_for_tiny_beta():
    r, g = synthetic(prompts=4, samples=5, constraints=1, seed=4)
    h = constraint_margins(g, 0.0)
    value = dual_value(2.0, r, h, 1e-4)  # exp would overflow without logsumexp
    assert np.isfinite(value)
    # as beta -> 0, D -> mean_x max_k (r + lam h)
    assert value == pytest.approx(np.mean(np.max(r + 2.0 * h[..., 0], axis=1)), abs=1e-3)


def test_infeasible_threshold_is_reported():
    r, g = synthetic(prompts=5, samples=4, constraints=2, seed=5)
    with pytest.raises(InfeasibleConstraintError, match="constraint 1 is infeasible"):
        solve_dual(r, g, [0.0, 100.0], 1.0)


def test_bad_inputs_are_named():
    r, g = synthetic(prompts=5, samples=4, constraints=1)
    with pytest.raises(DualInputError, match="does not match r"):
        solve_dual(r[:, :3], g, 0.0, 1.0)
    with pytest.raises(DualInputError, match="beta"):
        solve_dual(r, g, 0.0, 0.0)
    with pytest.raises(DualInputError, match="method"):
        solve_dual(r, g, 0.0, 1.0, method="newton")
    g[2, 1, 0] = np.nan
    with pytest.raises(DualInputError, match=r"g: entry \(2, 1, 0\) is not finite"):
        solve_dual(r, g, 0.0, 1.0)
