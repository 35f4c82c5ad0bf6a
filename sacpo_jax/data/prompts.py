"""Prompt sets for generation: {prompt, category} rows from any data source.

SACPO's evaluation sets (../shared/data/sacpo_eval/*.json) are JSON lists of
{prompt, category}; JSONL, CSV, Parquet, hub datasets and the bundled task work too.
"""

from __future__ import annotations

from sacpo_jax.data.errors import DataError
from sacpo_jax.data.sources import read_rows, source_label
from sacpo_jax.data.spec import SourceSpec


def read_prompts(source: SourceSpec, field: str = "prompt", limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows' ``field`` as {prompt, category} (category "all" if absent)."""
    prompts = []
    for index, row in enumerate(read_rows(source)):
        if limit is not None and index >= limit:
            break
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(source_label(source), "missing or empty", row=index, field=field)
        prompts.append({"prompt": text, "category": str(row.get("category", "all"))})
    if not prompts:
        raise DataError(source_label(source), "no prompts")
    return prompts
