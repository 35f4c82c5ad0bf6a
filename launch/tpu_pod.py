"""Train on a Cloud TPU pod slice: create it, run on every worker, copy results back.

    python launch/tpu_pod.py --name sacpo-v4 --zone us-central2-b \
        --accelerator-type v4-32 -- --config configs/my_run.yaml

Steps (each a ``gcloud`` command; ``--dry-run`` prints them and runs nothing):
    1. create   gcloud compute tpus tpu-vm create NAME ...         (skip: --no-create)
    2. pack     tar the package, configs and setup files here
    3. copy     scp the archive to every worker (--worker=all)
    4. setup    unpack and ``pip install 'jax[tpu]' -e .`` on every worker
    5. train    ``python3 -m sacpo_jax.train ...`` on every worker at once
    6. fetch    scp the run directory back from worker 0 (logs, exports)
    7. delete   gcloud compute tpus tpu-vm delete NAME               (skip: --keep)
The slice is deleted even when a step fails, unless --keep is given.

Every worker runs the same command; JAX on a TPU VM slice finds its peers itself, so
no coordinator flags are needed. Only process 0 writes logs and the exported model, so
worker 0's run directory has them. Checkpoints, however, are written by every worker
(each its own shards) and must go to one shared filesystem to be usable: pass
``--bucket B`` to mount gs://B with gcsfuse at ~/sacpo_jax/gcs on every worker and put
the run directory there (gcsfuse must be installed on the image).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localhost import parse_launch_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PACKED = ["sacpo_jax", "configs", "setup.py", "pyproject.toml", "README.md"]
REMOTE_DIR = "sacpo_jax"


def gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    """``gcloud compute tpus tpu-vm VERB ... --zone Z [--project P]``."""
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        command.append(f"--project={args.project}")
    return command


def run_dir(args: argparse.Namespace) -> str:
    """The run directory, relative to ~/sacpo_jax on every worker (no '~': it is quoted)."""
    return f"gcs/runs/{args.name}" if args.bucket else f"runs/{args.name}"


def on_all_workers(args: argparse.Namespace, remote_command: str) -> list[str]:
    return gcloud_tpu("ssh", args, args.name, "--worker=all", f"--command={remote_command}")


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """[(step name, command)] in order; 'delete' (unless --keep) is run last, always."""
    archive = f"/tmp/{args.name}-src.tar.gz"
    planned = []
    if args.create:
        create = ["--accelerator-type=" + args.accelerator_type, "--version=" + args.version]
        planned.append(("create", gcloud_tpu("create", args, args.name, *create)))
        if args.spot:
            planned[-1][1].append("--spot")
    planned.append(("pack", ["tar", "czf", archive, "-C", str(REPO), *PACKED]))
    planned.append(("copy", gcloud_tpu("scp", args, archive, f"{args.name}:~/", "--worker=all")))
    setup = [
        f"mkdir -p ~/{REMOTE_DIR}",
        f"tar xzf ~/{Path(archive).name} -C ~/{REMOTE_DIR}",
        f"pip install -q 'jax[tpu]' -e ~/{REMOTE_DIR}",
    ]
    if args.bucket:
        mount = f"~/{REMOTE_DIR}/gcs"
        setup.append(
            f"mkdir -p {mount} && gcsfuse --implicit-dirs {shlex.quote(args.bucket)} {mount}"
        )
    planned.append(("setup", on_all_workers(args, " && ".join(setup))))
    train = ["python3", "-m", "sacpo_jax.train", *args.train_args, f"run_dir={run_dir(args)}"]
    planned.append(("train", on_all_workers(args, f"cd ~/{REMOTE_DIR} && {shlex.join(train)}")))
    remote_run = f"{args.name}:~/{REMOTE_DIR}/{run_dir(args)}"
    fetch = gcloud_tpu("scp", args, "--recurse", remote_run, args.results)
    planned.append(("fetch", fetch + ["--worker=0"]))
    if not args.keep:
        planned.append(("delete", gcloud_tpu("delete", args, args.name, "--quiet")))
    return planned


def execute(planned: list[tuple[str, list[str]]]) -> int:
    """Run the steps in order; after a failure skip to 'delete' (if planned)."""
    failed = None
    for name, command in planned:
        if failed is not None and name != "delete":
            continue
        print(f"== {name}: {shlex.join(command)}", flush=True)
        code = subprocess.call(command)
        if code and failed is None:
            print(f"error: step '{name}' failed with exit status {code}", file=sys.stderr)
            failed = code
    return failed or 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator-type", default="v4-32")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM image")
    parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
    parser.add_argument("--no-create", dest="create", action="store_false", help="reuse NAME")
    parser.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    parser.add_argument("--bucket", help="GCS bucket for the run directory (gcsfuse)")
    parser.add_argument("--results", default="runs/", help="local folder for the run directory")
    args = parse_launch_args(parser, argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    planned = steps(args)
    if args.dry_run:
        for _, command in planned:
            print(shlex.join(command))
        return 0
    return execute(planned)


if __name__ == "__main__":
    sys.exit(main())
