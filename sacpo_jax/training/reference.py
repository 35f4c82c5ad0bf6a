"""The reference model's log-probs: precomputed once and stored, or scored every batch.

Precomputed (the default): a sharded pass of the reference over the examples a stage
will use writes the objective's reference columns beside the tokens; only the policy is
in memory while training. The store is keyed by (reference weights fingerprint, dataset
fingerprint, column names) and records which rows it holds, so a rerun, a sweep sharing
one reference, or a longer run reads what is there and scores only the missing rows.
The pass shows its progress (rows/s, ETA), saves what it has every few minutes and on a
preemption notice, and resumes from there.

On the fly: a frozen reference scores each batch just before the step (two models in
memory, as the SACPO paper ran it); the numbers are the same.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sacpo_jax import parallel
from sacpo_jax.checkpoint import Preempted
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.models.fingerprint import params_fingerprint
from sacpo_jax.models.llama import Llama
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.objectives import Reference
from sacpo_jax.training.state import split_model
from sacpo_jax.training.step import make_reference_step

CACHE_DIR = "reference"
SAVE_SECONDS = 300.0
SCORED = "scored"


def add_reference_columns(
    dataset: TokenizedDataset,
    spec: DataSpec,
    model: Llama,
    reference: Reference,
    ctx: StageContext,
    batch_size: int,
    *,
    rows: np.ndarray | None = None,
    log_every: int = 10,
) -> TokenizedDataset:
    """``dataset`` with ``reference.columns`` computed by ``model`` for ``rows`` (default:
    every example; the other rows hold NaN), taken from the store where it has them."""
    key = hashlib.sha256(
        f"{params_fingerprint(model)}:{dataset.fingerprint}:{reference.columns}".encode()
    ).hexdigest()[:20]
    path = os.path.join(ctx.cache_dir, CACHE_DIR, f"{key}.npz")
    store = _load(path, reference.columns, len(dataset))
    needed = np.arange(len(dataset)) if rows is None else np.unique(rows)
    missing = needed[~store[SCORED][needed]]
    if missing.size:
        _score(store, path, dataset, spec, model, reference, ctx, batch_size, missing, log_every)
    for name in reference.columns:
        dataset = dataset.add_column(name, store[name])
    return dataset


def _load(path: str, columns: tuple[str, ...], size: int) -> dict[str, np.ndarray]:
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as stored:
            store = {name: stored[name] for name in columns}
            store[SCORED] = stored[SCORED] if SCORED in stored else np.ones(size, bool)
            return store
    store = {name: np.full(size, np.nan, np.float32) for name in columns}
    store[SCORED] = np.zeros(size, bool)
    return store


def _save(path: str, store: dict[str, np.ndarray]) -> None:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **store)
        os.replace(path + ".tmp.npz", path)


def _score(store, path, dataset, spec, model, reference, ctx, batch_size, missing, log_every):
    """Score ``missing`` rows in stored order, filling ``store`` and saving it as it goes."""
    graphdef, params = split_model(model)
    reference_step = make_reference_step(graphdef, reference, ctx.mesh)
    stage = os.path.basename(ctx.stage_dir)
    show = ctx.progress_bar and jax.process_index() == 0
    progress = tqdm(total=len(missing), desc=f"{stage} reference", unit="rows", disable=not show)
    started = saved = time.perf_counter()
    with ctx.preemption as guard:
        loader = ctx.loader(dataset, spec, batch_size, train=False, rows=missing)
        for index, batch in loader.iterate():
            valid = parallel.gather_rows(batch.pop("valid")).astype(bool)
            out = reference_step(params, parallel.global_batch(batch, ctx.mesh))
            rows = missing[index * batch_size : index * batch_size + int(valid.sum())]
            for name, values in out.items():
                store[name][rows] = parallel.to_host(values)[valid]
            store[SCORED][rows] = True
            done = min((index + 1) * batch_size, len(missing))
            progress.update(len(rows))
            if not ctx.progress_bar and (index + 1) % log_every == 0 and jax.process_index() == 0:
                _log_progress(stage, done, len(missing), time.perf_counter() - started)
            if guard.should_stop(index):
                _save(path, store)
                progress.close()
                raise Preempted(
                    f"[{stage}] stopped in the reference pass ({done}/{len(missing)} rows "
                    "stored): rerun the same command to continue it"
                )
            if time.perf_counter() - saved > SAVE_SECONDS:
                _save(path, store)
                saved = time.perf_counter()
    progress.close()
    _save(path, store)


def _log_progress(stage: str, done: int, total: int, seconds: float) -> None:
    rate = done / max(seconds, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(
        f"[{stage}] reference log-probs: {done}/{total} rows, {rate:.1f} rows/s, {eta:.0f} s left",
        flush=True,
    )


class OnTheFlyReference:
    """A frozen reference model that scores each placed batch before the step."""

    def __init__(self, model: Llama, reference: Reference, mesh=None):
        graphdef, self.params = split_model(model)
        self.step = make_reference_step(graphdef, reference, mesh)

    def columns(self, batch: dict, grad_accum: int = 1) -> dict[str, jax.Array]:
        """The reference columns of a global batch ([accum, micro, ...] with accumulation)."""
        if grad_accum == 1:
            return self.step(self.params, batch)
        micro = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(grad_accum)]
        outs = [self.step(self.params, m) for m in micro]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
