"""A cheap identity of a model's weights, for cache keys and "is this the same model?"."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
from flax import nnx

from sacpo_jax import parallel
from sacpo_jax.models.llama import Llama


def params_fingerprint(model: Llama) -> str:
    """sha256 over each parameter's path, shape, dtype, sum and sum of squares (float32)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    stats = jax.jit(
        lambda xs: [
            (jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in xs
        ]
    )([leaf for _, leaf in leaves])
    digest = hashlib.sha256()
    for (path, leaf), (total, squares) in zip(leaves, jax.device_get(stats)):
        digest.update(
            f"{parallel.path_name(path)}{leaf.shape}{leaf.dtype}{total!r}{squares!r}".encode()
        )
    return digest.hexdigest()[:16]
