"""The stage chain: each stage starts from (and by default is referenced against) another.

SACPO is the chain  sft -> dpo(helpfulness, beta) -> dpo(harmlessness, beta/lambda):
stage k's start is stage k-1's result ("previous") and its reference is its own start,
so realignment uses the reward-aligned model as both. A stage may instead name any
earlier stage, or a Hugging Face directory, as its start or reference. A stage with a
list of betas fans out into one stage per value, all from the same start (a sweep), so
stage 1 is trained once however many beta/lambda values are tried.

Finished stages are not retrained: their exported model is loaded back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sacpo_jax.config import PreferenceStage, RunConfig
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama

INITIAL = "initial"


class ChainError(ValueError):
    """A stage names a start or reference that does not exist; one line."""


def sweep_name(name: str, beta: float) -> str:
    return f"{name}@beta={beta:g}"


def expand_sweeps(stages: list) -> list:
    """Replace each stage with a list of betas by one stage per beta, named name@beta=b.

    Each expanded stage keeps the original start (resolved to a concrete name) so all
    of them start from the same model; a later "previous" after a sweep is ambiguous.
    """
    expanded = []
    previous = INITIAL
    for stage in stages:
        start = previous if stage.start == "previous" else stage.start
        if start is None:
            raise ChainError(
                f"stage '{stage.name}' follows a sweep: name its start explicitly (one of the "
                "swept stages, e.g. start: NAME@beta=0.1)"
            )
        if isinstance(stage, PreferenceStage) and isinstance(stage.beta, list):
            for beta in stage.beta:
                expanded.append(
                    stage.model_copy(
                        update={"name": sweep_name(stage.name, beta), "beta": beta, "start": start}
                    )
                )
            previous = None
        else:
            expanded.append(stage.model_copy(update={"start": start}))
            previous = stage.name
    return expanded


def model_sources(stage) -> list[str]:
    """Names (or paths) of the models a stage reads."""
    sources = [stage.start]
    reference = getattr(stage, "reference", None)
    if reference not in (None, "start"):
        sources.append(reference)
    sources += list(getattr(stage, "models", []) or [])
    return sources


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
        if os.path.isdir(name):
            self._models[name] = hf.load_checkpoint(name, **self._load_options)
            return self._models[name]
        raise ChainError(
            f"stage '{asked_by}' names '{name}', which is neither an earlier stage nor a model "
            "directory"
        )

    def put(self, name: str, model: Llama) -> None:
        self._models[name] = model

    def release(self, name: str) -> None:
        self._models.pop(name, None)

    def names(self) -> list[str]:
        return list(self._models)


def run_chain(
    config: RunConfig,
    store: ModelStore,
    run_one: Callable[[Any, Llama, Llama | None], Llama],
) -> list:
    """Run every (expanded) stage in order; returns the expanded stage list."""
    stages = expand_sweeps(config.stages)
    last = last_uses(stages)
    for index, stage in enumerate(stages):
        start = store.get(stage.start, stage.name)
        reference_name = getattr(stage, "reference", "start")
        reference = start if reference_name == "start" else store.get(reference_name, stage.name)
        store.put(stage.name, run_one(stage, start, reference))
        for name in list(store.names()):
            if last.get(name, -1) <= index and name != stage.name and name != INITIAL:
                store.release(name)
    return stages
