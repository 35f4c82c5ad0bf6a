"""A LLaMA-family decoder in Flax NNX, plus a score-model variant for reward and cost models.

Layout. Every per-layer weight is stored stacked over layers, with a leading axis of size
``num_hidden_layers``. The same layout serves both execution modes: ``scan_layers=True``
runs the layers with ``jax.lax.scan`` (one layer is compiled, deep models compile in
seconds), ``scan_layers=False`` unrolls a Python loop over layer slices. Weights keep the
shapes that make the math readable:

    embed        [vocab, hidden]
    q / k / v    [layers, hidden, heads | kv_heads, head_dim]
    o            [layers, heads, head_dim, hidden]
    gate / up    [layers, hidden, intermediate]
    down         [layers, intermediate, hidden]
    lm_head      [hidden, vocab]            (absent when embeddings are tied)
    score_head   [hidden, 1]                (score models only)

Two optional variants of the seven projections (``LlamaConfig.lora``, ``.quantize``):
LoRA adapters ``<p>_lora_a`` / ``<p>_lora_b`` beside a targeted projection
(``sacpo_jax.models.lora``), and a frozen base stored as ``<p>_codes`` / ``<p>_absmax``
in NF4 or int8 (``sacpo_jax.models.quant``), dequantised one layer at a time inside the
forward pass.

The block is the standard pre-norm LLaMA block:

    h = x + Attn(RMSNorm(x));   y = h + SwiGLU(RMSNorm(h))
    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w
    SwiGLU(x)  = (silu(x W_gate) * (x W_up)) W_down

Positions are derived from the attention mask (``cumsum(mask) - 1``), so left- and
right-padded batches give the same values at real tokens as unpadded rows. Packed rows
(several sequences per row, ``segment_ids``) restart positions at each sequence and
attend only within it, so each sequence gets the values it would get alone in a row.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sacpo_jax import parallel
from sacpo_jax.models import lora, quant
from sacpo_jax.models.lora import LoraConfig

ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLEMENTATIONS = ("auto", "blocked", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: base frequency and optional context scaling."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (mirrors the Hugging Face config) plus execution options.

    Execution options (they change memory and speed, not results): ``remat`` recomputes
    each block's activations in the backward pass; ``scan_layers`` compiles one block;
    ``attention`` is an ``attend`` implementation (auto | blocked | cudnn) and
    ``attention_block`` its query block; ``vocab_chunk`` is the number of vocabulary
    entries whose logits are formed at once when log-probs are computed.

    ``hf_extra_json`` keeps the Hugging Face config fields we do not model (token ids,
    ``max_position_embeddings`` etc.) so that an export reproduces them. It is a JSON
    string so that the config stays hashable (it is static under ``jax.jit``).
    ``generation_config_json``: the source checkpoint's generation_config.json ("{}":
    none), kept the same way; generation stops on every ``eos_token_id`` it lists and an
    export writes it back.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True
    attention: str = "auto"
    attention_block: int = 512
    vocab_chunk: int = 4096
    hf_extra_json: str = "{}"
    generation_config_json: str = "{}"
    lora: LoraConfig | None = None
    quantize: str | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unsupported attention {self.attention!r}; "
                f"supported: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if min(self.attention_block, self.vocab_chunk) < 1:
            raise ValueError("attention_block and vocab_chunk must be >= 1")
        if self.rope.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.quantize is not None:
            for name, (inputs, _) in projection_shapes(self).items():
                quant.check_rows(self.quantize, math.prod(inputs), f"{name} ({inputs})")

    @property
    def score_model(self) -> bool:
        """True for reward/cost models: a hidden -> 1 head at the last real token."""
        return self.architecture != "LlamaForCausalLM"

    @property
    def hf_extra(self) -> dict[str, Any]:
        return json.loads(self.hf_extra_json)

    @property
    def generation_config(self) -> dict[str, Any]:
        return json.loads(self.generation_config_json)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input dims, output dims) of each projection's per-layer weight, in block order."""
    c = config
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    return {
        "q": ((d,), (c.num_attention_heads, hd)),
        "k": ((d,), (c.num_key_value_heads, hd)),
        "v": ((d,), (c.num_key_value_heads, hd)),
        "o": ((c.num_attention_heads, hd), (d,)),
        "gate": ((d,), (f,)),
        "up": ((d,), (f,)),
        "down": ((f,), (d,)),
    }


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A small random-init config for tests, demos and benchmarks."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    base.update(overrides)
    return LlamaConfig(**base)


# ----------------------------------------------------------------------------- math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> jax.Array:
    """inv_freq_i = theta^(-2i/head_dim), rescaled by the rope type.

    linear: inv_freq / factor.
    llama3: wavelengths longer than original_ctx/low_freq_factor are divided by factor,
    shorter than original_ctx/high_freq_factor are kept, and the band between is a
    linear blend with smooth = (original_ctx/wavelength - low) / (high - low).
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        ctx = rope.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = ctx / rope.low_freq_factor
        high_freq_wavelength = ctx / rope.high_freq_factor
        smooth = (ctx / wavelength - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / rope.factor, inv_freq)
        in_band = (wavelength <= low_freq_wavelength) & (wavelength >= high_freq_wavelength)
        return jnp.where(in_band, blended, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate halves: x*cos + rotate_half(x)*sin, angles = position * inv_freq.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq].
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, s, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row: cumsum(mask) - 1, >= 0."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment (a run of equal ids in a row):
    t - (first slot of the run holding t)."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=-1,
    )
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=slots.ndim - 1)


class AttentionMask(NamedTuple):
    """Which keys each query may see, without a [q, k] array: query ``i`` sits at key slot
    ``query_offset + i`` and sees key slot ``j`` iff ``j <= query_offset + i`` (causal)
    and ``key_mask[b, j]`` (a real token).

    key_mask:     [b, k] 1 for real keys, 0 for padding.
    query_offset: scalar slot of the first query (0 for a forward over a whole row; the
                  first new slot for a forward against a KV cache).
    segment_ids:  packed rows only, [b, k] (queries are the keys: no cache): the query at
                  slot i sees slot j iff j <= i and segment_ids[b, j] == segment_ids[b, i];
                  ``key_mask`` is then not read. Padding (id 0) sees only padding, so no
                  query is left without keys.
    """

    key_mask: jax.Array
    query_offset: jax.Array | int = 0
    segment_ids: jax.Array | None = None

    def allowed(self, query_slots: jax.Array) -> jax.Array:
        """Boolean [b, 1, q, k]: may the query at each of ``query_slots`` [q] see each key?"""
        keys = jnp.arange(self.key_mask.shape[-1])
        causal = keys[None, :] <= query_slots[:, None]
        if self.segment_ids is None:
            return causal[None, None] & self.key_mask[:, None, None, :].astype(bool)
        # Slots past the row (the padded last query block) are clipped; they are dropped.
        query_segments = jnp.take(self.segment_ids, query_slots, axis=1, mode="clip")
        same = query_segments[:, :, None] == self.segment_ids[:, None, :]
        return causal[None, None] & same[:, None]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    block_size: int = 512,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped-query attention softmax(q k^T / sqrt(d) + mask) v, over the keys ``mask`` allows.

    q: [b, s, heads, d]; k, v: [b, t, kv_heads, d]; heads = kv_heads * groups.

    "blocked" (XLA, any device): the queries are processed ``block_size`` at a time, each
    block under ``jax.checkpoint``, so the scores held at once are [b, heads, block, t]
    in forward and backward instead of [b, heads, s, t]. "cudnn": cuDNN's fused (flash)
    attention through ``jax.nn.dot_product_attention``. "auto": cuDNN on a GPU for
    bfloat16/float16 self-attention of a shape it supports, else blocked.
    """
    if implementation == "cudnn" or (implementation == "auto" and _cudnn_suits(q, k)):
        try:
            return fused_attention(q, k, v, mask, "cudnn")
        except NotImplementedError:  # a shape or dtype cuDNN does not support
            if implementation == "cudnn":
                raise
    s = q.shape[1]
    if s <= block_size:
        return _attend_block(q, k, v, mask, mask.query_offset + jnp.arange(s))
    blocks = -(-s // block_size)
    padded = jnp.pad(q, ((0, 0), (0, blocks * block_size - s), (0, 0), (0, 0)))
    q_blocks = jnp.moveaxis(padded.reshape(q.shape[0], blocks, block_size, *q.shape[2:]), 1, 0)
    slots = mask.query_offset + jnp.arange(blocks * block_size).reshape(blocks, block_size)

    @jax.checkpoint
    def one_block(block_and_slots):
        return _attend_block(block_and_slots[0], k, v, mask, block_and_slots[1])

    out = jax.lax.map(one_block, (q_blocks, slots))  # [blocks, b, block, heads, d]
    return jnp.moveaxis(out, 0, 1).reshape(padded.shape)[:, :s]


def _attend_block(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, query_slots: jax.Array
) -> jax.Array:
    """Exact attention of the queries at ``query_slots``; scores in float32.

    A query that may see no key (a pad row) gets uniform weights, not NaN; its output is
    never used.
    """
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k).astype(jnp.float32) / math.sqrt(d)
    allowed = mask.allowed(query_slots)[:, :, None]  # [b, 1, 1, s, t]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", weights, v)
    return out.reshape(b, s, heads, d)


def _cudnn_suits(q: jax.Array, k: jax.Array) -> bool:
    """On a GPU, half-precision self-attention (no KV cache): what cuDNN's kernel takes."""
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.default_backend() == "gpu" and half and q.shape[1] == k.shape[1]


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, implementation: str
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the mask as a boolean [b, 1, s, t] array."""
    allowed = mask.allowed(mask.query_offset + jnp.arange(q.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=implementation)


# ----------------------------------------------------------------------------- module


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std^2), or ones when std is None (norm weights)."""
    if std is None:
        return nnx.Param(jnp.ones(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))


class DecoderLayers(nnx.Module):
    """All decoder blocks, weights stacked on a leading layer axis."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, init_std: float = 0.02):
        c, dt = config, jnp.dtype(config.param_dtype)
        n, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.input_norm = _param(rngs, (n, d), dt, None)
        self.post_attention_norm = _param(rngs, (n, d), dt, None)
        shapes = projection_shapes(c)
        for name, (inputs, outputs) in shapes.items():
            weight = _param(rngs, (n, *inputs, *outputs), dt, init_std)
            if c.quantize is None:
                setattr(self, name, weight)
                continue
            matrix = weight[...].reshape(n, math.prod(inputs), math.prod(outputs))
            codes, absmax = quant.quantize(matrix, c.quantize)
            setattr(self, f"{name}_codes", nnx.Param(codes))
            setattr(self, f"{name}_absmax", nnx.Param(absmax))
        for name in c.lora.targets if c.lora else ():
            a, b = lora.init_adapter(rngs.params(), n, *shapes[name], c.lora.rank)
            a_name, b_name = lora.adapter_names(name)
            setattr(self, a_name, nnx.Param(a))
            setattr(self, b_name, nnx.Param(b))
        if c.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h, hd), dt))
            self.k_bias = nnx.Param(jnp.zeros((n, kv, hd), dt))
            self.v_bias = nnx.Param(jnp.zeros((n, kv, hd), dt))
            self.o_bias = nnx.Param(jnp.zeros((n, d), dt))
        if c.mlp_bias:
            self.gate_bias = nnx.Param(jnp.zeros((n, f), dt))
            self.up_bias = nnx.Param(jnp.zeros((n, f), dt))
            self.down_bias = nnx.Param(jnp.zeros((n, d), dt))


def _bias(layer: dict[str, jax.Array], name: str, dtype) -> jax.Array | float:
    return layer[name].astype(dtype) if name in layer else 0.0


def dense_layer(layer: dict[str, jax.Array], config: LlamaConfig) -> dict[str, jax.Array]:
    """One layer's base weights in the compute dtype: quantised projections dequantised
    to their [*in, *out] shape, adapters left out."""
    dt = jnp.dtype(config.dtype)
    shapes = projection_shapes(config)
    out = {}
    for name, value in layer.items():
        if name.endswith("_codes"):
            projection = name.removesuffix("_codes")
            inputs, outputs = shapes[projection]
            weight = quant.dequantize(value, layer[f"{projection}_absmax"], config.quantize, dt)
            out[projection] = weight.reshape(*inputs, *outputs)
        elif not (name.endswith("_absmax") or lora.is_adapter(name)):
            out[name] = value.astype(dt)
    return out


def project(
    x: jax.Array,
    name: str,
    dense: dict[str, jax.Array],
    layer: dict[str, jax.Array],
    config: LlamaConfig,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Projection ``name`` of one layer: x W + bias, plus the LoRA delta s (drop(x) A) B
    when ``layer`` has adapters for it. x [batch, seq, *in] -> [batch, seq, *out];
    ``dense``: ``dense_layer(layer, config)``."""
    inputs = len(projection_shapes(config)[name][0])
    y = jnp.tensordot(x, dense[name], axes=inputs) + _bias(dense, f"{name}_bias", x.dtype)
    a_name, b_name = lora.adapter_names(name)
    if a_name not in layer:
        return y
    key = None
    if dropout_key is not None:
        key = jax.random.fold_in(dropout_key, list(lora.PEFT_MODULES).index(name))
    return y + lora.delta(x, layer[a_name], layer[b_name], config.lora, key)


def decoder_block(
    layer: dict[str, jax.Array],
    x: jax.Array,
    positions: jax.Array,
    mask: AttentionMask,
    config: LlamaConfig,
    inv_freq: jax.Array,
    kv_cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm LLaMA block on one layer's weights (a dict of un-stacked arrays).

    With ``kv_cache`` ([b, max_len, kv_heads, d] keys and values), the new keys and
    values are written at ``cache_index`` and attention runs over the whole cache; the
    mask must then cover the cache length. Each projection adds its LoRA delta when the
    layer has adapters for it; ``dropout_key`` (training only) drops adapter inputs.
    """
    dt = jnp.dtype(config.dtype)
    w = dense_layer(layer, config)
    h = rms_norm(x, layer["input_norm"], config.rms_norm_eps)
    q = project(h, "q", w, layer, config, dropout_key)
    k = project(h, "k", w, layer, config, dropout_key)
    v = project(h, "v", w, layer, config, dropout_key)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if kv_cache is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(
            kv_cache[0], k.astype(kv_cache[0].dtype), cache_index, 1
        )
        v_all = jax.lax.dynamic_update_slice_in_dim(
            kv_cache[1], v.astype(kv_cache[1].dtype), cache_index, 1
        )
        kv_cache = (k_all, v_all)
        k, v = k_all.astype(dt), v_all.astype(dt)
    attn = attend(q, k, v, mask, config.attention_block, config.attention)
    x = x + project(attn, "o", w, layer, config, dropout_key)
    h = rms_norm(x, layer["post_attention_norm"], config.rms_norm_eps)
    gate = project(h, "gate", w, layer, config, dropout_key)
    up = project(h, "up", w, layer, config, dropout_key)
    x = x + project(jax.nn.silu(gate) * up, "down", w, layer, config, dropout_key)
    return x, kv_cache


def run_layers(
    layers: dict[str, jax.Array],
    x: jax.Array,
    positions: jax.Array,
    mask: AttentionMask,
    config: LlamaConfig,
    kv_caches: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Apply every block in order, scanned or unrolled; caches are stacked [layers, ...].
    ``dropout_key`` is split into one key per layer."""
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope)
    keys = None
    if dropout_key is not None:
        keys = jax.random.split(dropout_key, config.num_hidden_layers)

    def block(x, layer_cache_key):
        layer, cache, key = layer_cache_key
        x, cache = decoder_block(
            layer,
            parallel.constrain_rows(x),
            positions,
            mask,
            config,
            inv_freq,
            cache,
            cache_index,
            key,
        )
        return parallel.constrain_rows(x), cache

    if config.remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    if config.scan_layers:
        return jax.lax.scan(block, x, (layers, kv_caches, keys))
    new_caches = []
    for i in range(config.num_hidden_layers):
        cache_i = None if kv_caches is None else jax.tree.map(lambda c, i=i: c[i], kv_caches)
        key_i = None if keys is None else keys[i]
        x, cache_i = block(x, (jax.tree.map(lambda p, i=i: p[i], layers), cache_i, key_i))
        new_caches.append(cache_i)
    if kv_caches is None:
        return x, None
    return x, jax.tree.map(lambda *c: jnp.stack(c), *new_caches)


class Llama(nnx.Module):
    """LLaMA causal LM (``score_model=False``) or score model (``score_model=True``).

    ``model(input_ids, attention_mask)`` returns logits [batch, seq, vocab] for a causal
    LM, and scores [batch] read at each row's last real token for a score model.

    ``dropout_key``: None, or (set by the train step on the model it builds inside its
    compiled function) the key of this forward's LoRA dropout.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, init_std: float = 0.02):
        self.config = config
        self.dropout_key: jax.Array | None = None
        dt = jnp.dtype(config.param_dtype)
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), dt, init_std)
        self.layers = DecoderLayers(config, rngs, init_std)
        self.final_norm = _param(rngs, (config.hidden_size,), dt, None)
        if config.score_model:
            self.score_head = _param(rngs, (config.hidden_size, 1), dt, init_std)
        elif not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dt, init_std)

    def layer_weights(self) -> dict[str, jax.Array]:
        return {
            name: value[...]
            for name, value in vars(self.layers).items()
            if isinstance(value, nnx.Param)
        }

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [batch, seq, hidden].

        ``segment_ids`` (packed rows, [batch, seq], 0 = padding) replaces the attention
        mask: each token attends causally within its segment, and positions restart at
        each segment (unless ``positions`` are given).
        """
        if segment_ids is not None:
            attention_mask = (segment_ids > 0).astype(jnp.int32)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = self.embed[...][input_ids].astype(jnp.dtype(self.config.dtype))
        mask = AttentionMask(attention_mask, segment_ids=segment_ids)
        x, _ = run_layers(
            self.layer_weights(), x, positions, mask, self.config, dropout_key=self.dropout_key
        )
        return rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)

    def output_head(self) -> jax.Array:
        """The [hidden, vocab] matrix that maps hidden states to logits: lm_head, or
        embed^T when the embeddings are tied."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """hidden @ output_head, in float32."""
        head = self.output_head().astype(hidden.dtype)
        return jnp.einsum("bsd,dv->bsv", hidden, head).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        hidden = self.hidden_states(input_ids, attention_mask)
        if not self.config.score_model:
            return self.logits_from_hidden(hidden)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        last = last_token_index(attention_mask)
        at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return (at_last @ self.score_head[...].astype(at_last.dtype))[:, 0].astype(jnp.float32)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row (works for left and right padding)."""
    seq = attention_mask.shape[-1]
    return seq - 1 - jnp.argmax(jnp.flip(attention_mask, axis=-1), axis=-1)
