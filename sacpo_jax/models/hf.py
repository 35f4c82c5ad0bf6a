"""Hugging Face format <-> our LLaMA parameters, both ways, placed shard by shard; and the
entry point that imports every supported format (``load_checkpoint``).

Import reads config.json and model.safetensors (or sharded model-*.safetensors with
model.safetensors.index.json), memory-maps every tensor and builds each parameter with
``jax.make_array_from_callback``: every device reads only its own block of the file.
Export writes config.json, safetensors files (sharded above ``max_shard_bytes``) and the
tokenizer; ``transformers``' ``LlamaForCausalLM.from_pretrained`` loads the result.
A source's generation_config.json (EOS ids, pad, sampling defaults) is read on import,
kept in the config and written back on export.

Supported architectures: LlamaForCausalLM, LlamaForSequenceClassification (score head
``score.weight``) and safe-rlhf's LlamaModelForScore (``score_head.weight``).
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sacpo_jax import parallel
from sacpo_jax.models import formats, quant, transforms
from sacpo_jax.models.formats import CheckpointError
from sacpo_jax.models.llama import Llama, LlamaConfig, RopeConfig, projection_shapes
from sacpo_jax.models.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors

ARCHITECTURES = {
    "LlamaForCausalLM": None,
    "LlamaForSequenceClassification": "score.weight",
    "LlamaModelForScore": "score_head.weight",
}
_MODELED_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "architectures", "model_type", "torch_dtype", "dtype",
    "transformers_version",
}  # fmt: skip


GENERATION_CONFIG = "generation_config.json"


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict[str, Any], where: str) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (transformers 5) or rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{where}: rope type {rope_type!r} is not supported (default, linear, llama3)"
        )
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )


def _architecture(hf: dict[str, Any], where: str) -> str:
    architectures = hf.get("architectures") or (
        ["LlamaForCausalLM"] if hf.get("model_type") == "llama" else []
    )
    name = architectures[0] if architectures else hf.get("model_type", "<none>")
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    if name != "LlamaForCausalLM":
        outputs = hf.get("score_dim", hf.get("num_labels", len(hf.get("id2label", {0: 0}))))
        if outputs != 1:
            raise CheckpointError(
                f"{where}: a score model must have 1 output, this one has {outputs}"
            )
    return name


def config_from_hf(
    hf: dict[str, Any],
    *,
    param_dtype: str,
    dtype: str | None = None,
    where: str = "config.json",
    generation: dict[str, Any] | None = None,
    **options: Any,
) -> LlamaConfig:
    """Our LlamaConfig from a Hugging Face config dict (and generation_config.json's dict,
    ``generation``); ``options`` set remat/scan_layers."""
    try:
        heads = int(hf["num_attention_heads"])
        extra = {k: v for k, v in hf.items() if k not in _MODELED_KEYS}
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf, where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            architecture=_architecture(hf, where),
            param_dtype=param_dtype,
            dtype=dtype or param_dtype,
            hf_extra_json=json.dumps(extra, sort_keys=True),
            generation_config_json=json.dumps(generation or {}, sort_keys=True),
            **options,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: a field has a wrong type or value ({e})") from None


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A transformers-5 config dict for ``config`` (unmodelled original fields kept)."""
    rope = config.rope
    rope_parameters: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3"):
        rope_parameters["factor"] = rope.factor
    if rope.rope_type == "llama3":
        rope_parameters.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    hf = dict(config.hf_extra)
    hf.update(
        architectures=[config.architecture],
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        dtype=config.param_dtype,
    )
    if config.architecture == "LlamaForSequenceClassification":
        hf.setdefault("num_labels", 1)
        hf.setdefault("id2label", {"0": "LABEL_0"})
        hf.setdefault("label2id", {"LABEL_0": 0})
    if config.architecture == "LlamaModelForScore":
        hf.setdefault("score_dim", 1)
    return hf


# ----------------------------------------------------------------------------- tensor map


@dataclass(frozen=True)
class TensorMap:
    """How one of our parameters relates to Hugging Face tensors.

    ``hf_name`` has ``{i}`` for per-layer tensors (ours are stacked over layers).
    ``to_ours`` turns one HF tensor into our layout using views only (reshape of a
    contiguous array, transpose), so slicing the result reads only that block.
    """

    hf_name: str
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    hf_shape: Callable[[LlamaConfig], tuple[int, ...]]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(x, c):
    return x


def _transpose(x, c):
    return x.T


def _heads_in(n_heads: Callable[[LlamaConfig], int]) -> TensorMap:
    """q/k/v: HF [heads*hd, hidden] <-> ours [hidden, heads, hd]."""
    return dict(
        to_ours=lambda x, c: x.reshape(n_heads(c), c.head_dim, c.hidden_size).transpose(2, 0, 1),
        to_hf=lambda x, c: x.transpose(1, 2, 0).reshape(n_heads(c) * c.head_dim, c.hidden_size),
        hf_shape=lambda c: (n_heads(c) * c.head_dim, c.hidden_size),
    )


def _heads_bias(n_heads: Callable[[LlamaConfig], int]) -> dict:
    return dict(
        to_ours=lambda x, c: x.reshape(n_heads(c), c.head_dim),
        to_hf=lambda x, c: x.reshape(-1),
        hf_shape=lambda c: (n_heads(c) * c.head_dim,),
    )


def _vector(size: Callable[[LlamaConfig], int]) -> dict:
    return dict(to_ours=_same, to_hf=_same, hf_shape=lambda c: (size(c),))


def _linear(n_in: Callable, n_out: Callable) -> dict:
    """A torch Linear weight [out, in] <-> ours [in, out]."""
    return dict(to_ours=_transpose, to_hf=_transpose, hf_shape=lambda c: (n_out(c), n_in(c)))


def _heads(c):
    return c.num_attention_heads


def _kv_heads(c):
    return c.num_key_value_heads


def _hidden(c):
    return c.hidden_size


def _ffn(c):
    return c.intermediate_size


def _vocab(c):
    return c.vocab_size


def tensor_maps(config: LlamaConfig) -> dict[str, TensorMap]:
    """Our parameter path -> TensorMap, for the parameters this config has."""
    layer = "model.layers.{i}."
    maps = {
        "embed": TensorMap(
            "model.embed_tokens.weight", _same, _same, lambda c: (c.vocab_size, c.hidden_size)
        ),
        "final_norm": TensorMap("model.norm.weight", **_vector(_hidden)),
        "layers/input_norm": TensorMap(layer + "input_layernorm.weight", **_vector(_hidden)),
        "layers/post_attention_norm": TensorMap(
            layer + "post_attention_layernorm.weight", **_vector(_hidden)
        ),
        "layers/q": TensorMap(layer + "self_attn.q_proj.weight", **_heads_in(_heads)),
        "layers/k": TensorMap(layer + "self_attn.k_proj.weight", **_heads_in(_kv_heads)),
        "layers/v": TensorMap(layer + "self_attn.v_proj.weight", **_heads_in(_kv_heads)),
        "layers/o": TensorMap(
            layer + "self_attn.o_proj.weight",
            to_ours=lambda x, c: x.reshape(
                c.hidden_size, c.num_attention_heads, c.head_dim
            ).transpose(1, 2, 0),
            to_hf=lambda x, c: x.transpose(2, 0, 1).reshape(c.hidden_size, -1),
            hf_shape=lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
        ),
        "layers/gate": TensorMap(layer + "mlp.gate_proj.weight", **_linear(_hidden, _ffn)),
        "layers/up": TensorMap(layer + "mlp.up_proj.weight", **_linear(_hidden, _ffn)),
        "layers/down": TensorMap(layer + "mlp.down_proj.weight", **_linear(_ffn, _hidden)),
    }
    if config.attention_bias:
        maps["layers/q_bias"] = TensorMap(layer + "self_attn.q_proj.bias", **_heads_bias(_heads))
        maps["layers/k_bias"] = TensorMap(layer + "self_attn.k_proj.bias", **_heads_bias(_kv_heads))
        maps["layers/v_bias"] = TensorMap(layer + "self_attn.v_proj.bias", **_heads_bias(_kv_heads))
        maps["layers/o_bias"] = TensorMap(layer + "self_attn.o_proj.bias", **_vector(_hidden))
    if config.mlp_bias:
        maps["layers/gate_bias"] = TensorMap(layer + "mlp.gate_proj.bias", **_vector(_ffn))
        maps["layers/up_bias"] = TensorMap(layer + "mlp.up_proj.bias", **_vector(_ffn))
        maps["layers/down_bias"] = TensorMap(layer + "mlp.down_proj.bias", **_vector(_hidden))
    if config.score_model:
        head = ARCHITECTURES[config.architecture]
        maps["score_head"] = TensorMap(head, **_linear(_hidden, lambda c: 1))
    elif not config.tie_word_embeddings:
        maps["lm_head"] = TensorMap("lm_head.weight", **_linear(_hidden, _vocab))
    return maps


def _hf_names(name: str, tmap: TensorMap, config: LlamaConfig) -> list[str]:
    if not tmap.per_layer:
        return [tmap.hf_name]
    return [tmap.hf_name.format(i=i) for i in range(config.num_hidden_layers)]


# ----------------------------------------------------------------------------- import


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_ALWAYS = ["*.json", "tokenizer.model", "*.txt"]


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not a local directory: a Hugging Face hub repository."""
    return not os.path.exists(path) and HUB_ID.fullmatch(path) is not None


def hub_patterns(repo_files: list[str]) -> list[str]:
    """What to download: JSON, tokenizer and the safetensors weights, or the Flax msgpack
    weights when the repository has no safetensors. Pickle weights never."""
    has_safetensors = any(f.endswith(".safetensors") for f in repo_files)
    has_msgpack = any(f.endswith(".msgpack") for f in repo_files)
    weights = "*.msgpack" if has_msgpack and not has_safetensors else "*.safetensors"
    return HUB_ALWAYS + [weights, "*.msgpack.index.json"]


def resolve_model_dir(path: str, revision: str | None = None) -> str:
    """A local directory for ``path``: itself, or a hub snapshot (see ``hub_patterns``).

    Offline, or for a missing repository, the error is one line.
    """
    if not is_hub_id(path):
        return path
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        patterns = hub_patterns(list_repo_files(path, revision=revision))
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except Exception as e:  # network, authentication, missing repository
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not fetch {path} from the Hugging Face hub: {reason}"
        ) from None


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of a model directory, or the JSON file ``path`` itself."""
    config_path = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    return _read_json_object(config_path)


def read_generation_config(path: str) -> dict[str, Any]:
    """generation_config.json of a model directory; {} when it has none."""
    config_path = os.path.join(path, GENERATION_CONFIG)
    return _read_json_object(config_path) if os.path.isfile(config_path) else {}


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def open_safetensors(path: str) -> SafetensorsReader:
    """The reader over model.safetensors or the shards named by its index file (each shard
    a file inside the model directory)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file)")
        root = os.path.realpath(path)
        files = []
        for name in sorted(set(map(str, weight_map.values()))):
            shard = os.path.realpath(os.path.join(path, name))
            if os.path.dirname(shard) != root:
                raise CheckpointError(f"{index}: shard {name!r} is outside the model directory")
            if not os.path.isfile(shard):
                raise CheckpointError(f"{index}: shard {name!r} not found")
            files.append(shard)
        return SafetensorsReader(files)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors or model-*.safetensors found")
    return SafetensorsReader(files)


def check_tensors(reader, maps: dict[str, TensorMap], config: LlamaConfig, path: str) -> None:
    """Fail with one line on the first missing tensor or shape mismatch."""
    for name, tmap in maps.items():
        expected = tmap.hf_shape(config)
        for hf_name in _hf_names(name, tmap, config):
            if hf_name not in reader:
                raise CheckpointError(f"{path}: missing tensor {hf_name}")
            found = reader.info(hf_name).shape
            if tuple(found) != tuple(expected):
                raise CheckpointError(
                    f"{path}: tensor {hf_name} has shape {tuple(found)}, expected {tuple(expected)}"
                )


def _block_reader(reader, name: str, tmap: TensorMap, config: LlamaConfig):
    """read(index) -> our block at ``index``; per-layer tensors stack only the layers asked."""
    hf_names = _hf_names(name, tmap, config)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not tmap.per_layer:
            return tmap.to_ours(reader.view(hf_names[0]), config)[index]
        layers = range(config.num_hidden_layers)[index[0]]
        blocks = [tmap.to_ours(reader.view(hf_names[i]), config)[index[1:]] for i in layers]
        return np.stack(blocks)

    return read


_quantize_on_device = jax.jit(quant.quantize, static_argnames="kind")


def _quantized_block_reader(reader, name: str, maps: dict[str, TensorMap], config: LlamaConfig):
    """read(index) -> the block at ``index`` of a quantised projection's codes or absmax
    (``layers/q_codes``, ``layers/q_absmax``), quantised from the file one layer at a
    time: the rows read are the whole absmax blocks that cover the asked rows."""
    projection, part = name.removeprefix("layers/").rsplit("_", 1)
    tmap, kind = maps[f"layers/{projection}"], config.quantize
    inputs, outputs = projection_shapes(config)[projection]
    rows, cols = math.prod(inputs), math.prod(outputs)
    block = quant.block_rows(kind, rows)
    per_element = quant.rows_per_code(kind) if part == "codes" else block
    hf_names = _hf_names(f"layers/{projection}", tmap, config)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        layers, stored, columns = index
        first, stop, _ = stored.indices(rows // per_element)
        begin, end = first * per_element, stop * per_element
        aligned = slice(begin // block * block, -(-end // block) * block)
        offset = (begin - aligned.start) // per_element
        out = []
        for i in range(config.num_hidden_layers)[layers]:
            weight = tmap.to_ours(reader.view(hf_names[i]), config).reshape(rows, cols)
            values = np.asarray(weight[aligned, columns], np.float32)
            codes, absmax = _quantize_on_device(values, kind=kind)
            quantized = np.asarray(codes if part == "codes" else absmax)
            out.append(quantized[offset : offset + stop - first])
        return np.stack(out)

    return read


def place_parameters(
    reader, maps: dict[str, TensorMap], config: LlamaConfig, mesh: Mesh | None
) -> Llama:
    """A Llama whose every parameter is built block by block from ``reader`` via ``maps``
    (reader: ``view(name)`` -> array, as SafetensorsReader); default mesh: one device.
    With ``config.quantize`` each projection is quantised block by block as it is read:
    no process holds more than one layer's block of a dense projection."""
    mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))

    def place(key_path, leaf):
        name = parallel.path_name(key_path)
        sharding = jax.sharding.NamedSharding(mesh, parallel.param_spec(name, leaf.shape, mesh))
        if name in maps:
            read = _block_reader(reader, name, maps[name], config)
        else:
            read = _quantized_block_reader(reader, name, maps, config)
        return parallel.place_from_host(leaf.shape, leaf.dtype, sharding, read)

    state = jax.tree_util.tree_map_with_path(place, abstract)
    return nnx.merge(graphdef, state)


def load_checkpoint(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    format: str | None = None,
    llama_config: str | None = None,
    quantize: str | None = None,
    **options: Any,
) -> Llama:
    """Import a LLaMA checkpoint in any format of ``formats`` as a sharded Llama module.

    dtype: parameter dtype (default: the checkpoint's). mesh: where to place the
    parameters (default: one device). format: force a format (default: told from the
    files). llama_config: the architecture for formats that store none (EasyLM, MaxText).
    quantize: "nf4" or "int8" storage of the projections (safetensors are quantised
    while read, block by block; other formats after import, on the devices).
    options: LlamaConfig execution options (remat, scan_layers). ``path`` may also be a
    hub id ("owner/name").
    """
    path = resolve_model_dir(path)
    kind = formats.detect(path, format)
    if kind != "safetensors":
        module = importlib.import_module(f"sacpo_jax.models.{kind}")
        model = module.load_checkpoint(
            path,
            dtype=dtype,
            mesh=mesh,
            compute_dtype=compute_dtype,
            llama_config=llama_config,
            **options,
        )
        return model if quantize is None else _quantized(model, quantize, path)
    hf = read_hf_config(llama_config or path)
    reader = open_safetensors(path)
    stored = reader.info(
        "model.embed_tokens.weight" if "model.embed_tokens.weight" in reader else reader.names()[0]
    ).dtype
    param_dtype = jnp.dtype(dtype or stored.name).name
    where = os.path.join(path, "config.json")
    config = config_from_hf(
        hf,
        param_dtype=param_dtype,
        dtype=compute_dtype,
        where=where,
        generation=read_generation_config(path),
        quantize=quantize,
        **options,
    )
    maps = tensor_maps(config)
    check_tensors(reader, maps, config, path)
    return place_parameters(reader, maps, config, mesh)


def _quantized(model: Llama, kind: str, path: str) -> Llama:
    try:
        return transforms.quantized(model, kind)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- export


def export_plan(model: Llama, maps: dict[str, TensorMap]) -> list[PlannedTensor]:
    """One PlannedTensor per file tensor named in ``maps``, each gathered when written."""
    config = model.config
    params = {
        parallel.path_name(p): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    plan = []
    for name, tmap in maps.items():
        array = params[name]
        dtype = np.dtype(array.dtype)
        cache: dict[str, np.ndarray] = {}

        def produce(layer=None, array=array, tmap=tmap, cache=cache):
            if "host" not in cache:  # gather once per parameter, then slice its layers
                cache["host"] = parallel.to_host(array)
            host = cache["host"]
            out = tmap.to_hf(host if layer is None else host[layer], config)
            if layer is None or layer == config.num_hidden_layers - 1:
                cache.clear()
            return out

        if tmap.per_layer:
            for i, hf_name in enumerate(_hf_names(name, tmap, config)):
                plan.append(
                    PlannedTensor(
                        hf_name, dtype, tmap.hf_shape(config), lambda f=produce, i=i: f(i)
                    )
                )
        else:
            plan.append(PlannedTensor(tmap.hf_name, dtype, tmap.hf_shape(config), produce))
    return plan


def save_checkpoint(
    model: Llama,
    path: str,
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
    msgpack: bool = False,
) -> None:
    """Write config.json, safetensors (with an index when sharded), the source's
    generation_config.json (when it had one) and the tokenizer; ``msgpack``: also
    flax_model.msgpack in the transformers 4.x Flax layout."""
    plan = export_plan(model, tensor_maps(model.config))
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file_name, shard in zip(names, shards):
        if writer:
            write_safetensors(os.path.join(path, file_name), shard)
        else:  # still take part in the gathers of sharded parameters
            for tensor in shard:
                tensor.produce()
    if msgpack:
        importlib.import_module("sacpo_jax.models.flax_msgpack").save(model, path)
    if not writer:
        return
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan)},
            "weight_map": {t.name: f for f, shard in zip(names, shards) for t in shard},
        }
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2, sort_keys=True)
    if model.config.generation_config:
        with open(os.path.join(path, GENERATION_CONFIG), "w") as f:
            json.dump(model.config.generation_config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
