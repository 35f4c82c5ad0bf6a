"""Every shipped config loads and validates; paper recipes resolve into the paper's chain."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sacpo_jax.config import expand_stages, load_config
from sacpo_jax.training.optim import make_optimizer

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(str(path))
    assert config.stages
    expand_stages(config.stages)  # starts and sweeps resolve


PAPER_RECIPES = [
    "sacpo_pku_7b_gpu.yaml",
    "sacpo_pku_7b_tpu.yaml",
    "sacpo_pku_7b_gpu_official_numerics.yaml",
]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_sacpo_paper_recipe(name):
    path = Path(__file__).resolve().parent.parent / "configs" / name
    config = load_config(str(path))
    stages = {s.name: s for s in expand_stages(config.stages)}
    dpo_h = stages["dpo_h"]
    assert (dpo_h.beta, dpo_h.train.learning_rate, dpo_h.train.epochs) == (0.1, 2e-5, 3)
    assert (dpo_h.data.max_length, dpo_h.data.max_prompt_length) == (512, 128)
    assert dpo_h.train.batch_size == 256 and dpo_h.train.warmup_ratio == 0.03
    realigned = [s for n, s in stages.items() if n.startswith("dpo_s@")]
    assert sorted(s.beta for s in realigned) == [0.01, 0.025, 0.05, 0.1]
    assert all(s.start == "dpo_h" and s.reference == "start" for s in realigned)
    assert all(s.train.batch_size == 64 for s in realigned)
    merges = sorted(s.q for n, s in stages.items() if n.startswith("psacpo@"))
    assert merges == [0.25, 0.5, 0.75]
    assert config.model.compute_dtype == "bfloat16" and config.model.remat


def test_evaluated_models_exist_in_the_chain():
    for path in CONFIGS:
        config = load_config(str(path))
        stages = expand_stages(config.stages)
        known = {"initial"} | {s.name for s in stages}
        for stage in stages:
            if stage.kind == "evaluate":
                assert set(stage.models) <= known, (path.name, set(stage.models) - known)
                assert stage.baseline is None or stage.baseline in stage.models


def adam_moment_dtypes(config, stage) -> set:
    """dtypes of Adam's moments that a stage's optimiser creates for the run's parameters."""
    params = {"w": jnp.zeros((4, 4), config.model.dtype)}
    state = make_optimizer(10, moments_dtype=stage.train.adam_dtype).init(params)
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")))
    return {adam.mu["w"].dtype, adam.nu["w"].dtype}


def test_official_numerics_variant_is_pure_bf16_and_otherwise_the_recipe():
    """The official SACPO runs had bf16 weights and bf16 Adam state; our recipe keeps
    float32 for both. The variant differs from the recipe in nothing else."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    ours = load_config(str(configs / "sacpo_pku_7b_gpu.yaml"))
    official = load_config(str(configs / "sacpo_pku_7b_gpu_official_numerics.yaml"))
    assert (official.model.dtype, official.model.compute_dtype) == ("bfloat16", "bfloat16")
    assert ours.model.dtype == "float32"
    for config, dtype in ((official, jnp.bfloat16), (ours, jnp.float32)):
        for stage in config.stages:
            if getattr(stage, "train", None) is not None:
                assert adam_moment_dtypes(config, stage) == {jnp.dtype(dtype)}, stage.name
    differing = {"name", "model"}
    assert official.model.model_dump(exclude={"dtype"}) == ours.model.model_dump(exclude={"dtype"})
    assert official.model_dump(exclude=differing) == ours.model_dump(exclude=differing)
