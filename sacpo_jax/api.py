"""The public Python API: load and save Hugging Face checkpoints, score responses.

model, tokenizer = load_model("path/to/llama")          # HF directory
logits = model(input_ids, attention_mask)                 # [batch, seq, vocab]
save_model(model, "out/", tokenizer)                      # HF directory again
                                                          # (= models.hf.save_checkpoint)
logps = sequence_logprobs(model, tokenizer, prompts, responses)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sacpo_jax.logprobs import sequence_logps
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SCORING_BATCH = 16


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_model(
    path: str, *, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[Llama, Any]:
    """(model, tokenizer) from a Hugging Face LLaMA directory; tokenizer is None if absent.

    dtype: parameter and compute dtype ("float32", "bfloat16"; default: the checkpoint's).
    mesh: a (data, fsdp, tensor) mesh to shard the parameters over (default: one device).
    """
    from sacpo_jax.data.tokenize import load_tokenizer

    model = hf.load_checkpoint(path, dtype=dtype, mesh=mesh)
    tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
    return model, tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _scored(graphdef, state, input_ids, attention_mask, loss_mask):
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)
    return sequence_logps(logits, input_ids, loss_mask)[0]


def _bucket(length: int) -> int:
    """Pad lengths to a multiple of 32 so a few shapes cover all batches."""
    return max(32, -(-length // 32) * 32)


def sequence_logprobs(
    model: Llama,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    template: str | None = None,
    max_length: int | None = None,
) -> np.ndarray:
    """log pi(response | template(prompt)) summed over the response tokens and EOS.

    Tokenisation follows REFERENCE §4 (TRL): the completion is what tokenising
    prompt + response adds after the prompt's tokens (merges across the boundary go to
    the response), EOS is appended and scored. With max_length, over-long rows keep the
    last max_length // 2 prompt tokens, then the response is cut to fit.
    """
    from sacpo_jax.data.tokenize import pack, tokenize_prompt_completion, truncate

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
    graphdef, state = nnx.split(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(rows), SCORING_BATCH):
        chunk = rows[start : start + SCORING_BATCH]
        length = _bucket(max(len(p) + len(c) for p, c in chunk))
        packed = [pack(p, c, length, pad_id) for p, c in chunk]
        packed += [packed[-1]] * (SCORING_BATCH - len(packed))  # fixed batch shape
        ids, mask, loss_mask = (np.stack(column) for column in zip(*packed))
        out.append(np.asarray(_scored(graphdef, state, ids, mask, loss_mask))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
