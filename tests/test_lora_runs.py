"""LoRA through the command line on the bundled task: the SACPO chain of
configs/demo_lora.yaml shows the demo's shape, and a CAID run with LoRA (and LoRA reward
and cost models) completes, with PEFT adapters that PEFT loads onto each stage's start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from fixtures_models import torch_logits

pytestmark = pytest.mark.slow  # end-to-end runs: the full suite only

ROOT = Path(__file__).resolve().parent.parent
LORA = {"rank": 8, "alpha": 16, "dropout": 0.05}


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "sacpo_jax.train", *arguments]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def sacpo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo_lora")
    run_cli(
        [
            "--config", "configs/demo_lora.yaml", f"run_dir={run_dir}", "progress_bar=false",
            "tensorboard=false", "stages.dpo_s.beta=[0.01, 0.1]", "stages.psacpo.q=[0.5]",
            "stages.eval.settings.elo_trials=2",
        ]
    )  # fmt: skip
    return run_dir, json.loads((run_dir / "stages" / "eval" / "results.json").read_text())


def test_lora_sacpo_chain_shows_the_demo_shape(sacpo):
    _, results = sacpo
    sft, dpo_h = results["sft"], results["dpo_h"]
    assert dpo_h["mean_reward"] > sft["mean_reward"] + 1.0  # more helpful ...
    assert dpo_h["mean_cost"] > sft["mean_cost"] + 0.5  # ... and more harmful than SFT
    strong, weak = results["dpo_s@beta=0.01"], results["dpo_s@beta=0.1"]
    for realigned in (strong, weak):  # realignment lowers harm
        assert realigned["mean_cost"] < dpo_h["mean_cost"] - 1.0
        assert realigned["harmful/harmless_rate"] > dpo_h["harmful/harmless_rate"] + 0.2
    assert strong["mean_cost"] < weak["mean_cost"]  # the more, the smaller beta/lambda
    merged = results["psacpo@q=0.5"]
    low, high = sorted((dpo_h["mean_cost"], results["dpo_s@beta=0.01"]["mean_cost"]))
    assert low < merged["mean_cost"] < high


def test_each_lora_stage_exports_an_adapter_that_peft_loads_on_its_start(sacpo):
    run_dir, _ = sacpo
    stages = run_dir / "stages"
    for stage, start in (("dpo_h", "sft"), ("dpo_s@beta=0.01", "dpo_h")):
        config = json.loads((stages / stage / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 8 and len(config["target_modules"]) == 7
        base = transformers.LlamaForCausalLM.from_pretrained(stages / start / "model")
        ids = np.random.default_rng(0).integers(3, base.config.vocab_size, (2, 12))
        mask = np.ones_like(ids)
        adapted = peft.PeftModel.from_pretrained(base, stages / stage / "adapter")
        merged = transformers.LlamaForCausalLM.from_pretrained(stages / stage / "model")
        np.testing.assert_allclose(
            torch_logits(adapted, ids, mask), torch_logits(merged, ids, mask), atol=1e-4
        )
    assert not (stages / "sft" / "adapter").exists()  # SFT trained the full model


@pytest.fixture(scope="module")
def caid(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("caid_lora")
    with open(ROOT / "configs" / "caid_demo.yaml") as f:
        config = yaml.safe_load(f)
    stages = {stage["name"]: stage for stage in config["stages"]}
    for name in ("reward", "cost", "caid"):
        stages[name]["lora"] = LORA
        stages[name]["train"]["learning_rate"] = 1.0e-2
    stages["caid"]["iterations"] = 2
    config.update(run_dir=str(run_dir), progress_bar=False, tensorboard=False)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_cli(["--config", str(path)])
    return run_dir


def test_a_caid_run_with_lora_completes(caid):
    stage = caid / "stages" / "caid"
    history = json.loads((stage / "caid_history.json").read_text())
    assert [h["iteration"] for h in history["history"]] == [0, 1, 2]
    for t in (1, 2):
        assert (stage / "iterates" / str(t) / "config.json").is_file()
        assert (stage / "adapters" / str(t) / "adapter_model.safetensors").is_file()
    assert (stage / "adapter" / "adapter_config.json").is_file()
    assert (stage / "model" / "config.json").is_file()
    assert (caid / "stages" / "eval" / "results.md").is_file()


def test_a_lora_reward_model_adapter_loads_in_peft_with_its_head(caid):
    stages = caid / "stages"
    config = json.loads((stages / "reward" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.LlamaForSequenceClassification.from_pretrained(
        stages / "sft" / "model", num_labels=1
    )
    adapted = peft.PeftModel.from_pretrained(base, stages / "reward" / "adapter").eval()
    exported = transformers.LlamaForSequenceClassification.from_pretrained(
        stages / "reward" / "model"
    ).eval()
    ids = np.random.default_rng(1).integers(3, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        scores = adapted(input_ids=torch.as_tensor(ids)).logits.numpy()
        expected = exported(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-4)
