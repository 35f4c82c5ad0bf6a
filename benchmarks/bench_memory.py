"""Per-device memory of the DPO train step for LLaMA-sized models, without the memory.

    python benchmarks/bench_memory.py --model {llama2-7b,llama3-8b,llama3-70b}
        --pairs-per-device N --seq S --fsdp F [--lora R] [--quantize nf4|int8]
        [--no-remat] --json

The trainer's own DPO step (``make_train_step`` with the DPO objective and the AdamW
of ``make_optimizer``) is traced on abstract shapes (``nnx.eval_shape``,
``jax.eval_shape``, ``jax.ShapeDtypeStruct``: nothing is allocated), sharded over an
fsdp mesh of F forced CPU devices, compiled, and XLA's compiled memory analysis is
read: per device, ``args_GiB`` (parameters, Adam moments, batch), ``temp_GiB``
(temporaries: activations, gradients, logits ...), ``output_GiB`` and ``alias_GiB``
(outputs that reuse donated arguments). Parameters and compute are bfloat16, Adam
moments in the parameters' dtype, layers scanned, remat on unless ``--no-remat``.
``--lora R``: LoRA rank R (alpha 2R, dropout 0.05) on all seven projections, float32
adapters and Adam moments, the base frozen (an argument, not donated, no gradient);
``--quantize``: that base stored in nf4 or int8 (QLoRA).
Each device gets N pairs (2N rows) of S real tokens; the reference log-probs come in
the batch (precomputed). XLA:CPU's buffer assignment is a proxy for a GPU's or TPU's:
right for before/after comparisons, not an exact prediction of a device's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GIB = 2**30

# Architectures (Hugging Face configs of meta-llama/Llama-2-7b-hf, Meta-Llama-3-8B, -70B).
MODELS = {
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128,
    ),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    ),
    "llama3-70b": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128,
    ),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--pairs-per-device", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--fsdp", type=int, required=True, help="devices on the fsdp axis")
    parser.add_argument("--lora", type=int, metavar="R", help="LoRA rank (all 7 projections)")
    parser.add_argument("--quantize", choices=("nf4", "int8"), help="frozen base storage")
    parser.add_argument("--no-remat", action="store_true", help="keep activations")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.quantize and not args.lora:
        parser.exit(2, "bench_memory.py: --quantize needs --lora (a quantized base is frozen)\n")
    if args.lora is not None and args.lora < 1:
        parser.exit(2, "bench_memory.py: --lora must be >= 1\n")
    if min(args.pairs_per_device, args.seq, args.fsdp) < 1:
        parser.exit(2, "bench_memory.py: --pairs-per-device, --seq and --fsdp must be >= 1\n")
    return args


def compiled_dpo_step(config, pairs: int, seq: int, mesh):
    """The trainer's DPO step for ``config``, compiled on abstract inputs over ``mesh``.

    The one place this benchmark touches the training modules.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sacpo_jax.models import lora
    from sacpo_jax.models.llama import Llama
    from sacpo_jax.training import objectives
    from sacpo_jax.training.loop import Trainer
    from sacpo_jax.training.optim import make_optimizer
    from sacpo_jax.training.state import train_all

    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-5, 0.1))
    trainable = train_all if config.lora is None else lora.is_adapter
    trainer = Trainer(objective, graphdef, config, make_optimizer(1000), mesh, trainable=trainable)
    state = trainer.abstract_state(nnx.to_pure_dict(params))
    tokens = jax.ShapeDtypeStruct((pairs, seq), jnp.int32)
    logps = jax.ShapeDtypeStruct((pairs,), jnp.float32)
    batch = {f"{side}_{name}": tokens for side in ("chosen", "rejected")
             for name in ("input_ids", "attention_mask", "loss_mask")}  # fmt: skip
    batch.update(reference_chosen_logps=logps, reference_rejected_logps=logps)
    return trainer.lower(state, batch).compile()


def measure(args: argparse.Namespace) -> dict:
    import jax

    from sacpo_jax import parallel
    from sacpo_jax.models.llama import LlamaConfig
    from sacpo_jax.models.lora import PEFT_MODULES, LoraConfig

    adapters = None
    if args.lora:
        adapters = LoraConfig(args.lora, 2.0 * args.lora, 0.05, tuple(PEFT_MODULES))
    config = LlamaConfig(
        **MODELS[args.model],
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat=not args.no_remat,
        scan_layers=True,
        lora=adapters,
        quantize=args.quantize,
    )
    mesh = parallel.make_mesh(data=1, fsdp=args.fsdp, tensor=1)
    pairs = args.pairs_per_device * args.fsdp
    analysis = compiled_dpo_step(config, pairs, args.seq, mesh).memory_analysis()
    sizes = {
        "args_GiB": analysis.argument_size_in_bytes,
        "temp_GiB": analysis.temp_size_in_bytes,
        "output_GiB": analysis.output_size_in_bytes,
        "alias_GiB": analysis.alias_size_in_bytes,
    }
    return {
        "model": args.model,
        "pairs_per_device": args.pairs_per_device,
        "seq": args.seq,
        "fsdp": args.fsdp,
        "remat": not args.no_remat,
        "lora": args.lora,
        "quantize": args.quantize,
        **{name: round(size / GIB, 2) for name, size in sizes.items()},
        "jax": jax.__version__,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    # Forced CPU devices must be requested before jax is imported.
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.fsdp}"
    if "jax" in sys.modules:
        raise SystemExit("bench_memory.py: jax was imported before the device count was set")
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{name}={value}" for name, value in result.items()))


if __name__ == "__main__":
    main()
