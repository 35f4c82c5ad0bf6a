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


def chain(path: Path) -> dict:
    return {s.name: s for s in expand_stages(load_config(str(path)).stages)}


SWEEP = [0.01, 0.025, 0.05, 0.1]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def realigned(stages: dict, name: str) -> list:
    return [s for n, s in stages.items() if n.startswith(f"{name}@beta=")]


def check_kto_h_dpo_s(stages):
    assert stages["kto_h"].kind == "kto" and stages["kto_h"].start == "initial"
    assert stages["kto_h"].data.adapter == "pku_kto_helpful"
    dpo_s = realigned(stages, "dpo_s")
    assert sorted(s.beta for s in dpo_s) == SWEEP
    assert all(s.start == "kto_h" and s.reference == "start" for s in dpo_s)
    assert {s.data.adapter for s in dpo_s} == {"pku_harmless"}


def check_dpo_h_kto_s(stages):
    assert stages["dpo_h"].start == "initial" and stages["dpo_h"].data.adapter == "pku_helpful"
    kto_s = realigned(stages, "kto_s")
    assert sorted(s.beta for s in kto_s) == SWEEP
    for stage in kto_s:  # the paper's KTO(S): TRL's interleaved batches and balancing weight
        assert (stage.kind, stage.start, stage.reference) == ("kto", "dpo_h", "start")
        assert stage.sampling == "interleave" and stage.undesirable_weight == "balanced"
        assert stage.data.adapter == "pku_kto_safety"


def check_dpo_s_dpo_h(stages):
    assert stages["dpo_s"].start == "initial" and stages["dpo_s"].data.adapter == "pku_harmless"
    dpo_h = realigned(stages, "dpo_h")
    assert sorted(s.beta for s in dpo_h) == SWEEP
    assert all(s.start == "dpo_s" and s.data.adapter == "pku_helpful" for s in dpo_h)


def check_dpo_s(stages):
    dpo_s = stages["dpo_s"]
    assert (dpo_s.start, dpo_s.beta, dpo_s.data.adapter) == ("initial", 0.01, "pku_harmless")


def check_naive_merge(stages):
    assert stages["dpo_h"].start == stages["dpo_s"].start == "initial"  # both from SFT
    merges = [s for n, s in stages.items() if n.startswith("naive_merge@")]
    assert sorted(s.q for s in merges) == [0.25, 0.5, 0.75]
    assert all(s.models == ["dpo_h", "dpo_s"] for s in merges)


VARIANTS = {
    "kto_h_dpo_s": check_kto_h_dpo_s,
    "dpo_h_kto_s": check_dpo_h_kto_s,
    "dpo_s_dpo_h": check_dpo_s_dpo_h,
    "dpo_s": check_dpo_s,
    "naive_merge": check_naive_merge,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_recipes_are_the_papers_chain_on_both_platforms(variant):
    reference = chain(CONFIG_DIR / "sacpo_pku_7b_gpu.yaml")["dpo_h"]
    configs = {
        p: load_config(str(CONFIG_DIR / f"{variant}_pku_7b_{p}.yaml")) for p in ("gpu", "tpu")
    }
    for platform, config in configs.items():
        stages = chain(CONFIG_DIR / f"{variant}_pku_7b_{platform}.yaml")
        VARIANTS[variant](stages)
        trained = [s for s in stages.values() if hasattr(s, "train")]
        for stage in trained:  # the paper's optimisation, batch 256 in stage 1, 64 in stage 2
            assert stage.train.model_dump(exclude={"batch_size"}) == reference.train.model_dump(
                exclude={"batch_size"}
            )
            assert stage.train.batch_size in (256, 64)
            assert stage.data.source.name == "PKU-Alignment/PKU-SafeRLHF-30K"
        assert config.model.compute_dtype == "bfloat16" and config.model.remat
        evaluated = {m for s in stages.values() if s.kind == "evaluate" for m in s.models}
        assert evaluated == {"initial"} | {s.name for s in stages.values() if s.yields_policy}
    gpu, tpu = configs["gpu"], configs["tpu"]
    assert (gpu.mesh.fsdp, tpu.mesh.fsdp) == (8, -1)
    differing = {"name", "run_dir", "mesh"}
    assert gpu.model_dump(exclude=differing) == tpu.model_dump(exclude=differing)


def test_safedpo_recipe():
    stages = chain(CONFIG_DIR / "safedpo_pku_7b_gpu.yaml")
    safedpo = stages["safedpo"]
    assert (safedpo.kind, safedpo.start, safedpo.data.adapter) == (
        "safedpo",
        "initial",
        "pku_safedpo",
    )
    assert safedpo.eval_data.source.split == "test"


def test_bundled_variant_grid_holds_every_variant():
    stages = chain(CONFIG_DIR / "variant_grid.yaml")
    assert stages["dpo_h"].start == "sft"
    assert all(s.start == "dpo_h" for s in realigned(stages, "dpo_s"))  # DPO(H)->DPO(S)
    assert stages["psacpo@q=0.5"].models == ["dpo_h", "dpo_s@beta=0.01"]  # P-SACPO
    assert (stages["kto_h"].kind, stages["kto_h"].start) == ("kto", "sft")  # KTO(H)->DPO(S)
    assert (stages["kto_h_dpo_s"].start, stages["kto_h_dpo_s"].data.adapter) == (
        "kto_h",
        "pku_harmless",
    )
    kto_s = stages["dpo_h_kto_s"]  # DPO(H)->KTO(S), the paper's KTO(S) setup
    assert (kto_s.start, kto_s.sampling, kto_s.undesirable_weight) == (
        "dpo_h",
        "interleave",
        "balanced",
    )
    assert stages["dpo_s_only@beta=0.01"].start == "sft"  # DPO(S) alone
    assert stages["dpo_s_dpo_h"].start == "dpo_s_only@beta=0.1"  # DPO(S)->DPO(H)
    assert stages["naive_merge@q=0.5"].models == ["dpo_h", "dpo_s_only@beta=0.01"]
    assert stages["safedpo"].start == "sft"
    evaluated = set(stages["eval"].models)
    assert evaluated == {n for n, s in stages.items() if s.yields_policy}
