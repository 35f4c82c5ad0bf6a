"""QLoRA: NF4 and int8 storage against hand-computed codes, the quantised forward against
the bf16 one, and training on a quantised base: only the adapters move, with the
gradients of the dense model the codes stand for, on any mesh and layer layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from fixtures_lora import random_adapters
from fixtures_models import save_causal_lm
from flax import nnx
from jax.sharding import PartitionSpec

from sacpo_jax import parallel
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.models import hf, lora, quant, transforms
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import LlamaConfig, tiny_config
from sacpo_jax.models.lora import LoraConfig
from sacpo_jax.training import objectives
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.state import split_model

VOCAB = len(oracle_tokenizer())
# NF4 code values (bitsandbytes' table, REFERENCE-NEXT §4) used by the hand computations.
CODE = {
    0: -1.0, 2: -0.5250730514526367, 4: -0.28444138169288635, 7: 0.0,
    8: 0.07958029955625534, 9: 0.16093020141124725, 12: 0.44070982933044434,
    14: 0.7229568362236023, 15: 1.0,
}  # fmt: skip


def test_nf4_stores_each_value_as_its_nearest_code_times_the_block_absmax():
    # Block 0 (rows 0..63 of the column): absmax 2. x / 2 and its nearest code, by hand
    # (the midpoints between neighbouring codes decide):
    #   1 -> 1 (15); -1 -> -1 (0); 0.05 is above (0 + 0.0796)/2 = 0.0398 -> 0.0796 (8);
    #   0.15 is above (0.0796 + 0.1609)/2 = 0.1202 -> 0.1609 (9); -0.25 is below
    #   (-0.2844 - 0.1848)/2 = -0.2346 -> -0.2844 (4); 0.5 is below (0.4407 + 0.5626)/2
    #   = 0.5017 -> 0.4407 (12); 0.65 is above (0.5626 + 0.7230)/2 = 0.6428 -> 0.7230 (14);
    #   the 57 zeros -> 0 (7).
    # Block 1 (rows 64..127): absmax 0.5; -0.3 / 0.5 = -0.6 is above (-0.6962 - 0.5251)/2
    #   = -0.6106 -> -0.5251 (2); 0.5 / 0.5 = 1 -> 1 (15).
    column = np.zeros(128, np.float32)
    column[:7] = [2.0, -2.0, 0.1, 0.3, -0.5, 1.0, 1.3]
    column[64:66] = [-0.3, 0.5]
    weight = np.stack([column, -column], axis=1)  # a second column: every sign flipped
    codes, absmax = quant.quantize(weight, "nf4")
    np.testing.assert_array_equal(absmax, [[2.0, 2.0], [0.5, 0.5]])
    expected = np.zeros(128, np.float32)
    expected[:7] = 2.0 * np.array(
        [CODE[15], CODE[0], CODE[8], CODE[9], CODE[4], CODE[12], CODE[14]]
    )
    expected[64:66] = 0.5 * np.array([CODE[2], CODE[15]])
    restored = np.asarray(quant.dequantize(codes, absmax, "nf4", jnp.float32))
    np.testing.assert_allclose(restored[:, 0], expected, rtol=1e-7)
    # Two codes per byte, the first row in the high nibble: rows 0, 1 -> 15, 0 -> 0xF0;
    # rows 2, 3 -> 8, 9 -> 0x89; a byte of two zeros -> 0x77.
    assert codes.dtype == jnp.uint8 and codes.shape == (64, 2)
    assert [int(codes[0, 0]), int(codes[1, 0]), int(codes[10, 0])] == [0xF0, 0x89, 0x77]


def test_int8_stores_each_output_channel_with_its_own_absmax():
    # Column 0: absmax 4 -> codes round(127 x / 4): 4 -> 127, -1 -> -31.75 -> -32,
    # 0.1 -> 3.175 -> 3. Column 1: absmax 0.5 -> 0.5 -> 127, 0.2 -> 50.8 -> 51.
    weight = np.array([[4.0, 0.5], [-1.0, 0.2], [0.1, 0.0]], np.float32)
    codes, absmax = quant.quantize(weight, "int8")
    np.testing.assert_array_equal(absmax, [[4.0, 0.5]])
    np.testing.assert_array_equal(codes, [[127, 127], [-32, 51], [3, 0]])
    restored = np.asarray(quant.dequantize(codes, absmax, "int8", jnp.float32))
    np.testing.assert_allclose(restored, np.asarray(codes) * np.array([4.0, 0.5]) / 127, rtol=1e-7)


def test_quantization_error_is_at_most_half_a_code_gap():
    """|W - deq(W)| <= (largest gap between neighbouring codes) / 2 * block absmax (nf4;
    the largest gap, 0.3038, lies between -1 and -0.6962), <= absmax / 254 (int8); RMS
    error on Gaussian weights about 9% (nf4) and under 1% (int8)."""
    weight = np.random.default_rng(0).standard_normal((3, 256, 40)).astype(np.float32)
    half_gap = (1.0 - 0.6961928009986877) / 2
    for kind, bound, rms in (("nf4", half_gap, 0.1), ("int8", 1 / 254, 0.01)):
        codes, absmax = quant.quantize(weight, kind)
        error = np.abs(np.asarray(quant.dequantize(codes, absmax, kind, jnp.float32)) - weight)
        rows = quant.block_rows(kind, 256)
        scale = np.repeat(np.asarray(absmax), rows, axis=1)
        assert np.all(error <= bound * scale * (1 + 1e-6)), kind
        assert np.linalg.norm(error) / np.linalg.norm(weight) < rms, kind


def tiny(**overrides) -> LlamaConfig:
    return tiny_config(vocab_size=VOCAB, **overrides)


def one_device():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def test_quantised_forward_is_the_dequantised_model_and_near_the_bf16_one():
    """Exactly the forward of the dense model holding the dequantised weights; logits
    within a relative L2 error of 0.5 (nf4) and 0.05 (int8) of the bf16 model's, whose
    weights the codes approximate to 9% and 1% RMS (the tiny random model amplifies
    weight errors about 4x)."""
    config = tiny(param_dtype="bfloat16", dtype="bfloat16", hidden_size=128, intermediate_size=256,
                  head_dim=32)  # fmt: skip
    model = init_model(config, one_device(), seed=0, init_std=0.1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 24)))
    forward = nnx.jit(lambda model, ids: model(ids))
    dense = np.asarray(forward(model, ids))
    for kind, bound in (("nf4", 0.5), ("int8", 0.05)):
        quantized = transforms.quantized(model, kind)
        logits = np.asarray(forward(quantized, ids))
        np.testing.assert_array_equal(
            logits, np.asarray(forward(transforms.merged(quantized), ids))
        )
        assert np.linalg.norm(logits - dense) / np.linalg.norm(dense) < bound, kind


def sft_batch(seed: int, rows: int = 8, length: int = 16) -> dict:
    ids = np.random.default_rng(seed).integers(3, VOCAB, (rows, length), dtype=np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length // 2 :] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


ADAPTERS = LoraConfig(rank=4, alpha=8, targets=("q", "o", "up", "down"))


def adapter_gradients(model, batch: dict) -> dict:
    """d(SFT loss)/d(adapter matrices), every other leaf held fixed."""
    graphdef, params = split_model(model)
    adapters = {k: v for k, v in params["layers"].items() if lora.is_adapter(k)}

    def loss(adapters, params):
        layers = {**params["layers"], **adapters}
        return objectives.sft_loss(nnx.merge(graphdef, {**params, "layers": layers}), batch, None)[
            0
        ]

    return jax.jit(jax.grad(loss))(adapters, params)


def test_gradients_reach_only_the_adapters_and_are_those_of_the_dequantised_model():
    mesh = one_device()
    base = transforms.quantized(init_model(tiny(), mesh, seed=1, init_std=0.08), "nf4")
    model = random_adapters(base, ADAPTERS)
    batch = jax.tree.map(jnp.asarray, sft_batch(0))
    grads = adapter_gradients(model, batch)
    dense = adapter_gradients(random_adapters(transforms.merged(base), ADAPTERS), batch)
    assert sorted(grads) == sorted(n for t in ADAPTERS.targets for n in lora.adapter_names(t))
    for name, value in grads.items():
        scale = np.abs(np.asarray(dense[name])).max()
        assert scale > 0, name
        np.testing.assert_allclose(value, dense[name], rtol=0, atol=1e-5 * scale, err_msg=name)

    with_dropout = random_adapters(base, LoraConfig(**{**vars(ADAPTERS), "dropout": 0.3}))
    graphdef, params = split_model(with_dropout)
    before = jax.device_get(params)
    objective = objectives.Objective(objectives.sft_loss, objectives.Coefficients(1e-2))
    trainer = Trainer(
        objective, graphdef, with_dropout.config, make_optimizer(4, warmup_ratio=0.0), mesh,
        trainable=lora.is_adapter,
    )  # fmt: skip
    losses = []
    for _ in range(2):  # the dropout masks are a pure function of (seed, step)
        state = trainer.fresh_state(params)
        first = trainer.place(sft_batch(0))
        state, metrics = trainer.step(state, first)
        losses.append(float(metrics["loss"]))
        state, _ = trainer.step(state, trainer.place(sft_batch(1)))
    rows = trainer.eval_step(params, first, trainer.coefficients)  # no dropout
    undropped = float(np.sum(rows["nll_sum"]) / np.sum(rows["tokens"]))
    assert losses[0] == losses[1] and abs(losses[0] - undropped) > 1e-3
    after = jax.device_get(state.model_params())
    for name, value in before["layers"].items():
        moved = not np.array_equal(value, after["layers"][name])
        assert moved == lora.is_adapter(name), name  # codes, absmax, norms stay bit for bit
    for name in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(before[name], after[name])
    moments = [
        parallel.path_name(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if leaf.ndim > 0
    ]
    assert moments and all(lora.is_adapter(name) for name in moments)
    assert set(state.saved()) == {"step", "params", "opt_state"}


def test_adapter_gradients_agree_across_layouts_and_meshes():
    """On an NF4 base: scanned on one device vs unrolled with remat on a (data 2, fsdp 2,
    tensor 2) mesh."""
    batch = sft_batch(5)
    results = []
    for mesh, options in (
        (one_device(), dict(scan_layers=True, remat=False)),
        (parallel.make_mesh(2, 2, 2), dict(scan_layers=False, remat=True)),
    ):
        base = init_model(tiny(quantize="nf4", **options), mesh, seed=2, init_std=0.08)
        model = random_adapters(base, ADAPTERS)
        placed = parallel.global_batch(batch, mesh)
        results.append(adapter_gradients(model, placed))
    for name, value in results[0].items():
        scale = np.abs(np.asarray(value)).max()
        np.testing.assert_allclose(results[1][name], value, rtol=0, atol=1e-5 * scale)
    codes = split_model(base)[1]["layers"]["q_codes"]  # on the 2x2x2 mesh
    assert codes.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert codes.dtype == jnp.uint8 and codes.size * 8 == 4 * (2 * 64 * 64)  # 4 bits each


def test_quantising_import_equals_quantising_the_loaded_model(tmp_path):
    """Reading a safetensors checkpoint straight into nf4 / int8, shard by shard (with
    shards that cut through absmax blocks: 8-way fsdp over 64 rows), gives exactly the
    codes of the dense import quantised on the devices."""
    save_causal_lm(tmp_path, "gqa_llama3", seed=0, intermediate_size=128)
    for kind, mesh in (("nf4", parallel.make_mesh(1, 8, 1)), ("int8", parallel.make_mesh(2, 2, 2))):
        direct = split_model(hf.load_checkpoint(str(tmp_path), quantize=kind, mesh=mesh))[1]
        dense = hf.load_checkpoint(str(tmp_path), mesh=mesh)
        expected = split_model(transforms.quantized(dense, kind))[1]
        assert jax.tree.structure(direct) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(expected)):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
