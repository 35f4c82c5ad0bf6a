"""LoRA adapters with random A and B for tests (a fresh PEFT adapter has B = 0, which
would leave the model unchanged and hide errors)."""

from __future__ import annotations

import numpy as np

from sacpo_jax.models import llama, lora, transforms
from sacpo_jax.models.lora import LoraConfig


def random_adapters(model, config: LoraConfig, seed: int = 3):
    """``model`` with adapters whose A and B are both random (a trained-looking adapter)."""
    shapes = llama.projection_shapes(model.config)
    rng = np.random.default_rng(seed)
    weights = {}
    for name in config.targets:
        inputs, outputs = shapes[name]
        a_name, b_name = lora.adapter_names(name)
        layers = model.config.num_hidden_layers
        weights[a_name] = 0.2 * rng.standard_normal((layers, *inputs, config.rank))
        weights[b_name] = 0.2 * rng.standard_normal((layers, config.rank, *outputs))
    return transforms.with_adapter_weights(model, config, weights)
