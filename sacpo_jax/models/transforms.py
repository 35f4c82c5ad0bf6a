"""Model to model: attach LoRA adapters, merge them into the base, quantise the base.

    with_adapters(model, lora, seed)   the model plus fresh adapters (B = 0: the same
                                       outputs); the base arrays are shared, not copied
    with_adapter_weights(model, lora, weights)   the model plus given adapter matrices
    merged(model)                      the plain model it computes: per targeted projection
                                       W + s A B, in float32 (a quantised W dequantised),
                                       cast to the base's ``param_dtype``
    quantized(model, kind)             its seven projections stored as nf4 or int8

Results live on the model's mesh with the partition rules' shardings. Merging and
quantising are one compiled function per model config that maps over the layers, so
besides the two models they hold a layer's float32 weight per projection at a time.
"""

from __future__ import annotations

import functools
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


def _constrained(x: jax.Array, mesh: Mesh, name: str) -> jax.Array:
    """``x`` sharded as the layer parameter ``name`` (inside a jitted function)."""
    spec = parallel.param_spec(f"layers/{name}", tuple(x.shape), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def with_adapters(model: Llama, config: LoraConfig, seed: int = 0) -> Llama:
    """``model`` with fresh adapters on ``config.targets`` (PEFT's initialisation)."""
    graphdef = _adapter_graphdef(model, config)
    adapters = _fresh_adapters(model.config.replace(lora=config), seed, _mesh(_params(model)))
    return _attach(model, graphdef, adapters)


@functools.partial(jax.jit, static_argnames=("config", "seed", "mesh"))
def _fresh_adapters(config: LlamaConfig, seed: int, mesh: Mesh) -> dict[str, jax.Array]:
    shapes, out = projection_shapes(config), {}
    for index, name in enumerate(config.lora.targets):
        key = jax.random.fold_in(jax.random.key(seed), index)
        matrices = lora.init_adapter(key, config.num_hidden_layers, *shapes[name], config.lora.rank)
        for adapter, matrix in zip(lora.adapter_names(name), matrices):
            out[adapter] = _constrained(matrix, mesh, adapter)
    return out


def with_adapter_weights(model: Llama, config: LoraConfig, weights: dict[str, np.ndarray]) -> Llama:
    """``model`` with the adapters ``weights`` ({"q_lora_a": [layers, *in, r], ...}),
    placed block by block on their shards."""
    graphdef = _adapter_graphdef(model, config)
    mesh = _mesh(_params(model))
    adapters = {}
    for name, value in weights.items():
        spec = parallel.param_spec(f"layers/{name}", value.shape, mesh)
        adapters[name] = parallel.place_from_host(
            value.shape, lora.ADAPTER_DTYPE, NamedSharding(mesh, spec), lambda i, v=value: v[i]
        )
    return _attach(model, graphdef, adapters)


def _adapter_graphdef(model: Llama, config: LoraConfig) -> nnx.GraphDef:
    if model.config.lora is not None:
        raise ValueError("the model has adapters already; merge them first")
    return _abstract(model.config.replace(lora=config))[0]


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
    layers = params["layers"]
    parts = {name: value for name, value in layers.items() if name not in abstract["layers"]}
    kept = {name: value for name, value in layers.items() if name in abstract["layers"]}
    bases = {name: layers[name] for name in projection_shapes(c) if name in layers}
    params["layers"] = {**kept, **_merged_projections({**parts, **bases}, c, _mesh(params))}
    return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _merged_projections(layers: dict, config: LlamaConfig, mesh: Mesh) -> dict[str, jax.Array]:
    """Each projection's W + s A B, one layer at a time (``_merge_layer``)."""
    out = {}
    for name, (inputs, outputs) in projection_shapes(config).items():
        keys = (name, f"{name}_codes", f"{name}_absmax", *lora.adapter_names(name))
        parts = {
            part: layers[key]
            for part, key in zip(("weight", "codes", "absmax", "a", "b"), keys)
            if key in layers
        }
        weight = jax.lax.map(
            lambda layer, inputs=inputs, outputs=outputs: _merge_layer(
                layer, config, inputs, outputs
            ),
            parts,
        )
        out[name] = _constrained(weight, mesh, name)
    return out


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
    """``model`` with its seven projections stored as ``kind`` (merged first if it has
    adapters or another storage)."""
    c = model.config
    if c.quantize == kind and c.lora is None:
        return model
    if c.quantize is not None or c.lora is not None:
        model, c = merged(model), c.replace(lora=None, quantize=None)
    graphdef, _ = _abstract(c.replace(quantize=kind))
    params = _params(model)
    layers = dict(params["layers"])
    weights = {name: layers.pop(name) for name in projection_shapes(c)}
    layers.update(_quantized_projections(weights, c.replace(quantize=kind), _mesh(params)))
    params["layers"] = layers
    return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _quantized_projections(weights: dict, config: LlamaConfig, mesh: Mesh) -> dict[str, jax.Array]:
    """Each projection's codes and absmax, one layer at a time."""
    out = {}
    for name, (inputs, outputs) in projection_shapes(config).items():
        rows, cols = math.prod(inputs), math.prod(outputs)
        codes, absmax = jax.lax.map(
            lambda layer, rows=rows, cols=cols: quant.quantize(
                layer.reshape(rows, cols), config.quantize
            ),
            weights[name],
        )
        out[f"{name}_codes"] = _constrained(codes, mesh, f"{name}_codes")
        out[f"{name}_absmax"] = _constrained(absmax, mesh, f"{name}_absmax")
    return out
