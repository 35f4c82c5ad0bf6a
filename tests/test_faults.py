"""Faults a careless user or a cluster inflicts, through the command line (in-process, tiny
models): stale results, bad files, bad rows, preemption in every phase, two runs on one
directory, non-finite weights, a full or read-only disk.

Each case asserts the exit code, one stderr line that names the file, row or field, that
nothing is lost (an interrupted and resumed run ends bit-identical to an uninterrupted
one) and that nothing stale is reused (a changed rerun gives the changed result).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sacpo_jax import checkpoint, evaluation, train
from sacpo_jax.data.oracle_tokenizer import save_oracle_tokenizer
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.models import hf
from sacpo_jax.training import loop, reference

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer  # noqa: E402

TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def data(name: str, adapter: str, limit: int = 16, **extra) -> dict:
    spec = {"source": {"type": "bundled", "name": name}, "adapter": adapter}
    return {**spec, "max_length": 32, "max_prompt_length": 16, "limit": limit, **extra}


def train_settings(steps: int) -> dict:
    return {"max_steps": steps, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0,
            "log_every": 1, "save_every": 2}  # fmt: skip


def chain(run_dir: Path, *, evaluate: bool = False) -> dict:
    """SFT -> DPO (precomputed reference) [-> evaluation of both on 4 prompts]."""
    stages = [
        {"name": "sft", "kind": "sft", "data": data("sft", "sft", template=TEMPLATE),
         "train": train_settings(4)},
        {"name": "dpo", "kind": "dpo", "beta": 0.1, "data": data("preference", "pku_helpful"),
         "train": train_settings(4)},
    ]  # fmt: skip
    if evaluate:
        stages.append(
            {"name": "eval", "kind": "evaluate", "models": ["sft", "dpo"], "oracle": True,
             "prompts": {"source": {"type": "bundled", "name": "eval_prompts"}, "limit": 4},
             "settings": {"max_new_tokens": 4, "elo_trials": 1}}
        )  # fmt: skip
    return {
        "name": "faults",
        "run_dir": str(run_dir),
        "model": {"random": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 2}},
        "tokenizer": {"path": "bundled:oracle"},
        "tensorboard": False,
        "progress_bar": False,
        "stages": stages,
    }  # fmt: skip


def run_cli(config: dict, capsys, *overrides: str) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of ``python -m sacpo_jax.train`` in this process."""
    path = Path(config["run_dir"]).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    code = train.main(["--config", str(path), *overrides])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def model_bytes(run_dir: Path, stage: str) -> bytes:
    return (run_dir / "stages" / stage / "model" / "model.safetensors").read_bytes()


def leftovers(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if ".tmp" in p.name]


def signal_on_call(target, name: str, call: int, monkeypatch, signum=signal.SIGTERM):
    """Patch ``target.name`` to send this process ``signum`` when it is called the
    ``call``-th time (1-based), then to behave as before."""
    original = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


# ----------------------------------------------------------------------------- 1. no stale reuse


@pytest.mark.slow
def test_a_changed_stage_runs_again_and_the_rest_is_reused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(chain(run_dir), capsys)[0] == 0
    sft_log = (run_dir / "stages/sft/metrics.jsonl").read_bytes()
    first_dpo = model_bytes(run_dir, "dpo")
    assert not (run_dir / "stages/dpo/checkpoints").exists()  # deleted once exported

    code, err, out = run_cli(chain(run_dir), capsys, "stages.dpo.beta=0.3")
    assert (code, err) == (0, [])
    assert "[dpo] changed since the last run (beta: 0.1 -> 0.3)" in out
    assert "[sft]" not in out.replace("[sft] done", "")  # sft was reused, not retrained
    assert (run_dir / "stages/sft/metrics.jsonl").read_bytes() == sft_log
    assert model_bytes(run_dir, "dpo") != first_dpo
    (old,) = (run_dir / "superseded").iterdir()
    assert old.name.startswith("dpo@") and (old / "model/model.safetensors").read_bytes() == (
        first_dpo
    )
    assert len(list((run_dir / "history").glob("*.yaml"))) == 2

    # The changed rerun gave the right result: a fresh run with beta 0.3.
    fresh = tmp_path / "fresh"
    assert run_cli(chain(fresh), capsys, "stages.dpo.beta=0.3")[0] == 0
    assert model_bytes(run_dir, "dpo") == model_bytes(fresh, "dpo")

    # Strictness: refuse, in one line, before any compute.
    code, err, _ = run_cli(
        chain(run_dir), capsys, "stages.sft.train.learning_rate=0.001", "on_change=refuse"
    )
    assert code == 2 and len(err) == 1
    assert "stage 'sft' changed since the last run" in err[0]
    assert "train.learning_rate: 0.003 -> 0.001" in err[0]


# ----------------------------------------------------------------------------- 2. one line


def saved_model(directory: Path) -> Path:
    from sacpo_jax import parallel
    from sacpo_jax.models.init import init_model
    from sacpo_jax.models.llama import tiny_config

    model = init_model(tiny_config(vocab_size=64), parallel.make_mesh(), seed=0)
    hf.save_checkpoint(model, str(directory))
    save_oracle_tokenizer(str(directory / "tokenizer"))
    return directory


def corrupt_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def huge_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])


def unknown_dtype(path: Path) -> None:
    corrupt_header(path, lambda header: header["lm_head.weight"].update(dtype="F8_E9"))


def index_without_map(path: Path) -> None:
    (path.parent / "model.safetensors.index.json").write_text('{"metadata": {}}')


def index_outside(path: Path) -> None:
    index = {"weight_map": {"lm_head.weight": "../../../etc/passwd"}}
    (path.parent / "model.safetensors.index.json").write_text(json.dumps(index))


def wrong_field_type(path: Path) -> None:
    config = json.loads((path.parent / "config.json").read_text())
    config["hidden_size"] = "large"
    (path.parent / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (truncate, "model.safetensors: tensor"),
        (huge_header, "header length 1000000000000 runs past the end of the file"),
        (unknown_dtype, "tensor lm_head.weight has unsupported dtype F8_E9"),
        (index_without_map, "model.safetensors.index.json: no weight_map"),
        (index_outside, "shard '../../../etc/passwd' is outside the model directory"),
        (wrong_field_type, "config.json: a field has a wrong type or value"),
    ],
)
def test_a_broken_checkpoint_is_one_line(tmp_path, capsys, damage, fragment):
    model = saved_model(tmp_path / "model")
    damage(model / "model.safetensors")
    config = chain(tmp_path / "run")
    config["model"] = {"path": str(model)}
    config["tokenizer"] = {"path": "bundled:oracle"}
    code, err, _ = run_cli(config, capsys)
    assert code == 2 and len(err) == 1, err
    assert fragment in err[0]


def test_a_tokenizer_that_asks_for_remote_code_is_one_line(tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["custom.Tok", None]}, "tokenizer_class": "Tok"})
    )
    (tokenizer / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    config = chain(tmp_path / "run")
    config["tokenizer"] = {"path": str(tokenizer)}
    code, err, _ = run_cli(config, capsys)
    assert code == 2 and len(err) == 1
    assert f"{tokenizer}: cannot load a tokenizer" in err[0] and "custom code" in err[0]


def test_problems_of_later_stages_stop_the_run_before_it_trains(tmp_path, capsys):
    config = chain(tmp_path / "run", evaluate=True)
    code, err, _ = run_cli(config, capsys, "stages.eval.prompts.field=question")
    assert code == 2 and err == ["error: bundled:eval_prompts:train: row 0: field 'question': "
                                 "missing or empty"]  # fmt: skip
    rows = tmp_path / "foreign.jsonl"
    rows.write_text('{"prompt": "Write a poem about the sea"}\n')
    code, err, _ = run_cli(
        config, capsys, f"stages.eval.prompts.source={{type: jsonl, path: {rows}}}"
    )
    assert code == 2 and len(err) == 1 and "prompt 0 is not one of the bundled task's" in err[0]
    assert not (tmp_path / "run/stages/sft/metrics.jsonl").exists()  # nothing trained


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    code, err, _ = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 2 and len(err) == 1 and "cannot use as a run directory" in err[0]


def test_fewer_usable_rows_than_one_batch_is_one_line(tmp_path, capsys):
    code, err, _ = run_cli(chain(tmp_path / "run"), capsys, "stages.sft.data.limit=4")
    assert (
        code == 2
        and len(err) == 1
        and "4 usable examples cannot fill one batch of 8 (train.batch_size)" in err[0]
    )


# ----------------------------------------------------------------------------- 3. skip means skip


def test_skip_covers_rows_the_reader_cannot_read(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a b", "rejected": "c d"})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                good.encode(),
                b"",  # blank: not a row, but a line
                b'["a list"]',
                b'{"prompt": "caf\xe9"}',
                good.encode(),
                good.encode()[:-5],  # truncated last line, no newline
            ]
        )
    )
    spec = {"source": {"type": "jsonl", "path": str(path)}, "adapter": "pair", "max_length": 32,
            "max_prompt_length": 16}  # fmt: skip
    tokenizer = bpe_tokenizer(tmp_path / "bpe")
    dataset, report = build_dataset(DataSpec(**spec, on_bad_row="skip"), tokenizer)
    assert len(dataset) == 2
    assert report == {"not_an_object": 1, "not_utf8": 1, "invalid_json": 1}
    from sacpo_jax.data.errors import DataError

    with pytest.raises(DataError, match=r"rows\.jsonl: line 3: a row must be a JSON object$"):
        build_dataset(DataSpec(**spec, on_bad_row="error"), tokenizer)


# ----------------------------------------------------------------------------- 4. preemption


@pytest.mark.slow
def test_every_phase_stops_cleanly_and_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    expected = tmp_path / "uninterrupted"
    assert run_cli(chain(expected, evaluate=True), capsys)[0] == 0
    run_dir = tmp_path / "interrupted"
    config = chain(run_dir, evaluate=True)
    stops = []

    def interrupted(target, name: str, call: int) -> str:
        with monkeypatch.context() as patch:
            signal_on_call(target, name, call, patch)
            code, err, out = run_cli(config, capsys)
        assert code == 75 and len(err) == 1, err
        stops.append(err[0])
        return out

    # SFT training (step 3: the checkpoint of step 2 is kept, step 3 saved on the way out).
    interrupted(loop.Trainer, "step", 3)
    # The SFT export: it completes, and the run stops at the stage boundary.
    interrupted(hf, "save_checkpoint", 1)
    # The DPO reference pass, after its first batch of 8 of 16 rows.
    interrupted(reference, "make_reference_step", 1)
    # Evaluation, after the first of its two models; the reference pass scored only the
    # 8 rows it had not stored.
    out = interrupted(evaluation, "generate_responses", 1)
    assert "[dpo] reference log-probs: 8/8 rows" in out
    assert run_cli(config, capsys)[0] == 0

    assert "stopped at step 3" in stops[0] and "rerun the same command" in stops[0]
    assert "stopped after stage 'sft'" in stops[1]
    assert "stopped in the reference pass (8/16 rows stored)" in stops[2]
    assert "stopped after 1 of 2 models" in stops[3]
    for stage in ("sft", "dpo"):
        assert model_bytes(run_dir, stage) == model_bytes(expected, stage)
    results = [
        json.loads((d / "stages/eval/results.json").read_text()) for d in (run_dir, expected)
    ]
    assert results[0] == results[1]
    assert leftovers(run_dir) == []


def test_a_second_ctrl_c_stops_at_once(tmp_path, capsys, monkeypatch):
    original = loop.Trainer.step

    def twice(self, *args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return original(self, *args)

    monkeypatch.setattr(loop.Trainer, "step", twice)
    code, err, _ = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 130 and err == ["error: interrupted by a second Ctrl-C; rerun to resume"]


@pytest.mark.slow
def test_two_runs_on_one_directory(tmp_path):
    config = chain(tmp_path / "run")
    config["stages"][0]["train"]["max_steps"] = 30
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(path)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    lock = tmp_path / "run" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"error: {tmp_path / 'run'} is in use by {lock.read_text()}; wait for that run to end "
        "or set another run_dir"
    ]
    assert first.wait(timeout=600) == 0, first.stderr
    solo = tmp_path / "solo"
    config["run_dir"] = str(solo)
    (tmp_path / "solo.yaml").write_text(yaml.safe_dump(config))
    command[-1] = str(tmp_path / "solo.yaml")
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == 0
    for stage in ("sft", "dpo"):
        assert model_bytes(tmp_path / "run", stage) == model_bytes(solo, stage)


# ----------------------------------------------------------------------------- finite, disk


def test_non_finite_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    import jax.numpy as jnp

    original = loop.Trainer.step
    calls = []

    def poisoned(self, state, placed):
        calls.append(1)
        state, metrics = original(self, state, placed)
        if len(calls) == 4:  # step 4's update is NaN; the loss it reports is still finite
            state = state.replace(params=jax_tree_map(lambda x: x * jnp.nan, state.params))
        return state, metrics

    monkeypatch.setattr(loop.Trainer, "step", poisoned)
    code, err, _ = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 1 and len(err) == 1
    assert "[sft] parameters are not finite at step 4: stopped without saving" in err[0]
    assert "last good checkpoint (step 2)" in err[0]
    steps = sorted(int(p.name) for p in (tmp_path / "run/stages/sft/checkpoints").iterdir()
                   if p.name.isdigit())  # fmt: skip
    assert steps == [2]


def jax_tree_map(fn, tree):
    import jax

    return jax.tree.map(fn, tree)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
        code, err, _ = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 2 and len(err) == 1
    assert "GiB free, but the checkpoint of step 2 needs" in err[0]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run/x"))

    closed = []
    close = checkpoint.StageCheckpointer.close

    def recorded_close(self):
        close(self)
        closed.append(self.directory)

    with monkeypatch.context() as patch:
        patch.setattr(hf, "save_checkpoint", full)
        patch.setattr(checkpoint.StageCheckpointer, "close", recorded_close)
        code, err, _ = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 2
    assert err == [f"error: {tmp_path / 'run/x'}: No space left on device (the last complete "
                   "checkpoint is kept)"]  # fmt: skip
    # The stage's final save, started before the export failed, was waited for (closed) and
    # is complete on disk: no write is still under way when the stage is rerun.
    checkpoints = tmp_path / "run/stages/sft/checkpoints"
    assert closed == [checkpoints]
    assert leftovers(tmp_path / "run") == [] and (checkpoints / "4").is_dir()
    # Space again: the rerun finishes from what was saved (SFT's final checkpoint).
    code, _, out = run_cli(chain(tmp_path / "run"), capsys)
    assert code == 0 and "[sft] done" in out and leftovers(tmp_path / "run") == []
