"""The pure train state, split into trainable and frozen parameters.

A stage maps one ``TrainState`` to the next by a compiled function; the stepwise SACPO
schedule is a chain of such states. Parameters are the model's pure parameter dict
(``nnx.split`` + ``to_pure_dict``), split by a ``Trainable`` predicate on each leaf's
path name ("layers/q", "embed", ...):

    params     the leaves that train: differentiated, clipped, updated, with Adam state
    frozen     every other leaf: read by the forward pass, never updated, no optimiser state
    opt_state  the optimiser's state of ``params`` only

Full fine-tuning is ``train_all`` (``frozen`` is empty); adapters (LoRA) train only
their own leaves. The model is ``nnx.merge(graphdef, join(params, frozen))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sacpo_jax.models.llama import Llama

Trainable = Callable[[str], bool]
"""Whether the parameter at a path name ("layers/q") trains."""


def train_all(name: str) -> bool:
    """Every parameter trains (full fine-tuning)."""
    return True


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any

    def model_params(self) -> dict:
        """The whole parameter dict: trainable and frozen leaves together."""
        return join(self.params, self.frozen)

    def saved(self) -> dict:
        """What a checkpoint stores: everything but the frozen leaves (the stage's start
        model holds them already, bit for bit)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


def split_model(model: Llama) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure parameter dict) of a model."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def partition(params: dict, trainable: Trainable) -> tuple[dict, dict]:
    """(trainable leaves, frozen leaves) of a nested parameter dict, each a nested dict
    holding only its own leaves."""

    def keep(select: bool) -> dict:
        def walk(node: dict, prefix: str) -> dict:
            out = {}
            for key, value in node.items():
                name = f"{prefix}/{key}" if prefix else key
                if isinstance(value, dict):
                    sub = walk(value, name)
                    if sub:
                        out[key] = sub
                elif trainable(name) == select:
                    out[key] = value
            return out

        return walk(params, "")

    return keep(True), keep(False)


def join(first: dict, second: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (inverse of ``partition``)."""
    out = dict(first)
    for key, value in second.items():
        out[key] = join(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def create_state(params: dict, frozen: dict, optimizer: optax.GradientTransformation):
    """Step 0 of a stage. Call under jax.jit with out_shardings to create it sharded."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        frozen=frozen,
    )


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)
