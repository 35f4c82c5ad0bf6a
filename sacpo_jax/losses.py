"""Training objectives as small pure functions of log-probs or scores.

Every function here is plain `jax.numpy`, safe under `jax.jit`, and takes
its coefficients (beta, label smoothing, KTO weights) as ordinary values
that may be traced JAX scalars: changing them never recompiles. Only the
DPO `loss_type` is static (a Python string).

Notation, per example in a batch of B:
  pi_c, pi_r   summed completion log-probs of the chosen / rejected answer
               under the policy; ref_c, ref_r under the reference.
  delta        (pi_c - ref_c) - (pi_r - ref_r)
  beta         the KL coefficient (in SACPO's realignment stage, beta/lambda)

Metric names follow TRL ("rewards/chosen", "logps/chosen", ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


class LossConfigError(ValueError):
    """A loss was asked for with an unknown type or inconsistent arguments."""


def _check_dpo_arguments(loss_type: str, label_smoothing, chosen_lengths, rejected_lengths):
    """Reject bad static choices early; traced coefficients cannot be checked."""
    if loss_type not in DPO_LOSS_TYPES:
        raise LossConfigError(
            f"unknown DPO loss_type {loss_type!r}; valid names: {', '.join(DPO_LOSS_TYPES)}"
        )
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise LossConfigError(
            "DPO loss_type 'ipo' is length-normalised: pass chosen_lengths and rejected_lengths"
        )
    if isinstance(label_smoothing, (int, float)):
        if loss_type in ("hinge", "ipo") and label_smoothing != 0:
            raise LossConfigError(
                f"label_smoothing applies only to 'sigmoid' (cDPO) and 'robust', not {loss_type!r}"
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
    a non-zero Python eps with "hinge" or "ipo" is an error (a traced eps is
    simply unused there).

    Implicit rewards (always on un-normalised log-probs, like TRL, and with
    no gradient: they are for logging):
      chosen_rewards = beta * (pi_c - ref_c), rejected_rewards = beta * (pi_r - ref_r).

    Returns (losses, chosen_rewards, rejected_rewards), each of shape [B].
    """
    _check_dpo_arguments(loss_type, label_smoothing, chosen_lengths, rejected_lengths)
    chosen_logratios = jnp.asarray(policy_chosen_logps) - jnp.asarray(reference_chosen_logps)
    rejected_logratios = jnp.asarray(policy_rejected_logps) - jnp.asarray(reference_rejected_logps)
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(
            -beta * delta
        )
    elif loss_type == "robust":
        losses = (
            -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
            + eps * jax.nn.log_sigmoid(-beta * delta)
        ) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    else:  # "ipo"
        chosen_tokens = jnp.maximum(jnp.asarray(chosen_lengths), 1)
        rejected_tokens = jnp.maximum(jnp.asarray(rejected_lengths), 1)
        delta_avg = chosen_logratios / chosen_tokens - rejected_logratios / rejected_tokens
        losses = (delta_avg - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return losses, chosen_rewards, rejected_rewards


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
