"""One-shot dualization (MoCAN / PeCAN): the Lagrange multiplier from offline samples.

Given K responses per prompt sampled from the reference policy, with rewards
``r[x, k]`` and constraint utilities ``g[x, k, m]``, the constraint margins are

    h[x, k, m] = g[x, k, m] - mean_k' g[x, k', m] - b[m]     (relative thresholds, CAID)
    h[x, k, m] = g[x, k, m] - b[m]                           (absolute thresholds)

and the dual function of the KL-regularised constrained problem is

    D(lam) = beta * mean_x log mean_k exp((r[x, k] + lam . h[x, k]) / beta),   lam >= 0.

D is convex. The policy that attains it tilts the reference samples,
``w[x, k] = softmax_k((r[x, k] + lam . h[x, k]) / beta)``, and by Danskin's theorem

    grad D(lam) = mean_x sum_k w[x, k] * h[x, k]

is that tilted policy's expected margin: negative entries are violated constraints.
``solve_dual`` minimises D over lam >= 0, by projected gradient descent with a
backtracking step or by an exact convex solver. All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.special import logsumexp, softmax

from sacpo_jax.errors import SacpoError

LAMBDA_CEILING = 1e8
"""A multiplier this large means the constraint cannot be met on the samples."""


ROUNDING = 1e-12
"""Relative slack of pgd's sufficient-decrease test, for float64 rounding in D."""


class DualInputError(SacpoError, ValueError):
    """Raised when scores, thresholds or settings have the wrong shape or value."""


class InfeasibleConstraintError(SacpoError, ValueError):
    """Raised when no tilting of the reference samples meets the constraints."""


@dataclass(frozen=True)
class DualSolution:
    """The dual minimiser and what the solver knows about it.

    ``gradient`` is the tilted policy's expected margin E[h] at ``lam`` (one entry per
    constraint); ``iterations`` counts accepted steps (pgd) or solver iterations (exact).
    """

    lam: np.ndarray
    value: float
    gradient: np.ndarray
    iterations: int
    converged: bool
    method: str


def constraint_margins(
    g: np.ndarray, b: np.ndarray | float, *, relative: bool = True
) -> np.ndarray:
    """Margins ``h`` of shape (X, K, M) from utilities ``g`` of shape (X, K) or (X, K, M).

    relative: ``h = g - mean_k g - b`` (thresholds relative to the reference policy, as in
    CAID); otherwise ``h = g - b``.
    """
    utilities = np.asarray(g, dtype=np.float64)
    if utilities.ndim == 2:
        utilities = utilities[..., None]
    if utilities.ndim != 3:
        raise DualInputError(
            f"g: expected shape (prompts, samples[, constraints]), got {utilities.shape}"
        )
    thresholds = np.broadcast_to(np.asarray(b, dtype=np.float64), utilities.shape[-1:])
    _require_finite(utilities, "g")
    _require_finite(thresholds, "b")
    if relative:
        utilities = utilities - utilities.mean(axis=1, keepdims=True)
    return utilities - thresholds


def _require_finite(values: np.ndarray, name: str) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        raise DualInputError(f"{name}: entry {tuple(int(i) for i in bad[0])} is not finite")


def _tilted_logits(
    lam: np.ndarray | float, r: np.ndarray, h: np.ndarray, beta: float
) -> np.ndarray:
    """``(r + lam . h) / beta`` of shape (X, K)."""
    multipliers = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    if multipliers.shape != h.shape[-1:]:
        raise DualInputError(f"lam: expected {h.shape[-1]} entries, got {multipliers.shape}")
    return (np.asarray(r, dtype=np.float64) + h @ multipliers) / beta


def dual_value(lam: np.ndarray | float, r: np.ndarray, h: np.ndarray, beta: float) -> float:
    """``D(lam) = beta * mean_x [logsumexp_k((r + lam . h) / beta) - log K]``."""
    logits = _tilted_logits(lam, r, h, beta)
    return float(beta * np.mean(logsumexp(logits, axis=1) - np.log(logits.shape[1])))


def expected_constraint(
    lam: np.ndarray | float, r: np.ndarray, h: np.ndarray, beta: float
) -> np.ndarray:
    """``mean_x sum_k softmax_k((r + lam . h) / beta) * h``: the expected margin of the
    policy ``pi_ref * exp((r + lam . h) / beta)`` on the samples, one entry per constraint.
    It is also the gradient of ``D`` (use ``dual_gradient``)."""
    weights = softmax(_tilted_logits(lam, r, h, beta), axis=1)
    return np.einsum("xk,xkm->m", weights, h) / h.shape[0]


dual_gradient = expected_constraint  # grad D(lam) = E_tilted[h] (Danskin's theorem)


def _check_scores(r: np.ndarray, h: np.ndarray, beta: float) -> np.ndarray:
    rewards = np.asarray(r, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 1 or rewards.shape[0] < 1:
        raise DualInputError(f"r: expected shape (prompts, samples), got {rewards.shape}")
    if h.shape[:2] != rewards.shape:
        raise DualInputError(f"g: shape {h.shape[:2]} does not match r's {rewards.shape}")
    _require_finite(rewards, "r")
    if not beta > 0:
        raise DualInputError(f"beta: must be > 0, got {beta}")
    best_margin = h.max(axis=1).mean(axis=0)
    for index, margin in enumerate(best_margin):
        if margin < 0:
            raise InfeasibleConstraintError(
                f"constraint {index} is infeasible on these samples: even the best response "
                f"per prompt has mean margin {margin:.4g} < 0; lower its threshold b"
            )
    return rewards


def _solve_pgd(r, h, beta, lam_init, lr, max_iters, tol) -> tuple[np.ndarray, int, bool]:
    """Projected gradient descent with a backtracking step (see `solve_dual`)."""
    lam, step = np.full(h.shape[-1], float(lam_init)), float(lr)
    value, gradient = dual_value(lam, r, h, beta), dual_gradient(lam, r, h, beta)
    for iteration in range(1, max_iters + 1):
        while True:
            candidate = np.maximum(lam - step * gradient, 0.0)
            move = candidate - lam
            bound = value + gradient @ move + move @ move / (2.0 * step)
            candidate_value = dual_value(candidate, r, h, beta)
            if candidate_value <= bound + ROUNDING * abs(value):
                break
            step /= 2.0
        lam, value = candidate, candidate_value
        gradient = dual_gradient(lam, r, h, beta)
        if np.max(np.abs(lam - np.maximum(lam - gradient, 0.0))) <= tol:
            return lam, iteration, True
        step *= 2.0
    return lam, max_iters, False


def _solve_exact_1d(r, h, beta, lam_init, max_iters, tol) -> tuple[np.ndarray, int, bool]:
    """Root of the increasing derivative D'(lam) on [0, upper] (Brent), or 0 if D'(0) >= 0."""

    def derivative(value: float) -> float:
        return float(dual_gradient(value, r, h, beta)[0])

    if derivative(0.0) >= 0:
        return np.zeros(1), 0, True
    upper = max(1.0, float(lam_init))
    while derivative(upper) < 0:
        upper *= 2.0
        if upper > LAMBDA_CEILING:
            raise InfeasibleConstraintError(
                f"the constraint is not met for any lam <= {LAMBDA_CEILING:g}; lower b"
            )
    root, result = brentq(
        derivative, 0.0, upper, xtol=tol, maxiter=max_iters, full_output=True, disp=False
    )
    return np.array([root]), result.iterations, bool(result.converged)


def _solve_exact_box(r, h, beta, lam_init, max_iters, tol) -> tuple[np.ndarray, int, bool]:
    """L-BFGS-B on D over [0, LAMBDA_CEILING]^M with the analytic gradient; stops when
    the projected gradient's largest entry is <= tol."""
    result = minimize(
        lambda lam: dual_value(lam, r, h, beta),
        x0=np.full(h.shape[-1], float(lam_init)),
        jac=lambda lam: dual_gradient(lam, r, h, beta),
        method="L-BFGS-B",
        bounds=[(0.0, LAMBDA_CEILING)] * h.shape[-1],
        options={"maxiter": max_iters, "gtol": tol, "ftol": 1e-15},
    )
    if np.any(result.x >= LAMBDA_CEILING):
        raise InfeasibleConstraintError(
            "the constraints cannot be met together on these samples; lower some thresholds b"
        )
    return result.x, int(result.nit), bool(result.success)


def solve_dual(
    r: np.ndarray,
    g: np.ndarray,
    b: np.ndarray | float,
    beta: float,
    *,
    relative: bool = True,
    method: Literal["auto", "pgd", "exact"] = "auto",
    lam_init: float = 1.0,
    lr: float = 2.0,
    max_iters: int = 200,
    tol: float = 1e-5,
) -> DualSolution:
    """Minimise ``D(lam)`` over ``lam >= 0`` from reference samples.

    r: rewards (X, K). g: utilities (X, K) or (X, K, M). b: thresholds (scalar or (M,)),
    relative to the reference mean unless ``relative=False`` (see ``constraint_margins``).
    method: "pgd" is projected gradient descent with a backtracking step, our rule (the
    one-shot code's own step rule, which doubles the step and restarts, is not
    reproduced): from ``lam_init`` and step ``t = lr``, each iteration takes
    ``lam' = max(lam - t * grad, 0)``, halving t until the sufficient-decrease condition
    ``D(lam') <= D(lam) + grad . (lam' - lam) + |lam' - lam|^2 / (2 t)`` holds, then
    doubles t for the next iteration; it stops when the projected gradient
    ``lam - max(lam - grad, 0)`` has no entry above ``tol`` or after ``max_iters``
    iterations. Each step decreases D, so it converges for any lr, including at scales
    (rewards ~10, beta 0.1) where a fixed step lr = 2 oscillates. The defaults are the
    one-shot code's settings (lam_init 1, lr 2, 200 iterations, tol 1e-5).
    "exact" (= "auto") uses Brent's method on the monotone derivative for one constraint
    (bracket width ``tol``) and L-BFGS-B with bounds ``lam >= 0`` for several (projected
    gradient ``tol``).
    Raises InfeasibleConstraintError when no multiplier meets the constraints.
    """
    h = constraint_margins(g, b, relative=relative)
    rewards = _check_scores(r, h, beta)
    if method == "pgd":
        lam, iterations, converged = _solve_pgd(rewards, h, beta, lam_init, lr, max_iters, tol)
    elif method in ("auto", "exact"):
        solver = _solve_exact_1d if h.shape[-1] == 1 else _solve_exact_box
        lam, iterations, converged = solver(rewards, h, beta, lam_init, max_iters, tol)
    else:
        raise DualInputError(f"method: expected 'auto', 'pgd' or 'exact', got {method!r}")
    return DualSolution(
        lam=lam,
        value=dual_value(lam, rewards, h, beta),
        gradient=dual_gradient(lam, rewards, h, beta),
        iterations=iterations,
        converged=converged,
        method="pgd" if method == "pgd" else "exact",
    )
