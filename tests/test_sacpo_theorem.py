"""SACPO's Theorem 1 in small, run through the project's own chain: config -> command
line -> SFT, DPO and a swept realignment stage (precomputed references), on the bundled
task.

For a finite candidate set per prompt, DPO with the expected Bradley-Terry labels (soft
labels: the ``pair`` adapter's per-pair ``label_smoothing`` eps = sigmoid(-|Delta|), so the
optimum is exact rather than up to label noise; ties get eps = 1/2) gives, restricted to
the candidates,

  stage 1 (reference pi_ref, coefficient beta):          pi_r ∝ pi_ref exp(r / beta)
  stage 2 (reference = start = pi_r, coefficient c):      pi   ∝ pi_r exp(g / c)

so with c = beta / lam the realigned policy is the closed form pi_ref exp((r + lam g) /
beta) (REFERENCE §1-2). The realignment stage sweeps c over {beta/2, beta, 2 beta}: for
lam = 2 the right coefficient is beta/2, for lam = 0.5 it is 2 beta, and the wrong ones
(beta: lam ignored; beta * lam: lam inverted) must miss the closed form by more than the
bound that the right one meets. We measure the total variation distance between each
exported model's distribution over the candidates and the closed form.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sacpo_jax.data import oracle_task
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.models import hf
from sacpo_jax.scoring import sequence_logprobs

pytestmark = pytest.mark.slow  # an end-to-end run: the full suite only

BETA = 1.0
LAMBDAS = (2.0, 0.5)
COEFFICIENTS = (BETA / 2, BETA, 2 * BETA)  # the realignment sweep
TV_BOUND = 0.05  # measured: right coefficients ~0.001, wrong ones 0.16-0.37, pi_r 0.47


def candidate_table(prompts):
    """Per prompt: candidate texts, rewards r and safety utilities g = -cost."""
    table = []
    for prompt in prompts:
        texts = oracle_task.candidate_responses(prompt)
        scores = np.array([oracle_task.oracle_scores(prompt, t) for t in texts])
        table.append((prompt, texts, scores[:, 0], -scores[:, 1]))
    return table


def soft_pairs(table, utility_index):
    """Every candidate pair, chosen = higher utility, label_smoothing = sigmoid(-|diff|).

    Ties get eps = 1/2, whose loss is minimal at an unchanged log-ratio: they anchor the
    responses (and prompts) on which the utility has nothing to say, as coin-flip labels
    do in expectation.
    """
    rows = []
    for prompt, texts, *utilities in table:
        u = utilities[utility_index]
        for i, j in itertools.combinations(range(len(texts)), 2):
            hi, lo = (i, j) if u[i] > u[j] else (j, i)
            eps = 1.0 / (1.0 + np.exp(abs(u[i] - u[j])))
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": texts[hi],
                    "rejected": texts[lo],
                    "label_smoothing": eps,
                }
            )
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def data(path: str, adapter: str) -> dict:
    source = {"type": "jsonl", "path": path}
    return {
        "source": source,
        "adapter": adapter,
        "template": oracle_task.TEMPLATE,
        "max_length": 48,
        "max_prompt_length": 24,
    }


def train(steps: int, batch_size: int) -> dict:
    """Full-batch Adam (no clipping, no warmup) for ``steps`` steps of a cosine schedule."""
    return {
        "max_steps": steps,
        "batch_size": batch_size,
        "learning_rate": 4e-3,
        "warmup_ratio": 0.0,
        "max_grad_norm": 0.0,
        "log_every": 100,
        "save_every": 100_000,
    }


def chain_config(directory, table) -> dict:
    """SFT on every candidate equally (a reference that spreads its mass over them), DPO on
    the reward pairs at beta, and the realignment sweep on the safety pairs."""
    sft_rows = [{"prompt": p, "response": t} for p, texts, *_ in table for t in texts]
    sft = write_jsonl(directory / "sft.jsonl", sft_rows)
    reward = write_jsonl(directory / "reward.jsonl", soft_pairs(table, 0))
    safety = write_jsonl(directory / "safety.jsonl", soft_pairs(table, 1))
    pairs = len(soft_pairs(table, 0))
    return {
        "name": "theorem",
        "run_dir": str(directory / "run"),
        "model": {
            "random": {
                "hidden_size": 48,
                "intermediate_size": 96,
                "head_dim": 16,
                "init_std": 0.05,
            }
        },
        "tokenizer": {"path": "bundled:oracle"},
        "progress_bar": False,
        "tensorboard": False,
        "stages": [
            {"name": "sft", "kind": "sft", "data": data(sft, "sft"), "train": train(120, 16)},
            {
                "name": "dpo_r",
                "kind": "dpo",
                "beta": BETA,
                "data": data(reward, "pair"),
                "train": train(120, pairs),
            },
            {
                "name": "realign",
                "kind": "dpo",
                "beta": list(COEFFICIENTS),
                "data": data(safety, "pair"),
                "train": train(120, pairs),
            },
        ],
    }


def candidate_distribution(model, tokenizer, table):
    out = []
    for prompt, texts, *_ in table:
        logps = sequence_logprobs(
            model, tokenizer, [prompt] * len(texts), texts, template=oracle_task.TEMPLATE
        )
        weights = np.exp(logps - logps.max())
        out.append(weights / weights.sum())
    return out


def closed_form(pi_ref, table, utility):
    """pi_ref exp(utility(r, g) / BETA), normalised over each prompt's candidates."""
    out = []
    for p_ref, (_, _, r, g) in zip(pi_ref, table):
        u = utility(r, g)
        w = p_ref * np.exp((u - u.max()) / BETA)
        out.append(w / w.sum())
    return out


def mean_tv(first, second) -> float:
    return float(np.mean([0.5 * np.abs(p - q).sum() for p, q in zip(first, second)]))


def test_realigned_policy_matches_closed_form_at_lambda_2_and_one_half(tmp_path):
    tokenizer = oracle_tokenizer()
    prompts = [p["prompt"] for p in oracle_task.load_split("eval_prompts")]
    harmful = [p for p in prompts if oracle_task.prompt_topic(p).harmful][:1]
    benign = [p for p in prompts if not oracle_task.prompt_topic(p).harmful][:1]
    table = candidate_table(harmful + benign)
    config = tmp_path / "theorem.json"
    config.write_text(json.dumps(chain_config(tmp_path, table)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    command = [sys.executable, "-m", "sacpo_jax.train", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

    stages = tmp_path / "run" / "stages"

    def distribution(stage: str):
        return candidate_distribution(
            hf.load_checkpoint(str(stages / stage / "model")), tokenizer, table
        )

    pi_ref, pi_r = distribution("sft"), distribution("dpo_r")
    realigned = {c: distribution(f"realign@beta={c:g}") for c in COEFFICIENTS}
    spread = max(float(p.max()) for p in pi_ref)
    stage1_tv = mean_tv(pi_r, closed_form(pi_ref, table, lambda r, g: r))
    report = [f"stage1 TV {stage1_tv:.4f}; largest reference candidate mass {spread:.3f}"]
    checks = []
    for lam in LAMBDAS:
        target = closed_form(pi_ref, table, lambda r, g, lam=lam: r + lam * g)
        tv = {c: mean_tv(realigned[c], target) for c in COEFFICIENTS}
        right, wrong = BETA / lam, (BETA, BETA * lam)
        report.append(
            f"lam={lam}: TV right(beta/lam={right:g})={tv[right]:.4f}, "
            + ", ".join(f"wrong({c:g})={tv[c]:.4f}" for c in wrong)
            + f", pi_r={mean_tv(pi_r, target):.3f}"
        )
        checks.append((tv[right], [tv[c] for c in wrong]))
    message = "; ".join(report)
    assert spread < 0.5, message  # the reference is not concentrated on one candidate
    assert stage1_tv < TV_BOUND, message
    for right_tv, wrong_tvs in checks:
        assert right_tv < TV_BOUND, message
        assert min(wrong_tvs) > 2 * TV_BOUND, message  # the bound tells right from wrong
