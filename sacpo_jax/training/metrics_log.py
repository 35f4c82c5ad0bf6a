"""Metric sinks: JSONL always, TensorBoard by default, wandb when configured and installed.

Only process 0 writes; other processes get a logger whose calls do nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricsLogger:
    def __init__(
        self,
        directory: str,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str = "run",
        config: dict | None = None,
    ) -> None:
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tensorboard = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(directory, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed: logging without it")
            else:
                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": _number(v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
