"""Random initialisation directly into the mesh's shardings (no full host copy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.models.llama import Llama, LlamaConfig


def init_model(config: LlamaConfig, mesh: Mesh, *, seed: int = 0, init_std: float = 0.02) -> Llama:
    """A Llama with N(0, init_std^2) weights, each created on its own shards.

    The init function is compiled with the parameters' shardings as out_shardings, so
    XLA materialises only each device's block.
    """

    def create():
        return nnx.state(Llama(config, rngs=nnx.Rngs(seed), init_std=init_std), nnx.Param)

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed), init_std=init_std))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = parallel.param_shardings(abstract_state, mesh)
    state = jax.jit(create, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def with_score_head(model: Llama, seed: int) -> Llama:
    """A causal LM's backbone with a fresh zero-initialised score head (reward/cost):
    every score is 0 until the head trains."""
    config = model.config.replace(architecture="LlamaForSequenceClassification")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("lm_head", None)
    head = abstract["score_head"]
    params["score_head"] = jnp.zeros(head.shape, head.dtype)
    return nnx.merge(graphdef, params)
