"""Metric sinks: JSONL always, TensorBoard by default, wandb when configured and installed.

Only process 0 writes; other processes get a logger whose calls do nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from sacpo_jax.errors import SacpoError


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


class MetricsLogError(SacpoError, ValueError):
    """A metrics.jsonl file that cannot be read back; one line naming the file and line."""


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (each a JSON object with a "step")."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise MetricsLogError(f"{path}: cannot read metrics log ({error.strerror})") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MetricsLogError(f"{path}:{line_number}: not a JSON object") from None
        if not isinstance(row, dict) or "step" not in row:
            raise MetricsLogError(f"{path}:{line_number}: expected a JSON object with a 'step'")
        rows.append(row)
    return rows
