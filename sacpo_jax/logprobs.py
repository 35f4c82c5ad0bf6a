"""Log-probabilities of tokens under a causal LM: the bridge between models and losses.

Convention (TRL): logits[:, t] predicts input_ids[:, t + 1], so the log-probability of
token t >= 1 is log_softmax(logits[:, t - 1])[input_ids[:, t]], and a sequence's score
is the sum over the positions where loss_mask is 1 (the completion, EOS included).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t = 1..seq-1: shape [batch, seq - 1].

    Computed as logit[target] - logsumexp(logits), in float32.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of completion-token log-probs, number of completion tokens), each [batch]."""
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_logprobs(logits, input_ids) * mask, axis=-1), jnp.sum(mask, axis=-1)


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
    log-probs, so how the logits are formed (all at once, or in chunks) is decided here.
    """
    logits = model(input_ids, attention_mask)
    logps, counts = sequence_logps(logits, input_ids, loss_mask)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    per_token = jnp.mean(logits[:, :-1], axis=-1)
    mean_logits = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(counts, 1.0)
    return CompletionLogps(logps, counts, mean_logits)


def pair_logps(model, batch: dict) -> dict[str, jax.Array]:
    """Chosen and rejected completions of a pair batch in ONE forward over the
    concatenated [2B] rows: log-probs, token counts and mean logits of each."""
    ids, mask, loss_mask = (
        jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
        for name in ("input_ids", "attention_mask", "loss_mask")
    )
    logps, counts, mean_logits = completion_logps(model, ids, mask, loss_mask)
    n = batch["chosen_input_ids"].shape[0]
    return {
        "chosen_logps": logps[:n],
        "rejected_logps": logps[n:],
        "chosen_lengths": counts[:n],
        "rejected_lengths": counts[n:],
        "chosen_logits": mean_logits[:n],
        "rejected_logits": mean_logits[n:],
    }
