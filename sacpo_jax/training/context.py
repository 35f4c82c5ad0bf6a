"""What a stage needs from its run: the mesh, the tokenizer, where to write, how to log."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.spec import DataSpec


@dataclasses.dataclass(frozen=True)
class StageContext:
    mesh: Mesh
    tokenizer: Any
    stage_dir: str
    cache_dir: str
    seed: int = 0
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True

    def loader(
        self,
        dataset: TokenizedDataset,
        spec: DataSpec,
        batch_size: int,
        *,
        train: bool,
        grad_accum: int = 1,
        interleave_labels: bool = False,
    ) -> BatchLoader:
        """This process's batches: shuffled and full for training (seeded by ``seed``),
        every example once in stored order otherwise; ``interleave_labels``: see
        ``BatchLoader``."""
        return BatchLoader(
            dataset,
            global_batch_size=batch_size,
            buckets=spec.buckets(),
            pad_id=self.tokenizer.pad_token_id,
            seed=self.seed,
            shuffle=train,
            drop_remainder=train,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            grad_accum=grad_accum,
            interleave_labels=interleave_labels,
        )
