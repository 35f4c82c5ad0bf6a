"""Vocabulary-chunked log-probs against the plain full-logits computation, and transformers.

The plain truth is written out here from the full [rows, seq, vocab] logits of
``model(ids, mask)``: log_softmax, the target's entry, masked sums.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures_models import save_causal_lm, torch_logits
from flax import nnx

from sacpo_jax.logprobs import completion_logps, token_statistics
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama, tiny_config

VOCAB = 97  # prime: no chunk size below it divides it


def random_model(**overrides) -> Llama:
    config = tiny_config(vocab_size=VOCAB, **overrides)
    return Llama(config, rngs=nnx.Rngs(0), init_std=0.3)


def padded_rows(seed: int = 0):
    """Right-padded rows of lengths 12, 9, 5 and an empty row (all pads); the completion
    is the last 4 real tokens of each real row."""
    rng = np.random.default_rng(seed)
    lengths, width = (12, 9, 5, 0), 12
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    loss_mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, VOCAB, n)
        mask[row, :n] = 1
        loss_mask[row, max(n - 4, 0) : n] = 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask)


def plain_completion_logps(model, ids, mask, loss_mask):
    """Full logits, then log_softmax at each position for the next token."""
    logits = model(ids, mask)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    counts = weights.sum(-1)
    mean_logits = (logits.mean(-1) * weights).sum(-1) / jnp.maximum(counts, 1.0)
    return (picked * weights).sum(-1), counts, mean_logits


def with_vocab_chunk(model: Llama, chunk: int) -> Llama:
    graphdef, state = nnx.split(model)
    chunked = nnx.merge(graphdef, state)
    chunked.config = model.config.replace(vocab_chunk=chunk)
    return chunked


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_equals_plain_values_and_gradients(tied):
    model = random_model(tie_word_embeddings=tied)
    ids, mask, loss_mask = padded_rows()
    graphdef, params = nnx.split(model)

    def objective(params, compute):
        logps, counts, mean_logits = compute(nnx.merge(graphdef, params), ids, mask, loss_mask)
        # Distinct weights per row, so that every output's gradient counts.
        return jnp.sum(logps * jnp.arange(1.0, 5.0)) + jnp.sum(mean_logits * 3.0), (
            logps,
            counts,
            mean_logits,
        )

    def chunked(model, *batch):
        return completion_logps(with_vocab_chunk(model, 10), *batch)  # 10 does not divide 97

    value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
    (_, expected), expected_grads = value_and_grad(params, plain_completion_logps)
    (_, ours), grads = value_and_grad(params, chunked)
    assert float(jnp.abs(expected[0]).max()) > 5.0  # not flat: the check has teeth
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ours[1], [4.0, 4.0, 4.0, 0.0])  # counts; empty row: 0
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        # float32 sums in another order: within 1e-5 of the gradient's own scale
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)


def test_entropy_and_per_token_statistics_match_softmax():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, VOCAB)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (2, 7)), jnp.int32)
    stats = token_statistics(hidden, head, targets, chunk=13, entropy=True)
    logits = np.einsum("bsd,dv->bsv", np.float64(hidden), np.float64(head))
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[..., None]
        - logits.max(-1, keepdims=True)
    )
    np.testing.assert_allclose(
        stats.logps, np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0],
        atol=1e-4, rtol=1e-5,
    )  # fmt: skip
    np.testing.assert_allclose(stats.mean_logits, logits.mean(-1), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(stats.entropy, -(np.exp(logp) * logp).sum(-1), atol=1e-4, rtol=1e-5)
    assert token_statistics(hidden, head, targets, chunk=13).entropy is None


def test_bfloat16_compute_tracks_float32():
    model = random_model(tie_word_embeddings=True)
    ids, mask, loss_mask = padded_rows()
    graphdef, state = nnx.split(model)
    half = nnx.merge(graphdef, state)
    half.config = model.config.replace(dtype="bfloat16", vocab_chunk=10)
    exact = plain_completion_logps(model, ids, mask, loss_mask)[0]
    ours = completion_logps(half, ids, mask, loss_mask).logps
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, exact, rtol=0.05, atol=0.5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_small_blocks_and_chunks_match_transformers(tmp_path, padding_side):
    """The whole model with 3-query attention blocks and 10-entry vocabulary chunks
    (neither divides the lengths) against transformers' logits."""
    reference = save_causal_lm(tmp_path, "gqa_llama3")
    model = hf.load_checkpoint(str(tmp_path), attention_block=3, vocab_chunk=10)
    rng = np.random.default_rng(2)
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate((11, 7, 4)):
        where = slice(0, n) if padding_side == "right" else slice(11 - n, 11)
        ids[row, where], mask[row, where] = rng.integers(3, 96, n), 1
    logits = torch_logits(reference, ids, mask)
    real = mask.astype(bool)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[real], logits[real], atol=1e-4, rtol=0)

    loss_mask = mask.copy()
    loss_mask[np.arange(3), mask.argmax(-1)] = 0  # a row's first token is never scored
    logp = torch.log_softmax(torch.as_tensor(logits[:, :-1]).double(), -1).numpy()
    picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    expected = (picked * loss_mask[:, 1:]).sum(-1)
    got = completion_logps(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask))
    np.testing.assert_allclose(got.logps, expected, atol=2e-4, rtol=1e-5)


def test_chunked_step_holds_no_full_logits():
    """Compiled gradient of the log-probs of 4 rows x 256 tokens, vocabulary 32768, on
    abstract shapes: in chunks of 1024 entries the temporaries stay below half of one
    [rows, seq, vocab] float32 logits array; in one chunk they exceed it."""
    rows, seq = 4, 256
    ids = jax.ShapeDtypeStruct((rows, seq), jnp.int32)

    def temp_bytes(chunk: int) -> int:
        config = tiny_config(vocab_size=32768, hidden_size=32, intermediate_size=64,
                             vocab_chunk=chunk)  # fmt: skip
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))

        def loss(params, ids, mask, loss_mask):
            return jnp.sum(completion_logps(nnx.merge(graphdef, params), ids, mask, loss_mask)[0])

        compiled = jax.jit(jax.grad(loss)).lower(params, ids, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits = rows * seq * 32768 * 4
    assert temp_bytes(32768) > logits
    assert temp_bytes(1024) < logits / 2
