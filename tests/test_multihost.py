"""Multi-process training on localhost: 2 processes x 2 CPU devices against 1 process.

Three runs of the same 20-step DPO stage (a tiny random LLaMA saved by transformers,
bundled data) through launch/localhost.py, sharing a persistent compilation cache:
    two      2 processes, 2 devices each, checkpoints at steps 10 and 20;
    one      1 process, 2 devices, uninterrupted;
    resumed  1 process, 2 devices, from the two-process checkpoint of step 10
             (later steps, export and marker removed, as if stopped there).
Same global batch everywhere, so the losses must agree to float32 reduction order.
Each run ends with an evaluate stage that samples from the initial model: generation
with the batch split over both processes gives the one-process texts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import save_causal_lm
from safetensors.numpy import load_file

from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer

pytestmark = pytest.mark.slow  # an end-to-end run: the full suite only

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "localhost.py"
STEPS, STOP = 20, 10

CONFIG = f"""
name: multihost
seed: 0
model: {{path: "{{model}}"}}
tokenizer: {{path: "bundled:oracle"}}
tensorboard: false
progress_bar: false
stages:
  - name: dpo
    kind: dpo
    beta: 0.1
    data: {{source: {{type: bundled, name: preference}}, adapter: pku_helpful,
            max_length: 32, max_prompt_length: 16, limit: 96}}
    train: {{max_steps: {STEPS}, batch_size: 8, learning_rate: 1.0e-2, warmup_ratio: 0.0,
             log_every: 1, save_every: {STOP}, max_checkpoints: 2, keep_checkpoints: true}}
  - name: eval
    kind: evaluate
    models: [initial]
    prompts: {{source: {{type: bundled, name: eval_prompts}}, limit: 6}}
    settings: {{max_new_tokens: 6, temperature: 1.0, elo_trials: 1, stop: sacpo}}
    oracle: true
"""


def _launch(workdir: Path, run_dir: Path, num_processes: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    command = [sys.executable, str(LAUNCHER), "--num-processes", str(num_processes)]
    command += ["--devices-per-process", "2", "--", "--config", str(workdir / "config.yaml")]
    command += [f"run_dir={run_dir}"]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "stages" / "dpo" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{path}: duplicated steps {steps}"
    return {r["step"]: r for r in records}


def _exported(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(run_dir / "stages" / "dpo" / "model" / "model.safetensors")


def _assert_close_params(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    """Adam divides by sqrt(second moment), so float32 reduction-order noise in tiny
    gradients can move single weights by ~1e-5 after 20 steps of lr 1e-2: compare the
    tensor's relative error, and bound every weight well below one step's size."""
    relative = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert relative < 1e-4 and np.abs(actual - expected).max() < 1e-3, (name, relative)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost")
    # A saved model, not model.random: loading compiles nothing, random init would.
    vocab = len(oracle_tokenizer())
    save_causal_lm(
        workdir / "model",
        "mha_untied",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_key_value_heads=2,
    )
    (workdir / "config.yaml").write_text(CONFIG.replace("{model}", str(workdir / "model")))
    two = _launch(workdir, workdir / "two", num_processes=2)
    one = _launch(workdir, workdir / "one", num_processes=1)
    outputs = {"two": _finish(two), "one": _finish(one)}

    resumed = workdir / "resumed"
    shutil.copytree(workdir / "two", resumed)
    stage = resumed / "stages" / "dpo"
    shutil.rmtree(stage / "checkpoints" / str(STEPS))
    shutil.rmtree(stage / "model")
    (stage / "FINISHED.json").unlink()
    (stage / "metrics.jsonl").unlink()
    outputs["resumed"] = _finish(_launch(workdir, resumed, num_processes=1))
    return workdir, outputs


def test_two_processes_match_one_process(runs):
    workdir, outputs = runs
    two, one = _metrics(workdir / "two"), _metrics(workdir / "one")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    losses_two = np.array([two[s]["loss"] for s in range(1, STEPS + 1)])
    losses_one = np.array([one[s]["loss"] for s in range(1, STEPS + 1)])
    assert np.abs(losses_two - losses_one).max() < 1e-5
    assert np.ptp(losses_one) > 0.05  # the runs really trained: the losses moved
    assert "[p0] done" in outputs["two"] and "[p1] done" not in outputs["two"]


def test_every_process_writes_its_checkpoint_shards_and_process_0_exports(runs):
    workdir, _ = runs
    state = workdir / "two" / "stages" / "dpo" / "checkpoints" / str(STOP) / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    two, one = _exported(workdir / "two"), _exported(workdir / "one")
    assert sorted(two) == sorted(one)
    for name in one:
        _assert_close_params(two[name], one[name], name)


def test_two_process_checkpoint_resumes_in_one_process(runs):
    workdir, outputs = runs
    resumed, one = _metrics(workdir / "resumed"), _metrics(workdir / "one")
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1)), outputs["resumed"][-2000:]
    for step in resumed:
        assert abs(resumed[step]["loss"] - one[step]["loss"]) < 1e-5, step
    final_resumed, final_one = _exported(workdir / "resumed"), _exported(workdir / "one")
    for name in final_one:
        _assert_close_params(final_resumed[name], final_one[name], name)


def test_generation_across_processes_matches_one_process(runs):
    workdir, _ = runs
    samples = {
        name: (workdir / name / "stages" / "eval" / "samples.jsonl").read_text()
        for name in ("two", "one")
    }
    assert len(samples["one"].splitlines()) == 6
    assert samples["two"] == samples["one"]
