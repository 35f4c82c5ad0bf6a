"""Model FLOPs (sacpo_jax.flops) against XLA's own count of the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sacpo_jax import flops
from sacpo_jax.models import lora
from sacpo_jax.models.llama import Llama, tiny_config
from sacpo_jax.models.lora import PEFT_MODULES, LoraConfig
from sacpo_jax.training.state import join, partition

# Wide enough that matrix products dominate the elementwise work XLA also counts;
# unrolled because XLA's cost analysis counts a scanned loop's body once.
CONFIG = tiny_config(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    scan_layers=False,
)
ROWS, SEQ = 2, 64


def _xla_flops(fn) -> float:
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32)

    def forward(params, ids):
        return jnp.sum(nnx.merge(graphdef, params)(ids))

    analysis = jax.jit(fn(forward)).lower(params, ids).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def test_matmul_params_by_hand():
    # per layer: q,k,v 128*(4+2+2)*32 + o 4*32*128 + MLP 3*128*256; head 128*512
    assert flops.matmul_params(CONFIG) == 2 * (32768 + 16384 + 98304) + 65536


@pytest.mark.parametrize(
    "fn, ours",
    [
        (lambda f: f, flops.forward_flops_per_token),
        (lambda f: jax.grad(f), flops.training_flops_per_token),
    ],
    ids=["forward", "forward+backward"],
)
def test_flops_match_xla_cost_analysis(fn, ours):
    counted = ROWS * SEQ * ours(CONFIG, SEQ)
    assert counted == pytest.approx(_xla_flops(fn), rel=0.06)


def test_batch_flops_counts_every_token_array_and_the_reference_forward():
    batch = {
        "chosen_input_ids": np.zeros((4, 32), np.int32),
        "rejected_input_ids": np.zeros((4, 32), np.int32),
        "chosen_attention_mask": np.zeros((4, 32), np.int32),
        "reference_chosen_logps": np.zeros(4, np.float32),
    }
    n = flops.matmul_params(CONFIG)
    attention = 4 * 2 * 4 * 32 * 32  # 4 * L * H * d_h * S
    assert flops.batch_flops(CONFIG, batch) == 2 * 4 * 32 * (6 * n + 3 * attention)
    with_reference = flops.batch_flops(CONFIG, batch, reference_forward=True)
    assert with_reference == 2 * 4 * 32 * (8 * n + 4 * attention)
    accumulated = {"input_ids": np.zeros((2, 4, 32), np.int32)}  # [accum, micro, S]
    assert flops.batch_flops(CONFIG, accumulated) == 8 * 32 * (6 * n + 3 * attention)


def test_peak_table_and_utilisation():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("TPU v5") == 459e12
    assert flops.peak_flops("cpu") is None
    metrics = flops.utilisation_metrics(4 * 989e12, 2.0, 4, "NVIDIA H200")
    assert metrics == {"tflops_per_device": pytest.approx(494.5), "mfu": pytest.approx(0.5)}
    assert flops.utilisation_metrics(1e12, 1.0, 2, "cpu") == {"tflops_per_device": 0.5}


def test_lora_training_flops_match_xla_cost_analysis():
    """Gradients for the adapters only: the frozen weights cost a forward and an input
    gradient (4N), the adapters a full 6 N_a. (A squared loss: the gradient of a plain
    sum of logits lets XLA fold the head's backward matmul into a reduction.)"""
    config = CONFIG.replace(lora=LoraConfig(rank=8, alpha=16, targets=tuple(PEFT_MODULES)))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    adapters, frozen = partition(nnx.to_pure_dict(state), lora.is_adapter)
    ids = jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32)

    def forward(adapters, frozen, ids):
        return jnp.sum(jnp.square(nnx.merge(graphdef, join(adapters, frozen))(ids)))

    compiled = jax.jit(jax.grad(forward)).lower(adapters, frozen, ids).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    # per layer: r * (q 128+128, k 128+64, v 128+64, o 128+128, MLP 3 * (128+256))
    assert flops.adapter_params(config) == 2 * 8 * (256 + 192 + 192 + 256 + 3 * 384)
    counted = ROWS * SEQ * flops.training_flops_per_token(config, SEQ)
    assert counted == pytest.approx(float(analysis["flops"]), rel=0.06)
