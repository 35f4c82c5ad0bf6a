"""Rows -> examples -> tokens: `build_dataset`, with the bad-row policy and the cache.

For each row of the source (the first ``limit`` rows): the adapter makes
examples; each is tokenised, truncated and checked (no room for a response,
identical chosen/rejected tokens). A refused row either stops the run with a
one-line `DataError` (``on_bad_row: error``) or is counted under its reason
in the skip report (``on_bad_row: skip``).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from sacpo_jax.data import cache, errors
from sacpo_jax.data.adapters import ADAPTERS, AdapterContext, Example
from sacpo_jax.data.dataset import Ragged, TokenizedDataset
from sacpo_jax.data.errors import BadRow, DataError, DroppedRow
from sacpo_jax.data.prompts import has_chat_template
from sacpo_jax.data.sources import read_rows, source_fingerprint, source_label
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.data.tokenize import (
    default_bos_id,
    tokenize_prompt_completions,
    tokenizer_fingerprint,
    truncate,
)

_PIPELINE_VERSION = 2  # 2: conversational completions get no EOS

Encoded = tuple[list[int], list[list[int]], dict[str, float | int]]


def resolved_template(spec: DataSpec) -> str | None:
    """The template in force: the spec's, else the adapter's default."""
    return spec.template if spec.template is not None else ADAPTERS[spec.adapter].default_template


def build_dataset(
    spec: DataSpec, tokenizer, *, cache_dir: str | Path | None = None
) -> tuple[TokenizedDataset, dict[str, int]]:
    """The tokenised dataset of ``spec`` and its skip report {reason: count}.

    With ``cache_dir``, a dataset built before with the same source content,
    tokenizer, template, lengths and policy is read back instead of rebuilt.
    Raises `DataError` (one line) for any data problem.
    """
    label = source_label(spec.source)
    adapter = ADAPTERS[spec.adapter]
    if adapter.conversational and not has_chat_template(tokenizer):
        raise DataError(label, f"adapter '{spec.adapter}' needs a tokenizer with a chat template")
    key = None
    if cache_dir is not None:
        key = cache.cache_key(_cache_parts(spec, tokenizer))
        cached = cache.load_cached(cache_dir, key)
        if cached is not None:
            return cached
    dataset, report = _tokenize_source(spec, tokenizer, label)
    if key is not None:
        cache.store(cache_dir, key, dataset, report)
    return dataset, report


def _cache_parts(spec: DataSpec, tokenizer) -> dict:
    return {
        "pipeline_version": _PIPELINE_VERSION,
        "source": source_fingerprint(spec.source),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": resolved_template(spec),
        **spec.model_dump(exclude={"source", "template", "bucket_lengths"}),
    }


def _tokenize_source(
    spec: DataSpec, tokenizer, label: str
) -> tuple[TokenizedDataset, dict[str, int]]:
    adapter = ADAPTERS[spec.adapter]
    score_names = tuple(spec.score_names) if spec.score_names is not None else None
    context = AdapterContext(spec.columns, score_names, tokenizer)
    template, bos_id = resolved_template(spec), default_bos_id(tokenizer)
    encode = functools.partial(
        _encode,
        tokenizer=tokenizer,
        template=template,
        bos_id=bos_id,
        spec=spec,
        conversational=adapter.conversational,
    )
    encoded: list[Encoded] = []
    report: Counter[str] = Counter()
    for row in itertools.islice(read_rows(spec.source), spec.limit):
        try:
            if row.problem is not None:
                raise row.problem
            examples = adapter.convert(row.values, context)
            row_encoded = [encode(example) for example in examples]
            _check_columns(encoded[0][2] if encoded else None, row_encoded)
        except DroppedRow as dropped:
            report[dropped.reason] += 1
            continue
        except BadRow as bad:
            if spec.on_bad_row == "error":
                raise DataError(
                    label, bad.problem, row=row.where, field=bad.field, reason=bad.reason
                ) from None
            report[bad.reason] += 1
            continue
        encoded.extend(row_encoded)
    if not encoded:
        raise DataError(label, f"no usable rows (skipped: {dict(report) or 'none'})")
    return _assemble(adapter.kind, encoded), dict(report)


def _encode(
    example: Example,
    *,
    tokenizer,
    template: str | None,
    bos_id: int | None,
    spec: DataSpec,
    conversational: bool,
) -> Encoded:
    prompt_ids, completion_ids = tokenize_prompt_completions(
        tokenizer,
        example.prompt,
        example.completions,
        template,
        bos_id=bos_id,
        conversational=conversational,
    )
    prompt_ids, completion_ids = truncate(
        prompt_ids,
        completion_ids,
        max_length=spec.max_length,
        max_prompt_length=spec.max_prompt_length,
        bos_id=bos_id,
    )
    if len(completion_ids) == 2 and completion_ids[0] == completion_ids[1]:
        raise BadRow(
            "rejected", errors.IDENTICAL_TOKENS, "chosen and rejected have identical tokens"
        )
    return prompt_ids, completion_ids, example.columns


def _check_columns(first: dict | None, row_encoded: list[Encoded]) -> None:
    """Every example must carry the same scalar columns as the first one."""
    for _, _, columns in row_encoded:
        names = set(columns)
        expected = set(first if first is not None else row_encoded[0][2])
        if names != expected:
            differing = ", ".join(sorted(names ^ expected))
            raise BadRow(differing, errors.MALFORMED, "columns differ from earlier rows")


def _assemble(kind: str, encoded: list[Encoded]) -> TokenizedDataset:
    prompts = Ragged.from_rows([prompt for prompt, _, _ in encoded])
    slots = len(encoded[0][1])
    completions = tuple(Ragged.from_rows([c[k] for _, c, _ in encoded]) for k in range(slots))
    columns = {name: np.asarray([cols[name] for _, _, cols in encoded]) for name in encoded[0][2]}
    return TokenizedDataset(kind, prompts, completions, columns)
