"""The embedded demo, shortened, shows the SACPO paper's shape on the oracle's metrics.

Shortened only where it does not change the models kept: the realignment sweep keeps
beta/lambda = 0.01 and 0.1 and the merges keep q = 0.5 (each swept stage starts from the
same DPO(H) model, so these are the demo's own models); SFT and DPO(H) are as in the
demo. Runs the real command line in a subprocess on one CPU device, as a user would.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an end-to-end run: the full suite only

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable, "-m", "sacpo_jax.train", f"run_dir={run_dir}", "progress_bar=false",
        "tensorboard=false", "stages.dpo_s.beta=[0.01, 0.1]", "stages.psacpo.q=[0.5]",
        "stages.eval.settings.elo_trials=2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "results" in done.stdout and str(run_dir) in done.stdout
    eval_dir = run_dir / "stages" / "eval"
    assert (eval_dir / "frontier.png").stat().st_size > 10_000
    assert (eval_dir / "training_curves.png").stat().st_size > 10_000
    return json.loads((eval_dir / "results.json").read_text())


def test_dpo_h_is_more_helpful_and_more_harmful_than_sft(results):
    sft, dpo_h = results["sft"], results["dpo_h"]
    assert dpo_h["mean_reward"] > sft["mean_reward"] + 1.0
    assert dpo_h["mean_cost"] > sft["mean_cost"] + 0.5
    assert dpo_h["harmless_rate"] < sft["harmless_rate"]


def test_realignment_lowers_harm_more_for_smaller_beta_over_lambda(results):
    dpo_h = results["dpo_h"]
    strong, weak = results["dpo_s@beta=0.01"], results["dpo_s@beta=0.1"]
    for realigned in (strong, weak):
        assert realigned["mean_cost"] < dpo_h["mean_cost"] - 1.0
        assert realigned["harmful/harmless_rate"] > dpo_h["harmful/harmless_rate"] + 0.2
    assert strong["mean_cost"] < weak["mean_cost"]
    assert strong["harmless_rate"] > weak["harmless_rate"]


def test_merge_lies_between_its_endpoints(results):
    dpo_h, strong, merged = results["dpo_h"], results["dpo_s@beta=0.01"], results["psacpo@q=0.5"]
    for key in ("mean_cost", "mean_reward"):
        low, high = sorted((dpo_h[key], strong[key]))
        assert low < merged[key] < high, (key, low, merged[key], high)
