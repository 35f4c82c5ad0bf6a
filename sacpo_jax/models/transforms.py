"""Model to model: attach LoRA adapters, merge them into the base, quantise the base.

    with_adapters(model, lora, seed)   the model plus fresh adapters (B = 0: the same
                                       outputs); the base arrays are shared, not copied
    with_adapter_weights(model, lora, weights)   the model plus given adapter matrices
    merged(model)                      the plain model it computes: per targeted projection
                                       W + s A B, in float32 (a quantised W dequantised),
                                       cast to the base's ``param_dtype``
    quantized(model, kind)             its seven projections stored as nf4 or int8

Results live on the model's mesh with the partition rules' shardings; merging and
quantising run one projection and one layer at a time, so a step holds one layer's
float32 weight besides the two models.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sacpo_jax import parallel
from sacpo_jax.models import lora, quant
from sacpo_jax.models.llama import Llama, LlamaConfig, projection_shapes
from sacpo_jax.models.lora import LoraConfig


def _abstract(config: LlamaConfig) -> tuple[nnx.GraphDef, dict]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def _params(model: Llama) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _mesh(params: dict) -> Mesh:
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    return parallel.make_mesh(devices=list(sharding.device_set)[:1])


def _sharding(mesh: Mesh, name: str, like) -> NamedSharding:
    return NamedSharding(mesh, parallel.param_spec(f"layers/{name}", tuple(like.shape), mesh))


def with_adapters(model: Llama, config: LoraConfig, seed: int = 0) -> Llama:
    """``model`` with fresh adapters on ``config.targets`` (PEFT's initialisation)."""
    shapes, layers = projection_shapes(model.config), model.config.num_hidden_layers
    graphdef, shardings = _adapter_layout(model, config)

    def create():
        out = {}
        for index, name in enumerate(config.targets):
            key = jax.random.fold_in(jax.random.key(seed), index)
            matrices = lora.init_adapter(key, layers, *shapes[name], config.rank)
            out.update(zip(lora.adapter_names(name), matrices))
        return out

    return _attach(model, graphdef, jax.jit(create, out_shardings=shardings)())


def with_adapter_weights(model: Llama, config: LoraConfig, weights: dict[str, np.ndarray]) -> Llama:
    """``model`` with the adapters ``weights`` ({"q_lora_a": [layers, *in, r], ...}),
    placed block by block on their shards."""
    graphdef, shardings = _adapter_layout(model, config)
    adapters = {
        name: parallel.place_from_host(
            weights[name].shape,
            lora.ADAPTER_DTYPE,
            sharding,
            lambda index, value=weights[name]: value[index],
        )
        for name, sharding in shardings.items()
    }
    return _attach(model, graphdef, adapters)


def _adapter_layout(model: Llama, config: LoraConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef of the model with adapters, {adapter name: sharding})."""
    if model.config.lora is not None:
        raise ValueError("the model has adapters already; merge them first")
    graphdef, abstract = _abstract(model.config.replace(lora=config))
    mesh = _mesh(_params(model))
    shardings = {
        name: _sharding(mesh, name, like)
        for name, like in abstract["layers"].items()
        if lora.is_adapter(name)
    }
    return graphdef, shardings


def _attach(model: Llama, graphdef: nnx.GraphDef, adapters: dict[str, jax.Array]) -> Llama:
    params = _params(model)
    params["layers"] = {**params["layers"], **adapters}
    return nnx.merge(graphdef, params)


def merged(model: Llama) -> Llama:
    """The plain model ``model`` computes: adapters merged, a quantised base dequantised."""
    c = model.config
    if c.lora is None and c.quantize is None:
        return model
    graphdef, abstract = _abstract(c.replace(lora=None, quantize=None))
    params = _params(model)
    mesh = _mesh(params)
    layers = params["layers"]
    out = {name: value for name, value in layers.items() if name in abstract["layers"]}
    for name, (inputs, outputs) in projection_shapes(c).items():
        parts = {
            part: layers[key]
            for part, key in zip(
                ("weight", "codes", "absmax", "a", "b"),
                (name, f"{name}_codes", f"{name}_absmax", *lora.adapter_names(name)),
            )
            if key in layers
        }
        merge = jax.jit(
            lambda parts, inputs=inputs, outputs=outputs: jax.lax.map(
                lambda layer: _merge_layer(layer, c, inputs, outputs), parts
            ),
            out_shardings=_sharding(mesh, name, abstract["layers"][name]),
        )
        out[name] = merge(parts)
    params["layers"] = out
    return nnx.merge(graphdef, params)


def _merge_layer(parts: dict, config: LlamaConfig, inputs: tuple, outputs: tuple) -> jax.Array:
    """One layer's W + s A B in float32, cast to the parameter dtype."""
    rows, cols = math.prod(inputs), math.prod(outputs)
    if "codes" in parts:
        weight = quant.dequantize(parts["codes"], parts["absmax"], config.quantize, jnp.float32)
    else:
        weight = parts["weight"].astype(jnp.float32).reshape(rows, cols)
    if "a" in parts:
        a = parts["a"].astype(jnp.float32).reshape(rows, -1)
        b = parts["b"].astype(jnp.float32).reshape(-1, cols)
        product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        weight = weight + config.lora.scaling * product
    return weight.reshape(*inputs, *outputs).astype(config.param_dtype)


def quantized(model: Llama, kind: str) -> Llama:
    """``model`` (plain, no adapters) with its seven projections stored as ``kind``."""
    c = model.config
    if c.quantize == kind and c.lora is None:
        return model
    if c.quantize is not None or c.lora is not None:
        model, c = merged(model), c.replace(lora=None, quantize=None)
    graphdef, abstract = _abstract(c.replace(quantize=kind))
    params = _params(model)
    mesh = _mesh(params)
    layers = dict(params["layers"])
    for name, (inputs, outputs) in projection_shapes(c).items():
        rows, cols = math.prod(inputs), math.prod(outputs)
        codes_name, absmax_name = f"{name}_codes", f"{name}_absmax"
        store = jax.jit(
            lambda w, rows=rows, cols=cols: jax.lax.map(
                lambda layer: quant.quantize(layer.reshape(rows, cols), kind), w
            ),
            out_shardings=(
                _sharding(mesh, codes_name, abstract["layers"][codes_name]),
                _sharding(mesh, absmax_name, abstract["layers"][absmax_name]),
            ),
        )
        layers[codes_name], layers[absmax_name] = store(layers.pop(name))
    params["layers"] = layers
    return nnx.merge(graphdef, params)
