"""EasyLM streaming checkpoints of LLaMA models (the TPU trainer OpenLLaMA was trained with).

Layout facts, from EasyLM's EasyLM/checkpoint.py (``StreamingCheckpointer``) and
EasyLM/models/llama/{llama_model.py, convert_easylm_to_hf.py}, read here in their verbatim
copies in fjformer 0.0.50 (fjformer/checkpoint/streamer.py) and EasyDeL 0.0.2
(EasyDel/weight_convertor/llama.py ``convert_flax_to_pt``, EasyDel/modules/llama/
modelling_llama_flax.py):

* A file is a stream of msgpack records ``(key, flax.serialization.to_bytes(array))``, one
  per tensor, ``key`` the tensor's path in the flattened state dict (a list of strings).
  ``streaming_params`` holds the model tree itself (``save_all`` saves
  ``train_state.params["params"]``); ``streaming_train_state`` holds
  ``("params", "params", ...)`` plus optimizer and step records, which are skipped. A
  ``("params", ...)`` prefix (what EasyLM's ``params::`` loader strips) is accepted too.
* The model tree (kernels are [in, out]):
      transformer/wte/embedding                           [vocab, hidden]
      transformer/h/{i}/attention/{wq,wk,wv,wo}/kernel
      transformer/h/{i}/feed_forward/{w1,w2,w3}/kernel    w1 gate, w2 down, w3 up
      transformer/h/{i}/{attention_norm,ffn_norm}/kernel
      transformer/ln_f/kernel
      lm_head/kernel                                      [hidden, vocab] (untied only)
* RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head (``apply_rotary_emb`` via
  complex numbers); Hugging Face and we rotate halves (x[i], x[i + hd/2]). EasyLM's
  converter permutes wq/wk per head, ``w.view(heads, hd/2, 2, hidden).transpose(1, 2)``;
  here a head's column 2i+j becomes column j*hd/2 + i.
* No model config is stored: it comes from ``llama_config`` (a config.json, or a name of
  EasyLM's standard configs below) or a config.json next to the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sacpo_jax.models import formats, hf
from sacpo_jax.models.formats import CheckpointError
from sacpo_jax.models.llama import Llama, LlamaConfig
from sacpo_jax.models.msgpack_tensors import MsgpackError, MsgpackReader, flatten, read_records

MODEL_ROOTS = ("transformer", "lm_head")
KEY_PREFIXES = (("params", "params"), ("params",), ())
LAYER = "transformer/h/{i}/"
NAMES = {  # Hugging Face tensor -> EasyLM tensor
    "model.embed_tokens.weight": "transformer/wte/embedding",
    "model.norm.weight": "transformer/ln_f/kernel",
    "lm_head.weight": "lm_head/kernel",
    "model.layers.{i}.input_layernorm.weight": LAYER + "attention_norm/kernel",
    "model.layers.{i}.post_attention_layernorm.weight": LAYER + "ffn_norm/kernel",
    "model.layers.{i}.self_attn.q_proj.weight": LAYER + "attention/wq/kernel",
    "model.layers.{i}.self_attn.k_proj.weight": LAYER + "attention/wk/kernel",
    "model.layers.{i}.self_attn.v_proj.weight": LAYER + "attention/wv/kernel",
    "model.layers.{i}.self_attn.o_proj.weight": LAYER + "attention/wo/kernel",
    "model.layers.{i}.mlp.gate_proj.weight": LAYER + "feed_forward/w1/kernel",
    "model.layers.{i}.mlp.down_proj.weight": LAYER + "feed_forward/w2/kernel",
    "model.layers.{i}.mlp.up_proj.weight": LAYER + "feed_forward/w3/kernel",
}
INTERLEAVED = {"layers/q": "num_attention_heads", "layers/k": "num_key_value_heads"}

# EasyLM's LLAMA_STANDARD_CONFIGS by name, as Hugging Face config fields. The sizes are those
# of the released models (OpenLLaMA 3B; LLaMA 7B/13B/33B/65B: rms_norm_eps 1e-6, 32000 tokens,
# 2048 positions); EasyLM's file itself could not be read here, so only these are accepted.
_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048)
_SIZES = {  # name: (hidden, intermediate, layers, heads)
    "3b": (3200, 8640, 26, 32),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "30b": (6656, 17920, 60, 52),
    "65b": (8192, 22016, 80, 64),
}
STANDARD_CONFIGS = {
    name: dict(
        _LLAMA1,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    for name, (hidden, ffn, layers, heads) in _SIZES.items()
}


def hf_config(path: str, llama_config: str | None) -> dict[str, Any]:
    """The Hugging Face config dict: a standard name, a config.json, or one beside ``path``."""
    if llama_config in STANDARD_CONFIGS:
        return {"model_type": "llama", **STANDARD_CONFIGS[llama_config]}
    if llama_config is not None:
        if not os.path.exists(llama_config):
            raise CheckpointError(
                f"llama_config {llama_config!r} is neither a config.json path nor an EasyLM "
                f"standard config ({', '.join(STANDARD_CONFIGS)})"
            )
        return hf.read_hf_config(llama_config)
    directory = os.path.dirname(path) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(
            f"{path}: an EasyLM checkpoint stores no model config; put the model's Hugging Face "
            "config.json beside it or set model.llama_config (a config.json path or one of "
            f"{', '.join(STANDARD_CONFIGS)})"
        )
    return hf.read_hf_config(directory)


def checkpoint_file(path: str) -> str:
    """``path`` itself, or the one EasyLM streaming file in the directory ``path``."""
    if os.path.isfile(path):
        return path
    found = formats.easylm_files(path)
    if len(found) != 1:
        names = ", ".join(os.path.basename(f) for f in found) or "none"
        raise CheckpointError(
            f"{path}: expected one EasyLM streaming_params* / streaming_train_state* file, "
            f"found {names}; give the file's path"
        )
    return found[0]


def _model_key(key: Any) -> str | None:
    """'transformer/...' or 'lm_head/...' for a model tensor's record key, else None."""
    if not isinstance(key, list):
        return None
    parts = tuple(str(k) for k in key)
    for prefix in KEY_PREFIXES:
        n = len(prefix)
        if parts[:n] == prefix and len(parts) > n and parts[n] in MODEL_ROOTS:
            return "/".join(parts[n:])
    return None


def open_reader(file: str) -> MsgpackReader:
    """The model tensors of a streaming file, indexed in place (no tensor is read)."""
    arrays = {}
    try:
        for key, value in read_records(file):
            name = _model_key(key)
            if name is not None:
                arrays.update(flatten(value, name))
    except MsgpackError as e:
        raise CheckpointError(str(e)) from None
    if not arrays:
        raise CheckpointError(f"{file}: no EasyLM LLaMA tensors (transformer/..., lm_head/...)")
    return MsgpackReader(arrays)


def _halves(x: np.ndarray, heads: int) -> np.ndarray:
    """[in, heads * hd] with interleaved RoPE pairs -> the same with halves (HF order)."""
    n_in, width = x.shape
    hd = width // heads
    return x.reshape(n_in, heads, hd // 2, 2).transpose(0, 1, 3, 2).reshape(n_in, width)


def _no_export(x, c):
    raise CheckpointError("writing EasyLM checkpoints is not supported")


def _kernel_map(ours: str, tmap: hf.TensorMap) -> hf.TensorMap:
    heads_field = INTERLEAVED.get(ours)

    def to_ours(x, c):
        if heads_field:
            x = _halves(x, getattr(c, heads_field))
        return tmap.to_ours(x.T, c)

    return hf.TensorMap(
        NAMES[tmap.hf_name],
        to_ours=to_ours,
        to_hf=_no_export,
        hf_shape=lambda c: tuple(reversed(tmap.hf_shape(c))),
    )


def tensor_maps(config: LlamaConfig) -> dict[str, hf.TensorMap]:
    """Our parameter path -> its EasyLM tensor."""
    maps = {}
    for ours, tmap in hf.tensor_maps(config).items():
        if tmap.hf_name not in NAMES:
            raise CheckpointError(f"EasyLM's LLaMA has no {tmap.hf_name} (biases, score heads)")
        if len(tmap.hf_shape(config)) == 2 and ours != "embed":
            maps[ours] = _kernel_map(ours, tmap)
        else:
            maps[ours] = hf.TensorMap(NAMES[tmap.hf_name], tmap.to_ours, tmap.to_hf, tmap.hf_shape)
    return maps


def load_checkpoint(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    llama_config: str | None = None,
    **options: Any,
) -> Llama:
    """Import an EasyLM streaming checkpoint (a file, or a directory holding one)."""
    file = checkpoint_file(path)
    architecture = hf_config(path, llama_config)
    reader = open_reader(file)
    embed = "transformer/wte/embedding"
    stored = reader.info(embed if embed in reader else reader.names()[0]).dtype
    config = hf.config_from_hf(
        architecture,
        param_dtype=jnp.dtype(dtype or stored.name).name,
        dtype=compute_dtype,
        where=llama_config or os.path.join(os.path.dirname(file), "config.json"),
        **options,
    )
    maps = tensor_maps(config)
    hf.check_tensors(reader, maps, config, file)
    return hf.place_parameters(reader, maps, config, mesh)
