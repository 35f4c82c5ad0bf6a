"""One run: mesh, tokenizer, the initial model, then the stage chain. Used by the CLI.

Stage kinds dispatch here: training kinds (sft, dpo, kto, reward, cost) go to
``run_stage``.
"""

from __future__ import annotations

import os

import jax
import yaml

from sacpo_jax import parallel
from sacpo_jax.config import BUNDLED_TOKENIZER, RunConfig
from sacpo_jax.data.tokenize import load_tokenizer
from sacpo_jax.models import hf
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import LlamaConfig, RopeConfig
from sacpo_jax.training.chain import ModelStore, run_chain
from sacpo_jax.training.runner import StageContext, run_stage


def make_tokenizer(config: RunConfig):
    path = config.tokenizer.path or config.model.path
    if path == BUNDLED_TOKENIZER:
        from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer

        return oracle_tokenizer()
    return load_tokenizer(path, trust_remote_code=config.tokenizer.trust_remote_code)


def initial_model(config: RunConfig, mesh, tokenizer):
    m = config.model
    options = dict(remat=m.remat, scan_layers=m.scan_layers)
    if m.path is not None:
        return hf.load_checkpoint(
            m.path, dtype=m.dtype, mesh=mesh, compute_dtype=m.compute_dtype, **options
        )
    r = m.random
    dtype = m.dtype or "float32"
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
        hf_extra_json=_token_ids_json(tokenizer),
        **options,
    )
    return init_model(architecture, mesh, seed=config.seed, init_std=r.init_std)


def _token_ids_json(tokenizer) -> str:
    import json

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return json.dumps(ids, sort_keys=True)


def write_resolved_config(config: RunConfig) -> None:
    if jax.process_index() == 0:
        os.makedirs(config.directory, exist_ok=True)
        with open(config.directory / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config.model_dump(mode="json"), f, sort_keys=False)


def run(config: RunConfig) -> list:
    """Run the whole chain; returns the expanded list of stages."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    write_resolved_config(config)
    tokenizer = make_tokenizer(config)
    model = initial_model(config, mesh, tokenizer)
    m = config.model
    load_options = dict(
        mesh=mesh, remat=m.remat, scan_layers=m.scan_layers, compute_dtype=m.compute_dtype
    )
    store = ModelStore(model, load_options)

    def run_one(stage, start, reference):
        ctx = StageContext(
            mesh=mesh,
            tokenizer=tokenizer,
            stage_dir=str(config.directory / "stages" / stage.name),
            cache_dir=str(config.directory / "cache"),
            seed=config.seed,
            tensorboard=config.tensorboard,
            wandb_project=config.wandb_project,
            progress_bar=config.progress_bar,
        )
        return run_stage(stage, start, reference, ctx)

    stages = run_chain(config, store, run_one)
    if jax.process_index() == 0:
        print(f"done: results in {config.directory}/stages/<stage>/ (model/, metrics.jsonl)")
    return stages
