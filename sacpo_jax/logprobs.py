"""Log-probabilities of tokens under a causal LM: the bridge between models and losses.

Convention (TRL): the logits at position t predict input_ids[:, t + 1], so the
log-probability of token t >= 1 is log_softmax(z_{t-1})[input_ids[:, t]] with
z_t = hidden_t @ head, and a sequence's score is the sum over the positions where
loss_mask is 1 (the completion, EOS included).

The [rows, seq, vocab] float32 logits are never formed (unless the vocabulary fits in
one chunk). The vocabulary is processed ``chunk`` entries at a time in a scan that
keeps running statistics per position (an online logsumexp: max m, sum of
exp(z - m), ...), each chunk under ``jax.checkpoint``:
forward and backward hold one [rows, seq, chunk] block of logits at a time, the
backward pass recomputes its chunk's logits, and each chunk's slice of the head
gradient is produced once (no vocabulary-sized accumulator, and under FSDP only a
chunk of the head is gathered at a time).

Packed batches (``data.packing``: several sequences per row, see ``data.packing``) give
the same statistics: positions restart and attention stays within each sequence, and
per-sequence sums are segment sums over the tokens, read back per example by its
segment id.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStatistics(NamedTuple):
    """Per-position statistics of the next-token distribution p = softmax(z), z = logits.

    logps:       log p(target) = z[target] - logsumexp(z), [rows, seq] float32
    mean_logits: mean(z) over the vocabulary, [rows, seq] float32
    entropy:     -sum p log p = logsumexp(z) - sum p z, [rows, seq] float32, or None when
                 not asked for
    """

    logps: jax.Array
    mean_logits: jax.Array
    entropy: jax.Array | None


class _Running(NamedTuple):
    """Statistics of the vocabulary entries seen so far, per position (float32 [rows, seq]).

    max: m = max z; exp_sum: sum exp(z - m); weighted: sum exp(z - m) z;
    target: z[target] once its chunk was seen, else 0; total: sum z.
    """

    max: jax.Array
    exp_sum: jax.Array
    weighted: jax.Array
    target: jax.Array
    total: jax.Array


def token_statistics(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    chunk: int = 4096,
    entropy: bool = False,
) -> TokenStatistics:
    """Statistics of z = hidden @ head at every position, ``chunk`` vocabulary entries at
    a time (the last chunk is padded with masked-out entries).

    hidden: [rows, seq, d] (compute dtype); head: [d, vocab] (any dtype, cast to the
    hidden's; logits accumulate in float32); targets: [rows, seq] ids in [0, vocab).
    """
    vocab = head.shape[1]
    chunks = -(-vocab // chunk)
    head = jnp.pad(head, ((0, 0), (0, chunks * chunk - vocab)))
    head_chunks = jnp.moveaxis(head.reshape(head.shape[0], chunks, chunk), 1, 0)
    compute_dtype = hidden.dtype
    # A float32 constant of the scan, so that its gradient accumulates in float32.
    hidden = hidden.astype(jnp.float32)

    def add_chunk(run: _Running, chunk_and_start):
        weights, start = chunk_and_start
        ids = start + jnp.arange(chunk)
        real = ids < vocab
        logits = jnp.einsum(
            "bsd,dv->bsv",
            hidden.astype(compute_dtype),
            weights.astype(compute_dtype),
            preferred_element_type=jnp.float32,
        )
        logits = jnp.where(real, logits, 0.0)
        # The running max is only a shift for stability: the statistics do not depend
        # on it, so no gradient flows through it.
        new_max = jax.lax.stop_gradient(
            jnp.maximum(run.max, jnp.max(jnp.where(real, logits, -jnp.inf), axis=-1))
        )
        rescale = jnp.exp(run.max - new_max)
        exps = jnp.where(real, jnp.exp(logits - new_max[..., None]), 0.0)
        is_target = targets[..., None] == ids
        return _Running(
            max=new_max,
            exp_sum=run.exp_sum * rescale + jnp.sum(exps, axis=-1),
            weighted=run.weighted * rescale + jnp.sum(exps * logits, axis=-1),
            target=run.target + jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1),
            total=run.total + jnp.sum(logits, axis=-1),
        ), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    start = _Running(jnp.full(targets.shape, -jnp.inf), zeros, zeros, zeros, zeros)
    starts = jnp.arange(chunks) * chunk
    if chunks > 1:  # with one chunk, saving its logits for the backward pass costs nothing more
        add_chunk = jax.checkpoint(add_chunk)
    run, _ = jax.lax.scan(add_chunk, start, (head_chunks, starts))
    log_normaliser = run.max + jnp.log(run.exp_sum)
    return TokenStatistics(
        logps=run.target - log_normaliser,
        mean_logits=run.total / vocab,
        entropy=log_normaliser - run.weighted / run.exp_sum if entropy else None,
    )


class CompletionLogps(NamedTuple):
    """Per-row statistics of a row's completion tokens (positions where loss_mask is 1).

    logps:       sum of log p(token) over the completion, [batch] float32
    counts:      number of completion tokens, [batch] float32
    mean_logits: mean over completion positions of the mean logit over the vocabulary
                 (TRL's ``logits/chosen`` metric), [batch] float32
    """

    logps: jax.Array
    counts: jax.Array
    mean_logits: jax.Array


def completion_logps(
    model, input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array
) -> CompletionLogps:
    """The completion statistics of each row under a causal LM ``model``.

    The one place objectives, reference passes and scoring turn a model and tokens into
    log-probs. Position t is scored on token t + 1 with weight loss_mask[t + 1]; the
    last position predicts nothing (weight 0).
    """
    hidden = model.hidden_states(input_ids, attention_mask)
    weights = _next(loss_mask).astype(jnp.float32)
    return _completion_sums(model, hidden, input_ids, weights, lambda x: jnp.sum(x, axis=-1))


def packed_completion_logps(
    model, input_ids: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array, num_segments: int
) -> CompletionLogps:
    """``completion_logps`` of packed rows, per segment: entry k of each statistic is the
    sum over the tokens of segment k ([num_segments]; ids >= num_segments are dropped).

    Position t is scored on token t + 1 only when both belong to the same segment: the
    first token of a segment is never predicted, as the first token of a row is not.
    """
    hidden = model.hidden_states(input_ids, segment_ids=segment_ids)
    same_segment = _next(segment_ids) == segment_ids
    weights = (_next(loss_mask) * same_segment).astype(jnp.float32)

    def sum_segments(x: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(x.ravel(), segment_ids.ravel(), num_segments)

    return _completion_sums(model, hidden, input_ids, weights, sum_segments)


def _next(x: jax.Array) -> jax.Array:
    """x[:, t + 1] at position t; 0 at the last position."""
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)))


def _completion_sums(model, hidden, input_ids, weights, total) -> CompletionLogps:
    """Per-token statistics of the next tokens, weighted and reduced by ``total``."""
    stats = token_statistics(
        hidden, model.output_head(), _next(input_ids), model.config.vocab_chunk
    )
    counts = total(weights)
    mean_logits = total(stats.mean_logits * weights) / jnp.maximum(counts, 1.0)
    return CompletionLogps(total(stats.logps * weights), counts, mean_logits)


def example_logps(model, batch: dict) -> CompletionLogps:
    """The completion statistics of each example of a single-sequence (SFT) batch, packed
    (``segment_ids`` and the examples' ``segment``) or not."""
    if "segment_ids" not in batch:
        return completion_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
    slots = batch["segment"]
    per_segment = packed_completion_logps(
        model, batch["input_ids"], batch["segment_ids"], batch["loss_mask"], slots.shape[0] + 1
    )
    return _at(per_segment, slots)


def pair_logps(model, batch: dict) -> dict[str, jax.Array]:
    """Chosen and rejected completions of a pair batch in ONE forward, over the
    concatenated [2B] rows or over packed rows (``segment_ids``, with each pair's
    ``chosen_segment`` and ``rejected_segment``): log-probs, token counts and mean
    logits of each."""
    if "segment_ids" in batch:
        chosen, rejected = _packed_pairs(model, batch)
    else:
        ids, mask, loss_mask = (
            jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
            for name in ("input_ids", "attention_mask", "loss_mask")
        )
        stats = completion_logps(model, ids, mask, loss_mask)
        n = batch["chosen_input_ids"].shape[0]
        chosen = CompletionLogps(*(values[:n] for values in stats))
        rejected = CompletionLogps(*(values[n:] for values in stats))
    return {
        "chosen_logps": chosen.logps,
        "rejected_logps": rejected.logps,
        "chosen_lengths": chosen.counts,
        "rejected_lengths": rejected.counts,
        "chosen_logits": chosen.mean_logits,
        "rejected_logits": rejected.mean_logits,
    }


def _packed_pairs(model, batch: dict) -> tuple[CompletionLogps, CompletionLogps]:
    chosen_slots, rejected_slots = batch["chosen_segment"], batch["rejected_segment"]
    per_segment = packed_completion_logps(
        model,
        batch["input_ids"],
        batch["segment_ids"],
        batch["loss_mask"],
        chosen_slots.shape[0] + rejected_slots.shape[0] + 1,
    )
    return _at(per_segment, chosen_slots), _at(per_segment, rejected_slots)


def _at(per_segment: CompletionLogps, slots: jax.Array) -> CompletionLogps:
    """The statistics of the segments ``slots`` (one per example)."""
    return CompletionLogps(*(values[slots] for values in per_segment))
