"""LoRA adapters in PEFT's directory format, both ways (REFERENCE-NEXT §3).

    adapter_config.json         peft_type "LORA", task_type "CAUSAL_LM" | "SEQ_CLS", r,
                                lora_alpha, lora_dropout, target_modules, use_rslora, ...
    adapter_model.safetensors   per layer N and targeted module:
        base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
        base_model.model.model.layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.weight
      lora_A [r, in] = A^T and lora_B [out, r] = B^T (our A [*in, r], B [r, *out]
      flattened); a score model (SEQ_CLS) also saves its head whole,
      base_model.model.score.weight [1, hidden] (as PEFT's modules_to_save).

``peft.PeftModel.from_pretrained(base, directory)`` loads what ``save_adapter`` writes;
``load_adapter`` reads PEFT's plain LoRA adapters (no DoRA, biases, per-layer ranks or
layer subsets) and refuses anything else, or anything that does not fit the base model,
with one line naming the file, tensor or key.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from sacpo_jax import parallel
from sacpo_jax.models import lora, transforms
from sacpo_jax.models.formats import CheckpointError
from sacpo_jax.models.hf import ARCHITECTURES
from sacpo_jax.models.llama import Llama, LlamaConfig, projection_shapes
from sacpo_jax.models.lora import PEFT_MODULES, TARGETS, LoraConfig
from sacpo_jax.models.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.")


class AdapterError(CheckpointError):
    """A PEFT adapter directory that cannot be loaded on this model; one line."""


# ----------------------------------------------------------------------------- names


def _tensor_name(layer: int, projection: str, matrix: str) -> str:
    return f"{PREFIX}model.layers.{layer}.{PEFT_MODULES[projection]}.lora_{matrix}.weight"


def _head_module(config: LlamaConfig) -> str:
    """The score head's module name in the HF architecture ("score", or safe-rlhf's
    "score_head")."""
    return ARCHITECTURES[config.architecture].removesuffix(".weight")


def _task_type(config: LlamaConfig) -> str:
    return "SEQ_CLS" if config.score_model else "CAUSAL_LM"


# ----------------------------------------------------------------------------- save


def adapter_config(config: LlamaConfig, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for a model with adapters (PEFT's keys and defaults)."""
    c = config.lora
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "modules_to_save": [_head_module(config)] if config.score_model else None,
        "peft_type": "LORA",
        "r": c.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": c.peft_targets,
        "task_type": _task_type(config),
        "use_dora": False,
        "use_rslora": c.rslora,
    }


def save_adapter(model: Llama, path: str, base_model: str | None = None) -> None:
    """Write ``model``'s adapters (and a score model's head) into directory ``path``.

    Every process takes part (sharded adapters are gathered); process 0 writes."""
    config = model.config
    if config.lora is None:
        raise ValueError("the model has no adapters to save")
    layers = nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"]
    shapes = projection_shapes(config)
    plan = []
    for name in config.lora.targets:
        inputs, outputs = shapes[name]
        rows, cols = math.prod(inputs), math.prod(outputs)
        a_name, b_name = lora.adapter_names(name)
        a = parallel.to_host(layers[a_name]).reshape(-1, rows, config.lora.rank)
        b = parallel.to_host(layers[b_name]).reshape(-1, config.lora.rank, cols)
        for i in range(config.num_hidden_layers):
            for matrix, values in (("A", a[i].T), ("B", b[i].T)):
                plan.append(_planned(_tensor_name(i, name, matrix), values))
    if config.score_model:
        head = parallel.to_host(nnx.state(model, nnx.Param)["score_head"][...])
        plan.append(_planned(f"{PREFIX}{_head_module(config)}.weight", head.T))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, WEIGHTS_FILE), plan)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(config, base_model), f, indent=2, sort_keys=True)


def _planned(name: str, values: np.ndarray) -> PlannedTensor:
    values = np.ascontiguousarray(values)
    return PlannedTensor(name, values.dtype, values.shape, lambda: values)


# ----------------------------------------------------------------------------- load


def read_adapter_config(path: str) -> tuple[LoraConfig, str]:
    """(LoRA settings, task type) of a PEFT adapter directory, checked for what we
    support; AdapterError (one line) otherwise. Reads no tensors."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise AdapterError(f"{path}: no {CONFIG_FILE} (is this a PEFT adapter directory?)")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type {raw.get('peft_type')!r}; only LORA is supported")
    unsupported = {
        "use_dora": bool(raw.get("use_dora")),
        "bias": raw.get("bias", "none") != "none",
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "layers_to_transform": raw.get("layers_to_transform") is not None,
    }
    for key, used in unsupported.items():
        if used:
            raise AdapterError(f"{file}: {key}={raw[key]!r} is not supported")
    targets = raw.get("target_modules")
    if targets == "all-linear":
        targets = list(TARGETS)
    if not isinstance(targets, list) or not targets:
        raise AdapterError(
            f"{file}: target_modules {targets!r}: expected a list of module names "
            f"({', '.join(TARGETS)}) or 'all-linear'"
        )
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise AdapterError(
            f"{file}: target_modules {unknown} match no projection of a LLaMA layer "
            f"(valid: {', '.join(TARGETS)})"
        )
    task = raw.get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise AdapterError(f"{file}: task_type {task!r}; supported: CAUSAL_LM, SEQ_CLS")
    try:
        config = LoraConfig(
            rank=int(raw["r"]),
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout") or 0.0),
            targets=tuple(n for n in PEFT_MODULES if PEFT_MODULES[n].split(".")[-1] in targets),
            rslora=bool(raw.get("use_rslora", False)),
        )
    except KeyError as e:
        raise AdapterError(f"{file}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{file}: {e}") from None
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise AdapterError(f"{path}: no {WEIGHTS_FILE} (pickled adapter_model.bin is not read)")
    return config, task


def load_adapter(model: Llama, path: str) -> Llama:
    """``model`` (without adapters) plus the PEFT adapter in ``path`` (and, for a score
    model, the adapter's saved head)."""
    config = model.config
    lora_config, task = read_adapter_config(path)
    if task != _task_type(config):
        kind = "a score model" if config.score_model else "a causal LM"
        raise AdapterError(f"{path}: a {task} adapter cannot load on {kind}")
    reader = SafetensorsReader([os.path.join(path, WEIGHTS_FILE)])
    expected = _expected_shapes(config, lora_config)
    for name in reader.names():
        if name not in expected:
            why = _misfit(name, config, lora_config)
            raise AdapterError(f"{path}: tensor {name} does not fit this base model ({why})")
    for name, shape in expected.items():
        if name not in reader:
            raise AdapterError(f"{path}: missing tensor {name}")
        found = tuple(reader.info(name).shape)
        if found != shape:
            raise AdapterError(
                f"{path}: tensor {name} has shape {found}, this base model needs {shape} "
                "(an adapter for another model?)"
            )
    weights = {}
    shapes = projection_shapes(config)
    for projection in lora_config.targets:
        inputs, outputs = shapes[projection]
        a_name, b_name = lora.adapter_names(projection)
        layers = range(config.num_hidden_layers)
        a = [reader.view(_tensor_name(i, projection, "A")).T for i in layers]
        b = [reader.view(_tensor_name(i, projection, "B")).T for i in layers]
        weights[a_name] = np.stack(a).astype(np.float32).reshape(-1, *inputs, lora_config.rank)
        weights[b_name] = np.stack(b).astype(np.float32).reshape(-1, lora_config.rank, *outputs)
    adapted = transforms.with_adapter_weights(model, lora_config, weights)
    if not config.score_model:
        return adapted
    head = reader.view(f"{PREFIX}{_head_module(config)}.weight").T
    graphdef, state = nnx.split(adapted)
    params = nnx.to_pure_dict(state)
    old = params["score_head"]
    params["score_head"] = parallel.place_from_host(
        old.shape, old.dtype, old.sharding, lambda index: head[index]
    )
    return nnx.merge(graphdef, params)


def _expected_shapes(config: LlamaConfig, lora_config: LoraConfig) -> dict[str, tuple[int, ...]]:
    shapes = projection_shapes(config)
    expected = {}
    for projection in lora_config.targets:
        inputs, outputs = shapes[projection]
        for i in range(config.num_hidden_layers):
            expected[_tensor_name(i, projection, "A")] = (lora_config.rank, math.prod(inputs))
            expected[_tensor_name(i, projection, "B")] = (math.prod(outputs), lora_config.rank)
    if config.score_model:
        expected[f"{PREFIX}{_head_module(config)}.weight"] = (1, config.hidden_size)
    return expected


def _misfit(name: str, config: LlamaConfig, lora_config: LoraConfig) -> str:
    match = _LAYER_INDEX.match(name)
    if match and int(match.group(1)) >= config.num_hidden_layers:
        return f"it has {config.num_hidden_layers} layers"
    return f"target_modules {lora_config.peft_targets}"
