"""One run: mesh, tokenizer, the initial model, then the stage chain. Used by the CLI.

Each stage kind has an executor here: training kinds (sft, dpo, kto, reward, cost) go
to ``run_stage``; ``caid`` runs iterative dualization (``sacpo_jax.algorithms.caid``);
``merge`` combines weights (P-SACPO); ``evaluate`` generates, scores
and writes tables and plots. Every executor writes into runs/<name>/stages/<stage>/.
"""

from __future__ import annotations

import json
import os

import jax
import yaml

from sacpo_jax import checkpoint, parallel
from sacpo_jax.algorithms.merge import merge_models, two_model_weights
from sacpo_jax.config import BUNDLED_TOKENIZER, TRAINING_KINDS, ConfigError, RunConfig
from sacpo_jax.data.tokenize import load_tokenizer
from sacpo_jax.models import hf
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import Llama, LlamaConfig, RopeConfig
from sacpo_jax.training.chain import INITIAL, ModelStore, expand_sweeps, run_chain, sweep_series
from sacpo_jax.training.runner import MODEL_DIR, StageContext, load_finished, run_stage


def tokenizer_from_path(path: str, trust_remote_code: bool = False):
    """A tokenizer directory or hub id, or ``bundled:oracle`` for the bundled task's."""
    if path == BUNDLED_TOKENIZER:
        from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer

        return oracle_tokenizer()
    return load_tokenizer(hf.resolve_model_dir(path), trust_remote_code=trust_remote_code)


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


class Executors:
    """Runs one stage of any kind against the shared model store."""

    def __init__(self, config: RunConfig, mesh, tokenizer):
        self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
        self.series = sweep_series(expand_sweeps(config.stages))

    def context(self, stage) -> StageContext:
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

    def __call__(self, stage, store: ModelStore) -> Llama | None:
        if stage.kind == "caid":
            return self.caid(stage, store)
        if stage.kind in TRAINING_KINDS:
            start, reference = store.start_and_reference(stage)
            return run_stage(stage, start, reference, self.context(stage))
        if stage.kind == "merge":
            return self.merge(stage, store)
        return self.evaluate(stage, store)

    def caid(self, stage, store: ModelStore) -> Llama:
        """CAID from the stage's start (pi_ref), scored by the models it names."""
        from sacpo_jax.algorithms.caid import ORACLE, run_caid

        scorers = {n: store.get(n, stage.name) for n in stage.models if n != ORACLE}
        return run_caid(stage, store.get(stage.start, stage.name), scorers, self.context(stage))

    def merge(self, stage, store: ModelStore) -> Llama:
        ctx = self.context(stage)
        models = [store.get(name, stage.name) for name in stage.models]
        if checkpoint.is_finished(ctx.stage_dir):
            return load_finished(ctx, models[0])
        weights = two_model_weights(stage.q) if stage.q is not None else stage.weights
        merged = merge_models(models, weights)
        hf.save_checkpoint(merged, os.path.join(ctx.stage_dir, MODEL_DIR), self.tokenizer)
        mark_finished(ctx.stage_dir, {"models": stage.models, "weights": list(weights)})
        print(f"[{stage.name}] merged {stage.models} with weights {list(weights)}")
        return merged

    def evaluate(self, stage, store: ModelStore) -> None:
        from sacpo_jax import evaluate

        ctx = self.context(stage)
        if checkpoint.is_finished(ctx.stage_dir):
            print(f"[{stage.name}] already evaluated: {ctx.stage_dir}/results.md")
            return None
        models = {name: store.get(name, stage.name) for name in stage.models}
        scorers = [evaluate.oracle_scorer] if stage.oracle else []
        for name, key in ((stage.reward_model, "reward"), (stage.cost_model, "cost")):
            if name:
                score_model = store.get(name, stage.name)
                template = stage.settings.template
                scorers.append(evaluate.model_scorer(score_model, self.tokenizer, key, template))
        prompts = evaluate.read_prompts(
            stage.prompts.source, stage.prompts.field, stage.prompts.limit
        )
        results, samples = evaluate.evaluate_models(
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
        paths = evaluate.write_report(
            results, samples, ctx.stage_dir, series=self.series, training_logs=logs
        )
        mark_finished(ctx.stage_dir, {"models": list(models)})
        if paths:
            with open(paths["results.md"]) as f:
                print(f"\n[{stage.name}] results ({len(prompts)} prompts):\n{f.read()}")
            print(f"[{stage.name}] wrote " + ", ".join(sorted(paths.values())))
        return None


def mark_finished(stage_dir: str, info: dict) -> None:
    """FINISHED.json for a stage without an Orbax checkpoint (merge, evaluate)."""
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        tmp = os.path.join(stage_dir, ".FINISHED.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(stage_dir, checkpoint.FINISHED_FILE))


def run(config: RunConfig) -> list:
    """Run the whole chain; returns the expanded list of stages."""
    try:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as e:  # sizes that do not fit the devices: a config error, one line
        raise ConfigError(str(e)) from None
    write_resolved_config(config)
    tokenizer = tokenizer_from_path(
        config.tokenizer.path or config.model.path, config.tokenizer.trust_remote_code
    )
    model = initial_model(config, mesh, tokenizer)
    m = config.model
    store = ModelStore(
        model,
        dict(mesh=mesh, remat=m.remat, scan_layers=m.scan_layers, compute_dtype=m.compute_dtype),
    )
    stages = expand_sweeps(config.stages)
    run_chain(stages, store, Executors(config, mesh, tokenizer))
    if jax.process_index() == 0:
        print(f"done: every stage's outputs are in {config.directory}/stages/<stage>/")
    return stages
