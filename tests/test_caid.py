"""CAID: pseudo-labels, the dual update, thresholds, best iterate, and runs on the bundled task.

The end-to-end tests (slow) train a small SFT model (pi_ref) and a cost model on the
bundled oracle task, then run CAID under two thresholds: one the reference satisfies
(on the trained cost model) and one it violates (on the oracle's cost). Sampling error
is stated explicitly: an iterate "satisfies" a constraint when u + 2 * se >= 0,
se = std(g) / sqrt(N * M).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from sacpo_jax.algorithms import caid
from sacpo_jax.algorithms.caid import (
    CaidRun,
    best_iterate,
    draw_prompts,
    dual_update,
    dual_value,
    iterate_estimates,
    step_size,
)
from sacpo_jax.algorithms.pseudo_labels import (
    PseudoLabelError,
    draw_second_preferred,
    second_preferred_probability,
)
from sacpo_jax.checkpoint import Preempted
from sacpo_jax.config import CaidStage, ConfigError, load_config
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.models import hf
from sacpo_jax.models.fingerprint import params_fingerprint
from sacpo_jax.scorers import (
    LogRatioScorer,
    OracleScorer,
    PairSet,
    ScoreModelScorer,
)
from sacpo_jax.scoring import sequence_logprobs
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.objectives import PAIR_REFERENCE
from sacpo_jax.training.reference import add_reference_columns

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


# ----------------------------------------------------------------------------- pseudo-labels


def test_label_rate_matches_sigmoid_of_the_lagrangian_difference():
    # Three kinds of pair, 6000 copies each; w = r + lam . g with two constraints.
    lam = np.array([0.5, 2.0])
    kinds_r = np.array([[0.0, 1.0], [2.0, 0.0], [0.3, 0.3]])
    kinds_g = np.array(
        [[[0.0, 0.0], [-1.0, 0.0]], [[0.0, -1.0], [0.0, 0.5]], [[1.0, 0.0], [1.0, 0.0]]]
    )
    # by hand: w1 - w0 = 1 - 0.5 = 0.5;  -2 + 2*(0.5 + 1) = 1.0;  0
    expected = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.0)), 0.5]
    copies = 6000
    r, g = np.repeat(kinds_r, copies, axis=0), np.repeat(kinds_g, copies, axis=0)
    np.testing.assert_allclose(second_preferred_probability(r, g, lam)[::copies], expected)
    drawn = draw_second_preferred(r, g, lam, seed=3, iteration=1).reshape(3, copies)
    for rate, p in zip(drawn.mean(axis=1), expected):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / copies), (rate, p)


def test_label_draws_are_a_function_of_seed_and_iteration():
    r, g = np.zeros((500, 2)), np.zeros((500, 2, 1))
    first = draw_second_preferred(r, g, 1.0, seed=0, iteration=2)
    assert np.array_equal(first, draw_second_preferred(r, g, 1.0, seed=0, iteration=2))
    assert not np.array_equal(first, draw_second_preferred(r, g, 1.0, seed=0, iteration=3))


def test_label_inputs_are_checked():
    with pytest.raises(PseudoLabelError, match="lam: expected 2 entries"):
        second_preferred_probability(np.zeros((3, 2)), np.zeros((3, 2, 2)), [1.0])
    with pytest.raises(PseudoLabelError, match="r: pair 1 is not finite"):
        second_preferred_probability(np.array([[0, 0], [np.nan, 0]]), np.zeros((2, 2)), 1.0)


# ----------------------------------------------------------------------------- dual step


def test_dual_update_projects_at_zero_per_constraint():
    # violated (u < 0) raises lam; slack lowers it, stopping at 0
    lam = dual_update([1.0, 0.2, 0.0], [-0.5, 0.3, 0.4], 2.0)
    np.testing.assert_allclose(lam, [2.0, 0.0, 0.0])
    np.testing.assert_allclose(dual_update([1.0], [0.25], 2.0), [0.5])


def test_relative_and_absolute_thresholds():
    r = np.array([1.0, 3.0])
    g = np.array([[1.0, 2.0], [3.0, 4.0]])  # means [2, 3]; std (ddof 1) of each column sqrt(2)
    reference, b = np.array([1.5, 3.5]), np.array([0.25, -1.0])
    rel = iterate_estimates(r, g, reference, b, relative=True)
    np.testing.assert_allclose(rel["improvement"], [0.5, -0.5])
    np.testing.assert_allclose(rel["u"], [0.25, 0.5])  # E g - E_ref g - b
    np.testing.assert_allclose(rel["u_se"], [1.0, 1.0])  # sqrt(2) / sqrt(2)
    assert rel["reward"] == 2.0 and rel["feasible"]
    absolute = iterate_estimates(r, g, reference, b, relative=False)
    np.testing.assert_allclose(absolute["u"], [1.75, 4.0])  # E g - b
    tight = iterate_estimates(r, g, reference, np.array([0.75, -1.0]), relative=True)
    assert not tight["feasible"]  # u = [-0.25, 0.5], se = [1, 1]
    lenient = iterate_estimates(
        r, g, reference, np.array([0.75, -1.0]), relative=True, se_margin=0.3
    )
    assert lenient["feasible"]  # -0.25 + 0.3 * 1 >= 0


def test_step_sizes_decay_as_configured():
    assert [step_size(0.4, 0.0, k) for k in range(3)] == [0.4, 0.4, 0.4]
    np.testing.assert_allclose([step_size(0.4, 1.0, k) for k in range(3)], [0.4, 0.2, 0.4 / 3])
    np.testing.assert_allclose(step_size(0.4, 0.5, 3), 0.2)  # 0.4 / sqrt(4)


def test_dual_value_and_the_paper_output_rule():
    # D(lam) ~ reward + lam . u - beta KL: 2 + (0.5 * 1 + 2 * -0.5) - 0.1 * 3 = 1.2
    assert dual_value(2.0, [0.5, 2.0], [1.0, -0.5], 3.0, 0.1) == pytest.approx(1.2)
    history = [
        {"reward": 0.0, "u": [-1.0], "feasible": False},  # pi_ref: no multiplier trained it
        {"reward": 3.0, "u": [0.5], "feasible": True, "dual_value": 2.0},
        {"reward": 1.0, "u": [-0.2], "feasible": False, "dual_value": 1.5},
        {"reward": 2.0, "u": [0.1], "feasible": True, "dual_value": 1.8},
    ]
    assert best_iterate(history, "dual_value") == 2  # lowest dual value, though infeasible
    assert best_iterate(history, "feasible_reward") == 1


def test_best_iterate_prefers_feasible_reward_then_least_violation():
    history = [
        {"reward": 5.0, "u": [-0.1], "feasible": False},
        {"reward": 1.0, "u": [0.2], "feasible": True},
        {"reward": 2.0, "u": [0.0], "feasible": True},
    ]
    assert best_iterate(history) == 2
    infeasible = [
        {"reward": 5.0, "u": [-0.3, 0.1], "feasible": False},
        {"reward": 0.0, "u": [-0.1, -0.1], "feasible": False},
        {"reward": 1.0, "u": [-0.25, 2.0], "feasible": False},
    ]
    assert best_iterate(infeasible) == 1  # total violation 0.2 < 0.25 < 0.3


# ----------------------------------------------------------------------------- config


def caid_stage(**overrides) -> dict:
    stage = {
        "name": "caid",
        "kind": "caid",
        "data": {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"},
        "reward": "oracle",
        "constraints": [{"model": "oracle", "threshold": 0.2}],
        "prompts": {"source": {"type": "bundled", "name": "eval_prompts"}, "limit": 8},
    }
    return {**stage, **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reward_beta": 0.1}, "reward_beta and constraints.*.beta are for pecaid"),
        ({"feasibility_se": -1.0}, "feasibility_se"),
        ({"lambda_init": [1.0, 2.0]}, "lambda_init: one value per constraint (1)"),
        ({"lambda_init": -1.0}, "lambda_init must be >= 0"),
        ({"method": "pecaid"}, "pecaid scores with DPO policies"),
        ({"constraints": []}, "stages.0.constraints"),
        (
            {"data": {"source": {"type": "bundled", "name": "sft"}, "adapter": "sft"}},
            "data.adapter 'sft' does not make pairs",
        ),
    ],
)
def test_caid_stage_errors_are_one_line(tmp_path, overrides, message):
    config = {"model": {"random": {}}, "tokenizer": {"path": "bundled:oracle"}}
    config["stages"] = [caid_stage(**overrides)]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pecaid_takes_each_policy_beta_from_its_stage(tmp_path):
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    data = {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"}
    dpo = {"kind": "dpo", "start": "initial", "data": data}
    pecaid = caid_stage(
        method="pecaid",
        start="initial",
        reward="dpo_h",
        constraints=[
            {"model": "dpo_s@beta=0.2", "threshold": 0.1},
            {"model": str(directory), "threshold": 0.1, "beta": 0.3},
        ],
    )
    config = {"model": {"random": {}}, "tokenizer": {"path": "bundled:oracle"}}
    config["stages"] = [
        {**dpo, "name": "dpo_h", "beta": 0.05},
        {**dpo, "name": "dpo_s", "beta": [0.1, 0.2]},
        pecaid,
    ]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    stage = load_config(str(path)).expanded_stages()[-1]
    assert stage.model_betas == [0.05, 0.2, 0.3]
    del config["stages"][2]["constraints"][1]["beta"]
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"the beta that '{directory}' was aligned with"):
        load_config(str(path))


def test_caid_stage_lists_the_models_it_reads():
    stage = CaidStage.model_validate(
        caid_stage(
            reward="rm",
            constraints=[{"model": "c1", "threshold": 1}, {"model": "c2", "threshold": 2}],
        )
    )
    assert stage.models == ["rm", "c1", "c2"]


def test_paper_recipe_validates():
    config = load_config(os.path.join(CONFIGS, "caid_pku_7b.yaml"))
    stage = next(s for s in config.stages if s.kind == "caid")
    assert (stage.iterations, stage.beta) == (4, 0.1)
    sampling = stage.sampling
    assert (sampling.prompts_per_step, sampling.responses_per_prompt) == (600, 64)
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (1.0, 0.9, 512)
    assert sampling.stop is None  # samples of the policy, not cut at "\n\n" or "User"
    assert stage.prompts.source.split == "train" and stage.prompts.limit is None
    assert stage.first_step_lambda == "init" and stage.dual_lr < 1.0
    assert 3 <= stage.constraints[0].threshold <= 9 and stage.relative_thresholds


def test_dual_step_samples_are_policy_samples_by_default():
    sampling = CaidStage.model_validate(caid_stage()).sampling
    assert sampling.stop is None
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (1.0, 0.9, 512)


def test_prompt_draws_are_distinct_and_a_function_of_seed_and_iteration():
    prompts = [f"p{i}" for i in range(50)]
    first = draw_prompts(prompts, 20, seed=0, iteration=1)
    assert len(set(first)) == 20 and set(first) <= set(prompts)
    assert first == draw_prompts(prompts, 20, seed=0, iteration=1)
    assert first != draw_prompts(prompts, 20, seed=0, iteration=2)
    assert draw_prompts(prompts, None, seed=0, iteration=1) == prompts


# ----------------------------------------------------------------------------- the dual step


def scripted_run(monkeypatch, sampled: list, **overrides) -> CaidRun:
    """A CaidRun whose dual step scores scripted samples: iterate t's utilities are
    g = [0, 2] + shift_t (so u_t = shift_t - b), its rewards [1, 1]; the oracle's rows
    are the only prompts. Generation is recorded in ``sampled`` instead of run."""
    stage = CaidStage.model_validate(caid_stage(**overrides))
    run = CaidRun.__new__(CaidRun)
    run.stage, run.reference = stage, None
    run.thresholds = np.array([c.threshold for c in stage.constraints])
    run.ctx = StageContext(mesh=None, tokenizer=None, stage_dir="", cache_dir="")
    run.prompts = ["p0", "p1"]
    run.shift = [0.0]
    constant = type("Constant", (), {})

    def values(offset):
        scorer = constant()
        scorer.on_samples = lambda p, r: np.array([0.0, 2.0]) + offset()
        return scorer

    run.reward = values(lambda: 1.0 - np.array([0.0, 2.0]))
    run.constraints = [values(lambda: run.shift[0])]
    run.kl = lambda policy, prompts, responses: 2.0
    run.write_samples = lambda *args: None
    run.log_dual = lambda record: None

    def fake_generate(policy, tokenizer, prompts, **kwargs):
        sampled.append(kwargs)
        return ["y"] * len(prompts)

    monkeypatch.setattr(caid, "generate", fake_generate)
    return run


def dual_steps(run: CaidRun, shifts: list[float]) -> list[dict]:
    history = []
    for t, shift in enumerate(shifts):
        run.shift[0] = shift
        history.append(run.dual_step(t, None, history))
    return history


@pytest.mark.parametrize("order", ["init", "updated"])
def test_the_first_policy_step_uses_lambda_init_by_default(monkeypatch, order):
    sampled = []
    constraint = [{"model": "oracle", "threshold": 0.5}]
    run = scripted_run(
        monkeypatch,
        sampled,
        constraints=constraint,
        lambda_init=0.3,
        dual_lr=0.2,
        first_step_lambda=order,
        sampling={"responses_per_prompt": 1},
    )
    history = dual_steps(run, [0.0, 1.5, -0.5])
    assert [h["u"] for h in history] == [[-0.5], [1.0], [-1.0]]  # u_t = shift - b
    assert history[0]["lambda_init"] == [0.3]
    if order == "init":  # policy step 0 at lambda_init, then max(0, lam - eta u_{t+1})
        expected = [0.3, 0.3 - 0.2 * 1.0, 0.1 + 0.2 * 1.0]
    else:  # the printed order: a dual step on pi_ref's own samples first (u_0 = -b)
        expected = [0.3 + 0.2 * 0.5, 0.4 - 0.2 * 1.0, 0.2 + 0.2 * 1.0]
    np.testing.assert_allclose([h["lambda"][0] for h in history], expected)
    # iterate t >= 1 was trained under the multiplier set after iterate t - 1
    for t in (1, 2):
        assert history[t]["policy_lambda"] == history[t - 1]["lambda"]
        lam, u = history[t]["policy_lambda"][0], history[t]["u"][0]
        assert history[t]["dual_value"] == pytest.approx(1.0 + lam * u - 0.1 * 2.0)
    assert "dual_value" not in history[0] and history[0]["kl"] == 0.0
    # the policy's samples: temperature 1, top_p 0.9, 512 tokens, no stop strings
    assert {(k["temperature"], k["top_p"], k["max_new_tokens"], k["stop"]) for k in sampled} == {
        (1.0, 0.9, 512, None)
    }


def test_a_damped_dual_step_shrinks_later_steps(monkeypatch):
    run = scripted_run(
        monkeypatch,
        [],
        constraints=[{"model": "oracle", "threshold": 0.5}],
        lambda_init=1.0,
        dual_lr=0.4,
        dual_lr_decay=1.0,
        sampling={"responses_per_prompt": 1},
    )
    history = dual_steps(run, [0.0, 1.5, 1.5, -0.5])  # u = -0.5, 1, 1, -1
    assert [h.get("step_size") for h in history] == [None, 0.4, 0.2, pytest.approx(0.4 / 3)]
    np.testing.assert_allclose([h["lambda"][0] for h in history], [1.0, 0.6, 0.4, 0.4 + 0.4 / 3])


# ----------------------------------------------------------------------------- scorers


def test_oracle_scores_of_pairs_match_the_split_columns():
    tokenizer = oracle_tokenizer()
    spec = DataSpec(
        source={"type": "bundled", "name": "preference"},
        adapter="scored_pair",
        score_names=["reward", "cost"],
        limit=200,
        max_length=48,
        max_prompt_length=24,
    )
    dataset, _ = build_dataset(spec, tokenizer)
    pairs = PairSet(dataset, spec, batch_size=32, pad_id=tokenizer.pad_token_id)
    for key, column, sign in (("reward", "reward", 1.0), ("cost", "cost", -1.0)):
        scores = OracleScorer(key, tokenizer, sign).on_pairs(pairs)
        for slot in (0, 1):
            np.testing.assert_array_equal(
                scores[:, slot], sign * dataset.columns[f"score_{slot}_{column}"]
            )


# ----------------------------------------------------------------------------- runs

SHORT = {"max_length": 48, "max_prompt_length": 24, "template": TEMPLATE}
PAIRS = {
    "source": {"type": "bundled", "name": "preference"},
    "adapter": "scored_pair",
    "score_names": ["reward", "cost"],
    "limit": 320,
    **SHORT,
}
SAMPLING = {"responses_per_prompt": 6, "max_new_tokens": 16, "stop": None, "batch_size": 256}
PROMPTS = {"source": {"type": "bundled", "name": "eval_prompts"}, "limit": 48}
POLICY_TRAIN = {"epochs": 1, "batch_size": 32, "learning_rate": 1.0e-3, "warmup_ratio": 0.1}


def caid_run_stage(name: str, constraints: list[dict], **extra) -> dict:
    return {
        "name": name,
        "kind": "caid",
        "start": "sft",
        "data": PAIRS,
        "reward": "oracle",
        "constraints": constraints,
        "prompts": PROMPTS,
        "sampling": SAMPLING,
        "iterations": 2,
        "beta": 0.1,
        "train": {**POLICY_TRAIN, "log_every": 5, "save_every": 1000},
        **extra,
    }


def dpo_stage(name: str, adapter: str, beta: float) -> dict:
    data = {"source": {"type": "bundled", "name": "preference"}, "adapter": adapter}
    return {
        "name": name,
        "kind": "dpo",
        "start": "sft",
        "beta": beta,
        "data": {**data, "limit": 256, **SHORT},
        "train": {**POLICY_TRAIN, "save_every": 1000},
    }


def demo_with_test_stages(run_dir) -> dict:
    """configs/caid_demo.yaml as shipped (its caid stage's threshold is violated by pi_ref),
    plus: MoCAID under slack thresholds in the printed order (a dual step on pi_ref's
    samples first), and a one-iteration PeCAID from two small DPO policies pre-aligned on
    helpfulness and on safety with betas other than the CAID stage's."""
    with open(os.path.join(CONFIGS, "caid_demo.yaml")) as f:
        config = yaml.safe_load(f)
    slack = caid_run_stage(
        "caid_slack",
        [{"model": "cost", "threshold": -1.0}, {"model": "oracle", "threshold": -2.0}],
        reward="reward",
        lambda_init=[1.0, 1.0],
        dual_lr=0.5,
        first_step_lambda="updated",
        prompts={**PROMPTS, "limit": 32},
        sampling={**SAMPLING, "responses_per_prompt": 4},
    )
    pecaid = caid_run_stage(
        "pecaid",
        [{"model": "dpo_s", "threshold": 0.05}],
        method="pecaid",
        reward="dpo_h",
        iterations=1,
        lambda_init=1.0,
        prompts={**PROMPTS, "limit": 16},
        sampling={**SAMPLING, "responses_per_prompt": 4},
    )
    dpo_h, dpo_s = dpo_stage("dpo_h", "pku_helpful", 0.05), dpo_stage("dpo_s", "pku_harmless", 0.2)
    extra = [slack, dpo_h, dpo_s, pecaid]
    config["stages"] += extra
    return {**config, "run_dir": str(run_dir), "progress_bar": False, "tensorboard": False}


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def history_of(run_dir, stage: str) -> dict:
    return read_json(os.path.join(run_dir, "stages", stage, "caid_history.json"))


def stage_model(run_dir, stage: str, mesh=None):
    return hf.load_checkpoint(str(run_dir / "stages" / stage / "model"), mesh=mesh)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The CAID demo (with the stages above) run by the real command line on one CPU device."""
    run_dir = tmp_path_factory.mktemp("caid_demo")
    config = run_dir / "config.json"
    config.write_text(json.dumps(demo_with_test_stages(run_dir)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_caid_demo_writes_what_its_config_promises(demo):
    stage_dir = demo / "stages" / "caid"
    iterations = load_config(os.path.join(CONFIGS, "caid_demo.yaml")).stages[3].iterations
    summary = history_of(demo, "caid")
    assert [h["iteration"] for h in summary["history"]] == list(range(iterations + 1))
    for t in range(iterations + 1):  # iterate 0 is pi_ref: sampled, not exported again
        assert (stage_dir / "samples" / f"{t}.jsonl").is_file()
        assert (stage_dir / "iterates" / str(t) / "config.json").is_file() == (t > 0)
    for plot in (stage_dir / "dual_trajectories.png", demo / "stages/eval/frontier.png"):
        assert plot.stat().st_size > 10_000
    assert (demo / "stages/eval/results.md").is_file()


@pytest.mark.slow
def test_caid_raises_lambda_when_the_constraint_is_violated(demo):
    history = history_of(demo, "caid")["history"]
    first = history[0]
    b = -first["u"][0]  # relative threshold: pi_ref's own samples give u_0 = -b
    assert b > 2 * first["u_se"][0]  # pi_ref violates it by more than the sampling error
    assert first["lambda"] == first["lambda_init"]  # the first policy step at the warm start
    stage = load_config(os.path.join(CONFIGS, "caid_demo.yaml")).stages[3]
    for t in range(1, len(history)):  # lam_t = max(0, lam_{t-1} - eta_{t-1} u_t)
        lam, u = history[t]["policy_lambda"][0], history[t]["u"][0]
        assert history[t]["policy_lambda"] == history[t - 1]["lambda"]
        eta = step_size(stage.dual_lr, stage.dual_lr_decay, t - 1)
        assert history[t]["lambda"][0] == pytest.approx(max(0.0, lam - eta * u))
        if u < 0:
            assert history[t]["lambda"][0] > lam


@pytest.mark.slow
def test_caid_best_iterate_meets_the_violated_constraint(demo):
    """Satisfied within sampling error: u + 2 se >= 0, se = std(g) / sqrt(N M) of the
    cost model's utility on the iterate's N x M samples; and, as an independent check,
    the oracle rates the chosen model less harmful than pi_ref."""
    summary = history_of(demo, "caid")
    best_index = summary["best_iterate"]
    best = summary["history"][best_index]
    assert best_index > 0
    assert best["u"][0] + 2 * best["u_se"][0] >= 0
    stage_dir = demo / "stages" / "caid"
    assert (stage_dir / "model").resolve() == (stage_dir / "iterates" / str(best_index)).resolve()
    results = read_json(demo / "stages/eval/results.json")
    assert results["caid"]["mean_cost"] < results["sft"]["mean_cost"]


@pytest.mark.slow
def test_caid_lowers_lambda_when_the_constraints_are_slack(demo):
    """Two constraints (cost model, b = -1; oracle, b = -2), so lambda is a vector; the
    printed order: iterate 0's dual step already moves lambda."""
    history = history_of(demo, "caid_slack")["history"]
    lam = np.array([h["lambda"] for h in history])  # (T + 1, 2), after each dual step
    u = np.array([h["u"] for h in history])
    np.testing.assert_allclose(u[0], [1.0, 2.0])  # relative thresholds: u_0 = 0 - b
    np.testing.assert_allclose(lam[0], [0.5, 0.0])  # max(0, 1 - 0.5 u_0)
    for t in range(1, len(history)):  # slack (u > 0) lowers each lam, down to 0
        assert np.all(u[t] > 0)
        np.testing.assert_allclose(lam[t], np.maximum(0.0, lam[t - 1] - 0.5 * u[t]))


@pytest.mark.slow
def test_pecaid_scores_with_the_pre_aligned_policies(demo):
    """PeCAID's r and g on the samples are beta * log(pi / pi_ref) of dpo_h and dpo_s, each
    with its own beta (0.05 and 0.2; the CAID stage's is 0.1)."""
    summary = history_of(demo, "pecaid")
    first, second = summary["history"]
    assert summary["constraints"] == ["dpo_s"] and first["lambda"] == [1.0]
    assert second["lambda"][0] == pytest.approx(max(0.0, 1.0 - second["u"][0]))
    with open(demo / "stages/pecaid/samples/0.jsonl") as f:
        rows = [json.loads(line) for line in f][:8]
    models = {name: stage_model(demo, name) for name in ("sft", "dpo_h", "dpo_s")}
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]

    def log_ratio(name: str, beta: float) -> np.ndarray:
        logps = [
            sequence_logprobs(models[m], oracle_tokenizer(), prompts, responses, template=TEMPLATE)
            for m in (name, "sft")
        ]
        return beta * (np.asarray(logps[0], np.float64) - logps[1])

    rewards, utilities = [r["reward"] for r in rows], [r["utility"][0] for r in rows]
    np.testing.assert_allclose(rewards, log_ratio("dpo_h", 0.05), atol=1e-4)
    np.testing.assert_allclose(utilities, log_ratio("dpo_s", 0.2), atol=1e-4)


@pytest.mark.slow
def test_scorers_give_the_same_values_on_pairs_and_on_their_text(demo, tmp_path):
    """The policy step reads scores of tokenised pairs, the dual step scores of text: the
    two paths (cost model and PeCAID log-ratio) agree on the same responses."""
    context = direct_context(tmp_path)
    tokenizer = context.tokenizer
    sft = stage_model(demo, "sft", context.mesh)
    spec = DataSpec.model_validate({**PAIRS, "limit": 40})
    dataset, _ = build_dataset(spec, tokenizer)
    dataset = add_reference_columns(dataset, spec, sft, PAIR_REFERENCE, context, 16)
    pairs = PairSet(dataset, spec, 16, tokenizer.pad_token_id, context.mesh)

    def decode(ids: np.ndarray) -> str:
        return tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    prompts = [decode(dataset.prompts[i]) for i in range(len(dataset))]
    scorers = (
        ScoreModelScorer(
            "cost", stage_model(demo, "cost", context.mesh), tokenizer, template=None, sign=-1.0
        ),
        LogRatioScorer(
            "utility",
            stage_model(demo, "dpo_s", context.mesh),
            sft,
            tokenizer,
            template=None,
            beta=0.1,
        ),
    )
    for scorer in scorers:
        on_pairs = scorer.on_pairs(pairs)
        for slot, completions in enumerate(dataset.completions):
            responses = [" " + decode(completions[i]) for i in range(len(dataset))]
            on_text = scorer.on_samples(prompts, responses)
            np.testing.assert_allclose(on_pairs[:, slot], on_text, atol=1e-4)


# ----------------------------------------------------------------------------- engine


def direct_stage(**extra) -> CaidStage:
    spec = caid_run_stage(
        "direct",
        [{"model": "oracle", "threshold": 0.1}],
        lambda_init=1.0,
        dual_lr=4.0,
        dual_lr_decay=1.0,
        **extra,
    )
    spec["data"] = {**PAIRS, "limit": 192}
    spec["prompts"] = {**PROMPTS, "limit": 16}
    spec["sampling"] = {**SAMPLING, "responses_per_prompt": 4}
    spec["train"] = {**POLICY_TRAIN, "log_every": 2, "save_every": 4}
    return CaidStage.model_validate(spec)


def direct_context(directory) -> StageContext:
    from sacpo_jax import parallel

    return StageContext(
        mesh=parallel.make_mesh(1, -1, 1),
        tokenizer=oracle_tokenizer(),
        stage_dir=str(directory / "stage"),
        cache_dir=str(directory / "cache"),
        tensorboard=False,
        progress_bar=False,
    )


def final_fingerprint(directory) -> str:
    return params_fingerprint(hf.load_checkpoint(str(directory / "stage" / "iterates" / "2")))


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    run_dir = demo
    directory = tmp_path_factory.mktemp("caid_direct")
    context = direct_context(directory)
    reference = hf.load_checkpoint(
        os.path.join(run_dir, "stages", "sft", "model"), mesh=context.mesh
    )
    before = params_fingerprint(reference)
    caid = CaidRun(direct_stage(), reference, {}, context)
    caid.run()
    return caid, reference, before, directory


@pytest.mark.slow
def test_lambda_updates_do_not_recompile_the_train_step(uninterrupted):
    caid, reference, before, _ = uninterrupted
    history = read_json(os.path.join(caid.ctx.stage_dir, "caid_history.json"))["history"]
    lambdas = [h["lambda"][0] for h in history]
    assert lambdas[0] != lambdas[1]  # the two policy steps ran under different lambdas
    assert caid.trainer.train_step.compiled._cache_size() == 1
    assert params_fingerprint(reference) == before  # pi_ref is never trained or donated


@pytest.mark.slow
def test_policy_step_t_labels_under_the_multiplier_after_iterate_t(uninterrupted):
    """The label rate logged by each policy step is that of lambda_t: lambda_init = 1 for
    the first (not lambda_init + eta b), then the damped dual steps eta_k = 4 / (k + 1)."""
    caid, *_ = uninterrupted
    history = read_json(os.path.join(caid.ctx.stage_dir, "caid_history.json"))["history"]
    assert history[0]["lambda"] == [1.0]
    assert [h.get("step_size") for h in history] == [None, 4.0, 2.0]
    with open(os.path.join(caid.ctx.stage_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    rates = [r["caid/second_preferred_rate"] for r in logged if "caid/second_preferred_rate" in r]
    expected = [
        second_preferred_probability(caid.pair_r, caid.pair_g, h["lambda"]).mean()
        for h in history[:2]
    ]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


@pytest.mark.slow
def test_a_caid_stage_resumes_mid_iteration(uninterrupted, tmp_path):
    expected, reference, _, expected_dir = uninterrupted
    context = direct_context(tmp_path)
    interrupted = CaidRun(direct_stage(), reference, {}, context)
    step = interrupted.trainer.step
    calls = []

    def counted(*args):
        calls.append(1)
        if len(calls) == interrupted.steps_per_iteration + 2:  # inside iteration 1
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args)

    interrupted.trainer.step = counted
    with pytest.raises(Preempted):
        interrupted.run()
    assert not os.path.exists(os.path.join(context.stage_dir, "caid_history.json"))
    resumed = CaidRun(direct_stage(), reference, {}, context)
    resumed.run()
    got = read_json(os.path.join(context.stage_dir, "caid_history.json"))
    want = read_json(os.path.join(expected.ctx.stage_dir, "caid_history.json"))
    assert got == want
    assert final_fingerprint(tmp_path) == final_fingerprint(expected_dir)
