"""The stage chain: each stage starts from (and by default is referenced against) another.

SACPO is the chain  sft -> dpo(helpfulness, beta) -> dpo(harmlessness, beta/lambda):
stage k's start is stage k-1's result ("previous") and its reference is its own start,
so realignment uses the reward-aligned model as both. A stage may instead name any
earlier stage, or a Hugging Face directory, as its start or reference. A stage with a
list of betas fans out into one stage per value, all from the same start (a sweep, see
``config.expand_stages``), so stage 1 is trained once however many beta/lambda values
are tried.

Merge stages (P-SACPO) and evaluate stages read earlier results by name. Finished
stages are not retrained: their exported model is loaded back.

LoRA stages chain through merged models: a LoRA stage trains adapters on its frozen start
and its result is the start with the adapters merged in (in the base's dtype), so the
next stage starts from, and by default refers to, that merged model, and trains fresh
adapters of its own. A start {base, adapter} is the base with a PEFT adapter merged in.
With a quantised run (``model.quantize``) every model held here is stored quantised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sacpo_jax.config import (
    INITIAL,
    MergeStage,
    ReferencedStage,
    StageBase,
    StartedStage,
    TrainedStage,
)
from sacpo_jax.errors import SacpoError
from sacpo_jax.models import hf, peft_io, transforms
from sacpo_jax.models.llama import Llama


class ChainError(SacpoError, ValueError):
    """A stage names a model that does not exist; one line."""


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
        if isinstance(first, MergeStage):
            ordered = sorted(members, key=lambda s: s.q)
            series[base] = [first.models[0]] + [s.name for s in ordered] + [first.models[1]]
        else:
            ordered = sorted(members, key=lambda s: -s.beta)
            start = [first.start] if isinstance(first.start, str) else []
            series[base] = start + [s.name for s in ordered]
    return series


def last_uses(stages: list[StageBase]) -> dict[str, int]:
    """For each model name, the index of the last stage that reads it."""
    last: dict[str, int] = {}
    for index, stage in enumerate(stages):
        for source in stage.sources():
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

    def start_of(self, stage: StartedStage) -> Llama:
        """A training stage's start: a model by name, or a base with a PEFT adapter merged
        in (quantised again when the base is)."""
        if isinstance(stage.start, str):
            return self.get(stage.start, stage.name)
        base = self.get(stage.start.base, stage.name)
        adapted = transforms.merged(peft_io.load_adapter(base, stage.start.adapter))
        kind = base.config.quantize
        return adapted if kind is None else transforms.quantized(adapted, kind)

    def start_and_reference(self, stage: TrainedStage) -> tuple[Llama, Llama]:
        """A training stage's start model and its reference (its start unless it names one)."""
        start = self.start_of(stage)
        if isinstance(stage, ReferencedStage) and stage.reference != "start":
            return start, self.get(stage.reference, stage.name)
        return start, start


def run_chain(
    stages: list[StageBase],
    store: ModelStore,
    run_one: Callable[[StageBase, ModelStore], Llama | None],
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
