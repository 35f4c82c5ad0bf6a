"""Stage identity by content: a hash of everything a stage's result depends on.

    identity(stage) = sha256( the stage's resolved config, minus bookkeeping fields,
                              the identities of the models it reads,
                              the fingerprints of its data sources,
                              the run settings every stage shares )

The models a stage reads are earlier stages (their identities), the run's first model
(its random architecture and the seed, or its directory's fingerprint), or model
directories and hub ids (a fingerprint of the directory's files; the id itself). The
shared settings are the seed, the tokenizer's fingerprint and the model dtypes.

Bookkeeping fields (how often to log, evaluate and save, how many checkpoints to keep,
the evaluation batch size) and execution options that leave the result unchanged
(mesh, remat, scanned layers, progress bars, loggers) are not part of the identity: a
rerun that only changes them reuses the stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from sacpo_jax.config import INITIAL, RunConfig, StageBase
from sacpo_jax.data.sources import source_fingerprint
from sacpo_jax.data.spec import DataSpec, SourceSpec
from sacpo_jax.data.tokenize import tokenizer_fingerprint

BOOKKEEPING = {
    "train": ("log_every", "eval_every", "save_every", "max_checkpoints", "keep_checkpoints")
    + ("eval_batch_size",),
    "judge": ("timeout", "max_retries", "workers"),
}
_SAMPLE_BYTES = 1 << 20


def stage_settings(stage: StageBase) -> dict:
    """The stage's config as JSON values, without bookkeeping fields."""
    tree = stage.model_dump(mode="json")
    for key, fields in BOOKKEEPING.items():
        if tree.get(key):
            tree[key] = {k: v for k, v in tree[key].items() if k not in fields}
    return tree


def stage_identities(config: RunConfig, tokenizer: Any) -> dict[str, str]:
    """The identity of every stage of the expanded chain, by stage name."""
    shared = {
        "seed": config.seed,
        "model": _first_model(config),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    known = {INITIAL: _digest(shared)}
    for stage in config.expanded_stages():
        parts = {
            "settings": stage_settings(stage),
            "shared": known[INITIAL],
            "reads": {name: known.get(name) or model_fingerprint(name) for name in stage.sources()},
            "data": [_source(spec) for spec in _sources_of(stage)],
        }
        known[stage.name] = _digest(parts)
    return {name: value for name, value in known.items() if name != INITIAL}


def _first_model(config: RunConfig) -> dict:
    m = config.model
    tree = m.model_dump(mode="json", exclude={"remat", "scan_layers"})
    if m.path is not None:
        tree["files"] = model_fingerprint(m.path)
    return tree


def _sources_of(stage: StageBase) -> list[SourceSpec]:
    """Every data source a stage reads (training data, eval data, prompt sets)."""
    found = []
    for value in vars(stage).values():
        if isinstance(value, DataSpec) or isinstance(getattr(value, "source", None), SourceSpec):
            found.append(value.source)
    return found


@functools.lru_cache(maxsize=64)
def _source_digest(spec_json: str) -> str:
    return source_fingerprint(SourceSpec.model_validate_json(spec_json))


def _source(spec: SourceSpec) -> str:
    return _source_digest(spec.model_dump_json())


def model_fingerprint(path: str) -> str:
    """A model directory's files (names, sizes, first and last MiB), or a hub id as is."""
    if not os.path.isdir(path):
        return f"hub:{path}"
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, path)}:{size}".encode())
            with open(full, "rb") as handle:
                digest.update(handle.read(_SAMPLE_BYTES))
                handle.seek(max(size - _SAMPLE_BYTES, 0))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()
