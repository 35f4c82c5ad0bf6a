"""On-disk cache of tokenised datasets, keyed by everything that decides the tokens.

Layout: ``<cache_dir>/<key>/{arrays.npz, meta.json, report.json}``. An entry
is written into a temporary directory and renamed into place, so readers
never see half an entry and concurrent writers (several processes) are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sacpo_jax.data.dataset import TokenizedDataset

_REPORT = "report.json"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the parts as canonical JSON: source fingerprint, tokenizer, template, lengths..."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_cached(cache_dir: str | Path, key: str) -> tuple[TokenizedDataset, dict[str, int]] | None:
    """The cached (dataset, skip report) under ``key``, or None when absent."""
    entry = Path(cache_dir) / key
    if not (entry / _REPORT).is_file():
        return None
    report = json.loads((entry / _REPORT).read_text())
    return TokenizedDataset.load(entry), report


def store(
    cache_dir: str | Path, key: str, dataset: TokenizedDataset, report: dict[str, int]
) -> Path:
    """Write (dataset, report) under ``key``; an entry already there is kept."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    dataset.save(staging)
    (staging / _REPORT).write_text(json.dumps(report, sort_keys=True))
    try:
        os.rename(staging, entry)
    except OSError:  # another process stored the same entry first
        shutil.rmtree(staging, ignore_errors=True)
    return entry
