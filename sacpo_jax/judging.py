"""Judged comparisons: which calls a judge makes, where they are kept, and what they add up to.

Calls: for each criterion, each ordered pair of models (with a baseline: every model
and the baseline, in both orders, as the paper's ``--vs_base_only``; without one: every
ordered pair), each prompt and each repeat r = 0 .. repeats-1, one call with the pair's
responses as (first, second). Each finished call is appended at once to
``judgments.jsonl`` under a key that hashes everything that decides it (protocol, judge
model, temperature, max_tokens, criterion, the two models, prompt, both responses, r), so
a rerun makes only the calls it is missing, and never reuses a call whose responses
changed.

Results per model and criterion c (REFERENCE §2, REFERENCE-NEXT §5):

- ``judge_<c>_win_rate`` (and ``_std``) against the baseline: for each repeat r, the
  mean over prompts of the model's outcome (win 1, tie 0.5, loss 0); "sacpo" counts both
  orders as separate outcomes (higher score wins), "verdict" needs both orders to agree
  for a win or a loss (else a tie); mean and std over r. The baseline has 0.5.
- ``judge_<c>_elo`` (and ``_std``): ``eval_metrics.grouped_elo_ratings`` with K 32,
  start 1200, ``elo_trials`` trials x 10 shuffled passes, one group per comparison
  (ordered pair and prompt under "sacpo", pair and prompt under "verdict") applying its
  r outcomes in turn, each trial rescaled so the baseline has 1000.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from sacpo_jax import eval_metrics
from sacpo_jax.checkpoint import Preempted
from sacpo_jax.config import JudgeConfig
from sacpo_jax.judge import PROTOCOLS, JudgeClient, Protocol

JUDGMENTS_FILE = "judgments.jsonl"


def client_for(settings: JudgeConfig) -> JudgeClient:
    return JudgeClient(
        settings.base_url,
        settings.model,
        api_key_env=settings.api_key_env,
        timeout=settings.timeout,
        max_retries=settings.max_retries,
    )


class Plan:
    """The calls of one judged comparison and the settings that decide their answers."""

    def __init__(self, settings: JudgeConfig, samples: dict[str, list[dict]], baseline: str | None):
        self.settings, self.samples, self.baseline = settings, samples, baseline
        self.protocol: Protocol = PROTOCOLS[settings.protocol]
        p = self.protocol
        self.repeats = settings.repeats or p.repeats
        self.temperature = p.temperature if settings.temperature is None else settings.temperature
        self.max_tokens = settings.max_tokens or p.max_tokens

    def pairs(self) -> list[tuple[str, str]]:
        """Ordered (first, second) model pairs."""
        models = list(self.samples)
        if self.baseline is None:
            return list(itertools.permutations(models, 2))
        others = [m for m in models if m != self.baseline]
        return [pair for m in others for pair in ((m, self.baseline), (self.baseline, m))]

    def calls(self) -> list[dict]:
        """Every call: criterion, first, second, question, repeat and its key."""
        out = []
        for criterion, (first, second) in itertools.product(self.settings.criteria, self.pairs()):
            for question in range(len(self.samples[first])):
                for repeat in range(self.repeats):
                    call = {
                        "criterion": criterion,
                        "first": first,
                        "second": second,
                        "question": question,
                        "repeat": repeat,
                    }
                    call["key"] = self.key(call)
                    out.append(call)
        return out

    def texts(self, call: dict) -> tuple[str, str, str]:
        q = call["question"]
        first, second = self.samples[call["first"]][q], self.samples[call["second"]][q]
        return first["prompt"], first["response"], second["response"]

    def key(self, call: dict) -> str:
        decided_by = [
            self.protocol.name,
            self.settings.model,
            self.temperature,
            self.max_tokens,
            call["criterion"],
            call["first"],
            call["second"],
            *self.texts(call),
            call["repeat"],
        ]
        return hashlib.sha256(json.dumps(decided_by).encode("utf-8")).hexdigest()

    def ask(self, client: JudgeClient, call: dict) -> dict:
        """The call made: its record with the judge's raw reply and parsed answer."""
        messages = self.protocol.messages(call["criterion"], *self.texts(call))
        content = client.complete(
            messages, temperature=self.temperature, max_tokens=self.max_tokens
        )
        return {**call, "content": content, "answer": self.protocol.parse(content)}


# ----------------------------------------------------------------------------- the store


def read_judgments(path: str) -> dict[str, dict]:
    """Kept calls by key; a line cut short by a kill is ignored."""
    kept: dict[str, dict] = {}
    if not os.path.isfile(path):
        return kept
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            kept[record["key"]] = record
    return kept


def end_torn_line(path: str) -> None:
    """Close a last line cut short by a kill, so that the next record starts its own."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def append_judgment(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- running


def judge_models(
    samples: dict[str, list[dict]],
    settings: JudgeConfig,
    directory: str,
    *,
    baseline: str | None = None,
    elo_trials: int = 50,
    client: JudgeClient | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, dict[str, float]]:
    """Judge ``samples`` (model -> rows with prompt and response, same prompts in the same
    order) and return the judged metrics per model. Calls are kept in
    ``directory/judgments.jsonl``; ``stop_requested()`` True stops with ``Preempted``."""
    plan = Plan(settings, samples, baseline)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, JUDGMENTS_FILE)
    kept = read_judgments(path)
    end_torn_line(path)
    calls = plan.calls()
    missing = [call for call in calls if call["key"] not in kept]
    print(
        f"[judge] {settings.model} ({plan.protocol.name}): {len(calls)} calls, "
        f"{len(calls) - len(missing)} kept from an earlier run"
    )
    if missing:
        run_calls(plan, client or client_for(settings), missing, path, kept, stop_requested)
    records = [kept[call["key"]] for call in calls]
    unparsed = sum(record["answer"] is None for record in records)
    if unparsed:
        print(f"[judge] {unparsed} of {len(records)} replies had no readable answer: ties")
    return judged_results(plan, records, elo_trials)


def run_calls(
    plan: Plan,
    client: JudgeClient,
    calls: list[dict],
    path: str,
    kept: dict[str, dict],
    stop_requested: Callable[[], bool] | None,
) -> None:
    """Make ``calls`` with ``settings.workers`` in flight, keeping each as it finishes. On
    a failure or a stop request no new call starts; the calls in flight finish and are
    kept, then the failure (or ``Preempted``) is raised."""
    failure: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(plan.settings.workers) as pool:
        futures = [pool.submit(plan.ask, client, call) for call in calls]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            if future.cancelled():
                continue
            try:
                record = future.result()
            except Exception as error:  # JudgeError: the first one is reported
                failure = failure or error
            else:
                append_judgment(path, record)
                kept[record["key"]] = record
            if failure is None and stop_requested is not None and stop_requested():
                failure = Preempted(
                    f"[judge] stopped after {done} of {len(calls)} calls (preemption or "
                    "Ctrl-C): rerun the same command to judge the rest"
                )
            if failure is not None:
                for pending in futures:
                    pending.cancel()
    if failure is not None:
        raise failure


# ----------------------------------------------------------------------------- results


def judged_results(plan: Plan, records: list[dict], elo_trials: int) -> dict[str, dict]:
    """Win rates against the baseline and Elo ratings per model and criterion."""
    results: dict[str, dict[str, Any]] = {name: {} for name in plan.samples}
    for criterion in plan.settings.criteria:
        outcomes = {
            (r["first"], r["second"], r["question"], r["repeat"]): plan.protocol.first_outcome(
                r["answer"]
            )
            for r in records
            if r["criterion"] == criterion
        }
        combine = _paired if plan.protocol.name == "verdict" else _both_orders
        groups = combine(outcomes)
        prefix = f"judge_{criterion}"
        if plan.baseline is not None:
            for name in plan.samples:
                rate, std = _win_rate(groups, name, plan)
                results[name][f"{prefix}_win_rate"] = rate
                results[name][f"{prefix}_win_rate_std"] = std
        elo = eval_metrics.grouped_elo_ratings(
            list(groups.values()), list(plan.samples), trials=elo_trials, anchor=plan.baseline
        )
        for name, (mean, std) in elo.items():
            results[name][f"{prefix}_elo"] = mean
            results[name][f"{prefix}_elo_std"] = std
    return results


Group = list[tuple[str, str, float]]


def _both_orders(outcomes: dict) -> dict[tuple, Group]:
    """ "sacpo": one group per ordered pair and question, its outcomes by repeat."""
    groups: dict[tuple, Group] = {}
    for (first, second, question, _), outcome in sorted(outcomes.items()):
        groups.setdefault((first, second, question), []).append((first, second, outcome))
    return groups


def _paired(outcomes: dict) -> dict[tuple, Group]:
    """ "verdict": one group per unordered pair and question; per repeat, a win (or loss)
    for the first model only when both orders agree, else a tie."""
    groups: dict[tuple, Group] = {}
    for (first, second, question, repeat), outcome in sorted(outcomes.items()):
        reverse = outcomes.get((second, first, question, repeat))
        if reverse is None or (second, first) < (first, second):
            continue
        mine = (outcome, 1.0 - reverse)
        combined = 1.0 if mine == (1.0, 1.0) else 0.0 if mine == (0.0, 0.0) else 0.5
        groups.setdefault((first, second, question), []).append((first, second, combined))
    return groups


def _win_rate(groups: dict[tuple, Group], name: str, plan: Plan) -> tuple[float, float]:
    """Mean and std over repeats of ``name``'s mean outcome against the baseline."""
    if name == plan.baseline:
        return 0.5, 0.0
    per_repeat = [[] for _ in range(plan.repeats)]
    for group in groups.values():
        for repeat, (first, second, outcome) in enumerate(group):
            if plan.baseline in (first, second) and name in (first, second):
                per_repeat[repeat].append(outcome if first == name else 1.0 - outcome)
    rates = np.array([np.mean(values) for values in per_repeat])
    return float(rates.mean()), float(rates.std())
