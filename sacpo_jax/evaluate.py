"""``python -m sacpo_jax.evaluate``: generate with models, score, compare (``evaluation``).

    python -m sacpo_jax.evaluate --model sft=runs/demo/stages/sft/model \
        --model dpo=runs/demo/stages/dpo_h/model \
        --prompts ../shared/data/sacpo_eval/safety_problem.json \
        --reward-model RM_DIR --cost-model CM_DIR --baseline sft --output eval_out

With ``--judge-url URL --judge-model NAME`` the responses are also judged pairwise by an
OpenAI-compatible endpoint (``sacpo_jax.judging``; the key from ``--judge-api-key-env``).
Responses and judge calls are kept in ``--output`` (``models/``, ``judgments/``): a rerun
with the same arguments continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from sacpo_jax import parallel
from sacpo_jax.api import load_model
from sacpo_jax.config import EvalSettings, JudgeConfig
from sacpo_jax.data.prompts import read_prompts
from sacpo_jax.data.spec import SourceSpec
from sacpo_jax.data.tokenize import load_tokenizer
from sacpo_jax.errors import SacpoError
from sacpo_jax.evaluation import EvaluationError, evaluate_models, write_report
from sacpo_jax.models.hf import load_checkpoint
from sacpo_jax.scorers import OracleScorer, ScoreModelScorer, Scorer


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
    judge = parser.add_argument_group("pairwise LLM judge (sacpo_jax.config.JudgeConfig)")
    judge.add_argument("--judge-url", help="OpenAI-compatible server root")
    judge.add_argument("--judge-model")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    judge.add_argument("--judge-protocol", default="sacpo", help="sacpo (default) or verdict")
    judge.add_argument(
        "--judge-criteria", default="helpfulness,harmlessness", help="comma-separated"
    )
    judge.add_argument("--judge-repeats", type=int, help="default: the protocol's (sacpo: 3)")
    judge.add_argument("--judge-temperature", type=float, help="default: the protocol's")
    judge.add_argument("--judge-timeout", type=float, default=120.0)
    judge.add_argument("--judge-max-retries", type=int, default=5)
    judge.add_argument("--judge-workers", type=int, default=4)
    return parser.parse_args(argv)


def judge_config(args) -> JudgeConfig | None:
    """The judge of ``--judge-*``, or None without ``--judge-url``; EvaluationError (one
    line) for bad values."""
    if args.judge_url is None:
        return None
    fields = {
        "base_url": args.judge_url,
        "model": args.judge_model,
        "api_key_env": args.judge_api_key_env,
        "protocol": args.judge_protocol,
        "criteria": [c.strip() for c in args.judge_criteria.split(",") if c.strip()],
        "repeats": args.judge_repeats,
        "temperature": args.judge_temperature,
        "timeout": args.judge_timeout,
        "max_retries": args.judge_max_retries,
        "workers": args.judge_workers,
    }
    return validated(JudgeConfig, fields, "--judge-")


def validated(cls, fields: dict, prefix: str = "--"):
    """``cls`` built from command-line values; EvaluationError naming the flag (one line)."""
    try:
        return cls.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        flag = prefix + str(first["loc"][0]).replace("_", "-")
        flag = {"--judge-base-url": "--judge-url"}.get(flag, flag)
        message = first["msg"].removeprefix("Value error, ")
        raise EvaluationError(f"{flag}: {message} (got {first.get('input')!r})") from None


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
    try:
        named = dict(_name_and_path(spec) for spec in args.model)
        mesh = parallel.make_mesh()
        models = {name: load_checkpoint(path, mesh=mesh) for name, path in named.items()}
        tokenizer = load_tokenizer(args.tokenizer or next(iter(named.values())))
        fields = {"max_new_tokens": args.max_new_tokens, "elo_trials": args.elo_trials}
        settings = validated(EvalSettings, {"template": args.template, **fields})
        judge = judge_config(args)
        scorers: list[Scorer] = []
        if args.oracle:
            scorers += [OracleScorer("reward", tokenizer), OracleScorer("cost", tokenizer)]
        for path, name in ((args.reward_model, "reward"), (args.cost_model, "cost")):
            if path:
                score_model, _ = load_model(path, mesh=mesh)
                scorers.append(ScoreModelScorer(name, score_model, tokenizer, args.template))
        if not scorers and judge is None:
            raise EvaluationError(
                "no scorer: pass --oracle, --reward-model/--cost-model and/or --judge-url"
            )
        prompts = read_prompts(prompt_source(args.prompts), args.prompt_field, args.limit)
        results, samples = evaluate_models(
            models,
            tokenizer,
            prompts,
            scorers,
            settings,
            baseline=args.baseline,
            mesh=mesh,
            store=os.path.join(args.output, "models"),
            judge=judge,
            judgments=os.path.join(args.output, "judgments"),
        )
        paths = write_report(results, samples, args.output)
    except SacpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
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
