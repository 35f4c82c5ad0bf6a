"""LoRA adapters on the projections of the LLaMA block (PEFT's LoRA, read from its code).

For a targeted projection y = x W (W [*in, *out] per layer, see ``llama.projection_shapes``):

    y = x W + s * (dropout(x) A) B        A [*in, r], B [r, *out]
    s = alpha / r,  or alpha / sqrt(r) with rsLoRA

Initialisation as PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with
a = sqrt(5)), B = 0, so a fresh adapter leaves the model's outputs unchanged. Dropout
applies to the adapter's input only (one mask per projection, inverted scaling), and
only when a dropout key is given (training).

Adapters are stored in float32 beside the stacked base weights as ``layers/<p>_lora_a``
[layers, *in, r] and ``layers/<p>_lora_b`` [layers, r, *out]; they are the only leaves
that train. PEFT's files hold per layer lora_A.weight = A^T [r, in] and
lora_B.weight = B^T [out, r] (inputs and outputs flattened).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Our projection name -> PEFT's module path inside a LLaMA decoder layer.
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
TARGETS = {module.split(".")[-1]: name for name, module in PEFT_MODULES.items()}
"""PEFT's target name ("q_proj") -> our projection name ("q")."""
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha, dropout, the targeted projections (our names, in PEFT_MODULES order),
    and rsLoRA scaling."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    rslora: bool = False

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in PEFT_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {unknown or '[]'}: valid are {', '.join(PEFT_MODULES)}")
        if self.rank <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("LoRA needs rank > 0, alpha > 0 and 0 <= dropout < 1")

    @property
    def scaling(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def peft_targets(self) -> list[str]:
        return [PEFT_MODULES[t].split(".")[-1] for t in self.targets]


def adapter_names(projection: str) -> tuple[str, str]:
    """The layer-dict names of a projection's A and B."""
    return f"{projection}_lora_a", f"{projection}_lora_b"


def is_adapter(name: str) -> bool:
    """Whether a parameter path ("layers/q_lora_a") is a LoRA adapter matrix."""
    return "_lora_" in name


def init_adapter(
    key: jax.Array,
    layers: int,
    inputs: tuple[int, ...],
    outputs: tuple[int, ...],
    rank: int,
) -> tuple[jax.Array, jax.Array]:
    """PEFT's initialisation: A ~ U(+-1/sqrt(fan_in)) [layers, *in, r], B = 0 [layers, r, *out]."""
    bound = 1.0 / math.sqrt(math.prod(inputs))
    a = jax.random.uniform(key, (layers, *inputs, rank), ADAPTER_DTYPE, -bound, bound)
    return a, jnp.zeros((layers, rank, *outputs), ADAPTER_DTYPE)


def delta(
    x: jax.Array, a: jax.Array, b: jax.Array, config: LoraConfig, key: jax.Array | None
) -> jax.Array:
    """s * (dropout(x) A) B in x's dtype; x [batch, seq, *in], a [*in, r], b [r, *out]."""
    if key is not None and config.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
    down = jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1)
    return (jnp.tensordot(down, b.astype(x.dtype), axes=1) * config.scaling).astype(x.dtype)
