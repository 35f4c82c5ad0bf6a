"""Compiled steps: one optimiser update, one evaluation batch, one reference pass.

``train_step(state, batch, coeffs) -> (state, metrics)`` is jitted once per batch shape
with explicit shardings (state: by partition rules over data/fsdp/tensor; batch: rows
over (data, fsdp)). The trainable part of the state (step, params, optimiser state) is
donated and updated; the frozen parameters are read, never written and never donated,
so a reference that shares them stays valid. ``coeffs`` is a NamedTuple of float32
scalars (learning_rate, beta, ...): traced, so new values never recompile.

Gradient accumulation: a batch of shape [accum, micro, ...] is scanned micro-batch by
micro-batch, gradients are averaged, and one update is applied.

Randomness (LoRA dropout): micro-batch m of the update from step t runs with the key
fold_in(fold_in(key(seed), t), m), a pure function of the step, so a resumed stage draws
the masks it would have drawn; nothing random is stored in the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.training.objectives import Loss, Reference
from sacpo_jax.training.state import TrainState, join


def make_train_step(
    graphdef: nnx.GraphDef,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    mesh: Mesh,
    grad_accum: int = 1,
    seed: int = 0,
) -> Callable:
    """``train_step(state, batch, coeffs)``; ``train_step.compiled`` is the jitted update
    of the trainable part, ``(trainable_state, frozen, batch, coeffs)``."""

    def loss_fn(params, frozen, micro, coeffs, dropout_key):
        with on_mesh(mesh):
            model = nnx.merge(graphdef, join(params, frozen))
            model.dropout_key = dropout_key
            value, metrics, _ = loss(model, micro, coeffs)
        return value, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, batch: dict, coeffs):
        micro_batches = batch if grad_accum > 1 else jax.tree.map(lambda x: x[None], batch)
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def accumulate(grads_sum, micro_and_index):
            micro, index = micro_and_index
            key = jax.random.fold_in(step_key, index)
            (value, metrics), grads = grad_fn(state.params, frozen, micro, coeffs, key)
            return jax.tree.map(jnp.add, grads_sum, grads), {"loss": value, **metrics}

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        indices = jnp.arange(grad_accum)
        grads, metrics = jax.lax.scan(accumulate, zeros, (micro_batches, indices))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        direction, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda d: -coeffs.learning_rate * d, direction)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            frozen=None,
        )
        return new_state, metrics

    trainable = state_shardings.replace(frozen=None)
    replicated = parallel.replicated(mesh)
    compiled = jax.jit(
        step,
        in_shardings=(
            trainable,
            state_shardings.frozen,
            parallel.batch_sharding(mesh, grad_accum),
            replicated,
        ),
        out_shardings=(trainable, replicated),
        donate_argnums=(0,),
    )

    def train_step(state: TrainState, batch: dict, coeffs) -> tuple[TrainState, dict]:
        new_state, metrics = compiled(state.replace(frozen=None), state.frozen, batch, coeffs)
        return new_state.replace(frozen=state.frozen), metrics

    train_step.compiled = compiled
    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss: Loss, mesh: Mesh | None = None) -> Callable:
    """eval_step(params, batch, coeffs) -> per-example rows (no gradients)."""

    @jax.jit
    def eval_step(params, batch, coeffs):
        with on_mesh(mesh):
            return loss(nnx.merge(graphdef, params), batch, coeffs)[2]

    return eval_step


def make_reference_step(
    graphdef: nnx.GraphDef, reference: Reference, mesh: Mesh | None = None
) -> Callable:
    """reference_step(params, batch) -> {reference column: [batch] log-probs}."""

    @jax.jit
    def reference_step(params, batch):
        with on_mesh(mesh):
            return reference.compute(nnx.merge(graphdef, params), batch)

    return reference_step


def on_mesh(mesh: Mesh | None):
    """Inside a jitted function: the mesh that ``parallel.constrain_rows`` keeps
    activations row-sharded on (FSDP gathers weights, not activations)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
