"""The optimiser: AdamW with global-norm clipping and a warmup + cosine schedule.

The schedule is a *shape* in [0, 1]; the peak learning rate is a traced coefficient
multiplied in by the step, so changing it never recompiles:
    update = -lr * s(t) * (adam(g) + weight_decay * theta)
With ``moments_dtype`` Adam runs in that dtype (moments stored in it, gradients cast
to it), whatever the parameters' dtype; the update is cast back when applied.
"""

from __future__ import annotations

import jax
import optax

from sacpo_jax.config import TrainConfig


def schedule_shape(total_steps: int, warmup_ratio: float, kind: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0 to 1 over warmup_ratio * total_steps, then cosine to 0
    (``kind`` "cosine") or 1 to the end ("constant")."""
    warmup = int(round(warmup_ratio * total_steps))
    if kind == "constant":
        return optax.linear_schedule(0.0, 1.0, warmup) if warmup else optax.constant_schedule(1.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(
    total_steps: int,
    *,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    moments_dtype: str | None = None,
    schedule: str = "cosine",
) -> optax.GradientTransformation:
    """AdamW direction times the schedule shape; the step multiplies by -learning_rate."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    parts += [in_dtype(adam, moments_dtype) if moments_dtype else adam]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_schedule(schedule_shape(total_steps, warmup_ratio, schedule)))
    return optax.chain(*parts)


def in_dtype(inner: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """``inner`` run on gradients and parameters cast to ``dtype``: its state and its
    output are in ``dtype`` (e.g. float32 Adam moments for bfloat16 parameters)."""

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype), tree)

    def update(updates, state, params=None):
        return inner.update(cast(updates), state, None if params is None else cast(params))

    return optax.GradientTransformation(lambda params: inner.init(cast(params)), update)


def stage_optimizer(train: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``make_optimizer`` with a stage's ``train`` settings over ``total_steps``."""
    return make_optimizer(
        total_steps,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        moments_dtype=train.adam_dtype,
    )
