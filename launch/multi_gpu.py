"""Run ``python -m sacpo_jax.train`` on the GPUs of one host.

    python launch/multi_gpu.py -- --config my_run.yaml              # one process, all GPUs
    python launch/multi_gpu.py --gpus 0,1,2,3 --process-per-gpu -- --config my_run.yaml

By default one process drives every visible GPU (JAX is single-controller on one
host: the mesh spans all local devices and no coordinator is needed). With
``--process-per-gpu`` each GPU gets its own process (CUDA_VISIBLE_DEVICES=i) and the
processes meet at a coordinator on 127.0.0.1, as separate hosts would; this is
the layout to rehearse a multi-host GPU run on one machine. ``--gpus`` picks the
GPUs (default: all that ``nvidia-smi -L`` lists). ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localhost import (  # noqa: E402
    free_port,
    parse_launch_args,
    process_commands,
    run_processes,
)


def visible_gpus() -> list[str]:
    """GPU indices from ``nvidia-smi -L`` (one line per GPU)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: cannot list GPUs with nvidia-smi ({e}); pass --gpus") from None
    return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU")]


def plan(gpus: list[str], per_gpu: bool, port: int, train_args: list[str]):
    """[(environment, command)] for each process to start."""
    if not per_gpu:
        command = [sys.executable, "-m", "sacpo_jax.train", *train_args]
        return [({"CUDA_VISIBLE_DEVICES": ",".join(gpus)}, command)]
    commands = process_commands(len(gpus), f"127.0.0.1:{port}", train_args)
    return [({"CUDA_VISIBLE_DEVICES": gpu}, command) for gpu, command in zip(gpus, commands)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", help="comma-separated GPU indices (default: all)")
    parser.add_argument("--process-per-gpu", action="store_true", help="one process per GPU")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    args = parse_launch_args(parser, argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = args.gpus.split(",") if args.gpus else visible_gpus()
    if not gpus:
        raise SystemExit("error: no GPU found; pass --gpus")
    processes = plan(gpus, args.process_per_gpu, args.port or free_port(), args.train_args)
    if args.dry_run:
        for environment, command in processes:
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment.items())
            print(f"{prefix} {shlex.join(command)}")
        return 0
    if len(processes) == 1:
        environment, command = processes[0]
        return subprocess.call(command, env={**os.environ, **environment})
    return run_processes([c for _, c in processes], [e for e, _ in processes])


if __name__ == "__main__":
    sys.exit(main())
