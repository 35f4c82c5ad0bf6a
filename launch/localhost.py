"""Run ``python -m sacpo_jax.train`` as N processes on this machine (CPU, gloo collectives).

    python launch/localhost.py --num-processes 2 --devices-per-process 2 -- \
        --config configs/demo.yaml run_dir=runs/two_procs

Every process gets its own forced CPU device count (XLA_FLAGS, set before JAX is
imported), JAX_PLATFORMS=cpu, gloo CPU collectives and the same coordinator
(127.0.0.1:PORT, a free port unless --port is given). Output lines are prefixed with
``[pN]``. When one process fails, the others are stopped; the exit status is the first
non-zero one. SIGTERM and SIGINT are forwarded to every process, so a preemption notice
reaches the run as it would on a cluster. ``--dry-run`` prints the commands instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_commands(
    num_processes: int, coordinator: str, train_args: list[str], python: str = sys.executable
) -> list[list[str]]:
    """The train command of each process: the same arguments, its own --process-id."""
    return [
        [python, "-m", "sacpo_jax.train", "--coordinator", coordinator]
        + ["--num-processes", str(num_processes), "--process-id", str(i), *train_args]
        for i in range(num_processes)
    ]


def cpu_environment(devices_per_process: int) -> dict[str, str]:
    """Variables that give each process its own CPU devices and gloo collectives."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    return {
        "XLA_FLAGS": " ".join(flags),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }


def _pump(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def run_processes(commands: list[list[str]], environments: list[dict[str, str]]) -> int:
    """Start every command (with its extra environment), relay its output, stop all when
    one fails; the exit status."""
    processes = [
        subprocess.Popen(
            command,
            env={**os.environ, **environment},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command, environment in zip(commands, environments, strict=True)
    ]
    pumps = [
        threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] "), daemon=True)
        for i, p in enumerate(processes)
    ]
    for pump in pumps:
        pump.start()

    def forward(signum, frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait_all(processes)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for pump in pumps:
            pump.join(timeout=5)


def _wait_all(processes: list[subprocess.Popen]) -> int:
    """Wait for every process; after the first failure, terminate the rest."""
    status = 0
    pending = list(processes)
    while pending:
        for p in list(pending):
            try:
                code = p.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(p)
            if code and not status:
                status = code
                for other in pending:
                    other.terminate()
    return status


def parse_launch_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse a launcher's command line, adding what every launcher takes: ``--dry-run``
    and the train arguments after ``--`` (returned without the ``--``)."""
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train arguments")
    args = parser.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    args = parse_launch_args(parser, argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    commands = process_commands(args.num_processes, coordinator, args.train_args)
    environment = cpu_environment(args.devices_per_process)
    if args.dry_run:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment.items())
        for command in commands:
            print(f"{prefix} {shlex.join(command)}")
        return 0
    return run_processes(commands, [environment] * len(commands))


if __name__ == "__main__":
    sys.exit(main())
