"""``python -m sacpo_jax.train [--config PATH] [key.path=value ...]``: run a chain of stages.

With no arguments it runs the embedded SACPO demo (``demo.yaml``, shipped inside the
package and linked from ``configs/``) on the bundled oracle task. ``--config`` takes a
path, or the name of a shipped config (``caid_demo.yaml``). The run directory
(``runs/<name>/`` by default) receives the resolved config, per-stage metrics,
checkpoints and exported models. A rerun of the same command resumes: finished stages
are skipped, an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_jax.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help=f"YAML run config (default: the shipped {DEMO_CONFIG})")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-host GPU/CPU)")
    parser.add_argument("--num-processes", type=int, help="number of processes (multi-host)")
    parser.add_argument("--process-id", type=int, help="this process's index (multi-host)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    return parser.parse_args(argv)


def config_path(name: str | None) -> str:
    """The shipped demo when no config is given; a path; or, when no such file exists,
    the shipped config of that name."""
    if name is None:
        return str(SHIPPED_CONFIGS / DEMO_CONFIG)
    shipped = SHIPPED_CONFIGS / name
    return str(shipped) if not os.path.exists(name) and shipped.is_file() else name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sacpo_jax import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from sacpo_jax.config import load_config
    from sacpo_jax.errors import SacpoError, disk_error_line
    from sacpo_jax.run import run

    try:
        run(load_config(config_path(args.config), args.overrides))
    except SacpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted by a second Ctrl-C; rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:
        line = disk_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
