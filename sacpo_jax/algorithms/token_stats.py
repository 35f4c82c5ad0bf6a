"""Per-token quantities of rollout sequences: the policy's log-probs (and entropies) of the
response tokens, and a critic's values.

A rollout sequence is [left-padded prompt (P tokens), response (T tokens)]. Response
token t sits at position P + t and is predicted at position P + t - 1 (TRL's
convention: logits at position i score token i + 1), so every quantity of token t is
read from the hidden state at position P + t - 1: the policy's log-probability of the
token and the critic's value of the state before it (safe-rlhf: values =
scores[:, :-1], losses from position prompt_len - 1). All outputs are [n, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sacpo_jax.logprobs import TokenStatistics, token_statistics
from sacpo_jax.models.llama import Llama


def _before_response(hidden: jax.Array, response_length: int) -> jax.Array:
    """Hidden states at positions P - 1 .. P + T - 2 of [n, P + T, d]."""
    return hidden[:, hidden.shape[1] - response_length - 1 : -1]


def response_token_stats(
    policy: Llama,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    response_length: int,
    *,
    entropy: bool = False,
) -> TokenStatistics:
    """log pi(y_t | x, y_<t) of each response token [n, T] (and the entropy of each
    next-token distribution when asked), vocabulary-chunked as every log-prob here."""
    hidden = _before_response(policy.hidden_states(input_ids, attention_mask), response_length)
    targets = input_ids[:, -response_length:]
    head, chunk = policy.output_head(), policy.config.vocab_chunk
    return token_statistics(hidden, head, targets, chunk, entropy=entropy)


def response_values(
    critic: Llama, input_ids: jax.Array, attention_mask: jax.Array, response_length: int
) -> jax.Array:
    """V(x, y_<t) of each response token [n, T], float32: a score model's head applied at
    every position instead of only the last."""
    if not critic.config.score_model:
        raise ValueError("response_values needs a score model (a critic), got a causal LM")
    hidden = _before_response(critic.hidden_states(input_ids, attention_mask), response_length)
    head = critic.score_head[...].astype(hidden.dtype)
    return jnp.einsum("btd,do->bt", hidden, head).astype(jnp.float32)
