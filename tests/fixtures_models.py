"""Random-weight LLaMA checkpoints saved with transformers' torch classes, for parity tests.

HF initialises weights with std 0.02, which makes logits nearly flat and hides errors,
so matrices are scaled up and norm weights perturbed before saving.
"""

from __future__ import annotations

import torch
import transformers

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "mha_untied": dict(tie_word_embeddings=False),
    "gqa_llama3": dict(
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "tied_head_dim": dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=2),
    "linear_rope_biases": dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        attention_bias=True,
        mlp_bias=True,
    ),
}


def torch_config(variant: str, **overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**BASE, **VARIANTS[variant], **overrides})


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() > 1:
                param.copy_(noise * scale)
            else:
                param.copy_(1.0 + 0.3 * noise)
    return model.eval()


def save_causal_lm(
    path, variant: str, seed: int = 0, scale: float = 0.2, **overrides
) -> transformers.LlamaForCausalLM:
    config = torch_config(variant, **overrides)
    model = randomize(transformers.LlamaForCausalLM(config), seed, scale)
    model.save_pretrained(path)
    return model


def save_sequence_classifier(path, variant: str, seed: int = 0):
    config = torch_config(variant, num_labels=1)
    model = randomize(transformers.LlamaForSequenceClassification(config), seed)
    model.save_pretrained(path)
    return model


def torch_logits(model, input_ids, attention_mask):
    """HF logits with positions derived from the mask (HF does not do it for padding)."""
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
