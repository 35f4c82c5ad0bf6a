"""Tokenisation with TRL's conventions: completion masks, boundary merges, truncation, packing.

- The prompt text is the prompt under its template (`sacpo_jax.data.prompts`:
  ``{prompt}`` strings, or the tokenizer's chat template).
- Token ids come from ``tokenizer(text, add_special_tokens=False)``; BOS is
  prepended by us when the tokenizer adds one by default (and the text does
  not already start with it, as chat templates often do). `encode_prompt` is
  that rule; training, scoring and generation all tokenise prompts with it.
- The completion is the suffix of tokenize(prompt_text + completion) after its
  longest common prefix with tokenize(prompt_text). SentencePiece and BPE can
  merge tokens across the boundary; the merged token then belongs to the
  completion, and prompt + completion equals the tokenisation of the whole
  text. EOS is appended to a plain-text completion and scored; a conversational
  completion (rendered by a chat template) ends with the template's own end of
  turn and gets no EOS (TRL's convention).
- Log-prob convention for the trainer: ``logits[:, :-1]`` score
  ``input_ids[:, 1:]``, weighted by ``loss_mask[:, 1:]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sacpo_jax.data import errors
from sacpo_jax.data.errors import BadRow
from sacpo_jax.data.prompts import render_texts

BUNDLED_TOKENIZER = "bundled:oracle"


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """A tokenizer directory or hub id (pad = eos when it has no pad token), or
    ``bundled:oracle`` for the bundled task's word-level tokenizer."""
    if path == BUNDLED_TOKENIZER:
        from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer

        return oracle_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts BOS first by default, else None."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def encode_prompt(
    tokenizer, prompt: str, template: str | None = None, *, bos_id: int | None | str = "detect"
) -> list[int]:
    """Token ids of ``prompt`` under ``template``: the prompt ids of
    `tokenize_prompt_completions` when no token merges across the prompt's end.
    Generation encodes its prompts with this, so it sees what training and scoring see."""
    text, _, conversational = render_texts(tokenizer, template, prompt, [])
    tokens = _encode(tokenizer, text)
    return _bos_prefix(tokens, _bos(tokenizer, bos_id, conversational)) + tokens


def tokenize_prompt_completions(
    tokenizer,
    prompt: str,
    completions: Sequence[str],
    template: str | None = None,
    *,
    bos_id: int | None | str = "detect",
    conversational: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids]) for completions sharing one prompt.

    The shared prompt is the shortest of the per-completion common prefixes,
    so ``prompt_ids + completion_ids[k]`` is the tokenisation of
    prompt_text + completions[k] (after BOS), followed by EOS.
    Conversational text (``conversational``: texts already rendered by a chat template;
    or template "chat") is tokenised exactly as the template renders it: no BOS added,
    no EOS appended, the template's end of turn ends the completion (TRL's convention).
    ``bos_id="detect"`` asks the tokenizer (pass the value of
    `default_bos_id` to tokenise many rows without asking each time).
    """
    prompt_text, full_texts, rendered_chat = render_texts(tokenizer, template, prompt, completions)
    conversational = conversational or rendered_chat
    prompt_tokens = _encode(tokenizer, prompt_text)
    full_tokens = [_encode(tokenizer, text) for text in full_texts]
    shared = min(_common_prefix_length(prompt_tokens, full) for full in full_tokens)
    bos = _bos(tokenizer, bos_id, conversational)
    prompt_ids = _bos_prefix(prompt_tokens, bos) + prompt_tokens[:shared]
    completion_ids = [full[shared:] for full in full_tokens]
    if not conversational:
        completion_ids = [_with_eos(ids, tokenizer.eos_token_id) for ids in completion_ids]
    return prompt_ids, completion_ids


def tokenize_prompt_completion(
    tokenizer, prompt: str, completion: str, template: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one completion; see `tokenize_prompt_completions`."""
    prompt_ids, (completion_ids,) = tokenize_prompt_completions(
        tokenizer, prompt, [completion], template
    )
    return prompt_ids, completion_ids


def truncate(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """TRL's rule. If len(prompt) + max(len(c)) > max_length, keep the last
    max_prompt_length prompt tokens; if still too long, cut each completion to
    max_length - len(prompt). With ``bos_id`` given, a leading BOS is kept and
    counts towards max_prompt_length. Raises `BadRow` (no_room_for_response)
    when not one completion token fits.
    """
    prompt, completions = list(prompt_ids), [list(c) for c in completions]
    longest = max(len(c) for c in completions)
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt[:1] == [bos_id]
        head = prompt[:1] if keep_bos else []
        prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
    room = max_length - len(prompt)
    if room < 1:
        raise BadRow(
            "prompt",
            errors.NO_ROOM_FOR_RESPONSE,
            f"{len(prompt)} prompt tokens leave no room for a response (max_length {max_length})",
        )
    return prompt, [c[:room] for c in completions]


def pack(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, loss_mask), int32 of shape [length], right padded.

    loss_mask is 1 exactly at the completion's positions (EOS included).
    """
    used = len(prompt_ids) + len(completion_ids)
    if used > length:
        raise ValueError(f"sequence of {used} tokens does not fit length {length}")
    input_ids = np.full(length, pad_id, dtype=np.int32)
    input_ids[:used] = np.asarray(list(prompt_ids) + list(completion_ids), dtype=np.int32)
    attention_mask = (np.arange(length) < used).astype(np.int32)
    loss_mask = ((np.arange(length) >= len(prompt_ids)) & (np.arange(length) < used)).astype(
        np.int32
    )
    return input_ids, attention_mask, loss_mask


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides token ids: vocabulary and rules, specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab()))
    facts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "default_bos": default_bos_id(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest = hashlib.sha256(rules.encode())
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer, bos_id: int | None | str, conversational: bool) -> int | None:
    """The BOS to prepend: none for conversational text, else the given or detected one."""
    if conversational:
        return None
    return default_bos_id(tokenizer) if bos_id == "detect" else bos_id


def _bos_prefix(tokens: Sequence[int], bos_id: int | None) -> list[int]:
    return [bos_id] if bos_id is not None and list(tokens[:1]) != [bos_id] else []


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    return len(os.path.commonprefix([list(first), list(second)]))


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids[-1:] == [eos_id] else ids + [eos_id]
