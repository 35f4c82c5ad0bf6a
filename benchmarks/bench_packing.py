"""Real-token share of training batches with and without packing, on PKU-like lengths.

    python benchmarks/bench_packing.py [--kind pair|sft] [--processes P] [--batch B]
        [--accum A] [--shards S] [--max-length M] [--steps N] [--json]

A synthetic dataset with PKU-SafeRLHF-like lengths (prompts of 10-120 tokens, responses
of 20-400, uniform; 2000 examples) goes through the trainer's own ``BatchLoader`` for N
steps of a global batch of P x B examples (B per process, in A micro-batches, packed
rows a multiple of S: the process's devices on the batch axes), each process's
batches built as that process builds them. The share is real tokens / token
slots computed (every ``input_ids`` array's size, padding included), over all processes
and steps, for:

    padded        one sequence per row, padded to M (no buckets)
    bucketed      one sequence per row, padded to the smallest of 128, 256, ..., M
                  that fits the global batch (``data.bucket_lengths``)
    packed        ``data.packing`` (rows of about 2 M tokens, 8 lengths per power of two)

plus the distinct packed shapes seen (each is one compilation of the step). Counting
only: no model runs, so the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sacpo_jax.data.dataset import Ragged, TokenizedDataset
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.packing import computed_tokens, real_tokens


def pku_like(kind: str, n: int = 2000, seed: int = 0) -> TokenizedDataset:
    """Prompts of 10-120 tokens and responses of 20-400 (uniform), token ids 1."""
    rng = np.random.default_rng(seed)
    prompts = Ragged.from_rows([np.ones(rng.integers(10, 121), np.int32) for _ in range(n)])
    completions = tuple(
        Ragged.from_rows([np.ones(rng.integers(20, 401), np.int32) for _ in range(n)])
        for _ in range(2 if kind == "pair" else 1)
    )
    return TokenizedDataset(kind, prompts, completions)


def share(dataset: TokenizedDataset, args: argparse.Namespace, **options) -> dict:
    real = computed = 0
    shapes = set()
    for process in range(args.processes):
        loader = BatchLoader(
            dataset,
            global_batch_size=args.processes * args.batch,
            pad_id=0,
            process_index=process,
            process_count=args.processes,
            grad_accum=args.accum,
            **options,
        )
        for step in range(args.steps):
            batch = loader.batch(step)
            real += real_tokens(batch)
            computed += computed_tokens(batch)
            shapes.add(tuple(v.shape for k, v in batch.items() if k.endswith("input_ids")))
    return {"share": round(real / computed, 4), "shapes": len(shapes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("pair", "sft"), default="pair")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="examples per process")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation")
    parser.add_argument("--shards", type=int, default=1, help="batch shards per process")
    parser.add_argument("--max-length", type=int, default=640, help=">= 520, the longest")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    dataset = pku_like(args.kind)
    buckets = tuple(sorted({*range(128, args.max_length, 128), args.max_length}))
    result = {
        "kind": args.kind,
        "processes": args.processes,
        "batch_per_process": args.batch,
        "accum": args.accum,
        "shards": args.shards,
        "max_length": args.max_length,
        "padded": share(dataset, args, buckets=(args.max_length,)),
        "bucketed": share(dataset, args, buckets=buckets),
        "packed": share(
            dataset, args, buckets=(args.max_length,), packing=True, row_multiple=args.shards
        ),
    }
    if args.json:
        print(json.dumps(result))
        return
    for name in ("padded", "bucketed", "packed"):
        print(f"{name:>9}: real-token share {result[name]['share']:.3f}, "
              f"{result[name]['shapes']} shapes")  # fmt: skip


if __name__ == "__main__":
    main()
