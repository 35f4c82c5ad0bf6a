"""Write EasyLM streaming checkpoints from a Hugging Face torch LLaMA, the way EasyLM does.

Sources of the layout facts (EasyLM itself is not on PyPI; these are verbatim copies of it):
- record stream ``packer.pack((key, flax.serialization.to_bytes(value)))`` with ``key`` the
  tuple path of ``flatten_dict(to_state_dict(state))``: EasyLM/checkpoint.py
  ``StreamingCheckpointer.save_train_state_to_file`` (copy: fjformer 0.0.50
  fjformer/checkpoint/streamer.py ``save_state_to_file``).
- ``streaming_params`` holds ``train_state.params["params"]`` and ``streaming_train_state``
  the whole train state (``params/params/...``, ``opt_state``, ``step``): same file,
  ``save_all``.
- tensor names, kernels [in, out], w1/w2/w3 = gate/down/up, and the wq/wk permutation
  ``w.view(heads, hd // 2, 2, dim).transpose(1, 2)`` that turns EasyLM's interleaved RoPE
  into Hugging Face's halves: EasyLM/models/llama/convert_easylm_to_hf.py (copy: EasyDeL
  0.0.2 EasyDel/weight_convertor/llama.py ``convert_flax_to_pt``).
"""

from __future__ import annotations

import json
import os

import flax.serialization
import msgpack
import numpy as np
from safetensors.numpy import load_file


def interleaved(kernel: np.ndarray, heads: int) -> np.ndarray:
    """[in, heads * hd], HF's halves order -> EasyLM's interleaved one (2i+j <- j*hd/2 + i)."""
    n_in, width = kernel.shape
    hd = width // heads
    return kernel.reshape(n_in, heads, 2, hd // 2).transpose(0, 1, 3, 2).reshape(n_in, width)


def easylm_tree(hf_dir: str) -> dict[tuple[str, ...], np.ndarray]:
    """The flattened EasyLM parameter tree of a Hugging Face LLaMA directory."""
    t = load_file(os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    tree = {
        ("transformer", "wte", "embedding"): t["model.embed_tokens.weight"],
        ("transformer", "ln_f", "kernel"): t["model.norm.weight"],
    }
    if not c.get("tie_word_embeddings", False):
        tree[("lm_head", "kernel")] = t["lm_head.weight"].T
    heads = {"q": c["num_attention_heads"], "k": c["num_key_value_heads"]}
    for i in range(c["num_hidden_layers"]):
        hf_layer, layer = f"model.layers.{i}.", ("transformer", "h", str(i))
        for x in "qkvo":
            kernel = t[f"{hf_layer}self_attn.{x}_proj.weight"].T
            if x in heads:
                kernel = interleaved(kernel, heads[x])
            tree[layer + ("attention", f"w{x}", "kernel")] = kernel
        for w, proj in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            tree[layer + ("feed_forward", w, "kernel")] = t[f"{hf_layer}mlp.{proj}_proj.weight"].T
        tree[layer + ("attention_norm", "kernel")] = t[f"{hf_layer}input_layernorm.weight"]
        tree[layer + ("ffn_norm", "kernel")] = t[f"{hf_layer}post_attention_layernorm.weight"]
    return {k: np.ascontiguousarray(v) for k, v in tree.items()}


def write_streaming(hf_dir: str, path: str, *, train_state: bool = False) -> None:
    """``streaming_params`` (or, with ``train_state``, ``streaming_train_state``) at ``path``."""
    params = easylm_tree(hf_dir)
    if train_state:  # TrainState(step, params={"params": ...}, opt_state=(adam mu/nu, ...))
        state = {("step",): np.array(7, np.int32)}
        state.update({("params", "params") + k: v for k, v in params.items()})
        for moment in ("mu", "nu"):
            prefix = ("opt_state", "1", "0", moment, "params")
            state.update({prefix + k: np.zeros_like(v) for k, v in params.items()})
        params = state
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in params.items():
            f.write(packer.pack((key, flax.serialization.to_bytes(value))))
