"""Model FLOPs and model FLOPs utilisation (MFU), the way MaxText and PaLM count them.

Per token of a sequence of length S, for a LLaMA with L layers, H query heads of size
d_h, K key/value heads, hidden size D, MLP width F and vocabulary V:

    N      = L * (D*(H + 2K)*d_h + H*d_h*D + 3*D*F) + D*V     (matmul weights; the
             embedding lookup is not a matmul, the LM head is, tied or not)
    train  = 6*N + 12*L*H*d_h*S       (forward + backward, 1 + 2 passes)
    fwd    = 2*N +  4*L*H*d_h*S       (forward only, e.g. an on-the-fly reference)
    LoRA   = 4*N + 6*N_a + 12*L*H*d_h*S   (the frozen weights get no gradient: their
             backward pass is the inputs' gradient only; N_a = L * sum over the
             targeted projections of r*(in + out), the adapter weights)

6*N is 2 FLOPs per multiply-add times 3 passes; 12*L*H*d_h*S counts q.k^T and
softmax.v (2*2*S*H*d_h per token and layer) times 3 passes, over the full S x S
square as in PaLM (appendix B): a causal mask does not halve it. Norms, RoPE,
softmax and the loss are left out. A padded position costs the same FLOPs as a real
token, so the FLOPs of a batch are counted over its padded shape.

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s. The
peak table holds bf16 numbers, so a run computing in float32 reads low; on CPU the
peak is unknown and no MFU is given.
"""

from __future__ import annotations

import math

from sacpo_jax.models.llama import LlamaConfig

# Peak dense bf16 FLOP/s per device (chip), by jax Device.device_kind.
PEAK_FLOPS_BY_KIND: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
# NVIDIA kinds carry the memory size in their names: matched by prefix, first wins.
PEAK_FLOPS_BY_PREFIX: tuple[tuple[str, float], ...] = (
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100", 312e12),
)


def matmul_params(config: LlamaConfig) -> int:
    """N: the weights that take part in matrix products (per token, 2 FLOPs each)."""
    d, h, kv, hd = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * config.intermediate_size
    head = d * (1 if config.score_model else config.vocab_size)
    return config.num_hidden_layers * per_layer + head


def adapter_params(config: LlamaConfig) -> int:
    """N_a: the LoRA adapter weights (0 without LoRA)."""
    if config.lora is None:
        return 0
    d, f = config.hidden_size, config.intermediate_size
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    sizes = {"q": d + q, "k": d + kv, "v": d + kv, "o": q + d, "gate": d + f, "up": d + f}
    sizes["down"] = f + d
    per_layer = sum(config.lora.rank * sizes[name] for name in config.lora.targets)
    return config.num_hidden_layers * per_layer


def attention_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Forward FLOPs of q.k^T and softmax.v for one token: 4 * L * H * d_h * S."""
    return 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len


def forward_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """2*N + 4*L*H*d_h*S."""
    return 2 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Forward plus backward: 3 * (2*N + 4*L*H*d_h*S) = 6*N + 12*L*H*d_h*S; with LoRA
    4*N + 6*N_a + 12*L*H*d_h*S."""
    if config.lora is None:
        return 3 * forward_flops_per_token(config, seq_len)
    attention = 3 * attention_flops_per_token(config, seq_len)
    return 4 * matmul_params(config) + 6 * adapter_params(config) + attention


def batch_flops(config: LlamaConfig, batch: dict, *, reference_forward: bool = False) -> float:
    """Model FLOPs of one training step over ``batch`` (a per-process or global batch).

    Every ``*input_ids`` array ([rows, S] or [accum, micro, S]) is trained on; with
    ``reference_forward`` (an on-the-fly reference) each row also gets a forward pass.
    """
    total = 0.0
    for name, array in batch.items():
        if not name.endswith("input_ids"):
            continue
        seq_len = array.shape[-1]
        tokens = math.prod(array.shape)
        per_token = training_flops_per_token(config, seq_len)
        if reference_forward:
            per_token += forward_flops_per_token(config, seq_len)
        total += tokens * per_token
    return total


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
    if device_kind in PEAK_FLOPS_BY_KIND:
        return PEAK_FLOPS_BY_KIND[device_kind]
    for prefix, peak in PEAK_FLOPS_BY_PREFIX:
        if device_kind.startswith(prefix):
            return peak
    return None


def utilisation_metrics(
    flops: float, seconds: float, num_devices: int, device_kind: str
) -> dict[str, float]:
    """{"tflops_per_device": ..., "mfu": ...} for ``flops`` done in ``seconds`` on
    ``num_devices`` devices; "mfu" only when the device's peak is known."""
    per_device = flops / max(seconds, 1e-12) / num_devices
    out = {"tflops_per_device": per_device / 1e12}
    peak = peak_flops(device_kind)
    if peak is not None:
        out["mfu"] = per_device / peak
    return out
