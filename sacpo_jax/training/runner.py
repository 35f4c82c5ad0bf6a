"""``run_stage``: the imperative shell around the compiled step for one stage.

It owns the data, the reference log-probs, the loop, evaluation, metrics, checkpoints,
the NaN guard, the progress bar and the final Hugging Face export. Given the stage's
start parameters and its reference model it returns the trained model; the chain
(``sacpo_jax.training.chain``) links stages into the SACPO schedule.

Resume: the checkpoint's meta holds the step; the loader's batch is a pure function of
(seed, step), so a restarted stage sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sacpo_jax import checkpoint, flops, parallel
from sacpo_jax.config import PreferenceStage, TrainConfig
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.loader import BatchLoader, make_global
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.losses import kto_safety_undesirable_weight
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama
from sacpo_jax.training import objectives
from sacpo_jax.training import step as steps
from sacpo_jax.training.metrics_log import MetricsLogger
from sacpo_jax.training.state import (
    TrainState,
    create_state,
    make_optimizer,
    schedule_shape,
    split_model,
)

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"  # also where StageCheckpointer.mark_finished writes FINISHED.json


class TrainingError(RuntimeError):
    """A stage that cannot continue (e.g. NaN loss); the message is one line."""


@dataclasses.dataclass
class StageContext:
    """What a stage needs from the run: mesh, tokenizer, where to write, how to log."""

    mesh: Mesh
    tokenizer: Any
    stage_dir: str
    cache_dir: str
    seed: int = 0
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True


def params_fingerprint(model: Llama) -> str:
    """A cheap identity of a model's weights: shapes plus per-tensor sum and sum of squares."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    stats = jax.jit(
        lambda xs: [
            (jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in xs
        ]
    )([leaf for _, leaf in leaves])
    digest = hashlib.sha256()
    for (path, leaf), (total, squares) in zip(leaves, jax.device_get(stats)):
        digest.update(
            f"{parallel.path_name(path)}{leaf.shape}{leaf.dtype}{total!r}{squares!r}".encode()
        )
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- data


def coefficients(stage, dataset: TokenizedDataset) -> dict[str, float]:
    """The traced coefficients of a stage: learning rate, beta, KTO weights ..."""
    coeffs = {"learning_rate": stage.train.learning_rate}
    if isinstance(stage, PreferenceStage):
        coeffs["beta"] = float(stage.beta)
        coeffs["label_smoothing"] = stage.label_smoothing
        if stage.kind == "dpo":
            coeffs["rpo_alpha"] = stage.rpo_alpha
        if stage.kind == "kto":
            coeffs["desirable_weight"] = stage.desirable_weight
            weight = stage.undesirable_weight
            if weight == "balanced":
                labels = dataset.columns["label"]
                weight = kto_safety_undesirable_weight(int(labels.sum()), int((1 - labels).sum()))
            coeffs["undesirable_weight"] = float(weight)
    return coeffs


def make_loader(dataset, spec, ctx: StageContext, batch_size, *, train: bool, grad_accum=1):
    return BatchLoader(
        dataset,
        global_batch_size=batch_size,
        buckets=spec.buckets(),
        pad_id=ctx.tokenizer.pad_token_id,
        seed=ctx.seed,
        shuffle=train,
        drop_remainder=train,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        grad_accum=grad_accum,
    )


def global_batch(batch: dict, mesh: Mesh, grad_accum: int = 1) -> dict:
    """Per-process numpy batch -> global jax.Arrays, rows split over the batch axes."""
    shardings = steps.batch_shardings(mesh, batch, grad_accum)
    return {k: make_global({k: v}, shardings[k])[k] for k, v in batch.items()}


def stage_optimizer(train: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``make_optimizer`` with a stage's ``train`` settings over ``total_steps``."""
    return make_optimizer(
        total_steps,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        moments_dtype=train.adam_dtype,
    )


def stop_on_non_finite_loss(
    stage_name: str, loss: float, step: int, checkpointer: checkpoint.StageCheckpointer
) -> None:
    """Close the checkpointer (no further save) and raise a one-line TrainingError that
    names the last good checkpoint to resume from."""
    checkpointer.close()
    raise TrainingError(
        f"[{stage_name}] loss is {loss} at step {step}: stopped; the last good checkpoint "
        f"(step {checkpointer.latest_step()}) is in {checkpointer.directory}; lower the "
        "learning rate or check the data, then rerun to resume from it"
    )


def add_reference_logps(
    dataset: TokenizedDataset, spec, reference: Llama, kind: str, ctx: StageContext, batch_size: int
) -> TokenizedDataset:
    """Reference log-prob columns computed in one sharded pass and cached on disk.

    The cache key is (reference weights fingerprint, dataset fingerprint), so a stage
    rerun or a sweep sharing one reference reads them back instead of recomputing.
    """
    names = objectives.reference_columns(kind)
    key = hashlib.sha256(
        f"{params_fingerprint(reference)}:{dataset.fingerprint}:{names}".encode()
    ).hexdigest()[:20]
    path = os.path.join(ctx.cache_dir, "reference", f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as stored:
            columns = {name: stored[name] for name in names}
    else:
        columns = compute_reference_columns(dataset, spec, reference, kind, ctx, batch_size)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path + ".tmp.npz", **columns)
            os.replace(path + ".tmp.npz", path)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset


def compute_reference_columns(dataset, spec, reference, kind, ctx, batch_size) -> dict:
    """One pass of the reference model over every example, in stored order."""
    graphdef, params = split_model(reference)
    reference_step = steps.make_reference_step(graphdef, kind)
    loader = make_loader(dataset, spec, ctx, batch_size, train=False)
    collected: dict[str, list[np.ndarray]] = {}
    for _, batch in loader.iterate():
        valid = batch.pop("valid").astype(bool)
        out = reference_step(params, global_batch(batch, ctx.mesh))
        for name, values in out.items():
            full = np.asarray(
                jax.experimental.multihost_utils.process_allgather(values, tiled=True)
            )
            collected.setdefault(name, []).append(full[_global_valid(valid)])
    return {name: np.concatenate(parts)[: len(dataset)] for name, parts in collected.items()}


def _global_valid(local_valid: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return local_valid
    return np.asarray(multihost_utils.process_allgather(local_valid, tiled=True)).astype(bool)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    eval_step,
    params,
    dataset,
    spec,
    ctx,
    batch_size,
    coeffs,
    reference_step=None,
    reference_params=None,
) -> dict[str, float]:
    """Means of the objective's per-example rows over the whole eval set."""
    loader = make_loader(dataset, spec, ctx, batch_size, train=False)
    sums: dict[str, float] = {}
    count = 0.0
    for _, batch in loader.iterate():
        valid = _global_valid(batch.pop("valid")).astype(np.float64)
        batch = global_batch(batch, ctx.mesh)
        if reference_step is not None:
            batch.update(reference_step(reference_params, batch))
        rows = jax.device_get(eval_step(params, batch, coeffs))
        for name, values in rows.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(np.asarray(values) * valid))
        count += valid.sum()
    if "nll_sum" in sums:
        return {"nll": sums["nll_sum"] / max(sums["tokens"], 1.0)}
    return {name: total / max(count, 1.0) for name, total in sums.items()}


# ----------------------------------------------------------------------------- the loop


def to_score_model(model: Llama, seed: int) -> Llama:
    """A causal LM's backbone with a fresh zero-initialised score head (reward/cost)."""
    config = model.config.replace(architecture="LlamaForSequenceClassification")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("lm_head", None)
    head = abstract["score_head"]
    params["score_head"] = jnp.zeros(head.shape, head.dtype)
    return nnx.merge(graphdef, params)


@dataclasses.dataclass
class PreparedData:
    """A stage's tokenised train/eval data, with reference columns when precomputed."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    skipped: dict[str, int]


def prepare_data(stage, reference: Llama | None, ctx: StageContext, on_the_fly: bool):
    dataset, skipped = build_dataset(stage.data, ctx.tokenizer, cache_dir=ctx.cache_dir)
    eval_dataset = None
    if stage.eval_data is not None:
        eval_dataset, _ = build_dataset(stage.eval_data, ctx.tokenizer, cache_dir=ctx.cache_dir)
    if stage.kind in ("dpo", "kto") and not on_the_fly:
        batch = stage.train.eval_batch_size or stage.train.batch_size
        dataset = add_reference_logps(dataset, stage.data, reference, stage.kind, ctx, batch)
        if eval_dataset is not None:
            eval_dataset = add_reference_logps(
                eval_dataset, stage.eval_data, reference, stage.kind, ctx, batch
            )
    return PreparedData(dataset, eval_dataset, skipped)


def uses_on_the_fly_reference(stage) -> bool:
    """DPO and KTO precompute the reference's log-probs unless asked not to (KTO's
    mismatched KL rows are fixed per example, see ``loader.kl_partners``)."""
    return stage.kind in ("dpo", "kto") and stage.reference_mode == "on_the_fly"


def load_finished(ctx: StageContext, like: Llama) -> Llama:
    c = like.config
    return hf.load_checkpoint(
        os.path.join(ctx.stage_dir, MODEL_DIR),
        mesh=ctx.mesh,
        scan_layers=c.scan_layers,
        remat=c.remat,
        compute_dtype=c.dtype,
    )


def run_stage(stage, start: Llama, reference: Llama | None, ctx: StageContext) -> Llama:
    """Train ``stage`` from ``start`` against ``reference``; returns the trained model.

    A finished stage (FINISHED.json present) is loaded from its export instead.
    """
    if checkpoint.is_finished(os.path.join(ctx.stage_dir, CHECKPOINTS_DIR)):
        return load_finished(ctx, start)
    if stage.kind in ("reward", "cost") and not start.config.score_model:
        start = to_score_model(start, ctx.seed)
    on_the_fly = uses_on_the_fly_reference(stage)
    data = prepare_data(stage, reference, ctx, on_the_fly)
    return StageLoop(stage, start, reference if on_the_fly else None, data, ctx).run()


class StageLoop:
    """The loop of one stage: restore or init, step, log, evaluate, save, export."""

    def __init__(self, stage, start: Llama, reference, data: PreparedData, ctx: StageContext):
        self.stage, self.data, self.ctx, self.train = stage, data, ctx, stage.train
        self.coeffs = steps.coefficient_arrays(coefficients(stage, data.train))
        self.loader = make_loader(
            data.train,
            stage.data,
            ctx,
            self.train.batch_size,
            train=True,
            grad_accum=self.train.grad_accum,
        )
        epochs_steps = math.ceil(self.train.epochs * self.loader.steps_per_epoch)
        self.total_steps = self.train.max_steps or max(1, epochs_steps)
        self.optimizer = stage_optimizer(self.train, self.total_steps)
        self.graphdef, self.params = split_model(start)
        self.model_config = start.config
        self.objective = objectives.build_objective(
            stage.kind, getattr(stage, "loss_type", "sigmoid")
        )
        self.eval_step = steps.make_eval_step(self.graphdef, self.objective)
        self.reference_step = self.reference_params = None
        if reference is not None:
            ref_graphdef, self.reference_params = split_model(reference)
            self.reference_step = steps.make_reference_step(ref_graphdef, stage.kind)
        self.checkpointer = checkpoint.StageCheckpointer(
            os.path.join(ctx.stage_dir, CHECKPOINTS_DIR),
            save_every=self.train.save_every,
            keep=self.train.keep_checkpoints,
        )
        self.logger = MetricsLogger(
            ctx.stage_dir,
            tensorboard=ctx.tensorboard,
            wandb_project=ctx.wandb_project,
            run_name=stage.name,
        )

    # -- state ------------------------------------------------------------------------

    def init_or_restore(self) -> tuple[TrainState, int]:
        """Step 0's state, or the latest checkpoint's (placed by this mesh's shardings)."""
        create = functools.partial(create_state, optimizer=self.optimizer, seed=self.ctx.seed)
        abstract = jax.eval_shape(create, self.params)
        self.state_shardings = parallel.state_shardings(abstract, self.ctx.mesh)
        latest = self.checkpointer.latest_step()
        if latest is None:
            return jax.jit(create, out_shardings=self.state_shardings)(self.params), 0
        target = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        state, meta = self.checkpointer.restore(target, latest)
        return state, int(meta["step"])

    def global_batch(self, batch: dict) -> dict:
        accum = self.train.grad_accum
        placed = global_batch(batch, self.ctx.mesh, accum)
        if self.reference_step is not None:
            placed.update(_reference_for(self.reference_step, self.reference_params, placed, accum))
        return placed

    def evaluate(self, params) -> dict[str, float]:
        batch = self.train.eval_batch_size or self.train.batch_size
        return evaluate(
            self.eval_step,
            params,
            self.data.eval,
            self.stage.eval_data,
            self.ctx,
            batch,
            self.coeffs,
            self.reference_step,
            self.reference_params,
        )

    # -- loop -------------------------------------------------------------------------

    def run(self) -> Llama:
        state, first = self.init_or_restore()
        del self.params  # the state holds them now
        if first == 0 and self.data.skipped:
            self.report_skipped()
        train_step = None
        flops_of = functools.partial(
            flops.batch_flops, self.model_config, reference_forward=self.reference_step is not None
        )
        meter = ThroughputMeter(first, flops_of)
        progress = tqdm(
            total=self.total_steps,
            initial=first,
            desc=self.stage.name,
            dynamic_ncols=True,
            disable=not self.ctx.progress_bar or jax.process_index() != 0,
        )
        with checkpoint.PreemptionGuard() as guard:
            for index, batch in self.loader.iterate(first, self.total_steps - first):
                meter.add_tokens(batch)
                placed = self.global_batch(batch)
                if train_step is None:
                    train_step = self.compile_step(placed)
                state, metrics = train_step(state, placed, self.coeffs)
                done = index + 1
                progress.update(1)
                will_save = done % self.train.save_every == 0
                if done % self.train.log_every == 0 or done == self.total_steps or will_save:
                    self.log(done, metrics, meter, progress)
                if self.train.eval_every and self.data.eval and done % self.train.eval_every == 0:
                    self.logger.log(done, self.evaluate(state.params), prefix="eval/")
                if guard.should_stop(done):
                    self.checkpointer.save(done, state, {"step": done}, force=True)
                    self.checkpointer.close()
                    progress.close()
                    print(f"[{self.stage.name}] preempted at step {done}: saved; rerun to resume")
                    raise SystemExit(0)
                self.checkpointer.save(done, state, {"step": done})
        progress.close()
        return self.finish(state)

    def compile_step(self, placed: dict):
        return steps.make_train_step(
            self.graphdef,
            self.objective,
            self.optimizer,
            state_shardings=self.state_shardings,
            batch_shardings=steps.batch_shardings(self.ctx.mesh, placed, self.train.grad_accum),
            mesh=self.ctx.mesh,
            grad_accum=self.train.grad_accum,
        )

    def log(self, done: int, metrics: dict, meter: ThroughputMeter, progress) -> None:
        """Log (and NaN-check: a non-finite loss stops before any further save)."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            progress.close()
            stop_on_non_finite_loss(self.stage.name, metrics["loss"], done, self.checkpointer)
        schedule = schedule_shape(self.total_steps, self.train.warmup_ratio)
        metrics["learning_rate"] = float(self.coeffs["learning_rate"]) * float(schedule(done - 1))
        metrics.update(meter.read(done))
        self.logger.log(done, metrics)
        progress.set_postfix(_postfix(metrics), refresh=False)

    def report_skipped(self) -> None:
        skipped = self.data.skipped
        self.logger.log(0, {f"data/skipped/{reason}": n for reason, n in skipped.items()})
        if jax.process_index() == 0:
            counts = ", ".join(f"{r}={n}" for r, n in skipped.items())
            print(f"[{self.stage.name}] skipped rows: {counts}")

    def finish(self, state: TrainState) -> Llama:
        """Final eval, final checkpoint, HF export, FINISHED marker."""
        if self.data.eval is not None:
            results = self.evaluate(state.params)
            self.logger.log(self.total_steps, results, prefix="eval/")
            if jax.process_index() == 0:
                with open(os.path.join(self.ctx.stage_dir, "eval.json"), "w") as f:
                    json.dump(results, f, indent=2)
        self.checkpointer.save(self.total_steps, state, {"step": self.total_steps}, force=True)
        model = nnx.merge(self.graphdef, state.params)
        export = os.path.join(self.ctx.stage_dir, MODEL_DIR)
        hf.save_checkpoint(model, export, self.ctx.tokenizer, msgpack=self.train.export_msgpack)
        fingerprint = params_fingerprint(model)
        self.checkpointer.mark_finished({"step": self.total_steps, "fingerprint": fingerprint})
        self.checkpointer.close()
        self.logger.close()
        return model


class ThroughputMeter:
    """Real (non-pad) tokens per second between two log points, and model FLOP/s per
    device (``flops_of(batch)``, over padded shapes; see ``sacpo_jax.flops``) with MFU
    when the device's peak is known."""

    def __init__(self, first_step: int, flops_of=None):
        self.tokens, self.since, self.last_step = 0, time.perf_counter(), first_step
        self.flops_of, self.flops = flops_of, 0.0

    def add_tokens(self, batch: dict) -> None:
        self.tokens += int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))
        if self.flops_of is not None:
            self.flops += self.flops_of(batch)

    def read(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        rate = self.tokens * jax.process_count() / elapsed
        out = {"tokens_per_second": rate, "tokens_per_second_per_device": rate / jax.device_count()}
        out["step_time"] = elapsed / max(step - self.last_step, 1)
        if self.flops_of is not None:  # this process's batch on this process's devices
            kind = jax.local_devices()[0].device_kind
            out.update(
                flops.utilisation_metrics(self.flops, elapsed, jax.local_device_count(), kind)
            )
        self.tokens, self.since, self.last_step, self.flops = 0, time.perf_counter(), step, 0.0
        return out


def _reference_for(reference_step, reference_params, batch: dict, grad_accum: int) -> dict:
    if grad_accum == 1:
        return reference_step(reference_params, batch)
    micro = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(grad_accum)]
    outs = [reference_step(reference_params, m) for m in micro]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.4f}"}
    for name in ("rewards/accuracies", "accuracy", "nll"):
        if name in metrics:
            shown[name.split("/")[-1]] = f"{metrics[name]:.3f}"
    shown["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
    return shown
