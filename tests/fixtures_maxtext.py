"""Write MaxText Orbax checkpoints from a Hugging Face torch LLaMA, the way MaxText does.

Sources of the layout facts (MaxText 0.2.5 from PyPI, maxtext/...):
- scanned tensors, their axis orders ([embed, layers, heads, head_dim] for query/key/value,
  [heads, layers, head_dim, embed] for out, [embed, layers, mlp] / [mlp, layers, embed] for
  wi_0 (gate) / wi_1 (up) / wo (down), [embed, layers] for the norms), the query divided by
  sqrt(head_dim), logits_dense = lm_head.T and token_embedder = embed_tokens:
  checkpoint_conversion/standalone_scripts/llama_or_mistral_ckpt.py
  ``_convert_huggingface_to_jax_weights`` (HF gate/up/down -> w1/w2/w3 by
  ``_hf_to_maxtext_mapping``, then wi_0/wi_1/wo), checked against its inverse
  llama_mistral_mixtral_orbax_to_hf.py ``convert_state_to_hf``.
- RoPE: halves (HF order) for llama2/llama3; Meta's interleaved pairs for Llama 3.1/3.3
  (``_convert_pytorch_to_jax_weights`` skips ``permute_to_match_maxtext_rope`` for them;
  utils/max_utils.py ``unpermute_from_match_maxtext_rope`` maps them back).
- unscanned tensors ``decoder/layers_{i}/...`` without the layer axis, out [heads,
  head_dim, embed]: standalone_scripts/llama_ckpt_conversion_inference_only.py.
- the train state saved as the ``items`` of step 0 with the weights at ``params/params``
  and ``custom_metadata["scan_layers"]``: checkpoint_conversion/utils/utils.py
  ``save_weights_to_checkpoint`` and common/checkpointing.py ``save_checkpoint``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file


def interleaved(x: np.ndarray) -> np.ndarray:
    """Per head (last axis), HF halves -> Meta's interleaved pairs: 2i+j <- j*hd/2 + i."""
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(x.shape)


def layer_tensors(t: dict, c: dict, i: int) -> dict[str, np.ndarray]:
    """One layer's MaxText tensors (no layer axis), from HF torch tensors."""
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd = c.get("head_dim") or hidden // heads
    rope = (c.get("rope_parameters") or c.get("rope_scaling") or {}).get("rope_type")
    w = {k.removeprefix(f"model.layers.{i}."): v for k, v in t.items() if f"layers.{i}." in k}
    q = w["self_attn.q_proj.weight"].T.reshape(hidden, heads, hd)
    k = w["self_attn.k_proj.weight"].T.reshape(hidden, kv, hd)
    if rope == "llama3":
        q, k = interleaved(q), interleaved(k)
    return {
        "self_attention/query/kernel": q / np.sqrt(hd).astype(q.dtype),
        "self_attention/key/kernel": k,
        "self_attention/value/kernel": w["self_attn.v_proj.weight"].T.reshape(hidden, kv, hd),
        "self_attention/out/kernel": w["self_attn.o_proj.weight"]
        .reshape(hidden, heads, hd)
        .transpose(1, 2, 0),
        "mlp/wi_0/kernel": w["mlp.gate_proj.weight"].T,
        "mlp/wi_1/kernel": w["mlp.up_proj.weight"].T,
        "mlp/wo/kernel": w["mlp.down_proj.weight"].T,
        "pre_self_attention_layer_norm/scale": w["input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": w["post_attention_layernorm.weight"],
    }


def maxtext_params(hf_dir: str, scanned: bool) -> dict[str, np.ndarray]:
    """'/'-joined MaxText parameter paths -> arrays."""
    t = load_file(os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    params = {
        "token_embedder/embedding": t["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": t["model.norm.weight"],
    }
    if not c.get("tie_word_embeddings", False):
        params["decoder/logits_dense/kernel"] = t["lm_head.weight"].T
    layers = [layer_tensors(t, c, i) for i in range(c["num_hidden_layers"])]
    for name in layers[0]:
        if scanned:  # stack on axis 0, then move it to MaxText's param_scan_axis 1
            params[f"decoder/layers/{name}"] = np.moveaxis(
                np.stack([x[name] for x in layers]), 0, 1
            )
        else:
            for i, layer in enumerate(layers):
                params[f"decoder/layers_{i}/{name}"] = layer[name]
    return {k: np.ascontiguousarray(v) for k, v in params.items()}


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def write_maxtext(hf_dir: str, out: str, *, scanned: bool = True, declare: bool | None = None):
    """A MaxText checkpoint directory with step 0; ``declare`` is the recorded scan_layers
    (default: the truth)."""
    state = {
        "step": np.int32(0),
        "params": {"params": nest(maxtext_params(hf_dir, scanned))},
        "opt_state": {"mu": np.zeros(3, np.float32)},
    }
    manager = ocp.CheckpointManager(
        out, item_names=("items",), options=ocp.CheckpointManagerOptions(create=True)
    )
    declared = scanned if declare is None else declare
    manager.save(
        0,
        args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)),
        custom_metadata={"scan_layers": declared},
    )
    manager.wait_until_finished()
    manager.close()
