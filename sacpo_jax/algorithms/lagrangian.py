"""safe-rlhf's Lagrange multiplier for one cost constraint E[cost] <= d, kept on the host.

lambda = exp(log_lambda). Every sampled response's cost joins a window of the last
``window`` costs; the episode cost J_c is the window's mean. Before every update step
(REFERENCE §3, REFERENCE-NEXT §1: safe-rlhf's ``rl_step``):

    log_lambda <- min(log_lambda + lr * lambda * (J_c - d), log(lambda_max))

i.e. one SGD step on -(J_c - d) * exp(log_lambda): a violated constraint (J_c > d)
raises lambda, slack lowers it; lambda stays in (0, lambda_max]. lambda_init = 0 keeps
lambda at 0 for good (log_lambda = -inf): the unconstrained run of the same algorithm.

The multiplier enters the compiled steps as data (a batch column), so it never
recompiles them; its state is a small JSON dict in each checkpoint's meta.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


def log_lambda_step(
    log_lambda: float,
    episode_cost: float,
    threshold: float,
    lr: float,
    lambda_max: float | None,
) -> float:
    """One update: min(log_lambda + lr * exp(log_lambda) * (J_c - d), log(lambda_max))."""
    lam = math.exp(log_lambda)
    updated = log_lambda + lr * lam * (episode_cost - threshold) if lam > 0 else log_lambda
    return updated if lambda_max is None else min(updated, math.log(lambda_max))


def initial_log_lambda(lambda_init: float) -> float:
    """log(lambda_init), -inf for 0."""
    return math.log(lambda_init) if lambda_init > 0 else -math.inf


@dataclasses.dataclass
class Multiplier:
    """The multiplier's state: log_lambda and the window of recent episode costs."""

    log_lambda: float
    costs: list[float]
    threshold: float
    lr: float
    lambda_max: float | None
    window: int

    @property
    def value(self) -> float:
        """lambda = exp(log_lambda)."""
        return math.exp(self.log_lambda)

    @property
    def episode_cost(self) -> float:
        """J_c: the mean of the window (0 before any cost was observed)."""
        return sum(self.costs) / len(self.costs) if self.costs else 0.0

    def observe(self, costs: Sequence[float]) -> None:
        """Add a round's costs to the window, dropping the oldest beyond ``window``."""
        self.costs = (list(self.costs) + [float(c) for c in costs])[-self.window :]

    def schedule(self, steps: int) -> list[float]:
        """log_lambda after each of the next ``steps`` updates (J_c fixed meanwhile, as
        between two rounds); the state is not changed."""
        values, current = [], self.log_lambda
        for _ in range(steps):
            current = log_lambda_step(
                current, self.episode_cost, self.threshold, self.lr, self.lambda_max
            )
            values.append(current)
        return values

    def to_meta(self) -> dict:
        """JSON state for a checkpoint (log_lambda None for lambda = 0)."""
        finite = math.isfinite(self.log_lambda)
        return {"log_lambda": self.log_lambda if finite else None, "costs": list(self.costs)}

    def restored(self, meta: dict) -> Multiplier:
        """This multiplier with the state of ``to_meta``."""
        log_lambda = meta["log_lambda"]
        return dataclasses.replace(
            self,
            log_lambda=-math.inf if log_lambda is None else float(log_lambda),
            costs=[float(c) for c in meta["costs"]],
        )
