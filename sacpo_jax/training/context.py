"""What a stage needs from its run: the mesh, the tokenizer, where to write, how to log,
and the run's preemption guard (SIGTERM / Ctrl-C), which every long phase polls."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.checkpoint import PreemptionGuard
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.errors import DataError
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.sources import source_label
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
    preemption: PreemptionGuard = dataclasses.field(default_factory=PreemptionGuard)

    def loader(
        self,
        dataset: TokenizedDataset,
        spec: DataSpec,
        batch_size: int,
        *,
        train: bool,
        grad_accum: int = 1,
        rows: np.ndarray | None = None,
        interleave_labels: bool = False,
        packing: bool = False,
    ) -> BatchLoader:
        """This process's batches: shuffled and full for training (seeded by ``seed``),
        every example (or every one of ``rows``) once in stored order otherwise;
        ``interleave_labels``: see ``BatchLoader``; ``packing``: packed training rows,
        split evenly over this process's devices."""
        if train and len(dataset) < batch_size:
            raise DataError(
                source_label(spec.source),
                f"{len(dataset)} usable examples cannot fill one batch of {batch_size} "
                "(train.batch_size)",
            )
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
            rows=rows,
            interleave_labels=interleave_labels,
            packing=packing,
            row_multiple=max(1, parallel.batch_shards(self.mesh) // jax.process_count()),
        )
