"""Pseudo-preferences for CAID's policy step (REFERENCE §3).

Each pair (x, y0, y1) carries a reward ``r[i, k]`` and constraint utilities
``g[i, k, m]`` for its two responses k = 0, 1. Under the multipliers ``lam`` the pair's
Lagrangian scores are

    w[i, k] = r[i, k] + lam . g[i, k]

and y1 is preferred with probability ``sigmoid(w[i, 1] - w[i, 0])`` (a Bradley-Terry
draw). Thresholds cancel in the difference: they act only through the dual step.
Draws are a pure function of (seed, iteration), so a resumed run relabels identically.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


class PseudoLabelError(ValueError):
    """Scores or multipliers of the wrong shape; one line."""


def check_pair_scores(r: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``r`` as float64 (n, 2) and ``g`` as float64 (n, 2, M); raises PseudoLabelError."""
    rewards = np.asarray(r, dtype=np.float64)
    utilities = np.asarray(g, dtype=np.float64)
    if utilities.ndim == 2:
        utilities = utilities[..., None]
    if rewards.ndim != 2 or rewards.shape[1] != 2:
        raise PseudoLabelError(f"r: expected shape (pairs, 2), got {rewards.shape}")
    if utilities.ndim != 3 or utilities.shape[:2] != rewards.shape:
        raise PseudoLabelError(f"g: expected shape {rewards.shape + ('M',)}, got {utilities.shape}")
    for name, values in (("r", rewards), ("g", utilities)):
        if not np.all(np.isfinite(values)):
            raise PseudoLabelError(
                f"{name}: pair {np.argwhere(~np.isfinite(values))[0][0]} is not finite"
            )
    return rewards, utilities


def lagrangian_scores(r: np.ndarray, g: np.ndarray, lam: np.ndarray | float) -> np.ndarray:
    """``w = r + lam . g`` of shape (n, 2)."""
    rewards, utilities = check_pair_scores(r, g)
    multipliers = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    if multipliers.shape != utilities.shape[-1:]:
        raise PseudoLabelError(
            f"lam: expected {utilities.shape[-1]} entries, got {multipliers.shape}"
        )
    return rewards + utilities @ multipliers


def second_preferred_probability(
    r: np.ndarray, g: np.ndarray, lam: np.ndarray | float
) -> np.ndarray:
    """P(y1 preferred to y0) = sigmoid(w1 - w0), shape (n,)."""
    w = lagrangian_scores(r, g, lam)
    return expit(w[:, 1] - w[:, 0])


def draw_second_preferred(
    r: np.ndarray, g: np.ndarray, lam: np.ndarray | float, *, seed: int, iteration: int
) -> np.ndarray:
    """Bernoulli(sigmoid(w1 - w0)) draws, bool (n,): True where y1 is the chosen response."""
    probability = second_preferred_probability(r, g, lam)
    generator = np.random.default_rng([seed, iteration])
    return generator.random(len(probability)) < probability
