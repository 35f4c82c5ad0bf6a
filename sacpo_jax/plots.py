"""PNG figures: helpfulness-harmlessness frontier, training curves, CAID dual trajectories.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no
pyplot, no global state), saves it to ``path`` as PNG and returns the Figure so callers
and tests can inspect what was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sacpo_jax.errors import SacpoError
from sacpo_jax.metrics_log import MetricsLogError, read_metrics

DUAL_PANELS = (
    ("lambda", "multiplier λ"),
    ("u", "constraint estimate u = E[h]"),
    ("reward", "reward estimate"),
)
"""History keys that ``plot_dual_trajectories`` draws, one panel each when present."""


class PlotInputError(SacpoError, ValueError):
    """Raised when results, metric logs or histories cannot be plotted."""


def _new_figure(rows: int = 1, width: float = 6.4, row_height: float = 4.0):
    figure = Figure(figsize=(width, row_height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, 1, squeeze=False)[:, 0]


def _save(figure: Figure, path: str | Path) -> Figure:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=120)
    return figure


def _metric(results: Mapping[str, Mapping[str, float]], model: str, key: str) -> float:
    if model not in results:
        raise PlotInputError(f"frontier: model {model!r} is not in the results")
    if key not in results[model]:
        raise PlotInputError(f"frontier: model {model!r} has no {key!r} value")
    return float(results[model][key])


def plot_frontier(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    series: Mapping[str, Sequence[str]] | None = None,
    x_key: str = "harmless_rate",
    y_key: str = "mean_reward",
    x_label: str | None = None,
    y_label: str | None = None,
    title: str | None = None,
) -> Figure:
    """Helpfulness (``y_key``) against harmlessness (``x_key``), one labelled point per model.

    results: model name -> metrics (e.g. ``summarize_model`` output or win rates).
    series: series name -> ordered model names (a beta/lambda realignment sweep, a merge
    sweep over q, ...), each drawn as a line through its models' points.
    The figure's first axes holds one scatter collection (points in ``results`` order),
    one text label per model and one line per series.
    """
    if not results:
        raise PlotInputError("frontier: no results given")
    models = list(results)
    points = np.array([[_metric(results, m, x_key), _metric(results, m, y_key)] for m in models])
    figure, (axes,) = _new_figure()
    for name, members in (series or {}).items():
        xs = [_metric(results, member, x_key) for member in members]
        ys = [_metric(results, member, y_key) for member in members]
        axes.plot(xs, ys, marker="", linewidth=1.5, label=name)
    axes.scatter(points[:, 0], points[:, 1], color="black", zorder=3)
    for model, (x, y) in zip(models, points, strict=True):
        axes.annotate(model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(x_label or x_key)
    axes.set_ylabel(y_label or y_key)
    axes.set_title(title or "helpfulness vs harmlessness")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    return _save(figure, path)


def _curve(rows: list[dict], key: str, path: str | Path) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        if key not in row:
            continue
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlotInputError(f"{path}: step {row['step']}: {key!r} is not a number: {value!r}")
        steps.append(float(row["step"]))
        values.append(float(value))
    return steps, values


def plot_training_curves(
    metrics_jsonl_paths: Mapping[str, str | Path],
    path: str | Path,
    keys: Sequence[str] = ("loss", "rewards/accuracies"),
) -> Figure:
    """One panel per metric key, one line per stage, against ``step``.

    metrics_jsonl_paths: stage name -> JSONL log (one JSON object per line with ``step``
    and metric values). Rows without a key are skipped for that key's panel; a panel
    whose key no stage logged says "no data".
    """
    if not metrics_jsonl_paths or not keys:
        raise PlotInputError("training curves: need at least one log and one key")
    try:
        logs = {stage: read_metrics(log) for stage, log in metrics_jsonl_paths.items()}
    except MetricsLogError as error:
        raise PlotInputError(str(error)) from None
    figure, all_axes = _new_figure(rows=len(keys), row_height=3.0)
    for axes, key in zip(all_axes, keys, strict=True):
        for stage, rows in logs.items():
            steps, values = _curve(rows, key, metrics_jsonl_paths[stage])
            if steps:
                axes.plot(steps, values, label=stage)
        if axes.lines:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center")
        axes.set_title(key)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return _save(figure, path)


def _component_matrix(history: Sequence[Mapping], key: str) -> np.ndarray:
    """Values of ``key`` over the history as (iterations, components)."""
    try:
        return np.array([np.atleast_1d(entry[key]) for entry in history], dtype=np.float64)
    except (TypeError, ValueError):
        raise PlotInputError(f"dual history: {key!r} must be numbers of one length") from None


def plot_dual_trajectories(history: Sequence[Mapping], path: str | Path) -> Figure:
    """CAID dual iterates: one panel per key of ``DUAL_PANELS`` that the history holds.

    history: one dict per iteration with ``lambda`` (float or list, one per constraint)
    and optionally ``u`` (estimated E_pi[h], same length; < 0 means violated), ``reward``
    and ``iteration`` (defaults to the position). Vector values draw one line per
    constraint; the ``u`` panel marks zero, the constraint boundary, and draws
    +-2 standard errors (``u_se``) as error bars when every iteration has them.
    """
    if not history:
        raise PlotInputError("dual history: no iterations given")
    for position, entry in enumerate(history):
        if "lambda" not in entry:
            raise PlotInputError(f"dual history: iteration {position} has no 'lambda'")
    panels = [(key, label) for key, label in DUAL_PANELS if all(key in e for e in history)]
    iterations = [entry.get("iteration", position) for position, entry in enumerate(history)]
    figure, all_axes = _new_figure(rows=len(panels), row_height=2.6)
    for axes, (key, label) in zip(all_axes, panels, strict=True):
        matrix = _component_matrix(history, key)
        errors = None
        if key == "u" and all("u_se" in e for e in history):
            errors = 2.0 * _component_matrix(history, "u_se")
        for component in range(matrix.shape[1]):
            name = f"{key}[{component}]" if matrix.shape[1] > 1 else key
            (line,) = axes.plot(iterations, matrix[:, component], marker="o", label=name)
            if errors is not None:
                axes.errorbar(
                    iterations,
                    matrix[:, component],
                    yerr=errors[:, component],
                    fmt="none",
                    ecolor=line.get_color(),
                    capsize=3,
                )
        if key == "u":
            axes.axhline(0.0, color="gray", linestyle="--", linewidth=1)
        if matrix.shape[1] > 1:
            axes.legend(fontsize=8)
        axes.set_ylabel(label)
        axes.set_xlabel("iteration")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return _save(figure, path)
