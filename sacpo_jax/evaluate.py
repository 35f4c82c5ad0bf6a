"""Evaluation: generate on prompt sets, score, compare models, write tables and plots.

Per model (REFERENCE §2, §5): mean reward, mean cost, harmless rate (share of responses
with cost <= 0), win rate against a baseline by reward (ties 0.5) and by harmlessness
(lower cost wins), and Elo ratings from all pairwise per-prompt comparisons (K=32, start
1200, shuffled replays, SFT/baseline anchored at 1000). Scores come from the bundled
oracle (on the bundled task) and/or reward and cost models (ours or imported HF score
models). Writes results.json, results.md, frontier.png and, when training logs are
given, training_curves.png.

    python -m sacpo_jax.evaluate --model sft=runs/demo/stages/sft/model \
        --model dpo=runs/demo/stages/dpo_h/model \
        --prompts ../shared/data/sacpo_eval/safety_problem.json \
        --reward-model RM_DIR --cost-model CM_DIR --baseline sft --output eval_out
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sacpo_jax import eval_metrics, plots
from sacpo_jax.config import EvalSettings
from sacpo_jax.data.sources import read_rows
from sacpo_jax.data.spec import SourceSpec
from sacpo_jax.generate import generate
from sacpo_jax.models.llama import Llama
from sacpo_jax.scoring import score_responses

Scorer = Callable[[list[str], list[str]], dict[str, np.ndarray]]


class EvaluationError(ValueError):
    """Bad evaluation input (prompt file, scorer, model names); one line."""


def read_prompts(source: SourceSpec, field: str = "prompt", limit: int | None = None) -> list[dict]:
    """{prompt, category} rows from any source: SACPO's JSON lists, JSONL, CSV, HF, bundled."""
    prompts = []
    for index, row in enumerate(read_rows(source)):
        if limit is not None and index >= limit:
            break
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise EvaluationError(
                f"{source.path or source.name}: row {index}: field '{field}' is missing or empty"
            )
        prompts.append({"prompt": text, "category": str(row.get("category", "all"))})
    if not prompts:
        raise EvaluationError(f"{source.path or source.name}: no prompts")
    return prompts


def oracle_scorer(prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
    """The bundled task's ground truth: helpfulness reward and harm cost."""
    from sacpo_jax.data.oracle_task import score_batch

    reward, cost = score_batch(prompts, responses)
    return {"reward": np.asarray(reward, np.float64), "cost": np.asarray(cost, np.float64)}


def model_scorer(score_model: Llama, tokenizer, name: str, template: str | None) -> Scorer:
    """A reward or cost model as a scorer (its output is named ``name``)."""

    def scorer(prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        scores = score_responses(score_model, tokenizer, prompts, responses, template=template)
        return {name: scores.astype(np.float64)}

    return scorer


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


def summarize(scores: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None) -> dict:
    """Means, harmless rate and win rates vs the baseline for one model's scores."""
    out: dict[str, Any] = {"n": int(len(next(iter(scores.values()))))}
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
) -> tuple[dict, dict]:
    """(results per model, samples per model) for the given models and prompts; with a
    mesh, each generation batch is split over its data-parallel axes."""
    if baseline is not None and baseline not in models:
        raise EvaluationError(
            f"baseline '{baseline}' is not among the evaluated models {list(models)}"
        )
    texts = [p["prompt"] for p in prompts]
    categories = np.array([p["category"] for p in prompts])
    per_model, samples = {}, {}
    for name, model in models.items():
        responses = generate_responses(model, tokenizer, texts, settings, mesh)
        scores: dict[str, np.ndarray] = {}
        for scorer in scorers:
            scores.update(scorer(texts, responses))
        per_model[name] = scores
        samples[name] = [
            {"prompt": p, "response": r, **{k: float(v[i]) for k, v in scores.items()}}
            for i, (p, r) in enumerate(zip(texts, responses))
        ]
        if jax.process_index() == 0:
            print(f"[evaluate] {name}: " + _brief(summarize(scores, None)))
    results = {}
    for name, scores in per_model.items():
        base = per_model[baseline] if baseline else None
        results[name] = summarize(scores, base)
        for category in sorted(set(categories)) if len(set(categories)) > 1 else []:
            pick = categories == category
            sub = summarize({k: v[pick] for k, v in scores.items()}, None)
            results[name].update({f"{category}/{k}": v for k, v in sub.items() if k != "n"})
    add_elo(results, per_model, baseline, settings.elo_trials)
    return results, samples


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
    "harmful/mean_reward",
    "harmful/harmless_rate",
    "benign/mean_reward",
)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_jax.evaluate", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--model", action="append", required=True, metavar="NAME=DIR", help="repeatable")
    add("--prompts", required=True, help="a .json list / .jsonl / .csv / .parquet, or 'bundled'")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--limit", type=int)
    parser.add_argument(
        "--tokenizer", help="tokenizer dir (default: the first model's), or bundled:oracle"
    )
    parser.add_argument(
        "--template",
        default="auto",
        help="'{prompt}' template, 'chat', or 'auto' (default: chat template if the "
        "tokenizer has one, else the PKU template)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--reward-model")
    parser.add_argument("--cost-model")
    parser.add_argument(
        "--oracle", action="store_true", help="score with the bundled task's oracle"
    )
    parser.add_argument("--baseline", help="model name for win rates and the Elo anchor")
    parser.add_argument("--elo-trials", type=int, default=50)
    parser.add_argument("--output", required=True)
    return parser.parse_args(argv)


def prompt_source(path: str) -> SourceSpec:
    if path == "bundled":
        return SourceSpec(type="bundled", name="eval_prompts")
    if not os.path.isfile(path):
        raise EvaluationError(f"prompt file {path} not found")
    suffix = os.path.splitext(path)[1].lstrip(".")
    if suffix not in ("json", "jsonl", "csv", "parquet"):
        raise EvaluationError(f"{path}: unsupported prompt file type '.{suffix}'")
    return SourceSpec(type=suffix, path=path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sacpo_jax import load_model, parallel
    from sacpo_jax.data.errors import DataError
    from sacpo_jax.models.hf import CheckpointError, load_checkpoint
    from sacpo_jax.run import tokenizer_from_path

    try:
        named = dict(_name_and_path(spec) for spec in args.model)
        mesh = parallel.make_mesh()
        models = {name: load_checkpoint(path, mesh=mesh) for name, path in named.items()}
        tokenizer = tokenizer_from_path(args.tokenizer or next(iter(named.values())))
        settings = EvalSettings(
            template=args.template, max_new_tokens=args.max_new_tokens, elo_trials=args.elo_trials
        )
        scorers: list[Scorer] = [oracle_scorer] if args.oracle else []
        for path, key in ((args.reward_model, "reward"), (args.cost_model, "cost")):
            if path:
                score_model, _ = load_model(path, mesh=mesh)
                scorers.append(model_scorer(score_model, tokenizer, key, args.template))
        if not scorers:
            raise EvaluationError("no scorer: pass --oracle and/or --reward-model/--cost-model")
        prompts = read_prompts(prompt_source(args.prompts), args.prompt_field, args.limit)
        results, samples = evaluate_models(
            models, tokenizer, prompts, scorers, settings, baseline=args.baseline, mesh=mesh
        )
        paths = write_report(results, samples, args.output)
    except (EvaluationError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if paths:
        with open(paths["results.md"]) as f:
            print(f.read(), end="")
        print(f"results in {args.output}/")
    return 0


def _name_and_path(spec: str) -> tuple[str, str]:
    if "=" not in spec:
        raise EvaluationError(f"--model {spec!r}: expected NAME=DIR")
    name, path = spec.split("=", 1)
    return name, path


if __name__ == "__main__":
    sys.exit(main())
