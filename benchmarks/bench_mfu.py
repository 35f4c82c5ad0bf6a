"""MFU of the DPO train step (precomputed reference) for a ~1B LLaMA on one accelerator.

    python benchmarks/bench_mfu.py [--layers 22 --hidden 2048 --seq 2048 --pairs 4]
                                   [--param-dtype float32 --compute-dtype bfloat16]
                                   [--remat] [--steps 10 --warmup 3]

Random-initialised LLaMA (default: TinyLlama shapes, hidden 2048, 22 layers, 32
heads, 4 KV heads, MLP 5632, vocabulary 32000; 1.1B parameters), float32 parameters
and Adam state with bfloat16 compute by default. The step is the trainer's own
(``make_train_step``, DPO objective); reference log-probs come in the batch, as with
``reference_mode: precompute``. Every row is ``--seq`` real tokens; a step trains on
2 x pairs rows. FLOPs per step from ``sacpo_jax.flops`` (6N + 12 L H d_h S per token);
MFU against the device's bf16 peak. Median step time after the warmup steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sacpo_jax import flops, parallel
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import LlamaConfig
from sacpo_jax.training import objectives
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.state import split_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2x rows)")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        param_dtype=args.param_dtype,
        dtype=args.compute_dtype,
        remat=args.remat,
    )
    mesh = parallel.make_mesh()
    graphdef, params = split_model(init_model(config, mesh))
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-6, 0.1))
    trainer = Trainer(objective, graphdef, config, make_optimizer(1000, warmup_ratio=0.0), mesh)
    state = trainer.fresh_state(params)
    del params
    rng = np.random.default_rng(0)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(0, args.vocab, (args.pairs, args.seq), dtype=np.int32)
        loss_mask = np.zeros_like(ids)
        loss_mask[:, args.seq // 2 :] = 1
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = np.ones_like(ids)
        batch[f"{side}_loss_mask"] = loss_mask
        batch[f"reference_{side}_logps"] = rng.normal(-500, 10, args.pairs).astype(np.float32)
    batch = parallel.global_batch(batch, mesh)
    times = []
    for i in range(args.warmup + args.steps):
        started = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    step = float(np.median(times))
    step_flops = flops.batch_flops(config, batch)
    tokens = 2 * args.pairs * args.seq
    device = jax.devices()[0]
    util = flops.utilisation_metrics(step_flops, step, jax.device_count(), device.device_kind)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    memory = device.memory_stats() or {}
    print(f"device: {device.device_kind} x {jax.device_count()}; jax {jax.__version__}")
    print(f"params: {n_params / 1e9:.2f} B ({args.param_dtype}), compute {args.compute_dtype}, "
          f"remat {args.remat}; {2 * args.pairs} rows x {args.seq} tokens per step")  # fmt: skip
    print("| step (s) | tokens/s | TFLOP/s per device | MFU | peak memory (GiB) | loss |")
    print("|---|---|---|---|---|---|")
    peak = memory.get("peak_bytes_in_use", 0) / 2**30
    mfu = f"{util['mfu']:.1%}" if "mfu" in util else "n/a (peak unknown)"
    print(f"| {step:.3f} | {tokens / step:.0f} | {util['tflops_per_device']:.1f} | {mfu} "
          f"| {peak:.1f} | {float(metrics['loss']):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
