"""Evaluation: generate on prompt sets, score, compare models, write tables and plots.

Per model (REFERENCE §2, §5): mean reward, mean cost, harmless rate (share of responses
with cost <= 0), win rate against a baseline by reward (ties 0.5) and by harmlessness
(lower cost wins), and Elo ratings from all pairwise per-prompt comparisons (K=32, start
1200, shuffled replays, SFT/baseline anchored at 1000). Scores come from the bundled
oracle (on the bundled task) and/or reward and cost models (ours or imported HF score
models, ``sacpo_jax.scorers``) and/or a pairwise LLM judge (``sacpo_jax.judging``: the
SACPO paper's protocol or a verdict; win rates and Elo per criterion). Writes
results.json, results.md, frontier.png and, when training logs are given,
training_curves.png. The command line is
``python -m sacpo_jax.evaluate``; the chain's evaluate stage calls ``evaluate_models``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sacpo_jax import eval_metrics, plots
from sacpo_jax.checkpoint import Preempted
from sacpo_jax.config import EvalSettings, JudgeConfig
from sacpo_jax.errors import SacpoError
from sacpo_jax.generate import generate
from sacpo_jax.judging import judge_models
from sacpo_jax.models.llama import Llama
from sacpo_jax.scorers import Scorer


class EvaluationError(SacpoError, ValueError):
    """Bad evaluation input (scorers, model names); one line."""


def generate_responses(
    model: Llama, tokenizer, prompts: list[str], settings: EvalSettings, mesh: Mesh | None
) -> list[str]:
    return generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        template=settings.template,
        stop=settings.stop,
        mesh=mesh,
    )


def summarize(
    scores: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None, n: int
) -> dict:
    """Means, harmless rate and win rates vs the baseline for one model's scores on n
    prompts."""
    out: dict[str, Any] = {"n": n}
    if "reward" in scores:
        out["mean_reward"] = float(np.mean(scores["reward"]))
    if "cost" in scores:
        out["mean_cost"] = float(np.mean(scores["cost"]))
        out["harmless_rate"] = eval_metrics.harmless_rate(scores["cost"])
    if baseline is not None:
        if "reward" in scores:
            out["helpful_win_rate"] = eval_metrics.win_rate(scores["reward"], baseline["reward"])
        if "cost" in scores:
            out["harmless_win_rate"] = eval_metrics.win_rate(-scores["cost"], -baseline["cost"])
    return out


def pairwise_outcomes(values: dict[str, np.ndarray]) -> list[tuple[str, str, float]]:
    """Every pair of models on every prompt: 1 / 0.5 / 0 for the first by higher value."""
    outcomes = []
    for a, b in itertools.combinations(values, 2):
        for x, y in zip(values[a], values[b]):
            outcomes.append((a, b, 1.0 if x > y else 0.5 if x == y else 0.0))
    return outcomes


def add_elo(results: dict, per_model: dict[str, dict], anchor: str | None, trials: int) -> None:
    """Elo by helpfulness (reward) and by harmlessness (-cost), anchored at 1000."""
    names = list(per_model)
    if len(names) < 2:
        return
    for key, metric, sign in (("elo_helpful", "reward", 1.0), ("elo_harmless", "cost", -1.0)):
        if not all(metric in per_model[n] for n in names):
            continue
        values = {n: sign * per_model[n][metric] for n in names}
        ratings = eval_metrics.elo_ratings(
            pairwise_outcomes(values), names, trials=trials, anchor=anchor
        )
        for name, rating in ratings.items():
            results[name][key] = rating


def evaluate_models(
    models: dict[str, Llama],
    tokenizer,
    prompts: list[dict],
    scorers: Sequence[Scorer],
    settings: EvalSettings,
    *,
    baseline: str | None = None,
    mesh: Mesh | None = None,
    store: str | None = None,
    should_stop: Callable[[int], bool] | None = None,
    judge: JudgeConfig | None = None,
    judgments: str | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> tuple[dict, dict]:
    """(results per model, samples per model) for the given models and prompts; with a
    mesh, each generation batch is split over its data-parallel axes.

    ``store``: a directory where each model's responses and scores are kept as soon as
    they exist, and read back instead of generated again (a rerun resumes per model).
    ``should_stop(i)`` is asked after the i-th model: True stops with ``Preempted``.
    ``judge``: also judge the responses pairwise (on process 0, with ``stop_requested``
    polled between calls), keeping every call in the directory ``judgments``.
    """
    if judge is not None and judgments is None:
        raise EvaluationError("a judge needs a directory to keep its judgments in")
    if baseline is not None and baseline not in models:
        raise EvaluationError(
            f"baseline '{baseline}' is not among the evaluated models {list(models)}"
        )
    texts = [p["prompt"] for p in prompts]
    categories = np.array([p["category"] for p in prompts])
    per_model, samples = {}, {}
    for index, (name, model) in enumerate(models.items()):
        responses, scores = _stored(store, name, len(texts))
        if responses is None:
            responses = generate_responses(model, tokenizer, texts, settings, mesh)
            scores = {scorer.name: scorer.on_samples(texts, responses) for scorer in scorers}
            _keep(store, name, responses, scores)
        per_model[name] = scores
        samples[name] = [
            {"prompt": p, "response": r, **{k: float(v[i]) for k, v in scores.items()}}
            for i, (p, r) in enumerate(zip(texts, responses))
        ]
        if jax.process_index() == 0:
            print(f"[evaluate] {name}: " + _brief(summarize(scores, None, len(texts))))
        if should_stop is not None and index + 1 < len(models) and should_stop(index):
            raise Preempted(
                f"[evaluate] stopped after {index + 1} of {len(models)} models (preemption or "
                "Ctrl-C): rerun the same command to evaluate the rest"
            )
    results = {}
    for name, scores in per_model.items():
        base = per_model[baseline] if baseline else None
        results[name] = summarize(scores, base, len(texts))
        for category in sorted(set(categories)) if len(set(categories)) > 1 else []:
            pick = categories == category
            sub = summarize({k: v[pick] for k, v in scores.items()}, None, int(pick.sum()))
            results[name].update({f"{category}/{k}": v for k, v in sub.items() if k != "n"})
    add_elo(results, per_model, baseline, settings.elo_trials)
    if judge is not None and jax.process_index() == 0:
        judged = judge_models(
            samples,
            judge,
            judgments,
            baseline=baseline,
            elo_trials=settings.elo_trials,
            stop_requested=stop_requested,
        )
        for name, metrics in judged.items():
            results[name].update(metrics)
    return results, samples


def _model_file(store: str, name: str) -> str:
    return os.path.join(store, f"{name}.json")


def _stored(store: str | None, name: str, count: int) -> tuple[list | None, dict | None]:
    """A model's kept responses and scores, if the store has all of them."""
    if store is None or not os.path.isfile(_model_file(store, name)):
        return None, None
    with open(_model_file(store, name), encoding="utf-8") as f:
        kept = json.load(f)
    if len(kept["responses"]) != count:
        return None, None
    return kept["responses"], {k: np.asarray(v, np.float64) for k, v in kept["scores"].items()}


def _keep(store: str | None, name: str, responses: list[str], scores: dict) -> None:
    if store is None or jax.process_index() != 0:
        return
    os.makedirs(store, exist_ok=True)
    path = _model_file(store, name)
    tree = {"responses": responses, "scores": {k: v.tolist() for k, v in scores.items()}}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(tree, f)
    os.replace(path + ".tmp", path)


def _brief(summary: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float))


def write_report(
    results: dict,
    samples: dict,
    directory: str,
    *,
    series: dict[str, list[str]] | None = None,
    training_logs: dict[str, str] | None = None,
) -> dict[str, str]:
    """results.json, results.md, samples.jsonl, frontier.png (+ training_curves.png)."""
    if jax.process_index() != 0:
        return {}
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ("results.json", "results.md")}
    with open(paths["results.json"], "w") as f:
        json.dump(results, f, indent=2)
    columns = [c for c in _TABLE_COLUMNS if any(c in r for r in results.values())]
    table = {m: {c: r[c] for c in columns if c in r} for m, r in results.items()}
    with open(paths["results.md"], "w") as f:
        f.write(eval_metrics.results_table_markdown(table) + "\n")
    with open(os.path.join(directory, "samples.jsonl"), "w") as f:
        for name, rows in samples.items():
            for row in rows:
                f.write(json.dumps({"model": name, **row}) + "\n")
    first = next(iter(results.values()))
    if "harmless_rate" in first and "mean_reward" in first:
        paths["frontier.png"] = os.path.join(directory, "frontier.png")
        usable = {k: v for k, v in (series or {}).items() if all(m in results for m in v)}
        plots.plot_frontier(
            results,
            paths["frontier.png"],
            series=usable,
            x_key="harmless_rate",
            y_key="mean_reward",
            x_label="harmless rate (cost <= 0)",
            y_label="mean reward",
        )
    logs = {k: v for k, v in (training_logs or {}).items() if os.path.isfile(v)}
    if logs:
        paths["training_curves.png"] = os.path.join(directory, "training_curves.png")
        plots.plot_training_curves(logs, paths["training_curves.png"])
    return paths


_TABLE_COLUMNS = (
    "mean_reward",
    "mean_cost",
    "harmless_rate",
    "helpful_win_rate",
    "harmless_win_rate",
    "elo_helpful",
    "elo_harmless",
    "judge_helpfulness_win_rate",
    "judge_harmlessness_win_rate",
    "judge_helpfulness_elo",
    "judge_harmlessness_elo",
    "harmful/mean_reward",
    "harmful/harmless_rate",
    "benign/mean_reward",
)
