"""P-SACPO weight merging: theta = sum_i w_i * theta_i (sum_i w_i = 1).

For two models with q in [0, 1]: theta = (1 - q) * theta_0 + q * theta_1. SACPO's
P-SACPO merges the reward-aligned model (theta_0) with its over-realigned safety model
(theta_1, small beta/lambda); the paper's naive baseline merges theta_0 with a
safety-only DPO model trained from SFT. Each parameter is combined in float32 under
jit, keeping its sharding, then cast back to the parameter dtype.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sacpo_jax.models.llama import Llama, LlamaConfig


class MergeError(ValueError):
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
    first = _architecture(models[0].config)
    for model in models[1:]:
        if _architecture(model.config) != first:
            raise MergeError("models to merge must share one architecture and execution config")
    graphdef, _ = nnx.split(models[0])
    trees = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models]
    merged = _combine(trees, jnp.asarray(weights, jnp.float32))
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


def main(argv: list[str] | None = None) -> int:
    """``python -m sacpo_jax.merge --models A B [--q 0.5 | --weights ...] --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_jax.merge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", nargs="+", required=True, help="Hugging Face model directories")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--q", type=float, help="two models: theta = (1-q) A + q B")
    group.add_argument("--weights", type=float, nargs="+", help="one weight per model, sum 1")
    parser.add_argument("--output", required=True, help="output directory (HF format)")
    args = parser.parse_args(argv)

    from sacpo_jax import load_model, parallel, save_model
    from sacpo_jax.models.hf import CheckpointError

    try:
        weights = two_model_weights(args.q) if args.q is not None else args.weights
        if args.q is not None and len(args.models) != 2:
            raise MergeError("--q needs exactly two models")
        mesh = parallel.make_mesh()  # parameters sharded (FSDP) over all local devices
        loaded = [load_model(path, mesh=mesh) for path in args.models]
        merged = merge_models([model for model, _ in loaded], weights)
        save_model(merged, args.output, loaded[0][1])
    except (MergeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.models)} models with weights {list(weights)} into {args.output}")
    return 0
