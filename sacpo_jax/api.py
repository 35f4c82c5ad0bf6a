"""The public Python API: load and save Hugging Face checkpoints, score responses.

model, tokenizer = load_model("path/to/llama")          # HF directory
logits = model(input_ids, attention_mask)                 # [batch, seq, vocab]
save_model(model, "out/", tokenizer)                      # HF directory again
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
    path: str, *, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[Llama, Any]:
    """(model, tokenizer) from a Hugging Face LLaMA directory (or hub id "owner/name");
    tokenizer is None if the directory has none.

    dtype: parameter and compute dtype ("float32", "bfloat16"; default: the checkpoint's).
    mesh: a (data, fsdp, tensor) mesh to shard the parameters over (default: one device).
    """
    from sacpo_jax.data.tokenize import load_tokenizer

    path = hf.resolve_model_dir(path)
    model = hf.load_checkpoint(path, dtype=dtype, mesh=mesh)
    tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
    return model, tokenizer
