"""The tokenised dataset: ragged prompt and completion tokens plus per-example scalar columns.

Stored as flat int32 token arrays with offsets (example i's prompt is
``prompt_tokens[prompt_offsets[i]:prompt_offsets[i+1]]``), one flat array per
completion slot (pair: chosen, rejected; unpaired and sft: one), and 1-D
numeric columns (label, signs, scores, reference log-probs ...). Saved as
``arrays.npz`` (np.savez; loaded with allow_pickle=False) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COMPLETION_SLOTS = {"pair": 2, "score_pair": 2, "unpaired": 1, "sft": 1}
_FORMAT_VERSION = 1
_NO_TOKENS = np.zeros(0, dtype=np.int32)


@dataclass(frozen=True)
class Ragged:
    """Variable-length int32 rows: row i is ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows] + [_NO_TOKENS])
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, indices: np.ndarray) -> Ragged:
        return Ragged.from_rows([self[int(i)] for i in indices])


@dataclass(frozen=True)
class TokenizedDataset:
    """Tokenised examples of one kind (pair | score_pair | unpaired | sft).

    Immutable: `add_column`, `select` and `swap_pairs` return new datasets
    sharing the unchanged arrays.
    """

    kind: str
    prompts: Ragged
    completions: tuple[Ragged, ...]
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if COMPLETION_SLOTS.get(self.kind) != len(self.completions):
            raise ValueError(f"kind '{self.kind}' cannot hold {len(self.completions)} completions")
        sizes = {len(self.prompts), *(len(c) for c in self.completions)}
        sizes |= {len(v) for v in self.columns.values()}
        if len(sizes) != 1:
            raise ValueError(f"inconsistent example counts {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def sequence_lengths(self) -> np.ndarray:
        """Per example: prompt length + longest completion length."""
        longest = np.max(np.stack([c.lengths for c in self.completions]), axis=0)
        return self.prompts.lengths + longest

    def add_column(self, name: str, values: np.ndarray) -> TokenizedDataset:
        """A copy with a 1-D numeric column added or replaced (e.g. reference_chosen_logps)."""
        values = np.asarray(values)
        if values.shape != (len(self),) or values.dtype.kind not in "biuf":
            raise ValueError(
                f"column '{name}' must be numeric of shape ({len(self)},), got "
                f"{values.dtype} {values.shape}"
            )
        return TokenizedDataset(
            self.kind, self.prompts, self.completions, {**self.columns, name: values}
        )

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedDataset:
        """A copy holding the examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return TokenizedDataset(
            self.kind,
            self.prompts.take(indices),
            tuple(c.take(indices) for c in self.completions),
            {name: values[indices] for name, values in self.columns.items()},
        )

    def swap_pairs(self, swap: np.ndarray) -> TokenizedDataset:
        """A copy of a pair dataset where chosen and rejected trade places at ``swap`` (bool [n]).

        Columns named with "chosen" trade values with their "rejected"
        counterparts too (e.g. reference_chosen_logps, chosen_sign). For
        pseudo-labelling: swap where response_1 is preferred.
        """
        if len(self.completions) != 2:
            raise ValueError(f"swap_pairs needs a pair dataset, not '{self.kind}'")
        swap = np.asarray(swap, dtype=bool)
        chosen, rejected = self.completions
        rows = [
            (rejected[i], chosen[i]) if swap[i] else (chosen[i], rejected[i])
            for i in range(len(self))
        ]
        columns = dict(self.columns)
        for name, values in self.columns.items():
            partner = name.replace("chosen", "rejected")
            if "chosen" in name and partner in self.columns:
                columns[name] = np.where(swap, self.columns[partner], values)
                columns[partner] = np.where(swap, values, self.columns[partner])
        new_completions = (
            Ragged.from_rows([r[0] for r in rows]),
            Ragged.from_rows([r[1] for r in rows]),
        )
        return TokenizedDataset(self.kind, self.prompts, new_completions, columns)

    @property
    def fingerprint(self) -> str:
        """sha256 over the kind, every token array and every column."""
        digest = hashlib.sha256(self.kind.encode())
        for name, array in sorted(self._arrays().items()):
            digest.update(name.encode())
            digest.update(str(array.dtype).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> None:
        """Write ``arrays.npz`` and ``meta.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "arrays.npz", **self._arrays())
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "num_examples": len(self),
            "columns": sorted(self.columns),
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> TokenizedDataset:
        """Read a dataset written by `save` (no pickle)."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unknown dataset format {meta.get('format_version')}")
        with np.load(directory / "arrays.npz", allow_pickle=False) as arrays:
            prompts = Ragged(arrays["prompt_tokens"], arrays["prompt_offsets"])
            completions = tuple(
                Ragged(arrays[f"completion{k}_tokens"], arrays[f"completion{k}_offsets"])
                for k in range(COMPLETION_SLOTS[meta["kind"]])
            )
            columns = {name: arrays[f"column.{name}"] for name in meta["columns"]}
        return cls(meta["kind"], prompts, completions, columns)

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"prompt_tokens": self.prompts.values, "prompt_offsets": self.prompts.offsets}
        for k, completion in enumerate(self.completions):
            arrays[f"completion{k}_tokens"] = completion.values
            arrays[f"completion{k}_offsets"] = completion.offsets
        arrays.update({f"column.{name}": values for name, values in self.columns.items()})
        return arrays
