"""Every shipped config loads and validates; paper recipes resolve into the paper's chain."""

from pathlib import Path

import pytest

from sacpo_jax.config import expand_stages, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(str(path))
    assert config.stages
    expand_stages(config.stages)  # starts and sweeps resolve


@pytest.mark.parametrize("name", ["sacpo_pku_7b_gpu.yaml", "sacpo_pku_7b_tpu.yaml"])
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
