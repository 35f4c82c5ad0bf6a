"""One run: mesh, tokenizer, the initial model, then the stage chain.

``EXECUTORS`` is the one place a stage type meets the code that runs it (looked up along
the type's bases, so a new training kind needs no entry here): training stages go to
``training.stages``, CAID to ``algorithms.caid``, merges combine weights (P-SACPO),
evaluations generate, score and write tables and plots. Every executor writes into
runs/<name>/stages/<stage>/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import yaml

from sacpo_jax import checkpoint, parallel
from sacpo_jax.algorithms.caid import run_caid
from sacpo_jax.algorithms.merge import merge_models, two_model_weights
from sacpo_jax.config import (
    INITIAL,
    ORACLE,
    CaidStage,
    ConfigError,
    EvaluateStage,
    MergeStage,
    RunConfig,
    StageBase,
    SupervisedStage,
)
from sacpo_jax.data.prompts import read_prompts
from sacpo_jax.data.tokenize import load_tokenizer
from sacpo_jax.evaluation import evaluate_models, write_report
from sacpo_jax.models import hf
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import Llama, LlamaConfig, RopeConfig
from sacpo_jax.scorers import OracleScorer, ScoreModelScorer, Scorer
from sacpo_jax.training.chain import ModelStore, run_chain, sweep_series
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.stages import MODEL_DIR, load_export, run_training_stage


def initial_model(config: RunConfig, mesh, tokenizer) -> Llama:
    m = config.model
    options = dict(remat=m.remat, scan_layers=m.scan_layers)
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


def write_resolved_config(config: RunConfig) -> None:
    if jax.process_index() == 0:
        os.makedirs(config.directory, exist_ok=True)
        with open(config.directory / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config.model_dump(mode="json"), f, sort_keys=False)


class Run:
    """A run's shared pieces (config, mesh, tokenizer, expanded stages) and its executors."""

    def __init__(self, config: RunConfig, mesh, tokenizer):
        self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
        self.stages = config.expanded_stages()

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
        )

    def __call__(self, stage: StageBase, store: ModelStore) -> Llama | None:
        for cls in type(stage).__mro__:
            if cls in EXECUTORS:
                return EXECUTORS[cls](self, stage, store)
        raise TypeError(f"no executor for stage type {type(stage).__name__}")

    def train(self, stage: SupervisedStage, store: ModelStore) -> Llama:
        start, reference = store.start_and_reference(stage)
        return run_training_stage(stage, start, reference, self.context(stage))

    def caid(self, stage: CaidStage, store: ModelStore) -> Llama:
        """CAID from the stage's start (pi_ref), scored by the models it names."""
        scorers = {n: store.get(n, stage.name) for n in stage.models if n != ORACLE}
        return run_caid(stage, store.get(stage.start, stage.name), scorers, self.context(stage))

    def merge(self, stage: MergeStage, store: ModelStore) -> Llama:
        ctx = self.context(stage)
        models = [store.get(name, stage.name) for name in stage.models]
        if checkpoint.is_finished(ctx.stage_dir):
            return load_export(ctx, models[0])
        weights = two_model_weights(stage.q) if stage.q is not None else stage.weights
        merged = merge_models(models, weights)
        hf.save_checkpoint(merged, os.path.join(ctx.stage_dir, MODEL_DIR), self.tokenizer)
        mark_finished(ctx.stage_dir, {"models": stage.models, "weights": list(weights)})
        print(f"[{stage.name}] merged {stage.models} with weights {list(weights)}")
        return merged

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
        )
        stages_dir = self.config.directory / "stages"
        logs = {
            name: str(stages_dir / name / "metrics.jsonl") for name in models if name != INITIAL
        }
        paths = write_report(
            results, samples, ctx.stage_dir, series=sweep_series(self.stages), training_logs=logs
        )
        mark_finished(ctx.stage_dir, {"models": list(models)})
        if paths:
            with open(paths["results.md"]) as f:
                print(f"\n[{stage.name}] results ({len(prompts)} prompts):\n{f.read()}")
            print(f"[{stage.name}] wrote " + ", ".join(sorted(paths.values())))
        return None


EXECUTORS: dict[type, Callable[[Run, StageBase, ModelStore], Llama | None]] = {
    SupervisedStage: Run.train,
    CaidStage: Run.caid,
    MergeStage: Run.merge,
    EvaluateStage: Run.evaluate,
}


def mark_finished(stage_dir: str, info: dict) -> None:
    """FINISHED.json for a stage without an Orbax checkpoint (merge, evaluate)."""
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        tmp = os.path.join(stage_dir, ".FINISHED.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(stage_dir, checkpoint.FINISHED_FILE))


def run(config: RunConfig) -> list[StageBase]:
    """Run the whole chain; returns the expanded list of stages."""
    try:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:  # sizes that do not fit the devices: a config error, one line
        raise ConfigError(str(e)) from None
    write_resolved_config(config)
    tokenizer = load_tokenizer(
        config.tokenizer.path or config.model.path,
        trust_remote_code=config.tokenizer.trust_remote_code,
    )
    model = initial_model(config, mesh, tokenizer)
    m = config.model
    store = ModelStore(
        model,
        dict(mesh=mesh, remat=m.remat, scan_layers=m.scan_layers, compute_dtype=m.compute_dtype),
    )
    executor = Run(config, mesh, tokenizer)
    run_chain(executor.stages, store, executor)
    if jax.process_index() == 0:
        print(f"done: every stage's outputs are in {config.directory}/stages/<stage>/")
    return executor.stages
