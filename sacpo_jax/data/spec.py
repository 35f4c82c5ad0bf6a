"""Typed configuration of a data pipeline: where rows come from and how they become tokens."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SourceType = Literal["hub", "json", "jsonl", "parquet", "csv", "tfds", "bundled"]

AdapterName = Literal[
    "pku_helpful",
    "pku_harmless",
    "pku_kto_safety",
    "pku_kto_helpful",
    "pku_reward",
    "pku_cost",
    "pku_safedpo",
    "hh_rlhf",
    "pair",
    "unpaired",
    "sft",
    "chat_sft",
    "chat_pair",
    "scored_pair",
]

# Fields each source type needs.
_REQUIRED = {
    "hub": ("name",),
    "json": ("path",),
    "jsonl": ("path",),
    "parquet": ("path",),
    "csv": ("path",),
    "tfds": ("name",),
    "bundled": ("name",),
}


class SourceSpec(BaseModel):
    """Where the rows come from.

    - hub: ``datasets.load_dataset(name, config, split=split, revision=revision,
      data_dir=data_dir, data_files=data_files)``. Pin ``revision``: older
      revisions of PKU-SafeRLHF use other layouts.
    - json / jsonl / parquet / csv: a local file at ``path``. JSON holds a list
      of row objects; JSONL one object per line.
    - tfds: ``tfds.data_source(name, split=split, data_dir=data_dir)``
      (needs the ``tfds`` extra).
    - bundled: the synthetic oracle task shipped with the package; ``name`` is
      the split, ``seed`` its generator seed.
    """

    model_config = ConfigDict(extra="forbid")

    type: SourceType
    name: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    path: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check_required(self) -> SourceSpec:
        for field in _REQUIRED[self.type]:
            if getattr(self, field) is None:
                raise ValueError(f"source type '{self.type}' needs '{field}'")
        return self


class DataSpec(BaseModel):
    """A source, the adapter that turns its rows into examples, and the token budget.

    ``template``: a prompt template in which every ``{prompt}`` is replaced by
    the row's prompt; ``None`` uses the adapter's default (the PKU template for
    ``pku_*`` adapters, the prompt as is otherwise).
    ``bucket_lengths``: the padded lengths a batch may have (the smallest one
    that fits is used); ``None`` pads every batch to ``max_length``.
    ``columns``: renames, layout field -> column in the source (e.g.
    ``{"prompt": "instruction"}``).
    ``score_names``: for the ``scored_pair`` adapter with flat columns
    ``<name>_0`` and ``<name>_1``; ``None`` reads nested ``scores_0`` /
    ``scores_1`` dicts.
    ``limit``: use only the first ``limit`` rows of the source.
    ``packing``: training batches of SFT and DPO stages lay several sequences end to end
    in each row (no padding between them; attention and positions stay per sequence),
    giving the same log-probs up to float rounding; other stages and evaluation batches
    are not packed. Packed rows are about twice the largest bucket length long, on a
    grid of 8 lengths per power of two (``sacpo_jax.data.packing``).
    """

    model_config = ConfigDict(extra="forbid")

    source: SourceSpec
    adapter: AdapterName
    template: str | None = None
    max_length: int = Field(512, gt=1)
    max_prompt_length: int = Field(128, gt=0)
    bucket_lengths: list[int] | None = None
    on_bad_row: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, gt=0)
    columns: dict[str, str] = Field(default_factory=dict)
    score_names: list[str] | None = None
    packing: bool = True

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError("template must contain '{prompt}'")
        if self.max_prompt_length > self.max_length:
            raise ValueError("max_prompt_length must not exceed max_length")
        if self.bucket_lengths is not None:
            if not self.bucket_lengths or min(self.bucket_lengths) < 2:
                raise ValueError("bucket_lengths must be non-empty lengths >= 2")
            if max(self.bucket_lengths) < self.max_length:
                raise ValueError("the largest bucket length must be >= max_length")
        return self

    def buckets(self) -> tuple[int, ...]:
        """Sorted padded lengths a batch may take."""
        return tuple(sorted(set(self.bucket_lengths or [self.max_length])))
