"""Which checkpoint format a path holds, told from its files; and the import error type.

    safetensors   config.json + model.safetensors | model-*.safetensors (Hugging Face, torch)
    flax_msgpack  config.json + flax_model.msgpack | flax_model-*.msgpack (transformers 4.x Flax)
    easylm        an EasyLM streaming file (streaming_params*, streaming_train_state*), or a
                  directory holding exactly one
    maxtext       an Orbax checkpoint: a MaxText run's checkpoint directory, one step of it,
                  or the step's ``items`` directory

When a directory holds several (our stage exports may add flax_model.msgpack beside the
safetensors), the first of this list wins. Pickle weights are never a format.
"""

from __future__ import annotations

import glob
import os

FORMATS = ("safetensors", "flax_msgpack", "easylm", "maxtext")
EASYLM_PREFIXES = ("streaming_params", "streaming_train_state")
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "items")


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message is one line naming the problem."""


def is_easylm_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.basename(path).startswith(EASYLM_PREFIXES)


def easylm_files(directory: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(directory, "streaming_*")) if is_easylm_file(p))


def is_orbax(directory: str) -> bool:
    """An Orbax checkpoint, one step of a CheckpointManager, or a manager's directory."""
    if any(os.path.exists(os.path.join(directory, m)) for m in ORBAX_MARKERS):
        return True
    steps = [d for d in os.listdir(directory) if d.isdigit()]
    return any(is_orbax(os.path.join(directory, d)) for d in steps)


def _has(directory: str, *patterns: str) -> bool:
    return any(glob.glob(os.path.join(directory, p)) for p in patterns)


def detect(path: str, forced: str | None = None) -> str:
    """The format of ``path`` (a local directory or an EasyLM file); ``forced`` overrides."""
    if forced not in (None, "auto"):
        if forced not in FORMATS:
            raise CheckpointError(
                f"unknown checkpoint format {forced!r}; known: auto, {', '.join(FORMATS)}"
            )
        return forced
    if is_easylm_file(path):
        return "easylm"
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    if _has(path, "*.safetensors"):
        return "safetensors"
    if _has(path, "flax_model*.msgpack", "flax_model.msgpack.index.json"):
        return "flax_msgpack"
    if easylm_files(path):
        return "easylm"
    if is_orbax(path):
        return "maxtext"
    pickles = sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")))
    if pickles:
        raise CheckpointError(
            f"{pickles[0]} is a pickle checkpoint, which sacpo_jax refuses to load (pickle can "
            "run arbitrary code); safetensors is needed: convert it once with "
            f"`python -c \"import transformers as t; t.AutoModel.from_pretrained('{path}')"
            ".save_pretrained('OUT_DIR')\"` and load OUT_DIR"
        )
    raise CheckpointError(
        f"{path}: no model found (looked for model*.safetensors, flax_model*.msgpack, an EasyLM "
        "streaming_* file and an Orbax checkpoint)"
    )
