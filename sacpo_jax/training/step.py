"""Compiled steps: one optimiser update, one evaluation batch, one reference pass.

``train_step(state, batch, coeffs) -> (state, metrics)`` is jitted once per batch shape
with explicit shardings (state: by partition rules over data/fsdp/tensor; batch: rows
over (data, fsdp)) and the state donated. ``coeffs`` is a dict of float32 scalars
(learning_rate, beta, ...): traced, so new values never recompile.

Gradient accumulation: a batch of shape [accum, micro, ...] is scanned micro-batch by
micro-batch, gradients are averaged, and one update is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sacpo_jax import parallel
from sacpo_jax.training.objectives import Objective, reference_logps
from sacpo_jax.training.state import TrainState


def batch_shardings(mesh: Mesh, batch: dict, grad_accum: int = 1) -> dict:
    """Rows over (data, fsdp); with accumulation the row axis is axis 1."""
    lead = (None,) if grad_accum > 1 else ()
    return {
        name: NamedSharding(
            mesh,
            PartitionSpec(*lead, parallel.BATCH_AXES, *([None] * (x.ndim - 1 - len(lead)))),
        )
        for name, x in batch.items()
    }


def coefficient_arrays(coeffs: dict[str, float]) -> dict[str, jax.Array]:
    """Python numbers -> float32 scalars, so the step traces them instead of baking them in."""
    return {name: jnp.asarray(value, jnp.float32) for name, value in coeffs.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings,
    batch_shardings: dict,
    mesh: Mesh,
    grad_accum: int = 1,
) -> Callable:
    def loss_fn(params, micro, coeffs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see parallel.constrain_rows
            loss, metrics, _ = objective(nnx.merge(graphdef, params), micro, coeffs)
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict, coeffs: dict):
        micro_batches = batch if grad_accum > 1 else jax.tree.map(lambda x: x[None], batch)

        def accumulate(grads_sum, micro):
            (loss, metrics), grads = grad_fn(state.params, micro, coeffs)
            return jax.tree.map(jnp.add, grads_sum, grads), {"loss": loss, **metrics}

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(accumulate, zeros, micro_batches)
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        direction, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda d: -coeffs["learning_rate"] * d, direction)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, state.step),
        )
        return new_state, metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective) -> Callable:
    """eval_step(params, batch, coeffs) -> per-example rows (no gradients)."""

    @jax.jit
    def eval_step(params, batch, coeffs):
        return objective(nnx.merge(graphdef, params), batch, coeffs)[2]

    return eval_step


def make_reference_step(graphdef: nnx.GraphDef, kind: str) -> Callable:
    """reference_step(params, batch) -> {reference_* column: [batch] log-probs}."""

    @jax.jit
    def reference_step(params, batch):
        return reference_logps(nnx.merge(graphdef, params), batch, kind)

    return reference_step
