"""Compile time of the DPO train step for a 7B-shaped LLaMA on CPU, scanned vs unrolled.

    python benchmarks/bench_compile.py [--layers 32] [--unrolled-timeout 600]

Nothing is allocated: parameters, optimiser state and batch are abstract
(``jax.eval_shape`` / ``jax.ShapeDtypeStruct``) and the trainer's own step
(``sacpo_jax.training.step.make_train_step``, DPO objective, AdamW) is traced,
lowered and compiled with ``jax.jit(...).lower(...).compile()``. LLaMA-2-7B shapes:
hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000; bf16 parameters,
one pair of 512 tokens. Each variant runs in its own process; the unrolled one is
stopped after ``--unrolled-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def compile_step(layers: int, scan_layers: bool, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sacpo_jax import parallel
    from sacpo_jax.models.llama import Llama, LlamaConfig
    from sacpo_jax.training import objectives
    from sacpo_jax.training.loop import Trainer
    from sacpo_jax.training.optim import make_optimizer

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        param_dtype="bfloat16",
        dtype="bfloat16",
        scan_layers=scan_layers,
        remat=remat,
    )
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(params)
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-5, 0.1))
    trainer = Trainer(objective, graphdef, config, make_optimizer(1000), mesh)
    state = trainer.abstract_state(params)
    tokens = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    logps = jax.ShapeDtypeStruct((1,), jnp.float32)
    batch = {f"{side}_{name}": tokens for side in ("chosen", "rejected")
             for name in ("input_ids", "attention_mask", "loss_mask")}  # fmt: skip
    batch.update(reference_chosen_logps=logps, reference_rejected_logps=logps)
    started = time.perf_counter()
    lowered = trainer.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace_lower_s": lowered_at - started, "compile_s": done - lowered_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--unrolled-timeout", type=int, default=600)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = {
        "scan": (True, False),
        "scan+remat": (True, True),
        "unrolled": (False, False),
    }
    if args.variant:
        scan, remat = variants[args.variant]
        print("RESULT " + json.dumps(compile_step(args.layers, scan, remat)), flush=True)
        return
    print("| layers | variant | trace+lower (s) | XLA compile (s) |\n|---|---|---|---|")
    for name in variants:
        command = [sys.executable, __file__, "--variant", name, f"--layers={args.layers}"]
        timeout = args.unrolled_timeout if name == "unrolled" else None
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"| {args.layers} | {name} | - | > {timeout} (stopped) |", flush=True)
            continue
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(lines[0][7:])
        print(f"| {args.layers} | {name} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
