"""transformers 4.x ``FlaxLlamaForCausalLM`` checkpoints (flax_model.msgpack), in and out.

Layout, from transformers 4.49 (models/llama/modeling_flax_llama.py and
modeling_flax_utils.py ``save_pretrained``):

    model/embed_tokens/embedding                     [vocab, hidden]
    model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel [in, out]   (+ /bias if attention_bias)
    model/layers/{i}/mlp/{gate,up,down}_proj/kernel  [in, out]
    model/layers/{i}/{input,post_attention}_layernorm/weight
    model/norm/weight
    lm_head/kernel                                   [hidden, vocab]

i.e. the torch tensors with every Linear weight transposed (``from_pt`` only transposes;
RoPE is rotate-half in both). One file ``flax_model.msgpack`` (``to_bytes`` of the tree), or
shards ``flax_model-0000k-of-0000n.msgpack`` (each a sub-tree) listed by
``flax_model.msgpack.index.json``. The architecture comes from config.json.

transformers' Flax LLaMA never ties the output layer to the embeddings, and converting a
tied torch model gives it a freshly initialised ``lm_head``. So when config.json ties them
and the file also has ``lm_head/kernel``, the embeddings are used; a warning says so unless
``lm_head`` equals the embeddings transposed (as in our own exports).
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sacpo_jax.models import hf
from sacpo_jax.models.formats import CheckpointError
from sacpo_jax.models.llama import Llama, LlamaConfig
from sacpo_jax.models.msgpack_tensors import (
    MsgpackError,
    MsgpackReader,
    leaves_in_write_order,
    read_tree,
    write_tree,
)
from sacpo_jax.models.safetensors_io import PlannedTensor

WEIGHTS = "flax_model.msgpack"
INDEX = "flax_model.msgpack.index.json"
DEFAULT_ROPE_THETA = 10000.0  # transformers 4.49 Flax LLaMA: create_sinusoidal_positions
TIE_CHECK_ROWS = 4096


def _kernel(tmap: hf.TensorMap, name: str) -> hf.TensorMap:
    """A torch Linear map as a Flax Dense kernel: the same tensor transposed."""
    return hf.TensorMap(
        name,
        to_ours=lambda x, c: tmap.to_ours(x.T, c),
        to_hf=lambda x, c: tmap.to_hf(x, c).T,
        hf_shape=lambda c: tuple(reversed(tmap.hf_shape(c))),
    )


def tensor_maps(config: LlamaConfig) -> dict[str, hf.TensorMap]:
    """Our parameter path -> its tensor in the transformers 4.x Flax tree."""
    if config.score_model:
        raise CheckpointError(
            f"transformers' Flax LLaMA has no {config.architecture}; only LlamaForCausalLM"
        )
    maps = {}
    for ours, tmap in hf.tensor_maps(config).items():
        name = tmap.hf_name.replace(".", "/")
        if ours == "embed":
            maps[ours] = hf.TensorMap("model/embed_tokens/embedding", **_same_maps(tmap))
        elif len(tmap.hf_shape(config)) == 2:
            maps[ours] = _kernel(tmap, name.replace("/weight", "/kernel"))
        else:
            maps[ours] = hf.TensorMap(name, **_same_maps(tmap))
    return maps


def _same_maps(tmap: hf.TensorMap) -> dict[str, Any]:
    return dict(to_ours=tmap.to_ours, to_hf=tmap.to_hf, hf_shape=tmap.hf_shape)


# ----------------------------------------------------------------------------- import


def weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    single = os.path.join(path, WEIGHTS)
    if os.path.isfile(single):
        return [single]
    shards = sorted(glob.glob(os.path.join(path, "flax_model-*-of-*.msgpack")))
    if not shards:
        raise CheckpointError(f"{path}: no {WEIGHTS} or flax_model-*-of-*.msgpack found")
    return shards


def open_reader(path: str) -> MsgpackReader:
    arrays = {}
    try:
        for file in weight_files(path):
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: listed in {INDEX} but missing")
            arrays.update(read_tree(file))
    except MsgpackError as e:
        raise CheckpointError(str(e)) from None
    return MsgpackReader(arrays)


def _lm_head_is_embedding(reader: MsgpackReader) -> bool:
    """lm_head/kernel == embedding.T, compared a block of rows at a time."""
    embed, head = reader.view("model/embed_tokens/embedding"), reader.view("lm_head/kernel")
    if head.shape != embed.shape[::-1]:
        return False
    for start in range(0, embed.shape[0], TIE_CHECK_ROWS):
        rows = slice(start, start + TIE_CHECK_ROWS)
        if not np.array_equal(embed[rows], head[:, rows].T):
            return False
    return True


def load_checkpoint(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    llama_config: str | None = None,
    **options: Any,
) -> Llama:
    """Import a transformers 4.x Flax LLaMA directory (see the module docstring)."""
    hf_config = hf.read_hf_config(llama_config or path)
    reader = open_reader(path)
    embed = "model/embed_tokens/embedding"
    stored = reader.info(embed if embed in reader else reader.names()[0]).dtype
    config = hf.config_from_hf(
        hf_config,
        param_dtype=jnp.dtype(dtype or stored.name).name,
        dtype=compute_dtype,
        where=os.path.join(path, "config.json"),
        **options,
    )
    maps = tensor_maps(config)
    hf.check_tensors(reader, maps, config, path)
    tied_with_head = config.tie_word_embeddings and "lm_head/kernel" in reader
    if tied_with_head and not _lm_head_is_embedding(reader):
        warnings.warn(
            f"{path}: config.json ties the output layer to the embeddings but the file also "
            "has lm_head/kernel (transformers' Flax LLaMA never ties and gives a converted "
            "tied model a fresh lm_head): using the embeddings, ignoring lm_head/kernel",
            stacklevel=2,
        )
    return hf.place_parameters(reader, maps, config, mesh)


# ----------------------------------------------------------------------------- export


def _check_exportable(config: LlamaConfig) -> None:
    if config.head_dim * config.num_attention_heads != config.hidden_size or config.mlp_bias:
        raise CheckpointError(
            "transformers' Flax LLaMA needs head_dim = hidden_size / num_attention_heads and no "
            f"MLP biases; this model has head_dim={config.head_dim}, mlp_bias={config.mlp_bias}"
        )
    rope = config.rope
    if rope.rope_type != "default" or rope.theta != DEFAULT_ROPE_THETA:
        warnings.warn(
            f"transformers 4.x Flax LLaMA ignores RoPE settings (uses theta 10000, no scaling); "
            f"this model has {rope.rope_type} RoPE with theta {rope.theta}: {WEIGHTS} is exact, "
            "but only loaders that read config.json (like this one) compute the same logits",
            stacklevel=3,
        )


def _insert(tree: dict, name: str, tensor: PlannedTensor) -> None:
    *parents, leaf = name.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = tensor


def save(model: Llama, path: str) -> None:
    """Write ``path``/flax_model.msgpack in the transformers 4.x Flax layout (a tied model
    gets ``lm_head/kernel`` = embeddings transposed, which transformers 4.x needs)."""
    config = model.config
    _check_exportable(config)
    tree: dict = {}
    for tensor in hf.export_plan(model, tensor_maps(config)):
        _insert(tree, tensor.name, tensor)
    if config.tie_word_embeddings:
        embed = tree["model"]["embed_tokens"]["embedding"]
        tree["lm_head"] = {
            "kernel": PlannedTensor(
                "lm_head/kernel", embed.dtype, embed.shape[::-1], lambda: embed.produce().T
            )
        }
    if jax.process_index() == 0:
        write_tree(os.path.join(path, WEIGHTS), tree)
    else:  # still take part in the gathers of sharded parameters, in the same order
        for tensor in leaves_in_write_order(tree):
            tensor.produce()
