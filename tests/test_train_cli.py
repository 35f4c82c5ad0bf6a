"""``python -m sacpo_jax.train``: preemption and kill -9 resumes, the NaN guard, config errors.

The CLI runs in subprocesses on one CPU device, sharing a JAX compilation cache so
that the restarted processes do not compile everything again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from sacpo_jax import train
from sacpo_jax.config import ConfigError, load_config
from sacpo_jax.metrics_log import read_metrics

PAIR_DATA = {
    "source": {"type": "bundled", "name": "preference"},
    "adapter": "pku_helpful",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 128,
}
SFT_DATA = {
    "source": {"type": "bundled", "name": "sft"},
    "adapter": "sft",
    "template": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 128,
}


SFT_STEPS, DPO_STEPS = 40, 60


def chain_config() -> dict:
    """SFT -> DPO on a hidden-32, one-layer model; a checkpoint every 4 / 5 steps."""
    return {
        "name": "cli",
        "seed": 0,
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "model": {
            "random": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "init_std": 0.05,
            }
        },
        "tokenizer": {"path": "bundled:oracle"},
        "tensorboard": False,
        "progress_bar": False,
        "stages": [
            {
                "name": "sft",
                "kind": "sft",
                "data": SFT_DATA,
                "train": {
                    "max_steps": SFT_STEPS,
                    "batch_size": 8,
                    "learning_rate": 3e-3,
                    "log_every": 1,
                    "save_every": 4,
                },
            },
            {
                "name": "dpo",
                "kind": "dpo",
                "beta": 0.1,
                "data": PAIR_DATA,
                "train": {
                    "max_steps": DPO_STEPS,
                    "batch_size": 8,
                    "learning_rate": 1e-3,
                    "log_every": 1,
                    "save_every": 5,
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict:
    """One CPU device (not the 8 forced for in-process tests) and a shared compile cache."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def launch(env: dict, config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(config)]
    command.append(f"run_dir={run_dir}")
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 300) -> int:
    return process.wait(timeout=timeout)


def wait_until(process: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    """Poll ``condition()`` every 10 ms; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def logged_steps(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return [record["step"] for record in read_metrics(str(path))]
    except json.JSONDecodeError:  # a line being written
        return []


def complete_checkpoints(stage_dir: Path) -> list[int]:
    """Orbax renames a step directory to its bare number once every file is written."""
    directory = stage_dir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def model_bytes(run_dir: Path, stage: str) -> bytes:
    return (run_dir / "stages" / stage / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigterm_and_kill_9_resume_to_bit_identical_models(cli_env, tmp_path):
    config = write_config(tmp_path / "chain.yaml", chain_config())
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    log = tmp_path / "log.txt"
    assert finish(launch(cli_env, config, reference_dir, log)) == 0, log.read_text()
    sft_dir, dpo_dir = resumed_dir / "stages" / "sft", resumed_dir / "stages" / "dpo"

    # 1. SIGTERM during the SFT stage: it saves the step it reached and exits 0.
    process = launch(cli_env, config, resumed_dir, log)
    wait_until(process, lambda: max(logged_steps(sft_dir), default=0) >= 6, "SFT step 6")
    process.send_signal(signal.SIGTERM)
    assert finish(process) == 0, log.read_text()
    stopped = int(re.findall(r"\[sft\] preempted at step (\d+)", log.read_text())[-1])
    assert 6 <= stopped < SFT_STEPS
    assert complete_checkpoints(sft_dir)[-1] == stopped
    assert not (sft_dir / "checkpoints" / "FINISHED.json").exists()
    logged_before = len(logged_steps(sft_dir))

    # 2. Restart; kill -9 during the DPO stage, after a checkpoint at step >= 10.
    process = launch(cli_env, config, resumed_dir, log)
    wait_until(process, lambda: max(complete_checkpoints(dpo_dir), default=0) >= 10, "a DPO save")
    process.kill()
    assert finish(process) == -signal.SIGKILL
    assert not (dpo_dir / "checkpoints" / "FINISHED.json").exists()
    last_complete = complete_checkpoints(dpo_dir)[-1]
    assert 10 <= last_complete < DPO_STEPS
    # The restarted SFT stage continued right after the preempted step.
    assert logged_steps(sft_dir)[logged_before] == stopped + 1
    dpo_logged_before = len(logged_steps(dpo_dir))

    # 3. Restart: SFT is finished (loaded from its export), DPO resumes from its last
    # complete checkpoint, and both final models match the uninterrupted run's bytes.
    assert finish(launch(cli_env, config, resumed_dir, log)) == 0, log.read_text()
    assert logged_steps(dpo_dir)[dpo_logged_before] == last_complete + 1
    assert logged_steps(dpo_dir)[-1] == DPO_STEPS
    for stage in ("sft", "dpo"):
        assert model_bytes(resumed_dir, stage) == model_bytes(reference_dir, stage)


def test_nan_loss_stops_with_exit_code_1_and_leaves_a_finite_checkpoint(cli_env, tmp_path):
    config = chain_config()
    config["stages"] = config["stages"][:1]
    config["stages"][0]["train"].update(learning_rate=1e30, warmup_ratio=0.0, save_every=1)
    path = write_config(tmp_path / "nan.yaml", config)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(path), f"run_dir={run_dir}"]
    result = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    match = re.fullmatch(
        r"error: \[sft\] loss is (nan|inf) at step (\d+): stopped; the last good checkpoint "
        r"\(step (\d+)\) is in (\S+); lower the learning rate or check the data, then rerun "
        r"to resume from it",
        line,
    )
    assert match, line
    failed, last_good = int(match[2]), int(match[3])
    stage_dir = run_dir / "stages" / "sft"
    assert Path(match[4]) == (stage_dir / "checkpoints").absolute()
    # The step before the failing one was checked and saved; nothing after it.
    assert last_good == failed - 1 == complete_checkpoints(stage_dir)[-1]
    assert not (stage_dir / "model").exists()
    restored = ocp.StandardCheckpointer().restore(
        stage_dir / "checkpoints" / str(last_good) / "state"
    )
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(restored["params"])]
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)


# ----------------------------------------------------------------------------- config errors

CONFIG_ERRORS = [
    (
        ["stages.0.train.max_stepz=3"],
        "unknown key 'stages.0.train.max_stepz'; did you mean 'max_steps'?",
    ),
    (["sead=1"], "unknown key 'sead'; did you mean 'seed'?"),
    (["stages.dpo.beta_=0.2"], "unknown key 'stages.1.beta_'; did you mean 'beta'?"),
    (
        ["stages.0.train.batch_size=abc"],
        "stages.0.train.batch_size: Input should be a valid integer, unable to parse string as "
        "an integer (got 'abc')",
    ),
    (
        ["stages.dpo.beta=[0.1, high]"],
        "stages.1.beta: Input should be a valid number",
    ),
    (
        ["model={path: /nonexistent/model}"],
        "model.path: /nonexistent/model: no such model directory",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_load_config_names_the_bad_key_in_one_line(tmp_path, overrides, message):
    path = write_config(tmp_path / "run.yaml", chain_config())
    with pytest.raises(ConfigError) as error:
        load_config(str(path), overrides)
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {message}")
    assert load_config(str(path), []).stages[1].name == "dpo"  # the file itself is valid


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file \S+nope\.yaml not found$"):
        load_config(str(tmp_path / "nope.yaml"))


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = train.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys, overrides, message):
    path = write_config(tmp_path / "run.yaml", chain_config())
    code, lines = run_main(["--config", str(path), f"run_dir={tmp_path}/run", *overrides], capsys)
    assert code == 2
    (line,) = lines
    assert line.startswith(f"error: {path}: {message}")


def test_cli_missing_files_exit_2_with_one_line(tmp_path, capsys):
    code, lines = run_main(["--config", str(tmp_path / "absent.yaml")], capsys)
    assert (code, lines) == (2, [f"error: config file {tmp_path / 'absent.yaml'} not found"])

    # A data file that does not exist is found when its stage reads it.
    path = write_config(tmp_path / "run.yaml", chain_config())
    missing = tmp_path / "absent.jsonl"
    source = f"stages.sft.data.source={{type: jsonl, path: {missing}}}"
    code, lines = run_main(
        ["--config", str(path), f"run_dir={tmp_path}/run", "mesh.fsdp=-1", source], capsys
    )
    assert code == 2
    (line,) = lines
    assert line.startswith(f"error: {missing}: cannot read file")

    # A mesh that does not fit the devices (8 here).
    code, lines = run_main(
        ["--config", str(path), f"run_dir={tmp_path}/run", "mesh.data=3"], capsys
    )
    assert code == 2
    (line,) = lines
    assert (
        line
        == "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, but 8 are available"
    )


def test_cli_entry_point_exit_code_and_stderr(cli_env, tmp_path):
    path = write_config(tmp_path / "run.yaml", chain_config())
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(path), "sead=1"]
    result = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {path}: unknown key 'sead'; did you mean 'seed'?"
    ]
