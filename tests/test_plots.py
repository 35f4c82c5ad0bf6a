"""Plots: valid PNG files, and the drawn data matches the inputs."""

import json

import numpy as np
import pytest

from sacpo_jax.plots import (
    PlotInputError,
    plot_dual_trajectories,
    plot_frontier,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"


RESULTS = {
    "sft": {"harmless_rate": 0.50, "mean_reward": 0.0},
    "dpo_h": {"harmless_rate": 0.40, "mean_reward": 1.2},
    "sacpo_0.1": {"harmless_rate": 0.55, "mean_reward": 1.0},
    "sacpo_0.025": {"harmless_rate": 0.80, "mean_reward": 0.8},
    "merge_q0.5": {"harmless_rate": 0.65, "mean_reward": 1.1},
}


def test_frontier_draws_one_labelled_point_per_model_and_series_lines(tmp_path):
    path = tmp_path / "out" / "frontier.png"
    series = {"realign": ["dpo_h", "sacpo_0.1", "sacpo_0.025"]}
    figure = plot_frontier(RESULTS, path, series=series, x_label="harmless", y_label="reward")
    assert_png(path)
    axes = figure.axes[0]
    offsets = axes.collections[0].get_offsets()
    expected = [[m["harmless_rate"], m["mean_reward"]] for m in RESULTS.values()]
    np.testing.assert_allclose(offsets, expected)
    labels = {text.get_text(): text.xy for text in axes.texts}
    assert set(labels) == set(RESULTS)
    for name, metrics in RESULTS.items():
        assert labels[name] == pytest.approx((metrics["harmless_rate"], metrics["mean_reward"]))
    (line,) = axes.lines
    assert line.get_label() == "realign"
    np.testing.assert_allclose(line.get_xdata(), [0.40, 0.55, 0.80])
    np.testing.assert_allclose(line.get_ydata(), [1.2, 1.0, 0.8])
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("harmless", "reward")


def test_frontier_names_missing_model_or_metric(tmp_path):
    with pytest.raises(PlotInputError, match="model 'ghost' is not in the results"):
        plot_frontier(RESULTS, tmp_path / "f.png", series={"s": ["sft", "ghost"]})
    with pytest.raises(PlotInputError, match="'sft' has no 'win_rate'"):
        plot_frontier(RESULTS, tmp_path / "f.png", y_key="win_rate")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_training_curves_plot_each_stage_per_key(tmp_path):
    stage1 = write_jsonl(
        tmp_path / "s1.jsonl",
        [
            {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5},
            {"step": 2, "loss": 0.60},
            {"step": 3, "loss": 0.55, "rewards/accuracies": 0.7},
        ],
    )
    stage2 = write_jsonl(
        tmp_path / "s2.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}]
    )
    path = tmp_path / "curves.png"
    figure = plot_training_curves({"helpful": stage1, "safe": stage2}, path)
    assert_png(path)
    loss_axes, accuracy_axes = figure.axes
    assert loss_axes.get_title() == "loss"
    curves = {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in loss_axes.lines}
    np.testing.assert_allclose(curves["helpful"], [[1, 2, 3], [0.69, 0.60, 0.55]])
    np.testing.assert_allclose(curves["safe"], [[1, 2], [0.7, 0.5]])
    (accuracy_line,) = accuracy_axes.lines  # the safe stage never logged accuracies
    np.testing.assert_allclose(accuracy_line.get_xdata(), [1, 3])
    np.testing.assert_allclose(accuracy_line.get_ydata(), [0.5, 0.7])


def test_training_curves_name_the_bad_line(tmp_path):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(PlotInputError, match=r"bad.jsonl:2: not a JSON object"):
        plot_training_curves({"s": log}, tmp_path / "c.png")


def test_dual_trajectories_with_vector_lambda(tmp_path):
    history = [
        {"iteration": 0, "lambda": [1.0, 0.5], "u": [-0.3, 0.1], "reward": 1.0},
        {"iteration": 1, "lambda": [1.6, 0.3], "u": [-0.1, 0.2], "reward": 0.9},
        {"iteration": 2, "lambda": [1.8, 0.0], "u": [0.05, 0.4], "reward": 0.85},
    ]
    path = tmp_path / "dual.png"
    figure = plot_dual_trajectories(history, path)
    assert_png(path)
    lambda_axes, u_axes, reward_axes = figure.axes
    lambda_lines = {line.get_label(): line.get_ydata() for line in lambda_axes.lines}
    np.testing.assert_allclose(lambda_lines["lambda[0]"], [1.0, 1.6, 1.8])
    np.testing.assert_allclose(lambda_lines["lambda[1]"], [0.5, 0.3, 0.0])
    u_first = next(line for line in u_axes.lines if line.get_label() == "u[0]")
    np.testing.assert_allclose(u_first.get_ydata(), [-0.3, -0.1, 0.05])
    np.testing.assert_allclose(reward_axes.lines[0].get_xdata(), [0, 1, 2])


def test_dual_trajectories_draw_two_standard_errors_on_u(tmp_path):
    history = [
        {"lambda": 1.0, "u": -0.3, "u_se": 0.05},
        {"lambda": 1.6, "u": 0.1, "u_se": 0.25},
    ]
    u_axes = plot_dual_trajectories(history, tmp_path / "d.png").axes[1]
    (bars,) = u_axes.collections  # one vertical segment per iteration: u -+ 2 se
    segments = [np.asarray(s)[:, 1] for s in bars.get_segments()]
    np.testing.assert_allclose(segments, [[-0.4, -0.2], [-0.4, 0.6]])


def test_dual_trajectories_scalar_lambda_only(tmp_path):
    figure = plot_dual_trajectories([{"lambda": 1.0}, {"lambda": 2.5}], tmp_path / "d.png")
    (axes,) = figure.axes
    np.testing.assert_allclose(axes.lines[0].get_ydata(), [1.0, 2.5])
    with pytest.raises(PlotInputError, match="iteration 1 has no 'lambda'"):
        plot_dual_trajectories([{"lambda": 1.0}, {"u": 0.1}], tmp_path / "d.png")
