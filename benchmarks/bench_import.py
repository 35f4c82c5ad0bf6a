"""Import time and peak host memory of ``sacpo_jax.models.hf.load_checkpoint`` on CPU.

    python benchmarks/bench_import.py [--dir /tmp/llama-1b] [--shard-gb 1]

Writes (once) a random LLaMA of 1.1B parameters (TinyLlama shapes: hidden 2048, 22
layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000) in bfloat16 as sharded
safetensors with transformers' ``save_pretrained``, then measures in fresh processes,
with ``/usr/bin/time -v``:
    baseline  python importing jax and sacpo_jax, loading nothing;
    load      the same plus ``load_checkpoint(dir)`` onto one CPU device, until every
              parameter is ready.
Peak RSS counts file pages mapped into the process as well as its own memory.
Target: load peak RSS <= 1.5 x the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)

LOAD = """
import time, jax
from sacpo_jax.models import hf
started = time.perf_counter()
model = hf.load_checkpoint({path!r})
jax.block_until_ready(jax.tree.leaves(model))
print(f"LOAD_SECONDS {{time.perf_counter() - started:.2f}}")
"""
BASELINE = (
    "import jax, jax.numpy as jnp; import sacpo_jax.models.hf; jnp.zeros(1).block_until_ready()"
)


def write_checkpoint(path: str, shard_gb: float) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_1B))
    model.save_pretrained(path, max_shard_size=f"{int(shard_gb * 1000)}MB")


def measure(code: str) -> tuple[float, float, str]:
    """(peak RSS GiB, wall seconds, stdout) of ``python -c code`` under /usr/bin/time -v."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    return rss_kib / 2**20, hours * 3600 + minutes * 60 + seconds, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/sacpo_bench_llama_1b")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    args = parser.parse_args()
    if not glob.glob(os.path.join(args.dir, "*.safetensors")):
        write_checkpoint(args.dir, args.shard_gb)
    files = glob.glob(os.path.join(args.dir, "*.safetensors"))
    size_gib = sum(os.path.getsize(f) for f in files) / 2**30
    base_rss, base_wall, _ = measure(BASELINE)
    load_rss, load_wall, stdout = measure(LOAD.format(path=args.dir))
    load_seconds = float(re.search(r"LOAD_SECONDS ([\d.]+)", stdout)[1])
    print(f"checkpoint: {len(files)} safetensors files, {size_gib:.2f} GiB (bf16)")
    print("| process | peak RSS (GiB) | peak RSS / checkpoint | wall (s) | load_checkpoint (s) |")
    print("|---|---|---|---|---|")
    print(f"| imports only | {base_rss:.2f} | {base_rss / size_gib:.2f} | {base_wall:.1f} | - |")
    print(
        f"| imports + load | {load_rss:.2f} | {load_rss / size_gib:.2f} | {load_wall:.1f} "
        f"| {load_seconds:.1f} |"
    )


if __name__ == "__main__":
    main()
