"""One run: mesh, tokenizer, the initial model, then the stage chain.

``EXECUTORS`` is the one place a stage type meets the code that runs it (looked up along
the type's bases, so a new training kind needs no entry here): training stages go to
``training.stages``, CAID to ``algorithms.caid``, merges combine weights (P-SACPO),
evaluations generate, score and write tables and plots. Every executor writes into
runs/<name>/stages/<stage>/.

Before any model is loaded the run takes the run directory's lock, computes every
stage's identity, claims the stage directories (a changed stage's old results move to
``superseded/``, see ``rundir``), and checks what later stages read (prompt sets, the
oracle's prompts). SIGTERM and Ctrl-C stop it at the next safe point of whatever phase
it is in, with everything done so far kept (``Preempted``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax

from sacpo_jax import checkpoint, parallel, usage
from sacpo_jax.algorithms.caid import run_caid
from sacpo_jax.algorithms.grpo_lagrangian import run_grpo_lagrangian
from sacpo_jax.algorithms.merge import merge_models, two_model_weights
from sacpo_jax.algorithms.ppo_lagrangian import run_ppo_lagrangian
from sacpo_jax.checkpoint import Preempted, PreemptionGuard
from sacpo_jax.config import (
    INITIAL,
    ORACLE,
    CaidStage,
    ConfigError,
    EvaluateStage,
    GrpoLagrangianStage,
    MergeStage,
    OnPolicyStage,
    PpoLagrangianStage,
    RunConfig,
    StageBase,
    SupervisedStage,
)
from sacpo_jax.data import oracle_task
from sacpo_jax.data.prompts import read_prompts
from sacpo_jax.data.tokenize import load_tokenizer
from sacpo_jax.evaluation import EvaluationError, evaluate_models, write_report
from sacpo_jax.identity import stage_identities, stage_settings
from sacpo_jax.models import hf
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import Llama, LlamaConfig, RopeConfig
from sacpo_jax.rundir import RunLock, claim_stage_dir, record_config
from sacpo_jax.scorers import OracleScorer, ScoreModelScorer, Scorer
from sacpo_jax.training.chain import ModelStore, run_chain, sweep_series
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.stages import (
    export,
    held,
    load_export,
    report_disk_use,
    run_training_stage,
)


def initial_model(config: RunConfig, mesh, tokenizer) -> Llama:
    m = config.model
    options = dict(remat=m.remat, scan_layers=m.scan_layers, quantize=m.quantize)
    if m.path is not None:
        return hf.load_checkpoint(
            m.path,
            dtype=m.dtype,
            mesh=mesh,
            compute_dtype=m.compute_dtype,
            format=m.format,
            llama_config=m.llama_config,
            **options,
        )
    r = m.random
    dtype = m.dtype or "float32"
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    architecture = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_key_value_heads,
        head_dim=r.head_dim or r.hidden_size // r.num_attention_heads,
        rope=RopeConfig(theta=r.rope_theta),
        tie_word_embeddings=r.tie_word_embeddings,
        param_dtype=dtype,
        dtype=m.compute_dtype or dtype,
        hf_extra_json=json.dumps(token_ids, sort_keys=True),
        **options,
    )
    return init_model(architecture, mesh, seed=config.seed, init_std=r.init_std)


class Run:
    """A run's shared pieces (config, mesh, tokenizer, expanded stages, their identities,
    the preemption guard) and its executors."""

    def __init__(self, config: RunConfig, mesh, tokenizer, guard: PreemptionGuard):
        self.config, self.mesh, self.tokenizer, self.guard = config, mesh, tokenizer, guard
        self.stages = config.expanded_stages()
        self.identities = stage_identities(config, tokenizer)
        self.finished = 0

    def prepare(self) -> None:
        """Record the config, claim every stage directory, check what later stages read."""
        record_config(self.config, self.identities)
        for stage in self.stages:
            claim_stage_dir(
                Path(self.context(stage).stage_dir),
                stage.name,
                self.identities[stage.name],
                stage_settings(stage),
                on_change=self.config.on_change,
            )
        for stage in self.stages:
            prompt_set = stage.prompt_set()
            if prompt_set is not None:
                prompts, scored_by_oracle = prompt_set
                rows = read_prompts(prompts.source, prompts.field, prompts.limit)
                if scored_by_oracle:
                    check_oracle_prompts(stage.name, rows)

    def context(self, stage: StageBase) -> StageContext:
        c = self.config
        return StageContext(
            mesh=self.mesh,
            tokenizer=self.tokenizer,
            stage_dir=str(c.directory / "stages" / stage.name),
            cache_dir=str(c.directory / "cache"),
            seed=c.seed,
            tensorboard=c.tensorboard,
            wandb_project=c.wandb_project,
            progress_bar=c.progress_bar,
            preemption=self.guard,
        )

    def __call__(self, stage: StageBase, store: ModelStore) -> Llama | None:
        executor = next(EXECUTORS[cls] for cls in type(stage).__mro__ if cls in EXECUTORS)
        stage_dir = self.context(stage).stage_dir
        done_before = checkpoint.is_finished(stage_dir) is not None
        started, tokens = time.perf_counter(), usage.generated_tokens()
        try:
            result = executor(self, stage, store)
        finally:  # a preempted stage's share counts too: a rerun adds the rest
            if not done_before and jax.process_index() == 0:
                elapsed = time.perf_counter() - started
                usage.add_usage(stage_dir, elapsed, usage.generated_tokens() - tokens)
        self.finished += 1
        if self.finished < len(self.stages) and self.guard.should_stop(self.finished):
            raise Preempted(
                f"stopped after stage '{stage.name}' (preemption or Ctrl-C): rerun the same "
                "command to continue with the next stage"
            )
        return result

    def train(self, stage: SupervisedStage, store: ModelStore) -> Llama:
        start, reference = store.start_and_reference(stage)
        return run_training_stage(stage, start, reference, self.context(stage))

    def caid(self, stage: CaidStage, store: ModelStore) -> Llama:
        """CAID from the stage's start (pi_ref), scored by the models it names."""
        scorers = {n: store.get(n, stage.name) for n in stage.models if n != ORACLE}
        return run_caid(stage, store.start_of(stage), scorers, self.context(stage))

    def on_policy_models(self, stage: OnPolicyStage, store: ModelStore) -> dict[str, Llama]:
        """The score models (and critics' starts) an on-policy stage names, by name."""
        return {name: store.get(name, stage.name) for name in stage.named_models()}

    def ppo_lagrangian(self, stage: PpoLagrangianStage, store: ModelStore) -> Llama:
        start = store.start_of(stage)
        models = self.on_policy_models(stage, store)
        return run_ppo_lagrangian(stage, start, models, self.context(stage))

    def grpo_lagrangian(self, stage: GrpoLagrangianStage, store: ModelStore) -> Llama:
        start = store.start_of(stage)
        models = self.on_policy_models(stage, store)
        return run_grpo_lagrangian(stage, start, models, self.context(stage))

    def merge(self, stage: MergeStage, store: ModelStore) -> Llama:
        ctx = self.context(stage)
        models = [store.get(name, stage.name) for name in stage.models]
        if checkpoint.is_finished(ctx.stage_dir):
            return load_export(ctx, models[0])
        weights = two_model_weights(stage.q) if stage.q is not None else stage.weights
        merged = merge_models(models, weights)
        export(merged, ctx)
        checkpoint.mark_finished(ctx.stage_dir, {"models": stage.models, "weights": list(weights)})
        print(f"[{stage.name}] merged {stage.models} with weights {list(weights)}")
        report_disk_use(stage.name, ctx.stage_dir)
        return held(merged, models[0].config.quantize)

    def evaluate(self, stage: EvaluateStage, store: ModelStore) -> None:
        ctx = self.context(stage)
        if checkpoint.is_finished(ctx.stage_dir):
            print(f"[{stage.name}] already evaluated: {ctx.stage_dir}/results.md")
            return None
        models = {name: store.get(name, stage.name) for name in stage.models}
        scorers: list[Scorer] = []
        if stage.oracle:
            scorers += [
                OracleScorer("reward", self.tokenizer),
                OracleScorer("cost", self.tokenizer),
            ]
        for name, quantity in ((stage.reward_model, "reward"), (stage.cost_model, "cost")):
            if name:
                score_model = store.get(name, stage.name)
                template = stage.settings.template
                scorers.append(ScoreModelScorer(quantity, score_model, self.tokenizer, template))
        p = stage.prompts
        prompts = read_prompts(p.source, p.field, p.limit)
        results, samples = evaluate_models(
            models,
            self.tokenizer,
            prompts,
            scorers,
            stage.settings,
            baseline=stage.baseline,
            mesh=ctx.mesh,
            store=os.path.join(ctx.stage_dir, "models"),
            should_stop=self.guard.should_stop,
            judge=stage.judge,
            judgments=os.path.join(ctx.stage_dir, "judgments"),
            stop_requested=lambda: self.guard.requested,
        )
        stages_dir = self.config.directory / "stages"
        logs = {
            name: str(stages_dir / name / "metrics.jsonl") for name in models if name != INITIAL
        }
        paths = write_report(
            results, samples, ctx.stage_dir, series=sweep_series(self.stages), training_logs=logs
        )
        paths.update(self.write_usage(stage, ctx.stage_dir))
        checkpoint.mark_finished(ctx.stage_dir, {"models": list(models)})
        if paths:
            with open(paths["results.md"]) as f:
                print(f"\n[{stage.name}] results ({len(prompts)} prompts):\n{f.read()}")
            with open(paths["usage_by_model.md"]) as f:
                print(f"[{stage.name}] what each model cost beyond the baseline:\n{f.read()}")
            print(f"[{stage.name}] wrote " + ", ".join(sorted(paths.values())))
        return None

    def write_usage(self, stage: EvaluateStage, directory: str) -> dict[str, str]:
        """usage_by_model.json and .md: each evaluated model's wall time and generated
        tokens, summed over the stages it was made from (those of the baseline left out)."""
        if jax.process_index() != 0:
            return {}
        sources = {s.name: s.sources() for s in self.stages}
        stages_dir = self.config.directory / "stages"
        cost = usage.lineage_usage(stage.models, sources, stages_dir, stage.baseline)
        names = ("usage_by_model.json", "usage_by_model.md")
        paths = {name: os.path.join(directory, name) for name in names}
        with open(paths["usage_by_model.json"], "w") as f:
            json.dump(cost, f, indent=2)
        with open(paths["usage_by_model.md"], "w") as f:
            f.write(usage.usage_table_markdown(cost) + "\n")
        return paths


EXECUTORS: dict[type, Callable[[Run, StageBase, ModelStore], Llama | None]] = {
    SupervisedStage: Run.train,
    CaidStage: Run.caid,
    PpoLagrangianStage: Run.ppo_lagrangian,
    GrpoLagrangianStage: Run.grpo_lagrangian,
    MergeStage: Run.merge,
    EvaluateStage: Run.evaluate,
}


def check_oracle_prompts(stage: str, prompts: list[dict]) -> None:
    """The oracle scores only the bundled task's prompts: refuse others before training."""
    for index, row in enumerate(prompts):
        try:
            oracle_task.prompt_topic(row["prompt"])
        except oracle_task.OracleTaskError:
            raise EvaluationError(
                f"stage '{stage}': prompt {index} is not one of the bundled task's, which the "
                f"oracle scores ({row['prompt'][:60]!r}); use a reward/cost model instead"
            ) from None


def run(config: RunConfig) -> list[StageBase]:
    """Run the whole chain; returns the expanded list of stages."""
    try:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:  # sizes that do not fit the devices: a config error, one line
        raise ConfigError(str(e)) from None
    with RunLock(config.directory), PreemptionGuard() as guard:
        tokenizer = load_tokenizer(
            config.tokenizer.path or config.model.path,
            trust_remote_code=config.tokenizer.trust_remote_code,
        )
        executor = Run(config, mesh, tokenizer, guard)
        executor.prepare()
        model = initial_model(config, mesh, tokenizer)
        m = config.model
        load_options = dict(
            mesh=mesh,
            remat=m.remat,
            scan_layers=m.scan_layers,
            compute_dtype=m.compute_dtype,
            quantize=m.quantize,
        )
        run_chain(executor.stages, ModelStore(model, load_options), executor)
    if jax.process_index() == 0:
        print(f"done: every stage's outputs are in {config.directory}/stages/<stage>/")
    return executor.stages
