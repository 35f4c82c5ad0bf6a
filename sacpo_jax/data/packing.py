"""Padding-free packing: the sequences of a training batch laid end to end in rows.

A packed (micro-)batch of B examples on one process holds, with static shapes:

    input_ids, loss_mask   [R, L]  the sequences end to end in R rows of L tokens,
                                   the rest of each row padding
    segment_ids            [R, L]  int32: a sequence's id at its tokens, 0 at padding
    chosen_segment,        [B]     int32: each pair's chosen and rejected ids (pairs),
    rejected_segment               or each example's id
    segment                        (SFT)

Which process packs which examples: each global micro-batch's examples are dealt out
to the processes (B each) longest first, each to the process with the fewest tokens so
far (``deal``), so that the processes' rows fill alike; every global micro-batch
keeps its examples, so the step's loss is the unpacked one. Ids number the sequences
of the global (micro-)batch: process p's example i of it is example g = p * B + i,
whose k sequences have the ids k * g + 1 .. k * g + k (pairs: chosen 2g + 1, rejected
2g + 2; SFT: g + 1). So they are unique over every process's rows, and per-sequence sums over the
global batch (``logprobs.packed_completion_logps``) are read back per example by id.

Shapes. R is fixed for a loader: the rows that hold the mean number of tokens of a
micro-batch at about ``TARGET_ROWS_PER_LENGTH`` x the largest bucket length per row,
rounded up to a multiple of the process's shards of the batch axes. L is chosen per
step: the smallest length on a grid of 8 steps per power of two (``round_length``), at
least the longest sequence, at which first-fit decreasing puts the sequences of every
group (every process's every micro-batch) into R rows. Every process computes L from
the stored lengths of the global batch, so all agree without communicating; its few
values are the only new shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sacpo_jax.data.dataset import TokenizedDataset

LENGTH_STEPS_PER_OCTAVE = 8
MIN_LENGTH_STEP = 16
TARGET_ROWS_PER_LENGTH = 2
# Batch keys of each example's segment ids, one per sequence of the example.
SEGMENT_KEYS = {
    "pair": ("chosen_segment", "rejected_segment"),
    "score_pair": ("chosen_segment", "rejected_segment"),
    "sft": ("segment",),
}


def sequence_lengths(dataset: TokenizedDataset, indices: np.ndarray) -> np.ndarray:
    """[n, k] tokens of the k sequences (prompt + completion j) of each example."""
    prompts = dataset.prompts.lengths[indices]
    return np.stack([prompts + c.lengths[indices] for c in dataset.completions], axis=1)


def rows_per_group(
    dataset: TokenizedDataset, examples: int, max_length: int, row_multiple: int = 1
) -> int:
    """R for micro-batches of ``examples`` examples: their mean token count over rows of
    ``TARGET_ROWS_PER_LENGTH * max_length`` tokens (at least 1 row), rounded up to a
    multiple of ``row_multiple``."""
    mean = sequence_lengths(dataset, np.arange(len(dataset))).sum(axis=1).mean()
    rows = max(1, round(examples * mean / (TARGET_ROWS_PER_LENGTH * max_length)))
    return -(-rows // row_multiple) * row_multiple


def deal(dataset: TokenizedDataset, examples: np.ndarray, processes: int) -> np.ndarray:
    """[processes, n / processes]: ``examples`` dealt out longest first (most tokens),
    each to the process with the fewest tokens among those with room (the lowest index
    on ties); each process's share keeps the order of ``examples``."""
    totals = sequence_lengths(dataset, examples).sum(axis=1)
    per_process = len(examples) // processes
    dealt = np.zeros((processes, per_process), np.int64)
    count = np.zeros(processes, np.int64)
    tokens = np.zeros(processes, np.int64)
    for i in np.argsort(-totals, kind="stable"):
        p = int(np.argmin(np.where(count < per_process, tokens, np.iinfo(np.int64).max)))
        dealt[p, count[p]] = i
        count[p] += 1
        tokens[p] += totals[i]
    return examples[np.sort(dealt, axis=1)]


def first_fit_decreasing(lengths: np.ndarray, rows: int, row_length: int) -> np.ndarray | None:
    """[n, 2] (row, start) of each sequence when the longest first go to the first row
    with room, among ``rows`` rows of ``row_length`` tokens; None when one does not fit."""
    used = np.zeros(rows, np.int64)
    placed = np.zeros((len(lengths), 2), np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        room = np.flatnonzero(used + lengths[i] <= row_length)
        if room.size == 0:
            return None
        placed[i] = room[0], used[room[0]]
        used[room[0]] += lengths[i]
    return placed


def round_length(need: int) -> int:
    """The smallest row length >= need on the grid of ``LENGTH_STEPS_PER_OCTAVE`` steps
    per power of two (steps of at least ``MIN_LENGTH_STEP``): 16 apart below 256, 32
    from 256, 64 from 512, 128 from 1024 ...: at most 1/8 (or 16 tokens) above need."""
    step = max(MIN_LENGTH_STEP, (1 << (need.bit_length() - 1)) // LENGTH_STEPS_PER_OCTAVE)
    return -(-need // step) * step


def row_length(groups: Sequence[np.ndarray], rows: int) -> int:
    """The smallest row length (``round_length``'s grid) at which every group's sequence
    lengths fit ``rows`` rows by first-fit decreasing."""
    need = max(max(int(g.max()), -(-int(g.sum()) // rows)) for g in groups)
    length = round_length(need)
    while any(first_fit_decreasing(g, rows, length) is None for g in groups):
        length = round_length(length + 1)
    return length


def pack_group(
    dataset: TokenizedDataset,
    indices: np.ndarray,
    first_example: int,
    rows: int,
    length: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """The packed arrays of the examples ``indices``, the first being example
    ``first_example`` of the global (micro-)batch (see the module's layout)."""
    lengths = sequence_lengths(dataset, indices)
    k = lengths.shape[1]
    placed = first_fit_decreasing(lengths.ravel(), rows, length)
    if placed is None:
        raise ValueError(f"{lengths.size} sequences do not fit {rows} rows of {length} tokens")
    input_ids = np.full((rows, length), pad_id, np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    ids = (first_example + np.arange(len(indices)))[:, None] * k + np.arange(1, k + 1)
    for n, index in enumerate(indices):
        prompt = dataset.prompts[int(index)]
        for j, completion in enumerate(dataset.completions):
            row, start = placed[n * k + j]
            tokens = np.concatenate([prompt, completion[int(index)]])
            span = slice(start, start + len(tokens))
            input_ids[row, span] = tokens
            segment_ids[row, span] = ids[n, j]
            loss_mask[row, start + len(prompt) : span.stop] = 1
    out = {"input_ids": input_ids, "segment_ids": segment_ids, "loss_mask": loss_mask}
    for j, key in enumerate(SEGMENT_KEYS[dataset.kind]):
        out[key] = ids[:, j].astype(np.int32)
    return out


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens of a batch that are not padding (packed or not)."""
    return sum(
        int(np.count_nonzero(values))
        for name, values in batch.items()
        if name.endswith(("attention_mask", "segment_ids"))
    )


def computed_tokens(batch: dict[str, np.ndarray]) -> int:
    """Token slots a forward over the batch computes, padding included."""
    return sum(values.size for name, values in batch.items() if name.endswith("input_ids"))
