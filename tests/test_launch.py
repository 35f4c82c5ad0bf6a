"""The launch scripts: the commands they print in dry-run mode, and how they run them."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import localhost  # noqa: E402
import tpu_pod  # noqa: E402


def _dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_localhost_dry_run_gives_each_process_its_id_devices_and_the_same_coordinator():
    lines = _dry_run(
        "localhost.py", "--num-processes", "3", "--devices-per-process", "2", "--port", "4567",
        "--dry-run", "--", "--config", "c.yaml", "seed=1", env={"XLA_FLAGS": ""},
    )  # fmt: skip
    assert len(lines) == 3
    for i, line in enumerate(lines):
        env = dict(item.split("=", 1) for item in line[:3])
        assert env == {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        }
        assert line[4:] == [
            "-m", "sacpo_jax.train", "--coordinator", "127.0.0.1:4567", "--num-processes", "3",
            "--process-id", str(i), "--config", "c.yaml", "seed=1",
        ]  # fmt: skip


def test_localhost_replaces_an_inherited_device_count_and_picks_a_free_port():
    lines = _dry_run(
        "localhost.py", "--dry-run", "--", "--config", "c.yaml",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"},
    )  # fmt: skip
    assert lines[0][0] == "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=1"
    port = int(lines[0][lines[0].index("--coordinator") + 1].split(":")[1])
    assert 0 < port < 65536 and lines[1][lines[1].index("--coordinator") + 1].endswith(f":{port}")


def test_multi_gpu_dry_run_single_process_and_process_per_gpu():
    (single,) = _dry_run("multi_gpu.py", "--gpus", "0,1,2,3", "--dry-run", "--", "--config", "c")
    assert single[0] == "CUDA_VISIBLE_DEVICES=0,1,2,3"
    assert single[2:] == ["-m", "sacpo_jax.train", "--config", "c"]
    per_gpu = _dry_run(
        "multi_gpu.py", "--gpus", "2,3", "--process-per-gpu", "--port", "999", "--dry-run",
        "--", "--config", "c",
    )  # fmt: skip
    assert [line[0] for line in per_gpu] == ["CUDA_VISIBLE_DEVICES=2", "CUDA_VISIBLE_DEVICES=3"]
    for i, line in enumerate(per_gpu):
        assert line[line.index("--coordinator") + 1] == "127.0.0.1:999"
        assert line[line.index("--num-processes") + 1] == "2"
        assert line[line.index("--process-id") + 1] == str(i)


def test_tpu_pod_dry_run_creates_runs_on_all_workers_fetches_and_deletes():
    lines = _dry_run(
        "tpu_pod.py", "--name", "pod1", "--zone", "us-central2-b", "--project", "proj",
        "--accelerator-type", "v4-32", "--spot", "--dry-run", "--", "--config", "configs/x.yaml",
    )  # fmt: skip
    create, pack, copy, setup, train, fetch, delete = lines
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert create[:6] == tpu_vm + ["create", "pod1"]
    assert {"--accelerator-type=v4-32", "--zone=us-central2-b", "--project=proj", "--spot"} <= set(
        create
    )
    assert pack[:3] == ["tar", "czf", "/tmp/pod1-src.tar.gz"] and "sacpo_jax" in pack
    assert copy[:5] == tpu_vm + ["scp"] and "--worker=all" in copy and "pod1:~/" in copy
    assert setup[:6] == tpu_vm + ["ssh", "pod1"] and "--worker=all" in setup
    setup_command = next(a for a in setup if a.startswith("--command="))
    assert "pip install -q 'jax[tpu]' -e ~/sacpo_jax" in setup_command
    remote = shlex.split(next(a for a in train if a.startswith("--command=")).split("&& ", 1)[1])
    assert remote == [
        "python3", "-m", "sacpo_jax.train", "--config", "configs/x.yaml", "run_dir=runs/pod1",
    ]  # fmt: skip
    assert "--worker=all" in train
    assert fetch[:6] == tpu_vm + ["scp", "--recurse"] and "--worker=0" in fetch
    assert "pod1:~/sacpo_jax/runs/pod1" in fetch
    assert delete[:6] == tpu_vm + ["delete", "pod1"] and "--quiet" in delete


def test_tpu_pod_bucket_keep_and_no_create():
    lines = _dry_run(
        "tpu_pod.py", "--name", "p", "--zone", "z", "--bucket", "my-bucket", "--no-create",
        "--keep", "--dry-run", "--", "--config", "c.yaml",
    )  # fmt: skip
    assert [line[4] for line in lines if line[0] == "gcloud"] == ["scp", "ssh", "ssh", "scp"]
    setup, train = lines[2], lines[3]
    assert "gcsfuse --implicit-dirs my-bucket ~/sacpo_jax/gcs" in " ".join(setup)
    assert "run_dir=gcs/runs/p" in " ".join(train)


def test_tpu_pod_deletes_the_slice_after_a_failed_step(tmp_path, monkeypatch):
    """A fake gcloud logs its calls and fails the training ssh."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "gcloud"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *sacpo_jax.train*) exit 7;; esac\nexit 0\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    args = tpu_pod.parse_args(["--name", "p", "--zone", "z", "--", "--config", "c.yaml"])
    planned = [step for step in tpu_pod.steps(args) if step[0] != "pack"]
    assert tpu_pod.execute(planned) == 7
    verbs = [line.split()[3] for line in log.read_text().splitlines()]
    assert verbs == ["create", "scp", "ssh", "ssh", "delete"]  # no fetch after the failure


def test_localhost_stops_the_other_processes_when_one_fails():
    started = time.monotonic()
    status = localhost.run_processes(
        [
            [sys.executable, "-c", "import time; time.sleep(60)"],
            [sys.executable, "-c", "import sys; print('failing'); sys.exit(3)"],
        ],
        [{}, {}],
    )
    assert status == 3 and time.monotonic() - started < 30
