"""The stage chain: each stage starts from (and by default is referenced against) another.

SACPO is the chain  sft -> dpo(helpfulness, beta) -> dpo(harmlessness, beta/lambda):
stage k's start is stage k-1's result ("previous") and its reference is its own start,
so realignment uses the reward-aligned model as both. A stage may instead name any
earlier stage, or a Hugging Face directory, as its start or reference. A stage with a
list of betas fans out into one stage per value, all from the same start (a sweep), so
stage 1 is trained once however many beta/lambda values are tried.

Merge stages (P-SACPO) and evaluate stages read earlier results by name. Finished
stages are not retrained: their exported model is loaded back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sacpo_jax.config import TRAINING_KINDS
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama

INITIAL = "initial"


class ChainError(ValueError):
    """A stage names a start or reference that does not exist; one line."""


def sweep_name(name: str, key: str, value: float) -> str:
    return f"{name}@{key}={value:g}"


def expand_sweeps(stages: list) -> list:
    """One stage per swept value: beta lists (name@beta=b) and merge q lists (name@q=q).

    Swept training stages keep the original start (resolved to a concrete name) so all
    of them start from the same model; a later "previous" after a sweep is ambiguous.
    An evaluate stage with models "all" gets every earlier language-model stage.
    """
    expanded = []
    previous = INITIAL
    for stage in stages:
        if stage.kind in TRAINING_KINDS:
            start = previous if stage.start == "previous" else stage.start
            if start is None:
                raise ChainError(
                    f"stage '{stage.name}' follows a sweep: name its start explicitly (one of "
                    "the swept stages, e.g. start: NAME@beta=0.1)"
                )
            stage = stage.model_copy(update={"start": start})
        swept = _swept_values(stage)
        if swept is None:
            expanded.append(_with_models(stage, expanded))
            previous = stage.name if stage.kind in TRAINING_KINDS + ("merge",) else previous
            continue
        key, values = swept
        for value in values:
            expanded.append(
                stage.model_copy(update={"name": sweep_name(stage.name, key, value), key: value})
            )
        previous = None
    return expanded


def _swept_values(stage) -> tuple[str, list[float]] | None:
    for key in ("beta", "q"):
        value = getattr(stage, key, None)
        if isinstance(value, list):
            return key, value
    return None


def _with_models(stage, earlier: list):
    if stage.kind == "evaluate" and stage.models == "all":
        names = [s.name for s in earlier if s.kind not in ("reward", "cost", "evaluate")]
        return stage.model_copy(update={"models": names})
    return stage


def sweep_series(expanded: list) -> dict[str, list[str]]:
    """Lines for the frontier plot, from the expanded stages: each beta sweep from its
    start through decreasing beta (stronger realignment), each q merge sweep from its
    first model through increasing q to its second."""
    groups: dict[str, list] = {}
    for stage in expanded:
        base, _, swept = stage.name.partition("@")
        if swept:
            groups.setdefault(base, []).append(stage)
    series = {}
    for base, members in groups.items():
        first = members[0]
        if first.kind == "merge":
            ordered = sorted(members, key=lambda s: s.q)
            series[base] = [first.models[0]] + [s.name for s in ordered] + [first.models[1]]
        else:
            ordered = sorted(members, key=lambda s: -s.beta)
            series[base] = [first.start] + [s.name for s in ordered]
    return series


def model_sources(stage) -> list[str]:
    """Names (or paths) of the models a stage reads."""
    sources = [getattr(stage, "start", None)]
    reference = getattr(stage, "reference", None)
    if reference not in (None, "start"):
        sources.append(reference)
    sources += list(getattr(stage, "models", None) or [])
    sources += [getattr(stage, name, None) for name in ("reward_model", "cost_model")]
    return [s for s in sources if s]


def last_uses(stages: list) -> dict[str, int]:
    """For each model name, the index of the last stage that reads it."""
    last: dict[str, int] = {}
    for index, stage in enumerate(stages):
        for source in model_sources(stage):
            last[source] = index
    return last


class ModelStore:
    """Models by stage name, plus HF directories by path; frees models once unused."""

    def __init__(self, initial: Llama, load_options: dict[str, Any]):
        self._models: dict[str, Llama] = {INITIAL: initial}
        self._load_options = load_options

    def get(self, name: str, asked_by: str) -> Llama:
        if name in self._models:
            return self._models[name]
        if os.path.exists(name) or hf.is_hub_id(name):  # a directory, or an EasyLM file
            self._models[name] = hf.load_checkpoint(name, **self._load_options)
            return self._models[name]
        raise ChainError(
            f"stage '{asked_by}' names '{name}', which is neither an earlier stage, a model "
            "directory nor a hub id"
        )

    def put(self, name: str, model: Llama) -> None:
        self._models[name] = model

    def release(self, name: str) -> None:
        self._models.pop(name, None)

    def names(self) -> list[str]:
        return list(self._models)

    def start_and_reference(self, stage) -> tuple[Llama, Llama]:
        """A training stage's start model and its reference ("start": the same model)."""
        start = self.get(stage.start, stage.name)
        reference = getattr(stage, "reference", "start")
        return start, start if reference == "start" else self.get(reference, stage.name)


def run_chain(
    stages: list, store: ModelStore, run_one: Callable[[Any, ModelStore], Llama | None]
) -> None:
    """Run the (expanded) stages in order, keeping each result only while it is needed."""
    last = last_uses(stages)
    for index, stage in enumerate(stages):
        result = run_one(stage, store)
        if result is not None:
            store.put(stage.name, result)
        for name in store.names():
            if last.get(name, -1) <= index and name != INITIAL:
                store.release(name)
