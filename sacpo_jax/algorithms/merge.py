"""P-SACPO weight merging: theta = sum_i w_i * theta_i (sum_i w_i = 1).

For two models with q in [0, 1]: theta = (1 - q) * theta_0 + q * theta_1. SACPO's
P-SACPO merges the reward-aligned model (theta_0) with its over-realigned safety model
(theta_1, small beta/lambda); the paper's naive baseline merges theta_0 with a
safety-only DPO model trained from SFT. Each parameter is combined in float32 under
jit, keeping its sharding, then cast back to the parameter dtype. Models with adapters or
a quantised base are merged / dequantised first (``transforms.merged``): the result is a
plain model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sacpo_jax.errors import SacpoError
from sacpo_jax.models import transforms
from sacpo_jax.models.llama import Llama, LlamaConfig
from sacpo_jax.training.state import all_finite


class MergeError(SacpoError, ValueError):
    """Models that cannot be merged (architectures or weights); one line."""


def two_model_weights(q: float) -> list[float]:
    """(1 - q, q): q = 0 is the first model, q = 1 the second."""
    if not 0.0 <= q <= 1.0:
        raise MergeError(f"q must lie in [0, 1], got {q}")
    return [1.0 - q, q]


def merge_models(models: Sequence[Llama], weights: Sequence[float]) -> Llama:
    """The linear combination of ``models`` with ``weights`` (a new model)."""
    if len(models) < 2 or len(models) != len(weights):
        raise MergeError(
            f"need >= 2 models and one weight each, got {len(models)} and {len(weights)}"
        )
    if abs(sum(weights) - 1.0) > 1e-6:
        raise MergeError(f"merge weights must sum to 1, got {list(weights)} (sum {sum(weights)})")
    models = [transforms.merged(model) for model in models]
    first = _architecture(models[0].config)
    for model in models[1:]:
        if _architecture(model.config) != first:
            raise MergeError("models to merge must share one architecture and execution config")
    graphdef, _ = nnx.split(models[0])
    trees = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models]
    merged = _combine(trees, jnp.asarray(weights, jnp.float32))
    if not bool(all_finite(merged)):
        raise MergeError(f"merging with weights {list(weights)} gives non-finite parameters")
    return nnx.merge(graphdef, merged)


def _architecture(config: LlamaConfig) -> LlamaConfig:
    """The config without the exported-only HF fields (extra config, generation config)."""
    return config.replace(hf_extra_json="{}", generation_config_json="{}")


@jax.jit
def _combine(trees: list, weights: jax.Array):
    def mix(*leaves):
        total = sum(w * leaf.astype(jnp.float32) for w, leaf in zip(weights, leaves))
        return total.astype(leaves[0].dtype)

    return jax.tree.map(mix, *trees)
