"""Training objectives as small pure functions of log-probs or scores.

Every function here is plain `jax.numpy`, safe under `jax.jit`, and takes
its coefficients (beta, label smoothing, KTO weights) as ordinary values
that may be traced JAX scalars: changing them never recompiles. Only the
DPO `loss_type` is static: a key of ``PAIR_LOSSES``.

Notation, per example in a batch of B:
  pi_c, pi_r   summed completion log-probs of the chosen / rejected answer
               under the policy; ref_c, ref_r under the reference.
  delta        (pi_c - ref_c) - (pi_r - ref_r)
  beta         the KL coefficient (in SACPO's realignment stage, beta/lambda)

Metric names follow TRL ("rewards/chosen", "logps/chosen", ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sacpo_jax.errors import SacpoError


class LossConfigError(SacpoError, ValueError):
    """A loss was asked for with an unknown type or inconsistent arguments."""


class PairLogps(NamedTuple):
    """Summed completion log-probs of B pairs under the policy and the reference, and the
    completions' token counts (each [B])."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.policy_rejected - self.reference_rejected

    @property
    def delta(self) -> jax.Array:
        """(pi_c - ref_c) - (pi_r - ref_r)."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass(frozen=True)
class PairLoss:
    """One DPO-family loss: ``loss(pairs: PairLogps, coeffs) -> [B]`` per-pair losses.

    ``coeffs`` carries ``beta`` and, where ``uses_label_smoothing``, ``label_smoothing``
    (traced scalars). ``needs_lengths``: the loss reads the completion token counts.
    """

    loss: Callable[[PairLogps, Any], jax.Array]
    uses_label_smoothing: bool = False
    needs_lengths: bool = False


def _sigmoid(p: PairLogps, c) -> jax.Array:
    """-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d) (eps > 0: cDPO)."""
    z = c.beta * p.delta
    return -(1.0 - c.label_smoothing) * jax.nn.log_sigmoid(z) - c.label_smoothing * (
        jax.nn.log_sigmoid(-z)
    )


def _robust(p: PairLogps, c) -> jax.Array:
    """[-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)] / (1 - 2 eps)."""
    z, eps = c.beta * p.delta, c.label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2 * eps)


def _hinge(p: PairLogps, c) -> jax.Array:
    """relu(1 - beta d)."""
    return jax.nn.relu(1.0 - c.beta * p.delta)


def _ipo(p: PairLogps, c) -> jax.Array:
    """(d_avg - 1/(2 beta))^2, each log-ratio divided by its completion's token count."""
    chosen_tokens = jnp.maximum(p.chosen_lengths, 1)
    rejected_tokens = jnp.maximum(p.rejected_lengths, 1)
    delta_avg = p.chosen_logratios / chosen_tokens - p.rejected_logratios / rejected_tokens
    return (delta_avg - 1.0 / (2.0 * c.beta)) ** 2


PAIR_LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss(_sigmoid, uses_label_smoothing=True),
    "robust": PairLoss(_robust, uses_label_smoothing=True),
    "hinge": PairLoss(_hinge),
    "ipo": PairLoss(_ipo, needs_lengths=True),
}
"""The DPO family by TRL's ``loss_type`` names: a new loss is its function plus one entry."""


class _DpoCoefficients(NamedTuple):
    beta: ArrayLike
    label_smoothing: ArrayLike


def _check_dpo_arguments(loss_type: str, label_smoothing, chosen_lengths, rejected_lengths):
    """Reject bad static choices early; traced coefficients cannot be checked."""
    if loss_type not in PAIR_LOSSES:
        raise LossConfigError(
            f"unknown DPO loss_type {loss_type!r}; valid names: {', '.join(PAIR_LOSSES)}"
        )
    pair_loss = PAIR_LOSSES[loss_type]
    if pair_loss.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise LossConfigError(
            f"DPO loss_type {loss_type!r} is length-normalised: pass chosen_lengths and "
            "rejected_lengths"
        )
    if isinstance(label_smoothing, (int, float)):
        if not pair_loss.uses_label_smoothing and label_smoothing != 0:
            users = [name for name, loss in PAIR_LOSSES.items() if loss.uses_label_smoothing]
            raise LossConfigError(
                f"label_smoothing applies only to {', '.join(map(repr, users))}, not {loss_type!r}"
            )
        if not 0.0 <= label_smoothing < 0.5:
            raise LossConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: ArrayLike,
    loss_type: str = "sigmoid",
    label_smoothing: ArrayLike = 0.0,
    chosen_lengths: ArrayLike | None = None,
    rejected_lengths: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO-family losses and the implicit rewards, as TRL defines them.

    With delta = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing:

      "sigmoid": -(1 - eps) * log sigmoid(beta*delta) - eps * log sigmoid(-beta*delta)
                 (eps = 0 is DPO; eps > 0 is conservative DPO, cDPO, as in TRL:
                 there is no separate "cdpo" name)
      "robust":  [-(1 - eps) * log sigmoid(beta*delta) + eps * log sigmoid(-beta*delta)]
                 / (1 - 2*eps)
      "hinge":   relu(1 - beta*delta)
      "ipo":     (delta_avg - 1/(2*beta))^2, where each of the four log-probs is
                 first divided by its completion token count (chosen_lengths for
                 pi_c and ref_c, rejected_lengths for pi_r and ref_r; counts below
                 1 are treated as 1). Both length arrays are required.

    eps must lie in [0, 0.5); it is checked when given as a Python number, and
    a non-zero Python eps with a loss that ignores it is an error (a traced eps is
    simply unused there).

    Implicit rewards (always on un-normalised log-probs, like TRL, and with
    no gradient: they are for logging):
      chosen_rewards = beta * (pi_c - ref_c), rejected_rewards = beta * (pi_r - ref_r).

    Returns (losses, chosen_rewards, rejected_rewards), each of shape [B].
    """
    _check_dpo_arguments(loss_type, label_smoothing, chosen_lengths, rejected_lengths)
    pairs = PairLogps(
        *(
            jnp.asarray(x)
            for x in (
                policy_chosen_logps,
                policy_rejected_logps,
                reference_chosen_logps,
                reference_rejected_logps,
            )
        ),
        chosen_lengths=None if chosen_lengths is None else jnp.asarray(chosen_lengths),
        rejected_lengths=None if rejected_lengths is None else jnp.asarray(rejected_lengths),
    )
    losses = PAIR_LOSSES[loss_type].loss(pairs, _DpoCoefficients(beta, label_smoothing))
    chosen_rewards, rejected_rewards = implicit_rewards(pairs, beta)
    return losses, chosen_rewards, rejected_rewards


def implicit_rewards(pairs: PairLogps, beta: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """beta * (pi_c - ref_c) and beta * (pi_r - ref_r), without gradient (for logging)."""
    return (
        jax.lax.stop_gradient(beta * pairs.chosen_logratios),
        jax.lax.stop_gradient(beta * pairs.rejected_logratios),
    )


def kto_kl_estimate(
    policy_kl_logps: ArrayLike,
    reference_kl_logps: ArrayLike,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """KTO's reference point: KL = max(0, mean_i(policy_i - reference_i)), no gradient.

    The inputs are summed completion log-probs of *mismatched* pairs: each
    prompt scored with another row's completion (completions shuffled within
    the batch), under the policy and the reference.

    Averaging across devices: under `jax.jit` with a globally sharded batch the
    mean is over the global batch, so it already averages all devices (GSPMD
    inserts the reduction). Inside `jax.shard_map`, where each device sees only
    its shard, pass the mapped `axis_name`: the per-shard means are then averaged
    with `jax.lax.pmean` (shards have equal size, so this is the global mean).
    The clamp at 0 is applied after averaging.
    """
    kl = jnp.mean(jnp.asarray(policy_kl_logps) - jnp.asarray(reference_kl_logps))
    if axis_name is not None:
        kl = jax.lax.pmean(kl, axis_name)
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    policy_logps: ArrayLike,
    reference_logps: ArrayLike,
    labels: ArrayLike,
    kl: ArrayLike,
    *,
    beta: ArrayLike,
    desirable_weight: ArrayLike = 1.0,
    undesirable_weight: ArrayLike = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-example KTO losses (paper eq. 7) and implicit rewards.

    With logratio = policy - reference, r = beta * logratio and nu = beta * kl:
      desirable (label True):    w_plus  * (1 - sigmoid(r - nu))
      undesirable (label False): w_minus * (1 - sigmoid(nu - r))
    w_plus = desirable_weight, w_minus = undesirable_weight. `kl` is the
    reference point from `kto_kl_estimate`; it is held constant here too
    (stop_gradient). Returns (losses, rewards), rewards = beta * logratio
    without gradient, each of shape [B].
    """
    logratios = jnp.asarray(policy_logps) - jnp.asarray(reference_logps)
    rewards = beta * logratios
    nu = beta * jax.lax.stop_gradient(jnp.asarray(kl))
    desirable_losses = desirable_weight * jax.nn.sigmoid(nu - rewards)  # = 1 - sigmoid(r - nu)
    undesirable_losses = undesirable_weight * jax.nn.sigmoid(rewards - nu)  # = 1 - sigmoid(nu - r)
    losses = jnp.where(jnp.asarray(labels, bool), desirable_losses, undesirable_losses)
    return losses, jax.lax.stop_gradient(rewards)


def kto_safety_undesirable_weight(n_desirable: int, n_undesirable: int) -> float:
    """SACPO's KTO(S) weight for unsafe rows: w_minus = n_desirable / n_undesirable (w_plus = 1).

    Counts are over the training set (safe rows are desirable, unsafe rows
    undesirable), which balances the two terms of the KTO loss.
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise LossConfigError(
            "KTO(S) needs both safe and unsafe rows to set its weight; got "
            f"{n_desirable} desirable and {n_undesirable} undesirable"
        )
    return n_desirable / n_undesirable


def sft_loss(token_logps_sum: ArrayLike, token_counts: ArrayLike) -> jax.Array:
    """Supervised fine-tuning NLL, mean per token over the whole batch.

    loss = -sum_i token_logps_sum_i / sum_i token_counts_i

    token_logps_sum[i] is the summed log-prob of row i's completion tokens and
    token_counts[i] how many there are, so long rows weigh more than short ones
    (a per-token, not per-row, mean). A batch with no tokens gives 0 (the
    denominator is at least 1). Returns a scalar.
    """
    total_tokens = jnp.maximum(jnp.sum(jnp.asarray(token_counts)), 1)
    return -jnp.sum(jnp.asarray(token_logps_sum)) / total_tokens


def bradley_terry_loss(better_scores: ArrayLike, worse_scores: ArrayLike) -> jax.Array:
    """Reward-model loss per pair: -log sigmoid(r_better - r_worse). Returns shape [B]."""
    return -jax.nn.log_sigmoid(jnp.asarray(better_scores) - jnp.asarray(worse_scores))


def _sign_term(costs: jax.Array, signs: jax.Array) -> jax.Array:
    """-log sigmoid(s * c) where the sign s is known (+1 or -1), else 0."""
    return jnp.where(signs != 0, -jax.nn.log_sigmoid(signs * costs), 0.0)


def cost_loss(
    safer_costs: ArrayLike,
    unsafer_costs: ArrayLike,
    safer_signs: ArrayLike,
    unsafer_signs: ArrayLike,
) -> jax.Array:
    """Safe RLHF's cost-model loss per pair.

    loss = -log sigmoid(c_unsafer - c_safer)
           - log sigmoid(s_safer * c_safer) - log sigmoid(s_unsafer * c_unsafer)

    s = +1 for a response labelled unsafe, -1 for one labelled safe, so a safe
    response is pushed to cost < 0 and an unsafe one to cost > 0. A sign of 0
    means "safety unknown": that response contributes no sign term (rather
    than the constant log 2 that s = 0 would give). Returns shape [B].
    """
    safer_costs = jnp.asarray(safer_costs)
    unsafer_costs = jnp.asarray(unsafer_costs)
    pair_term = -jax.nn.log_sigmoid(unsafer_costs - safer_costs)
    return (
        pair_term
        + _sign_term(safer_costs, jnp.asarray(safer_signs))
        + _sign_term(unsafer_costs, jnp.asarray(unsafer_signs))
    )


def preference_metrics(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
) -> dict[str, jax.Array]:
    """TRL's DPO metrics, each a mean over the batch.

    rewards/chosen, rewards/rejected: mean implicit rewards;
    rewards/accuracies: share of pairs with chosen reward > rejected reward;
    rewards/margins: mean(chosen - rejected);
    logps/chosen, logps/rejected: mean policy log-probs.
    ("logits/*" need the logits and belong to the trainer.)
    """
    chosen_rewards = jnp.asarray(chosen_rewards)
    rejected_rewards = jnp.asarray(rejected_rewards)
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(jnp.asarray(policy_chosen_logps)),
        "logps/rejected": jnp.mean(jnp.asarray(policy_rejected_logps)),
    }


def pair_accuracy(better_scores: ArrayLike, worse_scores: ArrayLike) -> jax.Array:
    """Score-model pair accuracy: share of pairs with score(better) > score(worse).

    For a cost model pass (unsafer_costs, safer_costs): the unsafer answer
    should cost more.
    """
    return jnp.mean((jnp.asarray(better_scores) > jnp.asarray(worse_scores)).astype(jnp.float32))


def cost_sign_accuracy(costs: ArrayLike, signs: ArrayLike) -> jax.Array:
    """Share of labelled responses whose cost sign is right.

    Right means cost > 0 for s = +1 (unsafe) and cost <= 0 for s = -1 (safe),
    matching the harmless-rate rule "cost <= 0 is harmless". Responses with
    s = 0 (unknown) are left out; NaN when none is labelled.
    """
    costs = jnp.asarray(costs)
    signs = jnp.asarray(signs)
    predicted = jnp.where(costs > 0, 1, -1)
    labelled = signs != 0
    correct = jnp.sum(labelled & (predicted == signs))
    n_labelled = jnp.sum(labelled)
    return jnp.where(n_labelled > 0, correct / jnp.maximum(n_labelled, 1), jnp.nan)
