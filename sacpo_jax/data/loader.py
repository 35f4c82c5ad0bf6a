"""Deterministic, per-process batches with static shapes, assembled into global jax.Arrays.

Order: epoch e visits the examples in ``permutation(seed, e)`` (or in stored
order without shuffling). Global step s is batch ``s % steps_per_epoch`` of
epoch ``s // steps_per_epoch``, so a batch is a pure function of
(seed, step): resuming at step k gives exactly the batches k, k+1, ... of an
uninterrupted run. With ``interleave_labels`` (KTO as the TRL versions of the
SACPO paper fed it) an epoch alternates desirable and undesirable examples, each
class in its own seeded permutation and the smaller one cycled until the larger
one is used up (``interleave_classes``): 2 max(n_desirable, n_undesirable) rows.
Process p of P takes rows [p*b, (p+1)*b) of each global batch of P*b rows, so
the processes partition every epoch.

Shapes: a batch is padded (right) to the smallest bucket length that fits its
longest sequence in the *global* batch; every process computes that length
from the dataset's stored lengths, so all agree without communicating, and
only a few distinct shapes ever reach the compiled step. A packing loader
(``packing=True``, pair and sft training batches) lays the sequences end to
end instead, by the same rule (``data.packing``).

Batch layouts (dicts of numpy arrays, leading dim = per-process batch, or
[accum, micro] with gradient accumulation):
- pair / score_pair: chosen_{input_ids, attention_mask, loss_mask},
  rejected_{...}, plus every dataset column (chosen_sign, rejected_sign for
  score pairs; label; scores; reference log-probs).
- unpaired: input_ids, attention_mask, loss_mask, label, plus
  kl_{input_ids, attention_mask, loss_mask}: prompt i with the completion of its
  fixed partner ``kl_partners(n)[i]`` (the KTO KL estimate's mismatched pairs). The
  partner depends on the example only, not on the batch, so the reference's KL
  log-probs can be precomputed per example like its other log-probs.
- sft: input_ids, attention_mask, loss_mask.
- packed pair / score_pair / sft: input_ids, segment_ids, loss_mask of packed rows
  ([rows, length], rows fixed for the loader) and each example's segment ids
  (chosen_segment, rejected_segment; segment), plus every dataset column.
Token arrays are int32; integer columns int32, float columns float32. Eval
loaders (``drop_remainder=False``) pad the last batch with empty rows and add
``valid`` (int32, 1 for real rows).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np

from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.packing import (
    SEGMENT_KEYS,
    deal,
    pack_group,
    row_length,
    rows_per_group,
    sequence_lengths,
)
from sacpo_jax.data.tokenize import pack

_EMPTY = np.zeros(0, dtype=np.int32)
KL_PARTNER_SEED = 0


@functools.lru_cache(maxsize=8)
def kl_partners(n: int) -> np.ndarray:
    """Each example's KL partner: one random cycle through all n examples, so
    partner[i] != i for n >= 2. With order = permutation(n): partner[order[k]] =
    order[k + 1 mod n]. Read-only; the same on every process and in every epoch."""
    order = np.random.default_rng(KL_PARTNER_SEED).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    partner.flags.writeable = False
    return partner


def _partners_of(dataset: TokenizedDataset, indices: np.ndarray) -> np.ndarray:
    """KL partners of ``indices``; -1 (a padding row) stays -1."""
    partner = kl_partners(len(dataset))
    return np.where(indices >= 0, partner[np.maximum(indices, 0)], -1)


def interleave_classes(desirable: np.ndarray, undesirable: np.ndarray) -> np.ndarray:
    """d0, u0, d1, u1, ... until both are used up, the shorter one cycled: 2 max(n_d, n_u)
    indices (``datasets.interleave_datasets([d, u], stopping_strategy="all_exhausted")``,
    which TRL's KTOTrainer applied before SACPO's KTO runs)."""
    if not len(desirable) or not len(undesirable):
        raise ValueError(
            f"interleaving needs desirable and undesirable examples; got {len(desirable)} "
            f"desirable and {len(undesirable)} undesirable"
        )
    n = max(len(desirable), len(undesirable))
    order = np.empty(2 * n, dtype=np.int64)
    order[0::2] = desirable[np.arange(n) % len(desirable)]
    order[1::2] = undesirable[np.arange(n) % len(undesirable)]
    return order


def bucket_length(needed: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= needed, or the largest bucket when none is."""
    fitting = [b for b in sorted(buckets) if b >= needed]
    return fitting[0] if fitting else max(buckets)


class BatchLoader:
    """Batches of a `TokenizedDataset` for one process.

    ``global_batch_size`` counts rows over all processes; each process gets
    ``global_batch_size // process_count`` rows per step, reshaped to
    ``[grad_accum, rows // grad_accum, ...]`` when ``grad_accum > 1``.
    Training loaders shuffle and drop the incomplete last batch of an epoch;
    eval loaders (``shuffle=False, drop_remainder=False``) keep every row, or only the
    examples ``rows`` (in that order; KTO's KL partners stay those of the whole dataset).
    ``interleave_labels``: epochs alternate the dataset's ``label`` classes (module doc).
    ``packing``: training batches of pairs or sft examples as packed rows (``data.packing``),
    a multiple of ``row_multiple`` rows per process (its shards of the batch axes).
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        *,
        global_batch_size: int,
        buckets: Sequence[int],
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        grad_accum: int = 1,
        rows: np.ndarray | None = None,
        interleave_labels: bool = False,
        packing: bool = False,
        row_multiple: int = 1,
    ) -> None:
        if rows is not None and shuffle:
            raise ValueError("rows selects examples of an unshuffled (eval) loader")
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by {process_count} processes"
            )
        self.local_batch_size = global_batch_size // process_count
        if self.local_batch_size % grad_accum:
            raise ValueError(
                f"per-process batch {self.local_batch_size} is not divisible by "
                f"grad_accum {grad_accum}"
            )
        self.dataset = dataset
        self.rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, np.int64)
        self._classes = None
        if interleave_labels:
            if "label" not in dataset.columns:
                raise ValueError("interleave_labels needs a dataset with a 'label' column")
            labels = dataset.columns["label"].astype(bool)
            self._classes = (np.flatnonzero(labels), np.flatnonzero(~labels))
            interleave_classes(*self._classes)  # both classes present
        if drop_remainder and self.epoch_size < global_batch_size:
            raise ValueError(
                f"{self.epoch_size} examples cannot fill one batch of {global_batch_size}"
            )
        if dataset.sequence_lengths().max() > max(buckets):
            raise ValueError(
                f"the largest bucket {max(buckets)} is shorter than the longest example "
                f"({dataset.sequence_lengths().max()} tokens)"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        if packing and (dataset.kind not in SEGMENT_KEYS or not drop_remainder):
            raise ValueError(
                f"packing takes training batches of {' or '.join(SEGMENT_KEYS)} examples, "
                f"not {'' if drop_remainder else 'evaluation batches of '}{dataset.kind}"
            )
        self.global_batch_size = global_batch_size
        self.buckets = tuple(sorted(buckets))
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.grad_accum = grad_accum
        self._lengths = dataset.sequence_lengths()
        self.micro_batch_size = self.local_batch_size // grad_accum
        self.packed_rows = None
        if packing:
            self.packed_rows = rows_per_group(
                dataset, self.micro_batch_size, max(self.buckets), row_multiple
            )

    @property
    def epoch_size(self) -> int:
        """Rows per epoch: ``rows``' (the dataset's by default), or 2 max(n_d, n_u) when
        interleaving labels."""
        if self._classes is None:
            return len(self.rows)
        return 2 * max(len(c) for c in self._classes)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.epoch_size, self.global_batch_size)
        return full if self.drop_remainder or not rest else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of one epoch, in visiting order."""
        rng = np.random.default_rng([self.seed, epoch])
        if self._classes is not None:
            classes = [rng.permutation(c) if self.shuffle else c for c in self._classes]
            return interleave_classes(*classes)
        if not self.shuffle:
            return self.rows
        return rng.permutation(len(self.dataset))

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at ``step``; -1 marks padding rows (eval)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        chosen = self.epoch_order(epoch)[start : start + self.global_batch_size]
        padding = np.full(self.global_batch_size - len(chosen), -1, dtype=np.int64)
        return np.concatenate([chosen, padding])

    def local_indices(self, step: int) -> np.ndarray:
        """This process's share of the global batch at ``step``."""
        start = self.process_index * self.local_batch_size
        return self.global_indices(step)[start : start + self.local_batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch at global ``step``, as numpy arrays."""
        global_indices = self.global_indices(step)
        if self.packed_rows:
            indices, arrays = self._packed(global_indices)
        else:
            indices = self.local_indices(step)
            length = bucket_length(self._needed_length(global_indices), self.buckets)
            collate = _COLLATE[self.dataset.kind]
            arrays = self._micro(collate(self.dataset, indices, length, self.pad_id))
        columns = _columns(self.dataset, indices)
        if not self.drop_remainder:
            columns["valid"] = (indices >= 0).astype(np.int32)
        arrays.update(self._micro(columns))
        return arrays

    def _micro(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """[local batch, ...] -> [grad_accum, micro, ...] with gradient accumulation."""
        if self.grad_accum == 1:
            return arrays
        shape = (self.grad_accum, self.micro_batch_size)
        return {k: v.reshape(*shape, *v.shape[1:]) for k, v in arrays.items()}

    def _packed(self, global_indices: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(this process's examples, their packed micro-batches): each global micro-batch
        dealt out to the processes (``packing.deal``) and packed into rows of the
        length that fits every process's share (see ``packing``)."""
        micro = self.micro_batch_size
        # [accum, processes * micro]: global micro-batch m joins every process's m-th.
        per_micro = np.moveaxis(global_indices.reshape(-1, self.grad_accum, micro), 1, 0)
        per_micro = per_micro.reshape(self.grad_accum, -1)
        processes = per_micro.shape[1] // micro
        groups = np.stack([deal(self.dataset, examples, processes) for examples in per_micro])
        lengths = [sequence_lengths(self.dataset, g).ravel() for g in groups.reshape(-1, micro)]
        rows = self.packed_rows
        length = row_length(lengths, rows)
        mine = groups[:, self.process_index]  # [accum, micro]
        packed = [
            pack_group(self.dataset, group, self.process_index * micro, rows, length, self.pad_id)
            for group in mine
        ]
        if self.grad_accum == 1:
            return mine[0], packed[0]
        return mine.ravel(), {name: np.stack([p[name] for p in packed]) for name in packed[0]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (batch for _, batch in self.iterate())

    def iterate(
        self, start_step: int = 0, num_steps: int | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from ``start_step``; endless for training loaders unless ``num_steps``
        is given, one pass for eval loaders."""
        if num_steps is None and not self.drop_remainder:
            num_steps = self.steps_per_epoch - start_step
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step)
            step += 1

    def _needed_length(self, global_indices: np.ndarray) -> int:
        """Longest sequence of the global batch, KTO's mismatched KL pairs included."""
        real = global_indices[global_indices >= 0]
        needed = int(self._lengths[real].max()) if len(real) else 1
        if self.dataset.kind == "unpaired" and len(real):
            partners = _partners_of(self.dataset, real)
            kl = self.dataset.prompts.lengths[real] + self.dataset.completions[0].lengths[partners]
            needed = max(needed, int(kl.max()))
        return needed


def _pack_rows(prompts, completions, length: int, pad_id: int, prefix: str) -> dict:
    """Pack rows (prompt_k + completion_k), cutting completions that would overflow."""
    packed = [
        pack(p, c[: max(length - len(p), 0)], length, pad_id)
        for p, c in zip(prompts, completions, strict=True)
    ]
    names = ("input_ids", "attention_mask", "loss_mask")
    return {f"{prefix}{name}": np.stack([row[j] for row in packed]) for j, name in enumerate(names)}


def _tokens(ragged, indices: np.ndarray) -> list[np.ndarray]:
    return [ragged[int(i)] if i >= 0 else _EMPTY for i in indices]


def _collate_pair(dataset: TokenizedDataset, indices, length: int, pad_id: int) -> dict:
    prompts = _tokens(dataset.prompts, indices)
    chosen, rejected = (_tokens(c, indices) for c in dataset.completions)
    return {
        **_pack_rows(prompts, chosen, length, pad_id, "chosen_"),
        **_pack_rows(prompts, rejected, length, pad_id, "rejected_"),
    }


def _collate_single(dataset: TokenizedDataset, indices, length: int, pad_id: int) -> dict:
    prompts = _tokens(dataset.prompts, indices)
    return _pack_rows(prompts, _tokens(dataset.completions[0], indices), length, pad_id, "")


def _collate_unpaired(dataset: TokenizedDataset, indices, length: int, pad_id: int) -> dict:
    prompts = _tokens(dataset.prompts, indices)
    completions = _tokens(dataset.completions[0], indices)
    partners = _tokens(dataset.completions[0], _partners_of(dataset, indices))
    kl = _pack_rows(prompts, partners, length, pad_id, "kl_")
    return {**_pack_rows(prompts, completions, length, pad_id, ""), **kl}


_COLLATE = {
    "pair": _collate_pair,
    "score_pair": _collate_pair,
    "unpaired": _collate_unpaired,
    "sft": _collate_single,
}


def _columns(dataset: TokenizedDataset, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Scalar columns at ``indices`` (0 for padding rows): ints as int32, floats as float32."""
    taken = {}
    for name, values in dataset.columns.items():
        dtype = np.float32 if values.dtype.kind == "f" else np.int32
        taken[name] = np.where(indices >= 0, values[np.maximum(indices, 0)], 0).astype(dtype)
    return taken
