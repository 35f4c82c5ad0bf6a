"""A training stage end to end: data, reference columns, the loop, evaluation, export.

``run_training_stage`` takes the stage's start model (and its reference, for objectives
that have one) and returns the trained model; the chain (``training.chain``) links
stages into the SACPO schedule. A finished stage (its ``FINISHED.json``, written after
its export) is loaded from its export instead of trained again; the run directory makes
sure that a stage directory only ever holds results of the stage's current settings.

LoRA (``stage.lora``): fresh adapters on the frozen start are the only trainable leaves
(the base gets no optimiser state, is not checkpointed and not donated); an on-the-fly
reference that is the stage's start reads those same frozen arrays, with no adapters: no
second copy of the weights. The stage exports ``adapter/`` (PEFT's format) and
``model/`` (the start with the adapters merged in, in the base's dtype), and its result
is that merged model, quantised again when the start was (QLoRA).

Resume: a checkpoint's meta holds the step; the loader's batch is a pure function of
(seed, step), so a restarted stage sees exactly the batches it would have seen.
Disk: once the stage has exported and marked itself finished, its training checkpoints
are deleted (``train.keep_checkpoints: true`` keeps them); the stage prints its disk use.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
from flax import nnx

from sacpo_jax import checkpoint
from sacpo_jax.config import OnPolicyStage, SupervisedStage, TrainedStage
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.metrics_log import MetricsLogger
from sacpo_jax.models import hf, lora, peft_io, transforms
from sacpo_jax.models.fingerprint import params_fingerprint
from sacpo_jax.models.init import with_score_head
from sacpo_jax.models.llama import Llama
from sacpo_jax.training import objectives
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer, TrainingLoop
from sacpo_jax.training.optim import stage_optimizer
from sacpo_jax.training.reference import OnTheFlyReference, add_reference_columns
from sacpo_jax.training.state import Trainable, TrainState, all_finite, split_model, train_all

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"


def is_finished(ctx: StageContext) -> bool:
    return checkpoint.is_finished(ctx.stage_dir) is not None


def load_export(ctx: StageContext, like: Llama) -> Llama:
    """A stage's exported model, with ``like``'s execution options and storage (quantised
    or not), on the stage's mesh."""
    c = like.config
    return hf.load_checkpoint(
        os.path.join(ctx.stage_dir, MODEL_DIR),
        mesh=ctx.mesh,
        scan_layers=c.scan_layers,
        remat=c.remat,
        compute_dtype=c.dtype,
        quantize=c.quantize,
    )


def held(model: Llama, quantize: str | None) -> Llama:
    """A stage's result as the chain holds it: stored as ``quantize`` (None: as it is)."""
    return model if quantize is None else transforms.quantized(model, quantize)


def with_stage_adapters(stage: TrainedStage | OnPolicyStage, start: Llama, seed: int) -> Llama:
    """The model a stage trains: its start, plus fresh adapters when it has a lora block."""
    if stage.lora is None:
        return start
    return transforms.with_adapters(start, stage.lora.settings(), seed)


def trainable_leaves(stage: TrainedStage | OnPolicyStage, score_model: bool) -> Trainable:
    """Every leaf (full fine-tuning), or the adapters (and score models' heads: a path
    "score_head" or ending in "/score_head", e.g. a PPO critic's)."""
    if stage.lora is None:
        return train_all
    if score_model:
        return lambda name: lora.is_adapter(name) or name.split("/")[-1] == "score_head"
    return lora.is_adapter


def open_checkpoints(ctx: StageContext, train) -> checkpoint.StageCheckpointer:
    return checkpoint.StageCheckpointer(
        os.path.join(ctx.stage_dir, CHECKPOINTS_DIR),
        save_every=train.save_every,
        keep=train.max_checkpoints,
    )


def open_logger(ctx: StageContext, name: str) -> MetricsLogger:
    return MetricsLogger(
        ctx.stage_dir, tensorboard=ctx.tensorboard, wandb_project=ctx.wandb_project, run_name=name
    )


def run_training_stage(
    stage: SupervisedStage, start: Llama, reference: Llama | None, ctx: StageContext
) -> Llama:
    """Train ``stage`` from ``start`` (against ``reference`` where its objective has one);
    returns the trained model."""
    if is_finished(ctx):
        return load_export(ctx, start)
    train = stage.train
    dataset, skipped = build_dataset(stage.data, ctx.tokenizer, cache_dir=ctx.cache_dir)
    eval_dataset = None
    if stage.eval_data is not None:
        eval_dataset, _ = build_dataset(stage.eval_data, ctx.tokenizer, cache_dir=ctx.cache_dir)
    objective = objectives.for_stage(stage, dataset)
    if objective.score_model and not start.config.score_model:
        start = with_score_head(start, ctx.seed)
    policy = with_stage_adapters(stage, start, ctx.seed)
    on_the_fly = None
    if objective.reference is not None and stage.reference_mode == "on_the_fly":
        # With LoRA and the start as reference, these are the policy's frozen arrays.
        on_the_fly = OnTheFlyReference(reference, objective.reference, ctx.mesh)

    def train_loader(dataset):
        return ctx.loader(
            dataset, stage.data, train.batch_size, train=True, grad_accum=train.grad_accum,
            interleave_labels=stage.interleave_labels,
            packing=objective.packs and stage.data.packing,
        )  # fmt: skip

    loader = train_loader(dataset)
    total = train.max_steps or max(1, math.ceil(train.epochs * loader.steps_per_epoch))
    if objective.reference is not None and on_the_fly is None:
        batch = train.eval_batch_size or train.batch_size
        used = np.concatenate([loader.global_indices(step) for step in range(total)])
        dataset = add_reference_columns(
            dataset, stage.data, reference, objective.reference, ctx, batch,
            rows=used, log_every=train.log_every,
        )  # fmt: skip
        loader = train_loader(dataset)
        if eval_dataset is not None:
            eval_dataset = add_reference_columns(
                eval_dataset, stage.eval_data, reference, objective.reference, ctx, batch,
                log_every=train.log_every,
            )  # fmt: skip
    graphdef, params = split_model(policy)
    trainer = Trainer(
        objective,
        graphdef,
        policy.config,
        stage_optimizer(train, total),
        ctx.mesh,
        grad_accum=train.grad_accum,
        reference=on_the_fly,
        trainable=trainable_leaves(stage, objective.score_model),
        seed=ctx.seed,
    )

    def evaluate(model_params: dict) -> dict[str, float]:
        batch = train.eval_batch_size or train.batch_size
        return trainer.evaluate(model_params, eval_dataset, stage.eval_data, ctx, batch)

    loop = TrainingLoop(
        stage.name,
        trainer,
        train,
        ctx,
        open_checkpoints(ctx, train),
        open_logger(ctx, stage.name),
        evaluate if eval_dataset is not None else None,
    )
    latest = loop.checkpointer.latest_step()
    if latest is None:
        state, first = trainer.fresh_state(params), 0
        if skipped:
            report_skipped(loop, skipped)
    else:
        state, meta = trainer.restore(loop.checkpointer, latest, params)
        first = int(meta["step"])
    del params  # the state holds the trained copy now
    with loop:
        state = loop.run(state, loader.iterate(first, total - first), first=first, total=total)
        return finish(loop, state, total)


def report_skipped(loop: TrainingLoop, skipped: dict[str, int]) -> None:
    loop.logger.log(0, {f"data/skipped/{reason}": n for reason, n in skipped.items()})
    if jax.process_index() == 0:
        counts = ", ".join(f"{r}={n}" for r, n in skipped.items())
        print(f"[{loop.name}] skipped rows: {counts}")


def finish(loop: TrainingLoop, state: TrainState, total: int) -> Llama:
    """Final evaluation, final checkpoint, exports (adapter, merged model), FINISHED marker,
    checkpoint cleanup; returns the result as the chain holds it."""
    stage_dir = loop.ctx.stage_dir
    if loop.evaluate is not None:
        results = loop.evaluate(state.model_params())
        loop.logger.log(total, results, prefix="eval/")
        if jax.process_index() == 0:
            with open(os.path.join(stage_dir, "eval.json"), "w") as f:
                json.dump(results, f, indent=2)
    loop.save(total, state, {"step": total}, force=True)
    trained = nnx.merge(loop.trainer.graphdef, state.model_params())
    if trained.config.lora is not None:
        export_adapter(trained, loop.ctx)
    model = transforms.merged(trained)
    export(model, loop.ctx, msgpack=loop.train.export_msgpack)
    loop.checkpointer.close()
    loop.logger.close()
    checkpoint.mark_finished(stage_dir, {"step": total, "fingerprint": params_fingerprint(model)})
    if not loop.train.keep_checkpoints and jax.process_index() == 0:
        shutil.rmtree(loop.checkpointer.directory, ignore_errors=True)
    report_disk_use(loop.name, stage_dir)
    return held(model, trained.config.quantize)


def export(
    model: Llama, ctx: StageContext, directory: str = MODEL_DIR, *, msgpack: bool = False
) -> None:
    """The stage's model in the HF format (``msgpack``: also transformers 4.x Flax), written
    all at once into ``stage_dir/directory``; adapters merged, quantised weights
    dequantised to the base's dtype."""
    model = transforms.merged(model)
    if not bool(all_finite(nnx.state(model, nnx.Param))):
        raise checkpoint.CheckpointError(
            f"{ctx.stage_dir}: the model to export has non-finite parameters; nothing written"
        )
    with checkpoint.atomic_directory(os.path.join(ctx.stage_dir, directory)) as path:
        hf.save_checkpoint(model, path, ctx.tokenizer, msgpack=msgpack)


def export_adapter(model: Llama, ctx: StageContext, directory: str = ADAPTER_DIR) -> None:
    """The model's LoRA adapters in PEFT's format, written all at once into
    ``stage_dir/directory``; their base is the stage's start model."""
    if not bool(all_finite(nnx.state(model, nnx.Param))):
        raise checkpoint.CheckpointError(
            f"{ctx.stage_dir}: the adapters to export are not finite; nothing written"
        )
    with checkpoint.atomic_directory(os.path.join(ctx.stage_dir, directory)) as path:
        peft_io.save_adapter(model, path)


def report_disk_use(name: str, stage_dir: str) -> None:
    if jax.process_index() == 0:
        total = sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(stage_dir)
            for f in files
            if not os.path.islink(os.path.join(root, f))
        )
        print(f"[{name}] done: {total / 2**30:.2f} GiB on disk in {stage_dir}")
