"""The bundled variant grid (configs/variant_grid.yaml) runs end to end through the CLI.

Shortened: a smaller model, a few steps of small batches per training stage, 4 prompts
and 4 new tokens; the chain itself (every variant's stages, merges and the evaluation of
all of them) is the config's. Each training stage logs its steps with a finite loss, and
the evaluation scores every model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sacpo_jax.config import MergeStage, TrainedStage, load_config
from sacpo_jax.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # an end-to-end run of 12 training stages: the full suite only

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "variant_grid.yaml"
STEPS = 2


def shortening(config) -> list[str]:
    overrides = [
        "model.random={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 4, num_key_value_heads: 2, init_std: 0.05}",
        "stages.eval.prompts.limit=4",
        "stages.eval.settings.max_new_tokens=4",
        "stages.eval.settings.elo_trials=1",
    ]
    for stage in config.stages:
        if isinstance(stage, TrainedStage):
            prefix = f"stages.{stage.name}"
            overrides += [
                f"{prefix}.train.max_steps={STEPS}",
                f"{prefix}.train.batch_size=8",
                f"{prefix}.train.log_every=1",
                f"{prefix}.data.limit=32",
            ]
    return overrides


def test_the_grid_runs_through_the_cli(tmp_path):
    config = load_config(str(CONFIG))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable, "-m", "sacpo_jax.train", "--config", str(CONFIG),
        f"run_dir={tmp_path}", "progress_bar=false", "tensorboard=false", *shortening(config),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = config.expanded_stages()
    for stage in stages:
        if isinstance(stage, TrainedStage):
            records = read_metrics(str(tmp_path / "stages" / stage.name / "metrics.jsonl"))
            losses = [r["loss"] for r in records if "loss" in r]
            assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), stage.name
    results = json.loads((tmp_path / "stages" / "eval" / "results.json").read_text())
    trained = [s.name for s in stages if isinstance(s, TrainedStage | MergeStage)]
    assert set(results) == set(trained)
    for name in trained:
        assert math.isfinite(results[name]["mean_reward"]), name
        assert 0.0 <= results[name]["harmless_rate"] <= 1.0, name
    assert (tmp_path / "stages" / "eval" / "frontier.png").stat().st_size > 10_000
