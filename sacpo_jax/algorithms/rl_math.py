"""The math of the on-policy stages: advantages and the clipped surrogate losses.

Arrays hold one row per sampled response and one column per response token (``[n, T]``;
``mask`` is 1 on tokens the policy emitted, EOS included). Host-side functions (numpy)
turn a round's samples into advantages; the rest (jax) run inside the compiled update.
Facts: REFERENCE-NEXT §1 (safe-rlhf's PPO-Lagrangian), §2 (TRL's GRPO).

Host side:
    kl_shaped       per-token reward or cost of PPO: a KL term on every token plus the
                    score model's end score on the last one, clipped
    gae             generalised advantage estimation, returns = advantages + values
    group_advantages GRPO: each score standardised within its group of G samples
In the update:
    lagrangian_advantages  (A_r - lam A_c) / (1 + lam)
    clipped_surrogate      PPO's clipped policy objective per token
    clipped_value_loss     the critics' clipped squared error
    k3_kl                  Schulman's k3 estimator of KL(pi || pi_ref) per token
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GROUP_STD_EPSILON = 1e-4  # TRL: A = (r - mean) / (std + 1e-4)


# ----------------------------------------------------------------------------- host side


def last_token_onehot(mask: np.ndarray) -> np.ndarray:
    """[n, T] 1.0 at each row's last masked-in token (rows with none: all 0)."""
    mask = np.asarray(mask) > 0
    length = mask.shape[1]
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    onehot = np.zeros(mask.shape, np.float32)
    rows = np.flatnonzero(mask.any(axis=1))
    onehot[rows, last[rows]] = 1.0
    return onehot


def kl_shaped(
    end_scores: np.ndarray,
    kl: np.ndarray,
    mask: np.ndarray,
    kl_weight: float,
    clip_range: float,
) -> np.ndarray:
    """safe-rlhf's per-token reward (or cost) of a response:

        x_t = clip(kl_weight * kl_t + s * 1[t = last token], -clip_range, clip_range) * mask_t

    with kl_t = log pi_old(y_t) - log pi_ref(y_t) (the k1 estimate) and s the score model's
    value of the whole response. The reward stream takes kl_weight = -kl_coeff, the cost
    stream +kl_coeff, so that (A_r - lam A_c) / (1 + lam) penalises KL by kl_coeff.
    """
    shaped = kl_weight * kl + np.asarray(end_scores)[:, None] * last_token_onehot(mask)
    return (np.clip(shaped, -clip_range, clip_range) * mask).astype(np.float32)


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) by generalised advantage estimation, per row:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0: nothing after the end)
        A_t     = delta_t + gamma * lam * A_{t+1}       (A_T = 0)
        R_t     = A_t + V_t

    with r and V multiplied by the mask first (so V = 0 beyond a response's end), as
    safe-rlhf's ``get_advantages_and_returns``; no whitening.
    """
    mask = np.asarray(mask, np.float32)
    rewards = np.asarray(rewards, np.float32) * mask
    values = np.asarray(values, np.float32) * mask
    advantages = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[0], np.float32)
    next_values = np.zeros(rewards.shape[0], np.float32)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    return advantages, advantages + values


def group_advantages(scores: np.ndarray, group_size: int) -> np.ndarray:
    """GRPO's advantage of each sample: (s - mean of its group) / (std of its group + 1e-4),
    std with Bessel's correction (TRL); groups are consecutive runs of ``group_size``."""
    scores = np.asarray(scores, np.float64)
    if group_size < 2 or scores.size % group_size:
        raise ValueError(f"{scores.size} scores do not form groups of {group_size} (>= 2)")
    groups = scores.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - mean) / (std + GROUP_STD_EPSILON)).reshape(-1).astype(np.float32)


# ----------------------------------------------------------------------------- in the update


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(values * mask) / sum(mask) over every token of the batch (0 when none)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lagrangian_advantages(
    reward_advantages: jax.Array, cost_advantages: jax.Array, lam: jax.Array
) -> jax.Array:
    """safe-rlhf's combined advantage (A_r - lam * A_c) / (1 + lam); lam takes no gradient."""
    lam = jax.lax.stop_gradient(lam)
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def clipped_surrogate(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    clip_low: jax.Array | float,
    clip_high: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """(per-token loss, per-token clipped flag) of PPO's clipped objective:

        rho = exp(logp - logp_old)
        loss_t = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))

    A token counts as clipped when the clip takes effect: rho < 1 - clip_low with A < 0,
    or rho > 1 + clip_high with A > 0 (TRL's clip ratio).
    """
    ratio = jnp.exp(logps - old_logps)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(-advantages * ratio, -advantages * clipped_ratio)
    clipped = ((ratio < 1.0 - clip_low) & (advantages < 0)) | (
        (ratio > 1.0 + clip_high) & (advantages > 0)
    )
    return loss, clipped.astype(jnp.float32)


def clipped_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_range: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """(loss, clip fraction) of a critic, safe-rlhf's ``critic_loss_fn``:

        V_clip = clip(V, V_old - clip_range, V_old + clip_range)
        loss   = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

    The clip fraction is the share of tokens where the clipped error is the larger one.
    """
    clipped_values = jnp.clip(values, old_values - clip_range, old_values + clip_range)
    plain, clipped = jnp.square(values - returns), jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).astype(jnp.float32), mask)


def k3_kl(logps: jax.Array, reference_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || pi_ref) (TRL's GRPO):
    exp(ref - logp) - (ref - logp) - 1, >= 0 and unbiased under samples from pi."""
    delta = reference_logps - logps
    return jnp.exp(delta) - delta - 1.0
