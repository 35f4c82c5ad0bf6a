"""Rounds of samples for the on-policy stages: prompts in a seeded order, responses from
the current policy by the KV-cache sampler (rows split over the mesh's batch axes, as in
CAID's sampling), the decoded responses' scores, and per-token forward passes.

A round of n rows, held as host arrays by every process:

    input_ids, attention_mask  [n, P + T]  the prompt left-padded to P tokens, then the
                                           response (T = max_new_tokens; pads after EOS)
    response_mask              [n, T]      1 for emitted tokens (EOS included)
    rewards, costs             [n]         the reward and cost scorers' values

and the per-token columns an algorithm adds (``token_pass``: log-probs, values). The
samples_per_prompt rows of one prompt are consecutive (GRPO's groups). A round is a pure
function of (seed, round, policy), so a resumed run draws the same samples; while a
checkpoint inside a round's updates may be resumed, the round is kept on disk
(``save_round``: .npz, no pickle).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.config import RolloutSettings
from sacpo_jax.data.prompts import resolve_template
from sacpo_jax.generate import (
    data_parallel_size,
    eos_token_ids,
    generate_tokens,
    left_pad,
    place_batch,
    tokenize_prompts,
)
from sacpo_jax.models.llama import Llama
from sacpo_jax.scorers import Scorer
from sacpo_jax.usage import add_generated_tokens


@dataclasses.dataclass(frozen=True)
class PromptSchedule:
    """The training prompts (raw text and token ids under the template), padded to the
    longest one's ``length``, visited epoch by epoch in a seeded permutation."""

    texts: list[str]
    encoded: list[list[int]]
    length: int
    seed: int

    def __len__(self) -> int:
        return len(self.texts)

    def epoch_order(self, epoch: int) -> np.ndarray:
        generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return generator.permutation(len(self.texts))

    def round_indices(self, round_index: int, per_round: int) -> np.ndarray:
        """The prompts of a round: positions round*per_round .. of the concatenated epoch
        permutations (a round may straddle two epochs)."""
        positions = np.arange(round_index * per_round, (round_index + 1) * per_round)
        epochs, offsets = np.divmod(positions, len(self.texts))
        orders = {int(e): self.epoch_order(int(e)) for e in np.unique(epochs)}
        return np.array([orders[int(e)][o] for e, o in zip(epochs, offsets)])


def prompt_schedule(
    texts: Sequence[str], tokenizer: Any, settings: RolloutSettings, seed: int
) -> tuple[PromptSchedule, int]:
    """(schedule, number of prompts left out for being longer than max_prompt_length)."""
    template = resolve_template(tokenizer, settings.template)
    encoded = tokenize_prompts(tokenizer, texts, template)
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= settings.max_prompt_length]
    length = max((len(encoded[i]) for i in kept), default=0)
    schedule = PromptSchedule([texts[i] for i in kept], [encoded[i] for i in kept], length, seed)
    return schedule, len(texts) - len(kept)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (as generation pads)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def sampling_seed(seed: int, round_index: int) -> int:
    """The 31-bit sampling seed of a round of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, round_index, 0]).generate_state(1)[0] >> 1)


def _chunks(rows: int, batch_size: int) -> list[np.ndarray]:
    """Row indices in chunks of exactly ``batch_size`` (the last one filled with copies of
    its last row, whose outputs are dropped): one compiled shape."""
    chunks = []
    for start in range(0, rows, batch_size):
        chunk = np.arange(start, min(start + batch_size, rows))
        chunks.append(np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])]))
    return chunks


def sample_round(
    policy: Llama,
    tokenizer: Any,
    prompts: PromptSchedule,
    indices: np.ndarray,
    samples_per_prompt: int,
    settings: RolloutSettings,
    *,
    seed: int,
    mesh: Mesh | None,
    between_batches: Callable[[], None],
) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and response_mask of a round (module docstring): each
    prompt of ``indices`` answered ``samples_per_prompt`` times. Row i draws with key
    fold_in(key(seed), i), whichever batch it lands in. ``between_batches()`` runs after
    each generation batch (a preemption check that may raise)."""
    prompt_rows = np.repeat(indices, samples_per_prompt)
    pad = pad_id(tokenizer)
    ids, mask = left_pad([prompts.encoded[i] for i in prompt_rows], prompts.length, pad)
    rows, length = len(prompt_rows), settings.max_new_tokens
    tokens = np.zeros((rows, length), np.int32)
    emitted = np.zeros((rows, length), np.int32)
    for chunk in _chunks(rows, settings.batch_size):
        out = generate_tokens(
            policy,
            ids[chunk],
            mask[chunk],
            max_new_tokens=length,
            temperature=settings.temperature,
            top_p=settings.top_p,
            rng=jax.random.key(seed),
            eos_id=eos_token_ids(policy, tokenizer),
            pad_id=pad,
            row_ids=chunk,
            mesh=mesh,
        )
        tokens[chunk] = parallel.to_host(out.tokens)
        emitted[chunk] = parallel.to_host(out.mask)
        between_batches()
    add_generated_tokens(emitted.sum())
    return {
        "input_ids": np.concatenate([ids, tokens], axis=1),
        "attention_mask": np.concatenate([mask, emitted], axis=1),
        "response_mask": emitted,
    }


def response_texts(tokenizer: Any, round_columns: dict[str, np.ndarray]) -> list[str]:
    """Each row's response decoded (special tokens skipped)."""
    tokens = round_columns["input_ids"][:, -round_columns["response_mask"].shape[1] :]
    emitted = round_columns["response_mask"].astype(bool)
    return [
        tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
        for row, keep in zip(tokens, emitted)
    ]


def score_round(
    scorers: Sequence[Scorer], prompts: Sequence[str], responses: Sequence[str]
) -> dict[str, np.ndarray]:
    """{scorer name: float32 values [n]} of the decoded responses."""
    return {s.name: s.on_samples(prompts, responses).astype(np.float32) for s in scorers}


def token_pass(
    fn: Callable[[jax.Array, jax.Array], dict[str, jax.Array]],
    round_columns: dict[str, np.ndarray],
    batch_size: int,
    mesh: Mesh | None,
    between_batches: Callable[[], None],
) -> dict[str, np.ndarray]:
    """``fn(input_ids, attention_mask) -> {name: [b, T]}`` over every row of a round, in
    batches of ``batch_size`` rows split over the mesh's batch axes; host arrays."""
    rows = len(round_columns["input_ids"])
    split = mesh is not None and batch_size % data_parallel_size(mesh) == 0
    out: dict[str, np.ndarray] = {}
    for chunk in _chunks(rows, batch_size):
        placed = place_batch(
            [round_columns["input_ids"][chunk], round_columns["attention_mask"][chunk]],
            mesh,
            split,
        )
        for name, values in fn(*placed).items():
            values = parallel.to_host(values)
            if name not in out:
                out[name] = np.zeros((rows, *values.shape[1:]), values.dtype)
            out[name][chunk] = values
        between_batches()
    return out


def save_round(path: str, columns: dict[str, np.ndarray]) -> None:
    """Write a round's columns to ``path`` (.npz) all at once (process 0)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **columns)
    os.replace(tmp, path)


def load_round(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
