"""MaxText Orbax checkpoints of dense LLaMA-family models, restored straight onto our mesh.

Layout facts, from MaxText 0.2.5 (maxtext/checkpoint_conversion/standalone_scripts/
llama_or_mistral_ckpt.py, the HF/Meta -> MaxText converter; llama_mistral_mixtral_orbax_to_hf.py,
its inverse; llama_ckpt_conversion_inference_only.py, the unscanned layout;
maxtext/common/checkpointing.py):

* A checkpoint directory holds steps ``<step>/``, each with the Orbax PyTree ``items/`` of
  the train state; the weights are at ``params/params/``. ``<step>/_CHECKPOINT_METADATA``'s
  ``custom_metadata.scan_layers`` records how the run stacked its layers.
* Scanned layers (``decoder/layers/...``, layer axis 1, MaxText's ``param_scan_axis``):
      self_attention/query/kernel   [embed, layers, heads, head_dim]    (query / sqrt(head_dim))
      self_attention/{key,value}/kernel [embed, layers, kv_heads, head_dim]
      self_attention/out/kernel     [heads, layers, head_dim, embed]
      mlp/wi_0/kernel (gate), mlp/wi_1/kernel (up)  [embed, layers, mlp]
      mlp/wo/kernel (down)                         [mlp, layers, embed]
      {pre,post}_self_attention_layer_norm/scale  [embed, layers]
  Unscanned layers (``decoder/layers_{i}/...``): the same tensors without the layer axis.
  Plus decoder/decoder_norm/scale, decoder/logits_dense/kernel [embed, vocab] (absent with
  ``logits_via_embedding``: tied) and token_embedder/embedding [vocab, embed].
* The query kernel is stored divided by sqrt(head_dim) (``scale_query``, default on for LLaMA).
* RoPE: MaxText rotates halves like Hugging Face, except for Llama 3.1/3.3 (rope type
  "llama3"), whose q/k keep Meta's interleaved pairs (the converter skips
  ``permute_to_match_maxtext_rope`` for them and ``unpermute_from_match_maxtext_rope``
  undoes only theirs); those are reordered to halves here.
* No Hugging Face config is stored: it comes from ``llama_config`` (a config.json) or a
  config.json in the given directory.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sacpo_jax import parallel
from sacpo_jax.models import hf
from sacpo_jax.models.formats import CheckpointError
from sacpo_jax.models.llama import Llama, LlamaConfig

LAYER_TENSORS = {  # our per-layer parameter -> MaxText path under the layer
    "layers/q": "self_attention/query/kernel",
    "layers/k": "self_attention/key/kernel",
    "layers/v": "self_attention/value/kernel",
    "layers/o": "self_attention/out/kernel",
    "layers/gate": "mlp/wi_0/kernel",
    "layers/up": "mlp/wi_1/kernel",
    "layers/down": "mlp/wo/kernel",
    "layers/input_norm": "pre_self_attention_layer_norm/scale",
    "layers/post_attention_norm": "post_self_attention_layer_norm/scale",
}
GLOBAL_TENSORS = {
    "embed": "token_embedder/embedding",
    "final_norm": "decoder/decoder_norm/scale",
    "lm_head": "decoder/logits_dense/kernel",
}
SCAN_AXIS = 1
INTERLEAVED_ROPE_TYPES = ("llama3",)


# ----------------------------------------------------------------------------- locating


def items_dir(path: str) -> str:
    """The Orbax PyTree directory: ``path/items``, ``path`` itself, or the latest step's."""
    if os.path.isdir(os.path.join(path, "items")):
        return os.path.join(path, "items")
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    steps = sorted((d for d in os.listdir(path) if d.isdigit()), key=int)
    if not steps:
        raise CheckpointError(f"{path}: no Orbax checkpoint (no items/, _METADATA or step dirs)")
    return items_dir(os.path.join(path, steps[-1]))


def declared_scan(items: str) -> bool | None:
    """``scan_layers`` as MaxText recorded it beside the items, or None when absent."""
    metadata = os.path.join(os.path.dirname(items), "_CHECKPOINT_METADATA")
    if not os.path.isfile(metadata):
        return None
    with open(metadata, encoding="utf-8") as f:
        custom = json.load(f).get("custom_metadata") or {}
    return custom.get("scan_layers")


def _stored_tree(items: str) -> dict:
    import orbax.checkpoint as ocp

    try:
        metadata = ocp.PyTreeCheckpointer().metadata(items)
    except Exception as e:  # unreadable or not an Orbax PyTree
        raise CheckpointError(f"{items}: not a readable Orbax checkpoint ({e})") from None
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def model_root(tree: dict, where: str) -> tuple[str, ...]:
    """The key path of the model weights: params/params (a train state), params, or the root."""
    for root in (("params", "params"), ("params",), ()):
        node = tree
        for key in root:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and "decoder" in node:
            return root
    raise CheckpointError(f"{where}: no MaxText decoder tree (params/params/decoder) found")


# ----------------------------------------------------------------------------- mapping


def _lookup(tree: dict, path: str) -> Any:
    """The node at a '/'-joined path ('' is the root), or None."""
    for key in filter(None, path.split("/")):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def stored_names(config: LlamaConfig, scanned: bool) -> dict[str, list[str]]:
    """Our parameter -> its MaxText tensor path(s) under the model root (one per layer
    when unscanned)."""
    names = {ours: [path] for ours, path in GLOBAL_TENSORS.items()}
    if config.tie_word_embeddings:
        del names["lm_head"]
    for ours, path in LAYER_TENSORS.items():
        if scanned:
            names[ours] = [f"decoder/layers/{path}"]
        else:
            names[ours] = [f"decoder/layers_{i}/{path}" for i in range(config.num_hidden_layers)]
    return names


def stored_shape(ours_shape: tuple[int, ...], per_layer: bool, scanned: bool) -> tuple[int, ...]:
    """The MaxText shape of one stored tensor of a parameter with our shape."""
    if not per_layer:
        return ours_shape
    if not scanned:
        return ours_shape[1:]
    layers, first, *rest = ours_shape
    return (first, layers, *rest)


def stored_spec(ours: PartitionSpec, per_layer: bool, scanned: bool) -> PartitionSpec:
    """Our PartitionSpec moved to the stored layout, so each device reads only its block."""
    axes = list(ours)
    if not per_layer:
        return ours
    if not scanned:
        return PartitionSpec(*axes[1:])
    return PartitionSpec(axes[1], axes[0], *axes[2:])


def _uninterleave(x: jax.Array) -> jax.Array:
    """Per head, Meta's interleaved RoPE pairs (2i, 2i+1) -> halves (i, i + hd/2)."""
    hd = x.shape[-1]
    pairs = x.reshape(*x.shape[:-1], hd // 2, 2)
    return jnp.swapaxes(pairs, -1, -2).reshape(x.shape)


def to_ours(name: str, config: LlamaConfig, scanned: bool, parts: list[jax.Array]) -> jax.Array:
    """Our parameter from its stored tensor(s) (one, or one per layer when unscanned)."""
    per_layer = name.startswith("layers/")
    if not per_layer:
        x = parts[0]
    elif scanned:
        x = jnp.moveaxis(parts[0], SCAN_AXIS, 0)
    else:
        x = jnp.stack(parts)
    if name == "layers/q":
        x = x.astype(jnp.float32) * math.sqrt(config.head_dim)
    if name in ("layers/q", "layers/k") and config.rope.rope_type in INTERLEAVED_ROPE_TYPES:
        x = _uninterleave(x)
    return x.astype(config.param_dtype)


# ----------------------------------------------------------------------------- import


def _check_layout(root: dict, scanned_declared: bool | None, where: str) -> bool:
    """Whether the tree is scanned; a mismatch with the recorded scan_layers is an error."""
    decoder = root.get("decoder", {})
    scanned = "layers" in decoder
    unscanned = any(key.startswith("layers_") for key in decoder)
    if scanned == unscanned:
        raise CheckpointError(
            f"{where}: expected decoder/layers (scanned) or decoder/layers_0.. (unscanned)"
        )
    if scanned_declared is not None and scanned_declared != scanned:
        found = "scanned (decoder/layers)" if scanned else "unscanned (decoder/layers_0..)"
        raise CheckpointError(
            f"{where}: the checkpoint declares scan_layers={str(scanned_declared).lower()} but "
            f"its layers are {found}"
        )
    return scanned


def _architecture(
    path: str,
    llama_config: str | None,
    root: dict,
    dtype: str | None,
    compute_dtype: str | None,
    options: dict[str, Any],
) -> LlamaConfig:
    """Our LlamaConfig from the Hugging Face config.json given or in ``path``."""
    config_path = llama_config or path
    if not os.path.isfile(config_path) and not os.path.isfile(
        os.path.join(config_path, "config.json")
    ):
        raise CheckpointError(
            f"{path}: a MaxText checkpoint stores no Hugging Face config; put the model's "
            "config.json in this directory or set model.llama_config to its path"
        )
    embed = _lookup(root, GLOBAL_TENSORS["embed"])
    stored = jnp.dtype(embed.dtype if embed is not None else "float32")
    config = hf.config_from_hf(
        hf.read_hf_config(config_path),
        param_dtype=jnp.dtype(dtype or stored).name,
        dtype=compute_dtype,
        where=config_path,
        **options,
    )
    if config.score_model or config.attention_bias or config.mlp_bias:
        raise CheckpointError(f"{path}: MaxText LLaMA has no score heads or biases")
    return config


def _restore_targets(root, names, ours, mesh, scanned, where) -> dict[str, jax.ShapeDtypeStruct]:
    """Stored path -> its abstract array, sharded like our parameter (moved to its layout);
    a missing tensor or a wrong shape is a one-line error."""
    targets = {}
    for name, paths in names.items():
        per_layer = name.startswith("layers/")
        expected = stored_shape(tuple(ours[name].shape), per_layer, scanned)
        spec = parallel.param_spec(name, tuple(ours[name].shape), mesh)
        sharding = NamedSharding(mesh, stored_spec(spec, per_layer, scanned))
        for path in paths:
            leaf = _lookup(root, path)
            if leaf is None:
                raise CheckpointError(f"{where}: missing tensor {path}")
            if tuple(leaf.shape) != expected:
                raise CheckpointError(
                    f"{where}: tensor {path} has shape {tuple(leaf.shape)}, expected {expected}"
                )
            targets[path] = jax.ShapeDtypeStruct(expected, leaf.dtype, sharding=sharding)
    return targets


def _restore(items: str, prefix: str, targets: dict[str, jax.ShapeDtypeStruct]) -> dict:
    """Only the target arrays, each device reading its own block; keyed like ``targets``."""
    import orbax.checkpoint as ocp

    item = _nest({"/".join(filter(None, (prefix, p))): t for p, t in targets.items()})
    restore_args = jax.tree_util.tree_map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        item,
    )
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = _lookup(ocp.PyTreeCheckpointer().restore(items, args=args), prefix)
    return {path: _lookup(restored, path) for path in targets}


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def load_checkpoint(
    path: str,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    compute_dtype: str | None = None,
    llama_config: str | None = None,
    **options: Any,
) -> Llama:
    """Import a MaxText LLaMA checkpoint (run dir, step dir or items dir) onto ``mesh``."""
    items = items_dir(path)
    tree = _stored_tree(items)
    prefix = "/".join(model_root(tree, items))
    root = _lookup(tree, prefix)
    scanned = _check_layout(root, declared_scan(items), items)
    config = _architecture(path, llama_config, root, dtype, compute_dtype, options)
    mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    ours = {
        parallel.path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }
    names = stored_names(config, scanned)
    restored = _restore(items, prefix, _restore_targets(root, names, ours, mesh, scanned, items))

    def place(key_path, leaf):
        name = parallel.path_name(key_path)
        parts = [restored.pop(p) for p in names[name]]
        sharding = NamedSharding(mesh, parallel.param_spec(name, tuple(leaf.shape), mesh))
        convert = jax.jit(lambda xs: to_ours(name, config, scanned, xs), out_shardings=sharding)
        value = convert(parts)
        for part in parts:
            part.delete()
        return value

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(place, abstract))
