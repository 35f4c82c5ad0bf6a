"""New tokens per second: KV-cache generation against recomputing the prefix per token.

Run by hand: ``python benchmarks/bench_generate.py [--batch B --prompt-len P
--new-tokens T]``. Both sides are one compiled program with greedy decoding and no
early stop, timed after a warm-up call, the two interleaved (A B A B ...) over
``--repeats`` calls each, medians quoted; load average printed before and after (run it
on a quiet machine). The baseline keeps a
fixed [batch, prompt + new] buffer (left-padded prompt, then the new tokens) and runs
the full uncached forward over it for every new token, reading the logits at the last
filled slot; a growing buffer would recompile at every length. Both must emit the
same tokens.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sacpo_jax.generate import generate_tokens, left_pad
from sacpo_jax.models.llama import Llama, tiny_config

CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def recompute_greedy(graphdef, state, input_ids, attention_mask, max_new_tokens: int):
    """Greedy tokens [b, max_new_tokens], a full forward over the buffer per token."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    pad = jnp.zeros((batch, max_new_tokens), input_ids.dtype)
    ids = jnp.concatenate([input_ids, pad], axis=1)
    mask = jnp.concatenate([attention_mask, pad], axis=1)

    def step(t, carry):
        ids, mask = carry
        last = prompt_len + t - 1
        logits = jax.lax.dynamic_index_in_dim(model(ids, mask), last, axis=1, keepdims=False)
        token = jnp.argmax(logits, axis=-1).astype(ids.dtype)
        ids = jax.lax.dynamic_update_index_in_dim(ids, token, last + 1, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones_like(token), last + 1, axis=1)
        return ids, mask

    ids, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))
    return ids[:, prompt_len:]


def interleaved_median_seconds(runs, repeats: int) -> list[float]:
    """Median wall time of each of ``runs`` (blocked until ready), called in turn
    (A B A B ...) ``repeats`` times."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, kept in zip(runs, times):
            start = time.perf_counter()
            jax.block_until_ready(run())
            kept.append(time.perf_counter() - start)
    return [float(np.median(kept)) for kept in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = tiny_config(**CONFIG)
    model = Llama(config, rngs=nnx.Rngs(0), init_std=0.1)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.batch)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in lengths]
    ids, mask = left_pad(prompts, args.prompt_len, pad_id=0)
    new = args.new_tokens

    def cached():
        return generate_tokens(model, ids, mask, max_new_tokens=new, eos_id=None, pad_id=0).tokens

    def recompute():
        return recompute_greedy(graphdef, state, ids, mask, max_new_tokens=new)

    print(f"load average before: {os.getloadavg()}")
    np.testing.assert_array_equal(np.asarray(cached()), np.asarray(recompute()))
    produced = args.batch * new
    cached_s, recompute_s = interleaved_median_seconds((cached, recompute), args.repeats)
    print(f"load average after: {os.getloadavg()}")
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}")
    print(f"config: {CONFIG}")
    print(f"batch {args.batch}, prompt bucket {args.prompt_len}, {new} new tokens, greedy")
    print(f"kv cache : {cached_s:8.3f} s  {produced / cached_s:10.1f} new tokens/s")
    print(f"recompute: {recompute_s:8.3f} s  {produced / recompute_s:10.1f} new tokens/s")
    print(f"speed-up : {recompute_s / cached_s:.1f}x")


if __name__ == "__main__":
    main()
