"""The public Python API: load and save Hugging Face checkpoints, score responses.

model, tokenizer = load_model("path/to/llama")          # HF, Flax msgpack, EasyLM, MaxText
logits = model(input_ids, attention_mask)                 # [batch, seq, vocab]
save_model(model, "out/", tokenizer)                      # HF directory (msgpack=True: +Flax)
                                                          # (= models.hf.save_checkpoint)
logps = sequence_logprobs(model, tokenizer, prompts, responses)
"""

from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_model(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    format: str | None = None,
    llama_config: str | None = None,
) -> tuple[Llama, Any]:
    """(model, tokenizer) from a LLaMA checkpoint directory in any supported format (or a
    hub id "owner/name", or an EasyLM file); tokenizer is None if its directory has none.

    dtype: parameter and compute dtype ("float32", "bfloat16"; default: the checkpoint's).
    mesh: a (data, fsdp, tensor) mesh to shard the parameters over (default: one device).
    format, llama_config: see ``models.hf.load_checkpoint``.
    """
    from sacpo_jax.data.tokenize import load_tokenizer

    path = hf.resolve_model_dir(path)
    model = hf.load_checkpoint(
        path, dtype=dtype, mesh=mesh, format=format, llama_config=llama_config
    )
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    return model, tokenizer
