"""Peak host memory of importing a transformers-4.x Flax msgpack checkpoint, on CPU.

    python benchmarks/bench_msgpack_import.py [--dir /tmp/sacpo_bench_msgpack]

Writes (once) a random LLaMA of 134M parameters (hidden 768, 12 layers, 12 heads, MLP 2048,
vocabulary 32000, untied) in bfloat16 as one flax_model.msgpack (our export, byte-identical
to ``flax.serialization.to_bytes``) beside the same weights as model.safetensors, then
reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of fresh processes that
    import       import jax and sacpo_jax, load nothing;
    msgpack      import + ``load_checkpoint(dir, format="flax_msgpack")`` onto one CPU device;
    restore      import + ``flax.serialization.msgpack_restore`` of the file (what
                 transformers 4.x does), for comparison;
    safetensors  import + ``load_checkpoint(dir)`` of the same weights as safetensors.
Peak RSS counts the file pages mapped into the process as well as its own memory. The
checkpoint is written by a separate process too: Linux carries a parent's peak RSS at fork
time into its child's ``ru_maxrss``, so the measuring parent must stay small.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SHAPES = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    head_dim=64,
)
PEAK = "import resource; print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
IMPORTS = (
    "import jax, jax.numpy as jnp; import sacpo_jax.models.hf; jnp.zeros(1).block_until_ready()"
)
CASES = {
    "import": IMPORTS,
    "msgpack": IMPORTS
    + """
model = sacpo_jax.models.hf.load_checkpoint({path!r}, format="flax_msgpack")
jax.block_until_ready(jax.tree.leaves(model))""",
    "restore": IMPORTS
    + """
import flax.serialization
with open({path!r} + "/flax_model.msgpack", "rb") as f:
    tree = flax.serialization.msgpack_restore(f.read())""",
    "safetensors": IMPORTS
    + """
model = sacpo_jax.models.hf.load_checkpoint({path!r})
jax.block_until_ready(jax.tree.leaves(model))""",
}


def write_checkpoint(path: str) -> None:
    from flax import nnx

    from sacpo_jax.models import hf
    from sacpo_jax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(**SHAPES, param_dtype="bfloat16", dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(0))
    hf.save_checkpoint(model, path, msgpack=True)


def peak_gib(code: str) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code + "\n" + PEAK], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return int(out.stdout.split("PEAK_KIB")[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/sacpo_bench_msgpack")
    parser.add_argument("--write", action="store_true", help="only write the checkpoint")
    args = parser.parse_args()
    if args.write:
        write_checkpoint(args.dir)
        return
    weights = os.path.join(args.dir, "flax_model.msgpack")
    if not os.path.isfile(weights):
        subprocess.run([sys.executable, __file__, "--write", "--dir", args.dir], check=True)
    size = os.path.getsize(weights) / 2**30
    print(f"checkpoint: flax_model.msgpack, {size:.3f} GiB (bf16)")
    print("| process | peak RSS (GiB) | peak RSS / checkpoint |")
    print("|---|---|---|")
    for name, code in CASES.items():
        peak = peak_gib(code.format(path=args.dir))
        print(f"| {name} | {peak:.2f} | {peak / size:.2f} |")


if __name__ == "__main__":
    main()
