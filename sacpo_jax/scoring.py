"""Scoring (prompt, response) pairs with a model: summed log-probs, or reward/cost scores.

Both tokenise exactly as training does (REFERENCE §4): the completion is what
tokenising template(prompt) + response adds after the prompt's tokens, plus EOS. Rows
are packed into fixed-size batches padded to a multiple of 32 tokens, so a handful of
shapes covers any list and each compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sacpo_jax.data.tokenize import pack, tokenize_prompt_completion, truncate
from sacpo_jax.logprobs import completion_logps
from sacpo_jax.models.llama import Llama

SCORING_BATCH = 16


def _bucket(length: int) -> int:
    return max(32, -(-length // 32) * 32)


def packed_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: str | None,
    max_length: int | None,
    batch_size: int = SCORING_BATCH,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """(input_ids, attention_mask, loss_mask, real_rows) batches of ``batch_size`` rows.

    With max_length, over-long rows keep the last max_length // 2 prompt tokens, then
    the response is cut to fit (TRL's rule).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = []
    for prompt, response in zip(prompts, responses):
        prompt_ids, completion_ids = tokenize_prompt_completion(
            tokenizer, prompt, response, template
        )
        if max_length is not None:
            prompt_ids, (completion_ids,) = truncate(
                prompt_ids,
                [completion_ids],
                max_length=max_length,
                max_prompt_length=max_length // 2,
            )
        rows.append((prompt_ids, completion_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = _bucket(max(len(p) + len(c) for p, c in chunk))
        packed = [pack(p, c, length, pad_id) for p, c in chunk]
        packed += [packed[-1]] * (batch_size - len(packed))
        ids, mask, loss_mask = (np.stack(column) for column in zip(*packed))
        yield ids, mask, loss_mask, len(chunk)


@functools.partial(jax.jit, static_argnums=0)
def _per_row(graphdef, params, ids, mask, loss_mask):
    """A score model's scores, or a causal LM's summed completion log-probs, per row."""
    model = nnx.merge(graphdef, params)
    if model.config.score_model:
        return model(ids, mask)
    return completion_logps(model, ids, mask, loss_mask).logps


def _map_rows(model: Llama, tokenizer: Any, prompts, responses, template, max_length) -> np.ndarray:
    graphdef, params = nnx.split(model)
    out = [
        np.asarray(_per_row(graphdef, params, ids, mask, loss_mask))[:n]
        for ids, mask, loss_mask, n in packed_batches(
            tokenizer, prompts, responses, template=template, max_length=max_length
        )
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def sequence_logprobs(
    model: Llama,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: str | None = None,
    max_length: int | None = None,
) -> np.ndarray:
    """log pi(response | template(prompt)), summed over the response tokens and EOS."""
    if model.config.score_model:
        raise ValueError("sequence_logprobs needs a causal LM, got a score model")
    return _map_rows(model, tokenizer, prompts, responses, template, max_length)


def score_responses(
    score_model: Llama,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: str | None = None,
    max_length: int | None = None,
) -> np.ndarray:
    """Reward or cost of each response: the score head at the last real token (EOS)."""
    if not score_model.config.score_model:
        raise ValueError("score_responses needs a score model (reward or cost), got a causal LM")
    return _map_rows(score_model, tokenizer, prompts, responses, template, max_length)
