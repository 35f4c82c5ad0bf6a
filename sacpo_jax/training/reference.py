"""The reference model's log-probs: precomputed once and cached, or scored every batch.

Precomputed (the default): one sharded pass of the reference over every example writes
the objective's reference columns beside the tokens; only the policy is in memory while
training. The cache key is (reference weights fingerprint, dataset fingerprint, column
names), so a rerun or a sweep sharing one reference reads them back.

On the fly: a frozen reference scores each batch just before the step (two models in
memory, as the SACPO paper ran it); the numbers are the same.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from sacpo_jax import parallel
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.models.fingerprint import params_fingerprint
from sacpo_jax.models.llama import Llama
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.objectives import Reference
from sacpo_jax.training.state import split_model
from sacpo_jax.training.step import make_reference_step

CACHE_DIR = "reference"


def add_reference_columns(
    dataset: TokenizedDataset,
    spec: DataSpec,
    model: Llama,
    reference: Reference,
    ctx: StageContext,
    batch_size: int,
) -> TokenizedDataset:
    """``dataset`` with ``reference.columns`` computed by ``model``, read from the cache
    when this model and these tokens were scored before."""
    key = hashlib.sha256(
        f"{params_fingerprint(model)}:{dataset.fingerprint}:{reference.columns}".encode()
    ).hexdigest()[:20]
    path = os.path.join(ctx.cache_dir, CACHE_DIR, f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as stored:
            columns = {name: stored[name] for name in reference.columns}
    else:
        columns = compute_reference_columns(dataset, spec, model, reference, ctx, batch_size)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path + ".tmp.npz", **columns)
            os.replace(path + ".tmp.npz", path)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset


def compute_reference_columns(
    dataset: TokenizedDataset,
    spec: DataSpec,
    model: Llama,
    reference: Reference,
    ctx: StageContext,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """One pass of the reference model over every example, in stored order."""
    graphdef, params = split_model(model)
    reference_step = make_reference_step(graphdef, reference)
    collected: dict[str, list[np.ndarray]] = {}
    for _, batch in ctx.loader(dataset, spec, batch_size, train=False).iterate():
        valid = parallel.gather_rows(batch.pop("valid")).astype(bool)
        out = reference_step(params, parallel.global_batch(batch, ctx.mesh))
        for name, values in out.items():
            collected.setdefault(name, []).append(parallel.to_host(values)[valid])
    return {name: np.concatenate(parts)[: len(dataset)] for name, parts in collected.items()}


class OnTheFlyReference:
    """A frozen reference model that scores each placed batch before the step."""

    def __init__(self, model: Llama, reference: Reference):
        graphdef, self.params = split_model(model)
        self.step = make_reference_step(graphdef, reference)

    def columns(self, batch: dict, grad_accum: int = 1) -> dict[str, jax.Array]:
        """The reference columns of a global batch ([accum, micro, ...] with accumulation)."""
        if grad_accum == 1:
            return self.step(self.params, batch)
        micro = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(grad_accum)]
        outs = [self.step(self.params, m) for m in micro]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
