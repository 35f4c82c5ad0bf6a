"""Blocked and fused attention against a float64 loop written out here.

Truth: for row b, head h (KV head h // groups) and the query at slot offset + i,
softmax over the keys j with j <= offset + i and key_mask[b, j] of q.k / sqrt(d), times v.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sacpo_jax.models.llama import AttentionMask, attend, fused_attention

HEADS, KV_HEADS, DIM = 4, 2, 8


def reference(q, k, v, key_mask, offset):
    b, s, heads, d = q.shape
    out = np.zeros(q.shape)
    for row in range(b):
        for h in range(heads):
            kv = h // (heads // k.shape[2])
            for i in range(s):
                seen = [j for j in range(k.shape[1]) if j <= offset + i and key_mask[row, j]]
                if not seen:
                    continue
                scores = np.array([q[row, i, h] @ k[row, j, kv] for j in seen]) / np.sqrt(d)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[row, i, h] = weights @ v[row, seen, kv]
    return out


def key_masks(length: int) -> np.ndarray:
    """Left-padded (7 real), right-padded (6 real), unpadded, and an all-pad row."""
    mask = np.zeros((4, length), np.int32)
    mask[0, length - 7 :] = 1
    mask[1, :6] = 1
    mask[2] = 1
    return mask


def inputs(q_len: int, k_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(4, q_len, HEADS, DIM)) * 1.5
    k = rng.normal(size=(4, k_len, KV_HEADS, DIM)) * 1.5
    v = rng.normal(size=(4, k_len, KV_HEADS, DIM))
    return q, k, v


@pytest.mark.parametrize("block_size", [3, 64])  # 3: four blocks, the last one padded
def test_blocked_attention_matches_reference(block_size):
    q, k, v = inputs(10, 10)
    key_mask = key_masks(10)
    mask = AttentionMask(jnp.asarray(key_mask))
    ours = attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask, block_size, "blocked")
    assert np.all(np.isfinite(ours))  # the all-pad row too
    real = key_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], reference(q, k, v, key_mask, 0)[real],
                               atol=1e-5)  # fmt: skip


def test_queries_behind_a_cache_offset():
    """Four new queries at slots 5..8 of a 10-slot cache (the generation path)."""
    q, k, v = inputs(4, 10, seed=1)
    key_mask = key_masks(10)
    mask = AttentionMask(jnp.asarray(key_mask), query_offset=jnp.asarray(5))
    ours = attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask, 3, "blocked")
    expected = reference(q, k, v, key_mask, 5)
    seen = key_mask[:, 5:9].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[seen], expected[seen], atol=1e-5)


def test_fused_path_builds_the_same_mask():
    """jax.nn.dot_product_attention (its XLA implementation here; cuDNN on a GPU) with
    the mask ``fused_attention`` passes gives the reference values."""
    q, k, v = inputs(10, 10, seed=2)
    key_mask = key_masks(10)
    mask = AttentionMask(jnp.asarray(key_mask))
    ours = fused_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask, "xla")
    real = key_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], reference(q, k, v, key_mask, 0)[real],
                               atol=1e-5)  # fmt: skip


def test_blocked_gradients_match_fused_and_stay_finite():
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs(10, 10, seed=3))
    key_mask = key_masks(10)
    mask = AttentionMask(jnp.asarray(key_mask))
    weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
    real = jnp.asarray(key_mask, jnp.float32)[:, :, None, None]

    def loss(qkv, compute):
        return jnp.sum(compute(*qkv) * weights * real)

    blocked = jax.grad(loss)((q, k, v), lambda *x: attend(*x, mask, 3, "blocked"))
    fused = jax.grad(loss)((q, k, v), lambda *x: fused_attention(*x, mask, "xla"))
    for got, want in zip(blocked, fused):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_blocked_attention_holds_one_block_of_scores():
    """Compiled forward + backward of 1024 queries in blocks of 64: the temporaries stay
    below half of one [b, heads, s, s] float32 score array; in one block they exceed it."""
    b, s = 2, 1024
    q = jax.ShapeDtypeStruct((b, s, HEADS, DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, s, KV_HEADS, DIM), jnp.float32)
    key_mask = jax.ShapeDtypeStruct((b, s), jnp.int32)

    def loss(q, k, v, key_mask, block):
        return jnp.sum(attend(q, k, v, AttentionMask(key_mask), block, "blocked"))

    def temp_bytes(block):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)
        return grad.lower(q, kv, kv, key_mask, block).compile().memory_analysis().temp_size_in_bytes

    scores = b * HEADS * s * s * 4
    assert temp_bytes(s) > scores  # the one-block path does hold them
    assert temp_bytes(64) < scores / 2
