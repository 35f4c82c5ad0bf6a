"""``python -m sacpo_jax.merge --models A B (--q 0.5 | --weights W...) --output DIR``:
P-SACPO linear weight merging of Hugging Face checkpoints (``algorithms.merge``)."""

from __future__ import annotations

import argparse
import sys

from sacpo_jax.algorithms.merge import MergeError, merge_models, two_model_weights
from sacpo_jax.api import load_model
from sacpo_jax.errors import SacpoError
from sacpo_jax.models.hf import save_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_jax.merge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", nargs="+", required=True, help="Hugging Face model directories")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--q", type=float, help="two models: theta = (1-q) A + q B")
    group.add_argument("--weights", type=float, nargs="+", help="one weight per model, sum 1")
    parser.add_argument("--output", required=True, help="output directory (HF format)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sacpo_jax import parallel

    try:
        weights = two_model_weights(args.q) if args.q is not None else args.weights
        if args.q is not None and len(args.models) != 2:
            raise MergeError("--q needs exactly two models")
        mesh = parallel.make_mesh()  # parameters sharded (FSDP) over all local devices
        loaded = [load_model(path, mesh=mesh) for path in args.models]
        merged = merge_models([model for model, _ in loaded], weights)
        save_checkpoint(merged, args.output, loaded[0][1])
    except SacpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"merged {len(args.models)} models with weights {list(weights)} into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
