"""The one training loop: every training stage and each of CAID's policy steps run it.

``Trainer`` holds what a loop run needs from an objective and a mesh: the compiled train
and eval steps (compiled once, reused by every run), the on-the-fly reference if any,
fresh and restored train states. ``TrainingLoop.run`` drives it over batches and owns
everything around the step: the progress bar, logging (TRL's metric names, tokens/s,
model FLOP/s per device), evaluation every ``eval_every`` steps, the non-finite-loss
stop, preemption (SIGTERM: save, then exit) and checkpoint saves every ``save_every``.

Step numbers: a run covers local steps ``first .. total-1`` of one optimisation (its
learning-rate schedule spans ``total``); checkpoints and logs use ``offset + local``,
so several runs (CAID's iterations) share one checkpoint directory and one log.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from sacpo_jax import checkpoint, flops, parallel
from sacpo_jax.config import TrainConfig
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.data.packing import real_tokens
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.errors import RunFailure
from sacpo_jax.metrics_log import MetricsLogger
from sacpo_jax.models.llama import LlamaConfig
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.objectives import Objective, as_arrays
from sacpo_jax.training.optim import schedule_shape
from sacpo_jax.training.reference import OnTheFlyReference
from sacpo_jax.training.state import Trainable, TrainState, all_finite, partition, train_all
from sacpo_jax.training.step import make_eval_step, make_train_step


class TrainingError(RunFailure):
    """A stage that cannot continue (e.g. a non-finite loss); the message is one line."""


class Trainer:
    """An objective's compiled steps on one mesh, and the states they map.

    ``trainable``: which parameter leaves train (the rest are frozen); ``seed``: the
    randomness of the step (LoRA dropout), folded with the step number."""

    def __init__(
        self,
        objective: Objective,
        graphdef: nnx.GraphDef,
        model_config: LlamaConfig,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        *,
        grad_accum: int = 1,
        reference: OnTheFlyReference | None = None,
        trainable: Trainable = train_all,
        seed: int = 0,
    ):
        self.objective, self.graphdef, self.model_config = objective, graphdef, model_config
        self.optimizer, self.mesh, self.grad_accum = optimizer, mesh, grad_accum
        self.reference, self.trainable, self.seed = reference, trainable, seed
        self.coefficients = as_arrays(objective.coefficients)
        self.eval_step = make_eval_step(graphdef, objective.loss, mesh)
        self.train_step: Callable | None = None
        self.state_shardings: TrainState | None = None

    # -- states -----------------------------------------------------------------------

    def fresh_state(self, params: dict) -> TrainState:
        """Step 0 from a model's parameters: the trainable leaves are copied (the step
        donates them) with a new optimiser state; the frozen leaves are shared."""
        trainable, frozen = partition(params, self.trainable)
        self._set_shardings(trainable, frozen)
        shardings = self.state_shardings

        def start(params):
            return jnp.zeros((), jnp.int32), params, self.optimizer.init(params)

        step, params, opt_state = jax.jit(
            start, out_shardings=(shardings.step, shardings.params, shardings.opt_state)
        )(trainable)
        return TrainState(step, params, opt_state, frozen)

    def restore(
        self, checkpointer: checkpoint.StageCheckpointer, step: int, params: dict
    ) -> tuple[TrainState, dict]:
        """(state, meta) of a saved step; ``params`` (the start model's) give the frozen
        leaves and the shapes."""
        trainable, frozen = partition(params, self.trainable)
        abstract = self._set_shardings(trainable, frozen)
        target = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            abstract.saved(),
            self.state_shardings.saved(),
        )
        saved, meta = checkpointer.restore(target, step)
        return TrainState(**saved, frozen=frozen), meta

    def abstract_state(self, params: dict) -> TrainState:
        """The state ``fresh_state(params)`` would make, as sharded ShapeDtypeStructs
        (``params`` may be abstract too): what ``lower`` compiles for, allocating nothing."""
        abstract = self._set_shardings(*partition(params, self.trainable))
        return jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )

    def _set_shardings(self, trainable: dict, frozen: dict) -> TrainState:
        def create(params, frozen):
            return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params), frozen)

        abstract = jax.eval_shape(create, trainable, frozen)
        self.state_shardings = parallel.state_shardings(abstract, self.mesh)
        return abstract

    # -- steps ------------------------------------------------------------------------

    def place(self, batch: dict) -> dict:
        """A per-process numpy batch as global arrays, with on-the-fly reference columns."""
        placed = parallel.global_batch(batch, self.mesh, self.grad_accum)
        if self.reference is not None:
            placed.update(self.reference.columns(placed, self.grad_accum))
        return placed

    def step(self, state: TrainState, placed: dict) -> tuple[TrainState, dict]:
        """One optimiser update (compiled at the first call)."""
        return self._train_step()(state, placed, self.coefficients)

    def lower(self, state: TrainState, batch: dict) -> jax.stages.Lowered:
        """The train step lowered for a (possibly abstract) state and batch, e.g. to read
        ``.compile().memory_analysis()`` or ``.cost_analysis()``."""
        compiled = self._train_step().compiled
        return compiled.lower(state.replace(frozen=None), state.frozen, batch, self.coefficients)

    def _train_step(self) -> Callable:
        if self.train_step is None:
            self.train_step = make_train_step(
                self.graphdef,
                self.objective.loss,
                self.optimizer,
                state_shardings=self.state_shardings,
                mesh=self.mesh,
                grad_accum=self.grad_accum,
                seed=self.seed,
            )
        return self.train_step

    def evaluate(
        self, params: dict, dataset: TokenizedDataset, spec: DataSpec, ctx: StageContext, batch_size
    ) -> dict[str, float]:
        """The objective's metrics over a whole dataset (``objective.summarize`` of the
        per-example rows)."""
        sums: dict[str, float] = {}
        count = 0.0
        for _, batch in ctx.loader(dataset, spec, batch_size, train=False).iterate():
            valid = parallel.gather_rows(batch.pop("valid")).astype(np.float64)
            placed = parallel.global_batch(batch, self.mesh)
            if self.reference is not None:
                placed.update(self.reference.columns(placed))
            rows = self.eval_step(params, placed, self.coefficients)
            for name, values in rows.items():
                total = float(np.sum(parallel.to_host(values) * valid))
                sums[name] = sums.get(name, 0.0) + total
            count += valid.sum()
        return self.objective.summarize(sums, count)


@dataclasses.dataclass
class TrainingLoop:
    """The loop of one stage (or one CAID stage's policy steps) around a ``Trainer``.

    ``evaluate(params) -> metrics`` runs every ``train.eval_every`` steps when given.
    Use it as a context manager: leaving the block, normally or by an error, waits for the
    pending checkpoint save and closes the logs, so that no save is still being written
    when the stage is rerun (in this process or the next).
    """

    name: str
    trainer: Trainer
    train: TrainConfig
    ctx: StageContext
    checkpointer: checkpoint.StageCheckpointer
    logger: MetricsLogger
    evaluate: Callable[[dict], dict[str, float]] | None = None

    def __enter__(self) -> TrainingLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.checkpointer.close()
        self.logger.close()

    def run(
        self,
        state: TrainState,
        batches: Iterable[tuple[int, dict]],
        *,
        first: int,
        total: int,
        offset: int = 0,
        meta: Callable[[int], dict] | None = None,
        description: str | None = None,
        progress: tqdm | None = None,
    ) -> TrainState:
        """Steps ``first .. total - 1`` over ``batches`` (``(local step, batch)`` pairs);
        ``meta(done)`` is what each checkpoint records (default ``{"step": done}``).
        ``progress``: a bar from ``progress_bar`` that the caller owns and closes (an outer
        loop that runs the steps in several calls, e.g. once per round of samples)."""
        meta = meta or (lambda done: {"step": done})
        flops_of = functools.partial(
            flops.batch_flops,
            self.trainer.model_config,
            reference_forward=self.trainer.reference is not None,
        )
        meter = ThroughputMeter(first, flops_of)
        own_progress = progress is None
        if own_progress:
            progress = self.progress_bar(first, total, description)
        schedule = schedule_shape(total, self.train.warmup_ratio)
        with self.ctx.preemption as guard:
            for index, batch in batches:
                meter.add_tokens(batch)
                state, metrics = self.trainer.step(state, self.trainer.place(batch))
                done, step = index + 1, offset + index + 1
                progress.update(1)
                will_save = step % self.train.save_every == 0
                if done % self.train.log_every == 0 or done == total or will_save:
                    self.log(step, done, metrics, meter, schedule, progress)
                if self.evaluate and self.train.eval_every and done % self.train.eval_every == 0:
                    self.logger.log(step, self.evaluate(state.model_params()), prefix="eval/")
                if guard.should_stop(step):
                    progress.close()
                    self.save(step, state, meta(done), force=True)
                    raise checkpoint.Preempted(
                        f"[{self.name}] stopped at step {step} (preemption or Ctrl-C): saved; "
                        "rerun the same command to resume"
                    )
                if will_save:
                    self.save(step, state, meta(done))
        if own_progress:
            progress.close()
        return state

    def progress_bar(self, first: int, total: int, description: str | None = None) -> tqdm:
        """The bar of steps ``first .. total`` (shown on process 0 when progress bars are on)."""
        return tqdm(
            total=total,
            initial=first,
            desc=description or self.name,
            dynamic_ncols=True,
            disable=not self.ctx.progress_bar or jax.process_index() != 0,
        )

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> None:
        """A checkpoint of the trainable state, only of finite parameters: a non-finite one
        stops the stage and leaves the last good checkpoint as the one to resume from."""
        if not bool(all_finite(state.params)):
            self.checkpointer.wait()  # the message names the last complete save
            raise TrainingError(
                f"[{self.name}] parameters are not finite at step {step}: stopped without "
                f"saving; the last good checkpoint (step {self.checkpointer.latest_step()}) is "
                f"in {self.checkpointer.directory}; lower the learning rate or check the data, "
                "then rerun to resume from it"
            )
        self.checkpointer.save(step, state.saved(), meta, force=force)

    def log(self, step: int, done: int, metrics: dict, meter, schedule, progress) -> None:
        """Log (and check: a non-finite loss stops before any further save)."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            progress.close()
            self.checkpointer.wait()  # the message names the last complete save
            raise TrainingError(
                f"[{self.name}] loss is {metrics['loss']} at step {step}: stopped; the last "
                f"good checkpoint (step {self.checkpointer.latest_step()}) is in "
                f"{self.checkpointer.directory}; lower the learning rate or check the data, "
                "then rerun to resume from it"
            )
        learning_rate = float(self.trainer.coefficients.learning_rate)
        metrics["learning_rate"] = learning_rate * float(schedule(done - 1))
        metrics.update(meter.read(done))
        self.logger.log(step, metrics)
        progress.set_postfix(_postfix(metrics), refresh=False)


class ThroughputMeter:
    """Real (non-pad) tokens per second between two log points, and model FLOP/s per
    device (``flops_of(batch)``, over padded shapes; see ``sacpo_jax.flops``) with MFU
    when the device's peak is known."""

    def __init__(self, first_step: int, flops_of: Callable[[dict], float]):
        self.tokens, self.since, self.last_step = 0, time.perf_counter(), first_step
        self.flops_of, self.flops = flops_of, 0.0

    def add_tokens(self, batch: dict) -> None:
        self.tokens += real_tokens(batch)
        self.flops += self.flops_of(batch)

    def read(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        rate = self.tokens * jax.process_count() / elapsed
        out = {"tokens_per_second": rate, "tokens_per_second_per_device": rate / jax.device_count()}
        out["step_time"] = elapsed / max(step - self.last_step, 1)
        kind = jax.local_devices()[0].device_kind  # this process's batch on its devices
        out.update(flops.utilisation_metrics(self.flops, elapsed, jax.local_device_count(), kind))
        self.tokens, self.since, self.last_step, self.flops = 0, time.perf_counter(), step, 0.0
        return out


def _postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.4f}"}
    for name in ("rewards/accuracies", "accuracy", "nll"):
        if name in metrics:
            shown[name.split("/")[-1]] = f"{metrics[name]:.3f}"
    shown["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
    return shown
