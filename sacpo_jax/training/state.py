"""The pure train state and the optimiser.

TrainState is a plain pytree (step, params, opt_state, rng): a stage maps one state to
the next by a compiled function, and the stepwise SACPO schedule is a chain of such
states. ``params`` is the model's pure parameter dict (``nnx.split`` + ``to_pure_dict``);
``rng`` is raw uint32 key data so that checkpoints store it as an ordinary array.

Optimiser: AdamW with global-norm clipping and a warmup + cosine schedule. The schedule
is a *shape* in [0, 1]; the peak learning rate is a traced coefficient multiplied in by
the step, so changing it never recompiles:
    update = -lr * s(t) * (adam(g) + weight_decay * theta)
With ``moments_dtype`` Adam runs in that dtype (moments stored in it, gradients cast
to it), whatever the parameters' dtype; the update is cast back when applied.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sacpo_jax.models.llama import Llama


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def schedule_shape(total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup from 0 to 1 over warmup_ratio * total_steps, then cosine to 0."""
    warmup = int(round(warmup_ratio * total_steps))
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
) -> optax.GradientTransformation:
    """AdamW direction times the schedule shape; the step multiplies by -learning_rate."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    parts += [in_dtype(adam, moments_dtype) if moments_dtype else adam]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_schedule(schedule_shape(total_steps, warmup_ratio)))
    return optax.chain(*parts)


def in_dtype(inner: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """``inner`` run on gradients and parameters cast to ``dtype``: its state and its
    output are in ``dtype`` (e.g. float32 Adam moments for bfloat16 parameters)."""

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype), tree)

    def update(updates, state, params=None):
        return inner.update(cast(updates), state, None if params is None else cast(params))

    return optax.GradientTransformation(lambda params: inner.init(cast(params)), update)


def split_model(model: Llama) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure parameter dict) of a model."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def create_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 of a stage. Call under jax.jit with out_shardings to create it sharded."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )
