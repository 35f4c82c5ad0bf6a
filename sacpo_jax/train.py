"""``python -m sacpo_jax.train [--config PATH] [key.path=value ...]``: run a chain of stages.

With no arguments it runs ``configs/demo.yaml``, the embedded SACPO demo on the bundled
oracle task. The run directory (``runs/<name>/`` by default) receives the resolved
config, per-stage metrics, checkpoints and exported models. A rerun of the same
command resumes: finished stages are skipped, an interrupted one continues from its
last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_jax.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="YAML run config (default: configs/demo.yaml)")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-host GPU/CPU)")
    parser.add_argument("--num-processes", type=int, help="number of processes (multi-host)")
    parser.add_argument("--process-id", type=int, help="this process's index (multi-host)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    return parser.parse_args(argv)


def default_config_path() -> str:
    for candidate in (Path("configs/demo.yaml"), DEMO_CONFIG):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError("configs/demo.yaml not found; pass --config PATH")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sacpo_jax import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from sacpo_jax.checkpoint import CheckpointError
    from sacpo_jax.config import ConfigError, load_config
    from sacpo_jax.data.errors import DataError
    from sacpo_jax.models.hf import CheckpointError as ModelError
    from sacpo_jax.run import run
    from sacpo_jax.training.chain import ChainError
    from sacpo_jax.training.runner import TrainingError

    try:
        config = load_config(args.config or default_config_path(), args.overrides)
        run(config)
    except (
        ConfigError,
        DataError,
        ModelError,
        CheckpointError,
        ChainError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
