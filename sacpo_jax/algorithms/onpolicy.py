"""The rounds of an on-policy Lagrangian stage, shared by PPO- and GRPO-Lagrangian.

    for round k = 0 .. K-1:
        sample n responses from the current policy on the round's prompts and score them
            (reward r, cost c); add the algorithm's per-token columns (log-probs, values)
        the multiplier observes the costs (``lagrangian.Multiplier``)
        U = update_epochs * n / batch_size updates on seeded minibatches of the round, each
            under lambda after one more multiplier step (safe-rlhf: lambda, then the actor)
    export the policy

The updates are steps of the one training loop (``TrainingLoop.run``, called once per
round with one progress bar for the stage); lambda reaches them as a batch column, i.e.
as data: changing it never recompiles. Steps count updates: round k's are k*U .. k*U+U-1.

Checkpoints are the loop's (every ``train.save_every`` updates, and at a preemption);
their meta holds {step, multiplier, history}. A rerun resumes at the saved step: inside
a round it reloads the round's samples from ``rounds/<k>.npz`` (kept while a checkpoint
inside that round exists); at a round boundary it samples the round, drawing the same
samples (a pure function of seed, round and policy). SIGTERM while sampling saves the
boundary state and stops. Outputs in the stage directory: ``model/`` (the policy; with
LoRA its adapters merged, and ``adapter/`` in PEFT's format),
``rounds.json`` (each round's estimates), ``lagrangian.png`` (reward, cost, episode cost
and lambda over the updates) and metrics.jsonl.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator

import jax
import numpy as np
import optax
from tqdm import tqdm

from sacpo_jax import checkpoint, plots
from sacpo_jax.algorithms.lagrangian import Multiplier, initial_log_lambda
from sacpo_jax.algorithms.rollouts import (
    load_round,
    prompt_schedule,
    response_texts,
    sample_round,
    sampling_seed,
    save_round,
    score_round,
    token_pass,
)
from sacpo_jax.config import ORACLE, OnPolicyStage, OnPolicyTrain
from sacpo_jax.data.prompts import read_prompts, resolve_template
from sacpo_jax.errors import SacpoError
from sacpo_jax.generate import data_parallel_size
from sacpo_jax.models import transforms
from sacpo_jax.models.llama import Llama
from sacpo_jax.scorers import OracleScorer, ScoreModelScorer, Scorer
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer, TrainingLoop
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.stages import (
    export,
    export_adapter,
    held,
    open_checkpoints,
    open_logger,
    report_disk_use,
)
from sacpo_jax.training.state import TrainState

ROUNDS_DIR = "rounds"
ROUNDS_FILE = "rounds.json"


class OnPolicyError(SacpoError):
    """An on-policy stage that cannot run as configured (a causal LM named as a score
    model, a vocabulary that differs from the policy's, ...); one line."""


def policy_optimizer(train: OnPolicyTrain, total: int) -> optax.GradientTransformation:
    """The policy's AdamW (warmup + cosine) over ``total`` updates."""
    b1, b2 = train.adam_betas
    return make_optimizer(
        total,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        b1=b1,
        b2=b2,
        moments_dtype=train.adam_dtype,
    )


class OnPolicyRun(abc.ABC):
    """One on-policy stage. Subclasses give ``build_trainer`` (the trained state's
    modules and optimiser), ``policy`` (the policy of a state), ``token_pass`` (per-token
    columns of a round) and ``update_columns`` (a round's columns -> the update batches'
    columns, lambda aside)."""

    def __init__(
        self, stage: OnPolicyStage, start: Llama, models: dict[str, Llama], ctx: StageContext
    ):
        self.stage, self.ctx, self.reference = stage, ctx, start
        self.template = resolve_template(ctx.tokenizer, stage.rollout.template)
        self.scorers = [
            self.scorer(stage.reward_model, "reward", models),
            self.scorer(stage.cost_model, "cost", models),
        ]
        self.check_batches()
        p = stage.prompts
        texts = [row["prompt"] for row in read_prompts(p.source, p.field, p.limit)]
        self.prompts, skipped = prompt_schedule(texts, ctx.tokenizer, stage.rollout, ctx.seed)
        if not len(self.prompts):
            raise OnPolicyError(
                f"[{stage.name}] every prompt is longer than rollout.max_prompt_length "
                f"({stage.rollout.max_prompt_length} tokens)"
            )
        if skipped and jax.process_index() == 0:
            print(f"[{stage.name}] left out {skipped} prompts longer than max_prompt_length")
        minibatches = stage.rows_per_round // stage.train.batch_size
        self.updates_per_round = stage.update_epochs * minibatches
        per_round = stage.rollout.prompts_per_round
        self.rounds = stage.rounds or max(
            1, math.ceil(stage.train.epochs * len(self.prompts) / per_round)
        )
        self.total = self.rounds * self.updates_per_round
        self.trainer, self.start_params = self.build_trainer(models)
        self.loop = TrainingLoop(
            stage.name,
            self.trainer,
            stage.train,
            ctx,
            open_checkpoints(ctx, stage.train),
            open_logger(ctx, stage.name),
        )
        self.multiplier = Multiplier(
            initial_log_lambda(stage.lambda_init),
            [],
            stage.threshold,
            stage.lambda_lr,
            stage.lambda_max,
            stage.episode_cost_window,
        )
        self.sampled_rows, self.sampled_tokens, self.started = 0, 0, time.perf_counter()

    # -- subclass hooks ---------------------------------------------------------------

    @abc.abstractmethod
    def build_trainer(self, models: dict[str, Llama]) -> tuple[Trainer, dict]:
        """(trainer of the update steps, parameters of the state's start)."""

    @abc.abstractmethod
    def policy(self, state: TrainState) -> Llama:
        """The policy of a train state."""

    @abc.abstractmethod
    def token_pass(
        self, state: TrainState, input_ids: jax.Array, attention_mask: jax.Array
    ) -> dict[str, jax.Array]:
        """Per-token columns [b, T] of a batch of rollout sequences (log-probs, values)."""

    @abc.abstractmethod
    def update_columns(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A round's columns -> the columns its update batches take (lambda aside)."""

    # -- checks -----------------------------------------------------------------------

    def scorer(self, name: str, kind: str, models: dict[str, Llama]) -> Scorer:
        """The bundled oracle's ``kind``, or a score model checked for the policy."""
        if name == ORACLE:
            return OracleScorer(kind, self.ctx.tokenizer)
        model = models[name]
        self.check_score_model(name, f"{kind}_model", model)
        return ScoreModelScorer(kind, model, self.ctx.tokenizer, self.template)

    def check_score_model(self, name: str, role: str, model: Llama) -> None:
        """A score model whose vocabulary is the policy's, else one line."""
        stage = self.stage.name
        if not model.config.score_model:
            raise OnPolicyError(
                f"[{stage}] {role} '{name}' is a causal LM, not a score model (a reward or "
                "cost stage, or an HF LlamaForSequenceClassification / LlamaModelForScore)"
            )
        ours, theirs = self.reference.config.vocab_size, model.config.vocab_size
        if theirs != ours:
            raise OnPolicyError(
                f"[{stage}] {role} '{name}' has a vocabulary of {theirs} tokens but the policy "
                f"has {ours}: score models must use the policy's tokenizer"
            )

    def check_batches(self) -> None:
        """Update batches split evenly over processes, accumulation steps and devices."""
        train, devices = self.stage.train, data_parallel_size(self.ctx.mesh)
        if train.batch_size % (train.grad_accum * jax.process_count() * devices):
            raise OnPolicyError(
                f"[{self.stage.name}] train.batch_size {train.batch_size} is not a multiple of "
                f"grad_accum x processes x data-parallel devices ({train.grad_accum} x "
                f"{jax.process_count()} x {devices})"
            )

    # -- the rounds -------------------------------------------------------------------

    def run(self) -> Llama:
        with self.loop:
            with self.ctx.preemption as guard:
                state, done, history = self.init_or_restore()
                progress = self.loop.progress_bar(done, self.total)
                try:
                    per_round = self.updates_per_round
                    for k in range(done // per_round, self.rounds):
                        state = self.run_round(
                            k, done - k * per_round, state, history, guard, progress
                        )
                        done = (k + 1) * per_round
                finally:
                    progress.close()
            return self.finish(state, history)

    def init_or_restore(self) -> tuple[TrainState, int, list[dict]]:
        """(state, updates done, per-round history): fresh, or the latest checkpoint."""
        latest = self.loop.checkpointer.latest_step()
        if latest is None:
            return self.trainer.fresh_state(self.start_params), 0, []
        state, meta = self.trainer.restore(self.loop.checkpointer, latest, self.start_params)
        self.multiplier = self.multiplier.restored(meta["multiplier"])
        if jax.process_index() == 0:
            print(f"[{self.stage.name}] resuming after update {meta['step']} of {self.total}")
        return state, int(meta["step"]), list(meta["history"])

    def run_round(
        self, k: int, first: int, state: TrainState, history: list[dict], guard, progress: tqdm
    ) -> TrainState:
        """Round k from its update ``first`` (0: sample it first; else reload its samples)."""
        per_round = self.updates_per_round
        if first == 0:
            columns = self.sample(k, state, history, guard, progress)
        else:
            columns = load_round(self.round_path(k))
        schedule = self.multiplier.schedule(per_round - first)
        start = k * per_round + first

        def meta(done: int) -> dict:
            lam = dataclasses.replace(self.multiplier, log_lambda=schedule[done - start - 1])
            return {"step": done, "multiplier": lam.to_meta(), "history": history}

        state = self.loop.run(
            state,
            self.minibatches(k, self.update_columns(columns), first, schedule),
            first=start,
            total=self.total,
            meta=meta,
            progress=progress,
        )
        self.multiplier.log_lambda = schedule[-1]
        return state

    def sample(
        self, k: int, state: TrainState, history: list[dict], guard, progress: tqdm
    ) -> dict[str, np.ndarray]:
        """Round k's samples, scores and per-token columns; kept on disk for a resume
        inside the round, observed by the multiplier, logged."""
        stage, ctx = self.stage, self.ctx
        step = k * self.updates_per_round

        def stop_if_asked() -> None:
            if guard.should_stop(step):
                meta = {"step": step, "multiplier": self.multiplier.to_meta(), "history": history}
                self.loop.save(step, state, meta, force=True)
                raise checkpoint.Preempted(
                    f"[{stage.name}] stopped while sampling round {k + 1} (preemption or "
                    "Ctrl-C): saved; rerun the same command to resume"
                )

        indices = self.prompts.round_indices(k, stage.rollout.prompts_per_round)
        columns = sample_round(
            self.policy(state),
            ctx.tokenizer,
            self.prompts,
            indices,
            stage.samples_per_prompt,
            stage.rollout,
            seed=sampling_seed(ctx.seed, k),
            mesh=ctx.mesh,
            between_batches=stop_if_asked,
        )
        prompts = [self.prompts.texts[i] for i in np.repeat(indices, stage.samples_per_prompt)]
        scores = score_round(self.scorers, prompts, response_texts(ctx.tokenizer, columns))
        columns["rewards"], columns["costs"] = scores["reward"], scores["cost"]
        columns.update(
            token_pass(
                lambda ids, mask: self.token_pass(state, ids, mask),
                columns,
                stage.rollout.batch_size,
                ctx.mesh,
                stop_if_asked,
            )
        )
        save_round(self.round_path(k), columns)
        self.prune_rounds(k)
        self.multiplier.observe(columns["costs"].tolist())
        record = self.round_record(k, columns)
        history.append(record)
        self.loop.logger.log(step, {n: v for n, v in record.items() if n != "round"})
        self.sampled_rows += len(columns["costs"])
        self.sampled_tokens += int(columns["response_mask"].sum())
        self.show_rates(k, progress)
        return columns

    def round_record(self, k: int, columns: dict[str, np.ndarray]) -> dict:
        """A round's estimates (safe-rlhf's names): mean reward and cost of its samples,
        the episode cost J_c and lambda as the round's updates start, the mean
        KL(pi_old || pi_ref) per response and the mean response length."""
        mask = columns["response_mask"]
        kl = np.sum((columns["old_logps"] - columns["ref_logps"]) * mask, axis=1)
        return {
            "round": k,
            "reward": float(np.mean(columns["rewards"])),
            "cost": float(np.mean(columns["costs"])),
            "episode_cost": self.multiplier.episode_cost,
            "lambda": self.multiplier.value,
            "kl_divergence": float(np.mean(kl)),
            "generated_length": float(np.mean(mask.sum(axis=1))),
        }

    def show_rates(self, k: int, progress: tqdm) -> None:
        """Responses and generated tokens per second of this process's run so far."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        progress.set_description_str(
            f"{self.stage.name} round {k + 1}/{self.rounds} | "
            f"{self.sampled_rows / elapsed:.2f} rollouts/s "
            f"{self.sampled_tokens / elapsed:.0f} generated tok/s",
            refresh=False,
        )

    def minibatches(
        self, k: int, columns: dict[str, np.ndarray], first: int, schedule: list[float]
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, this process's batch) of round k's updates from ``first``: update u takes
        minibatch u mod (n / batch_size) of a seeded permutation per update epoch, with
        lambda = exp(schedule[u - first]) as the ``lagrange_multiplier`` column."""
        rows, size = len(columns["input_ids"]), self.stage.train.batch_size
        per_epoch = rows // size
        for u in range(first, self.updates_per_round):
            epoch, j = divmod(u, per_epoch)
            order = np.random.default_rng([self.ctx.seed, k, 1, epoch]).permutation(rows)
            picked = order[j * size : (j + 1) * size]
            batch = {name: values[picked] for name, values in columns.items()}
            lam = math.exp(schedule[u - first])
            batch["lagrange_multiplier"] = np.full(size, lam, np.float32)
            yield k * self.updates_per_round + u, self.local_rows(batch)

    def local_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's contiguous share of a global batch, [accum, micro, ...] with
        gradient accumulation (the loader's layout)."""
        size, accum = self.stage.train.batch_size, self.stage.train.grad_accum
        local = size // jax.process_count()
        start = jax.process_index() * local
        out = {name: values[start : start + local] for name, values in batch.items()}
        if accum > 1:
            out = {n: v.reshape(accum, local // accum, *v.shape[1:]) for n, v in out.items()}
        return out

    # -- files ------------------------------------------------------------------------

    def round_path(self, k: int) -> str:
        return os.path.join(self.ctx.stage_dir, ROUNDS_DIR, f"{k}.npz")

    def prune_rounds(self, current: int) -> None:
        """Delete kept rounds that no checkpoint can resume into any more."""
        per_round = self.updates_per_round
        steps = self.loop.checkpointer.all_steps()
        needed = {s // per_round for s in steps if s % per_round} | {current}
        directory = os.path.join(self.ctx.stage_dir, ROUNDS_DIR)
        if jax.process_index() != 0 or not os.path.isdir(directory):
            return
        for name in os.listdir(directory):
            stem = name.removesuffix(".npz")
            if stem.isdigit() and int(stem) not in needed:
                os.remove(os.path.join(directory, name))

    def finish(self, state: TrainState, history: list[dict]) -> Llama:
        """Final checkpoint, the policy's export, rounds.json and lagrangian.png, FINISHED."""
        stage, stage_dir = self.stage, self.ctx.stage_dir
        meta = {"step": self.total, "multiplier": self.multiplier.to_meta(), "history": history}
        self.loop.save(self.total, state, meta, force=True)
        policy = self.policy(state)
        if policy.config.lora is not None:
            export_adapter(policy, self.ctx)
        model = transforms.merged(policy)
        export(model, self.ctx, msgpack=stage.train.export_msgpack)
        self.loop.checkpointer.close()
        self.loop.logger.close()
        if jax.process_index() == 0:
            summary = {"threshold": stage.threshold, "rounds": history}
            with open(os.path.join(stage_dir, ROUNDS_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            plots.plot_training_curves(
                {stage.name: self.loop.logger.path},
                os.path.join(stage_dir, "lagrangian.png"),
                keys=("reward", "cost", "episode_cost", "lambda"),
            )
        checkpoint.mark_finished(stage_dir, {"rounds": self.rounds, "updates": self.total})
        if not stage.train.keep_checkpoints and jax.process_index() == 0:
            shutil.rmtree(self.loop.checkpointer.directory, ignore_errors=True)
            shutil.rmtree(os.path.join(stage_dir, ROUNDS_DIR), ignore_errors=True)
        report_disk_use(stage.name, stage_dir)
        return held(model, policy.config.quantize)
