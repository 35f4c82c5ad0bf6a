"""Training objectives as small pure functions of log-probs or scores.

Every function here is plain `jax.numpy`, safe under `jax.jit`, and takes
its coefficients (beta, label smoothing, KTO weights) as ordinary values
that may be traced JAX scalars: changing them never recompiles. Only the
DPO `loss_type` (a key of ``PAIR_LOSSES``, or a list of keys) is static.

Notation, per example in a batch of B:
  pi_c, pi_r   summed completion log-probs of the chosen / rejected answer
               under the policy; ref_c, ref_r under the reference.
  delta, d     (pi_c - ref_c) - (pi_r - ref_r); dw = pi_c - ref_c, dl = pi_r - ref_r
  beta         the KL coefficient (in SACPO's realignment stage, beta/lambda)

Metric names follow TRL ("rewards/chosen", "logps/chosen", ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    ``coeffs`` carries ``beta`` and whatever else the loss reads (``label_smoothing``,
    ``discopop_tau``, ``simpo_gamma``), as traced scalars.
    ``uses_label_smoothing``: the loss reads eps; ``requires_label_smoothing``: it is
    undefined at eps = 0 (exo_pair). ``needs_lengths``: it reads the completion token
    counts. ``needs_reference``: it reads the reference log-probs (False: reference-free,
    no reference model is run for it).
    """

    loss: Callable[[PairLogps, Any], jax.Array]
    uses_label_smoothing: bool = False
    needs_lengths: bool = False
    needs_reference: bool = True
    requires_label_smoothing: bool = False


def _smoothed(z: jax.Array, eps) -> jax.Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _per_token(logps: jax.Array, lengths: jax.Array) -> jax.Array:
    """Summed log-probs divided by their token counts (counts below 1 taken as 1)."""
    return logps / jnp.maximum(lengths, 1)


def _length_normalised_delta(p: PairLogps) -> jax.Array:
    """d_avg = (pi_c - ref_c)/|y_c| - (pi_r - ref_r)/|y_r|."""
    return _per_token(p.chosen_logratios, p.chosen_lengths) - _per_token(
        p.rejected_logratios, p.rejected_lengths
    )


def _sigmoid(p: PairLogps, c) -> jax.Array:
    """-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d). eps = 0 is DPO and TRL's
    "sigmoid"; eps > 0 is conservative DPO (cDPO), which TRL 1.x no longer offers."""
    return _smoothed(c.beta * p.delta, c.label_smoothing)


def _robust(p: PairLogps, c) -> jax.Array:
    """[-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)] / (1 - 2 eps)."""
    z, eps = c.beta * p.delta, c.label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2 * eps)


def _hinge(p: PairLogps, c) -> jax.Array:
    """relu(1 - beta d)."""
    return jax.nn.relu(1.0 - c.beta * p.delta)


def _ipo(p: PairLogps, c) -> jax.Array:
    """(d_avg - 1/(2 beta))^2, each log-ratio divided by its completion's token count."""
    return (_length_normalised_delta(p) - 1.0 / (2.0 * c.beta)) ** 2


def _exo_pair(p: PairLogps, c) -> jax.Array:
    """EXO-pref: KL(q || (1 - eps, eps)) with q = sigmoid(beta d):
    q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps), eps > 0."""
    z, eps = c.beta * p.delta, c.label_smoothing
    q = jax.nn.sigmoid(z)
    return q * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + (1.0 - q) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(p: PairLogps, c) -> jax.Array:
    """NCA: -log sigmoid(beta dw) - 1/2 log sigmoid(-beta dw) - 1/2 log sigmoid(-beta dl),
    dw = pi_c - ref_c and dl = pi_r - ref_r."""
    chosen, rejected = c.beta * p.chosen_logratios, c.beta * p.rejected_logratios
    return (
        -jax.nn.log_sigmoid(chosen)
        - 0.5 * jax.nn.log_sigmoid(-chosen)
        - 0.5 * jax.nn.log_sigmoid(-rejected)
    )


def _bco_pair(p: PairLogps, c) -> jax.Array:
    """BCO on pairs: -log sigmoid(beta dw) - log sigmoid(-beta dl) (TRL 1.x: no running
    reward mean subtracted)."""
    return -jax.nn.log_sigmoid(c.beta * p.chosen_logratios) - jax.nn.log_sigmoid(
        -c.beta * p.rejected_logratios
    )


def _sppo_hard(p: PairLogps, c) -> jax.Array:
    """SPPO with hard labels: (dw - 1/(2 beta))^2 + (dl + 1/(2 beta))^2."""
    half = 0.5 / c.beta
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


def _aot(p: PairLogps, c) -> jax.Array:
    """AOT (paired): delta = sort_batch(pi_c - pi_r) - sort_batch(ref_c - ref_r), then the
    smoothed sigmoid loss of beta delta. A function of the whole batch (the i-th loss pairs
    the i-th smallest policy and reference margins)."""
    delta = jnp.sort(p.policy_chosen - p.policy_rejected) - jnp.sort(
        p.reference_chosen - p.reference_rejected
    )
    return _smoothed(c.beta * delta, c.label_smoothing)


def _aot_unpaired(p: PairLogps, c) -> jax.Array:
    """AOT (unpaired): delta = sort_batch(dw) - sort_batch(dl), smoothed sigmoid loss."""
    delta = jnp.sort(p.chosen_logratios) - jnp.sort(p.rejected_logratios)
    return _smoothed(c.beta * delta, c.label_smoothing)


def _apo_zero(p: PairLogps, c) -> jax.Array:
    """APO-zero: (1 - sigmoid(beta dw)) + sigmoid(beta dl)."""
    return jax.nn.sigmoid(-c.beta * p.chosen_logratios) + jax.nn.sigmoid(
        c.beta * p.rejected_logratios
    )


def _apo_down(p: PairLogps, c) -> jax.Array:
    """APO-down: sigmoid(beta dw) + (1 - sigmoid(beta d))."""
    return jax.nn.sigmoid(c.beta * p.chosen_logratios) + jax.nn.sigmoid(-c.beta * p.delta)


def _discopop(p: PairLogps, c) -> jax.Array:
    """DiscoPOP: z = beta d, m = sigmoid(z / tau); (1 - m)(-log sigmoid z) + m e^(-z).
    m e^(-z) is computed as exp(log sigmoid(z/tau) - z), finite for any margin."""
    z = c.beta * p.delta
    logistic = -jax.nn.log_sigmoid(z)
    exponential = jnp.exp(jax.nn.log_sigmoid(z / c.discopop_tau) - z)
    return jax.nn.sigmoid(-z / c.discopop_tau) * logistic + exponential


def chosen_nll(p: PairLogps) -> jax.Array:
    """Token-mean NLL of the chosen completions over the whole batch,
    -sum_i pi_c,i / sum_i |y_c,i|, broadcast to [B] (TRL's "sft" term, RPO's NLL)."""
    nll = -jnp.sum(p.policy_chosen) / jnp.maximum(jnp.sum(p.chosen_lengths), 1)
    return jnp.broadcast_to(nll, p.policy_chosen.shape)


def _sft(p: PairLogps, c) -> jax.Array:
    return chosen_nll(p)


def _sigmoid_norm(p: PairLogps, c) -> jax.Array:
    """-log sigmoid(beta d_avg), log-ratios divided by token counts."""
    return -jax.nn.log_sigmoid(c.beta * _length_normalised_delta(p))


PAIR_LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss(_sigmoid, uses_label_smoothing=True),
    "robust": PairLoss(_robust, uses_label_smoothing=True),
    "hinge": PairLoss(_hinge),
    "ipo": PairLoss(_ipo, needs_lengths=True),
    "exo_pair": PairLoss(_exo_pair, uses_label_smoothing=True, requires_label_smoothing=True),
    "nca_pair": PairLoss(_nca_pair),
    "bco_pair": PairLoss(_bco_pair),
    "sppo_hard": PairLoss(_sppo_hard),
    "aot": PairLoss(_aot, uses_label_smoothing=True),
    "aot_unpaired": PairLoss(_aot_unpaired, uses_label_smoothing=True),
    "apo_zero": PairLoss(_apo_zero),
    "apo_down": PairLoss(_apo_down),
    "discopop": PairLoss(_discopop),
    "sft": PairLoss(_sft, needs_lengths=True, needs_reference=False),
    "sigmoid_norm": PairLoss(_sigmoid_norm, needs_lengths=True),
}
"""The DPO family by TRL's ``loss_type`` names (TRL 1.x ``DPOTrainer._compute_loss``):
a new loss is its function plus one entry."""

DISCOPOP_TAU = 0.05
"""TRL's default ``discopop_tau`` (the DiscoPOP paper's)."""


# ----------------------------------------------------------------- reference-free losses


def _simpo(p: PairLogps, c) -> jax.Array:
    """SimPO: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta (avg_c - avg_r) - gamma,
    avg = summed policy log-prob / token count (no reference)."""
    margin = _per_token(p.policy_chosen, p.chosen_lengths) - _per_token(
        p.policy_rejected, p.rejected_lengths
    )
    return _smoothed(c.beta * margin - c.simpo_gamma, c.label_smoothing)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_log_odds(p: PairLogps) -> jax.Array:
    """ORPO's log odds ratio of the token-averaged policy log-probs lc, lr:
    (lc - lr) - (log(1 - e^lc) - log(1 - e^lr))."""
    chosen = _per_token(p.policy_chosen, p.chosen_lengths)
    rejected = _per_token(p.policy_rejected, p.rejected_lengths)
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def _orpo(p: PairLogps, c) -> jax.Array:
    """ORPO's odds-ratio term -beta log sigmoid(log odds) (beta: the paper's lambda)."""
    return -c.beta * jax.nn.log_sigmoid(orpo_log_odds(p))


SIMPO = PairLoss(_simpo, uses_label_smoothing=True, needs_lengths=True, needs_reference=False)
ORPO = PairLoss(_orpo, needs_lengths=True, needs_reference=False)


def safedpo_loss(
    p: PairLogps, c, chosen_unsafe: ArrayLike, rejected_unsafe: ArrayLike
) -> jax.Array:
    """SafeDPO: -log sigmoid(beta d - (h_r - h_c) * margin), h = 1 for an unsafe response.

    ``c.safety_margin`` is SafeDPO's Delta. On pairs reordered by ``pku_safedpo`` the
    chosen answer is safe (h_c = 0), so a pair with an unsafe rejected answer must win by
    Delta more: the implicit reward learns r - Delta * h.
    """
    gap = jnp.asarray(rejected_unsafe, jnp.float32) - jnp.asarray(chosen_unsafe, jnp.float32)
    return -jax.nn.log_sigmoid(c.beta * p.delta - gap * c.safety_margin)


class PairCoefficients(NamedTuple):
    """The coefficients the DPO family reads (an objective's may hold more)."""

    beta: ArrayLike
    label_smoothing: ArrayLike
    discopop_tau: ArrayLike


def _check_dpo_arguments(
    loss_types: tuple[str, ...], loss_weights, label_smoothing, chosen_lengths, rejected_lengths
):
    """Reject bad static choices early; traced coefficients cannot be checked."""
    for loss_type in loss_types:
        if loss_type not in PAIR_LOSSES:
            raise LossConfigError(
                f"unknown DPO loss_type {loss_type!r}; valid names: {', '.join(PAIR_LOSSES)}"
            )
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise LossConfigError(
            f"loss_weights has {len(loss_weights)} values for {len(loss_types)} loss types"
        )
    chosen = [PAIR_LOSSES[t] for t in loss_types]
    if any(loss.needs_lengths for loss in chosen) and (
        chosen_lengths is None or rejected_lengths is None
    ):
        names = ", ".join(repr(t) for t in loss_types if PAIR_LOSSES[t].needs_lengths)
        raise LossConfigError(
            f"DPO loss_type {names} is length-normalised: pass chosen_lengths and rejected_lengths"
        )
    if isinstance(label_smoothing, (int, float)):
        if not any(loss.uses_label_smoothing for loss in chosen) and label_smoothing != 0:
            users = [name for name, loss in PAIR_LOSSES.items() if loss.uses_label_smoothing]
            raise LossConfigError(
                f"label_smoothing applies only to {', '.join(map(repr, users))}, not "
                f"{', '.join(map(repr, loss_types))}"
            )
        if not 0.0 <= label_smoothing < 0.5:
            raise LossConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        if any(loss.requires_label_smoothing for loss in chosen) and label_smoothing == 0:
            raise LossConfigError("loss_type 'exo_pair' needs label_smoothing > 0 (EXO: 1e-3)")


def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    reference_chosen_logps: ArrayLike,
    reference_rejected_logps: ArrayLike,
    *,
    beta: ArrayLike,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[ArrayLike] | None = None,
    label_smoothing: ArrayLike = 0.0,
    discopop_tau: ArrayLike = DISCOPOP_TAU,
    chosen_lengths: ArrayLike | None = None,
    rejected_lengths: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO-family losses and the implicit rewards, as TRL defines them.

    ``loss_type`` is a name of ``PAIR_LOSSES`` or a list of names; a list is combined as
    TRL combines it: loss_i = sum_k w_k * loss_k,i with ``loss_weights`` w (default all 1),
    so the batch mean is sum_k w_k * mean(loss_k). With d = (pi_c - ref_c) - (pi_r - ref_r)
    and eps = label_smoothing, e.g.:

      "sigmoid": -(1 - eps) * log sigmoid(beta*d) - eps * log sigmoid(-beta*d)
                 (eps = 0 is DPO; eps > 0 is conservative DPO, cDPO)
      "robust":  [-(1 - eps) * log sigmoid(beta*d) + eps * log sigmoid(-beta*d)] / (1 - 2*eps)
      "hinge":   relu(1 - beta*d)
      "ipo":     (d_avg - 1/(2*beta))^2, each log-ratio divided by its completion's token
                 count (chosen_lengths / rejected_lengths; counts below 1 count as 1)

    and the others of ``PAIR_LOSSES`` (each function's docstring states its formula).
    Length-normalised losses (ipo, sigmoid_norm, sft) need both length arrays.

    eps must lie in [0, 0.5); it is checked when given as a Python number, and a non-zero
    Python eps with losses that all ignore it is an error (a traced eps is simply unused).

    Implicit rewards (always on un-normalised log-probs, like TRL, and with
    no gradient: they are for logging):
      chosen_rewards = beta * (pi_c - ref_c), rejected_rewards = beta * (pi_r - ref_r).

    Returns (losses, chosen_rewards, rejected_rewards), each of shape [B].
    """
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    _check_dpo_arguments(
        loss_types, loss_weights, label_smoothing, chosen_lengths, rejected_lengths
    )
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
    coeffs = PairCoefficients(beta, label_smoothing, discopop_tau)
    weights = loss_weights if loss_weights is not None else (1.0,) * len(loss_types)
    losses = combined_pair_loss(pairs, coeffs, loss_types, weights)
    chosen_rewards, rejected_rewards = implicit_rewards(pairs, beta)
    return losses, chosen_rewards, rejected_rewards


def combined_pair_loss(
    pairs: PairLogps, coeffs, loss_types: Sequence[str], loss_weights: Sequence[ArrayLike]
) -> jax.Array:
    """sum_k loss_weights[k] * PAIR_LOSSES[loss_types[k]](pairs, coeffs), per pair ([B])."""
    total = 0.0
    for name, weight in zip(loss_types, loss_weights, strict=True):
        total = total + weight * PAIR_LOSSES[name].loss(pairs, coeffs)
    return total


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
