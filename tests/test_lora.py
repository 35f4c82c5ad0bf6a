"""LoRA adapters against PEFT's own code, in both directions, and what LoRA training
promises: only the adapters train, the base stays bit for bit, the on-the-fly reference
is the base itself (no second copy), and bad adapters or settings fail in one line."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from fixtures_lora import random_adapters
from fixtures_models import save_causal_lm, torch_logits

from sacpo_jax import parallel
from sacpo_jax.config import ConfigError, DpoStage, load_config
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.metrics_log import read_metrics
from sacpo_jax.models import hf, llama, lora, peft_io, transforms
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import LlamaConfig, tiny_config
from sacpo_jax.models.lora import LoraConfig
from sacpo_jax.models.safetensors_io import SafetensorsReader
from sacpo_jax.training import objectives
from sacpo_jax.training.chain import ModelStore
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.reference import OnTheFlyReference
from sacpo_jax.training.stages import run_training_stage
from sacpo_jax.training.state import split_model
from sacpo_jax.training.step import make_reference_step

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = [
    (["q_proj", "v_proj"], False),
    (["k_proj", "o_proj"], False),
    (["gate_proj", "up_proj", "down_proj"], False),
    (ALL, False),
    (["q_proj", "o_proj", "down_proj"], True),
]
TOKENIZER = oracle_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random GQA LLaMA (hidden 64, 4 heads x 16, 2 KV heads, MLP 128) saved by torch."""
    path = tmp_path_factory.mktemp("base")
    save_causal_lm(path, "gqa_llama3", seed=0, intermediate_size=128)
    return path


def tokens(seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, 96, (2, 10))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


def peft_adapter(base_dir, path, targets, rslora: bool, rank: int = 4):
    """A PEFT LoRA model on the base with random A and B (PEFT zeroes B), saved to ``path``."""
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    return model.eval()


def layer_slice(model, index: int) -> dict:
    return jax.tree.map(lambda p: p[index], model.layer_weights())


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize(("targets", "rslora"), TARGET_SETS)
def test_lora_forward_matches_peft(base_dir, tmp_path, targets, rslora):
    """Every adapted projection of PEFT's model, and the logits, with PEFT's adapter read."""
    reference = peft_adapter(base_dir, tmp_path / "adapter", targets, rslora)
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = (inputs[0].detach().numpy(), output.detach().numpy())

        return hook

    for i, layer in enumerate(reference.base_model.model.model.layers):
        for target in targets:
            module = dict(layer.named_modules())[lora.PEFT_MODULES[lora.TARGETS[target]]]
            module.register_forward_hook(keep((i, target)))
    ids, mask = tokens()
    expected = torch_logits(reference, ids, mask)

    ours = peft_io.load_adapter(hf.load_checkpoint(str(base_dir)), str(tmp_path / "adapter"))
    assert ours.config.lora.scaling == (8 / math.sqrt(4) if rslora else 8 / 4)
    shapes = llama.projection_shapes(ours.config)
    for (i, target), (x, y) in captured.items():
        name = lora.TARGETS[target]
        inputs, outputs = shapes[name]
        layer = layer_slice(ours, i)
        out = llama.project(
            jnp.asarray(x.reshape(*x.shape[:2], *inputs)),
            name,
            llama.dense_layer(layer, ours.config),
            layer,
            ours.config,
        )
        got = np.asarray(out).reshape(y.shape)
        np.testing.assert_allclose(got, y, rtol=0, atol=1e-5, err_msg=f"layer {i} {target}")
    logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=1e-4)


def test_our_adapter_loads_in_peft_with_the_logits_of_our_merged_export(base_dir, tmp_path):
    config = LoraConfig(rank=4, alpha=16, targets=("q", "k", "o", "up", "down"), rslora=True)
    adapted = random_adapters(hf.load_checkpoint(str(base_dir)), config)
    peft_io.save_adapter(adapted, str(tmp_path / "adapter"), str(base_dir))
    merged = transforms.merged(adapted)
    hf.save_checkpoint(merged, str(tmp_path / "merged"))
    ids, mask = tokens(1)
    real = mask.astype(bool)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    through_peft = torch_logits(
        peft.PeftModel.from_pretrained(base, tmp_path / "adapter"), ids, mask
    )
    export = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(
        through_peft[real], torch_logits(export, ids, mask)[real], rtol=0, atol=1e-4
    )
    ours = np.asarray(adapted(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[real], through_peft[real], rtol=0, atol=1e-4)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert saved["target_modules"] == ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"]) == (4, 16.0, True)


def test_a_start_of_base_and_peft_adapter_is_peft_merged_model(base_dir, tmp_path):
    reference = peft_adapter(base_dir, tmp_path / "adapter", ["v_proj", "gate_proj"], False)
    stage = DpoStage.model_validate(
        {
            "name": "dpo",
            "kind": "dpo",
            "start": {"base": str(base_dir), "adapter": str(tmp_path / "adapter")},
            "data": {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"},
        }
    )
    assert stage.sources() == [str(base_dir), str(tmp_path / "adapter")]
    store = ModelStore(hf.load_checkpoint(str(base_dir)), {})
    start = store.start_of(stage)
    assert start.config.lora is None  # merged: a plain model
    ids, mask = tokens(2)
    real = mask.astype(bool)
    expected = torch_logits(reference.merge_and_unload(), ids, mask)
    got = np.asarray(start(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- bad adapters


def broken_adapter(base_dir, tmp_path, change) -> str:
    """A copy of a valid PEFT adapter (q_proj, v_proj) after ``change(directory)``."""
    good = tmp_path / "good"
    if not good.exists():
        peft_adapter(base_dir, good, ["q_proj", "v_proj"], False)
    path = tmp_path / "broken"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(good, path)
    change(path)
    return str(path)


def edit_config(**changes):
    def change(path):
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return change


def edit_tensors(edit):
    def change(path):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(path / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, path / "adapter_model.safetensors")

    return change


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (edit_tensors(lambda t: t.pop(Q_A)), f"missing tensor {Q_A}"),
        (
            edit_tensors(lambda t: t.update({Q_A: np.zeros((4, 32), np.float32)})),
            "has shape (4, 32), this base model needs (4, 64)",
        ),
        (
            edit_tensors(lambda t: t.update({Q_A.replace("1.", "7.", 1): t[Q_A]})),
            "does not fit this base model (it has 2 layers)",
        ),
        (edit_config(target_modules=["q_proj"]), "does not fit this base model (target_modules"),
        (edit_config(target_modules=["q_proj", "lm_head"]), "['lm_head'] match no projection"),
        (edit_config(use_dora=True), "use_dora=True is not supported"),
        (edit_config(peft_type="IA3"), "only LORA is supported"),
        (edit_config(r=0), "rank > 0"),
        (lambda path: (path / "adapter_config.json").unlink(), "no adapter_config.json"),
    ],
)
def test_a_bad_adapter_is_refused_in_one_line(base_dir, tmp_path, change, message):
    path = broken_adapter(base_dir, tmp_path, change)
    with pytest.raises(peft_io.AdapterError) as error:
        peft_io.load_adapter(hf.load_checkpoint(str(base_dir)), path)
    assert message in str(error.value) and "\n" not in str(error.value)


LORA_STAGE = {
    "name": "dpo",
    "kind": "dpo",
    "data": {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"},
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora": {"targets": ["q_proj", "qkv_proj"]}}, "'qkv_proj' matches no projection"),
        ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than 0"),
        ({"lora": {"alpha": -1}}, "lora.alpha: Input should be greater than 0"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout: Input should be less than 1"),
        ({"start": {"base": "initial", "adapter": "/nonexistent"}}, "adapter: /nonexistent: no"),
        ({"start": {"base": "initial"}}, "stages.0.start: adapter: Field required"),
    ],
)
def test_bad_lora_settings_are_refused_in_one_line(tmp_path, changes, message):
    tree = {
        "model": {"random": {}},
        "tokenizer": {"path": "bundled:oracle"},
        "stages": [{**LORA_STAGE, **changes}],
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_quantize_needs_lora_on_every_training_stage(tmp_path):
    tree = {
        "model": {"random": {}, "quantize": "nf4"},
        "tokenizer": {"path": "bundled:oracle"},
        "stages": [{**LORA_STAGE, "lora": {}}, {**LORA_STAGE, "name": "full"}],
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match="stage 'full' trains the full model"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="intermediate_size has 96"):
        load_config(str(path), ["stages.1.lora={}", "model.random.intermediate_size=96"])
    assert load_config(str(path), ["stages.1.lora={}"]).model.quantize == "nf4"


# ----------------------------------------------------------------------------- training


def tiny(**overrides) -> LlamaConfig:
    return tiny_config(vocab_size=len(TOKENIZER), **overrides)


def one_device():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def pair_batch(seed: int, rows: int = 4, length: int = 12) -> dict:
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, len(TOKENIZER), (rows, length), dtype=np.int32)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = np.ones_like(ids)
        loss_mask = np.zeros_like(ids)
        loss_mask[:, length // 2 :] = 1
        batch[f"{side}_loss_mask"] = loss_mask
    return batch


def test_the_on_the_fly_reference_is_the_frozen_base_itself():
    """No second copy: the reference reads the very arrays the train state holds frozen,
    and scores the start model (the adapters switched off) at every step."""
    mesh = one_device()
    start = init_model(tiny(), mesh, seed=0, init_std=0.05)
    policy = transforms.with_adapters(start, LoraConfig(rank=4, alpha=8, targets=("q", "v")))
    graphdef, params = split_model(policy)
    reference = OnTheFlyReference(start, objectives.PAIR_REFERENCE, mesh)
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(5e-2, 0.1))
    trainer = Trainer(
        objective, graphdef, policy.config, make_optimizer(4, warmup_ratio=0.0), mesh,
        reference=reference, trainable=lora.is_adapter,
    )  # fmt: skip
    state = trainer.fresh_state(params)
    frozen = jax.tree_util.tree_leaves(state.frozen)
    assert len(frozen) == len(jax.tree_util.tree_leaves(reference.params))
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(reference.params), frozen))
    probe = jax.tree.map(jnp.asarray, pair_batch(9))
    start_columns = reference.step(split_model(start)[1], probe)
    for step in range(3):
        state, metrics = trainer.step(state, trainer.place(pair_batch(step)))
    for name, values in trainer.place(pair_batch(9)).items():
        if name in start_columns:  # still the start model's log-probs
            np.testing.assert_allclose(values, start_columns[name], rtol=1e-6)
    trained = make_reference_step(graphdef, objectives.PAIR_REFERENCE)(state.model_params(), probe)
    name = "reference_chosen_logps"
    assert np.abs(np.asarray(trained[name]) - np.asarray(start_columns[name])).max() > 1e-3


def stage_context(root, name: str) -> StageContext:
    return StageContext(
        mesh=one_device(),
        tokenizer=TOKENIZER,
        stage_dir=str(root / "stages" / name),
        cache_dir=str(root / "cache"),
        tensorboard=False,
        progress_bar=False,
    )


def lora_dpo_stage(name: str, mode: str) -> DpoStage:
    return DpoStage.model_validate(
        {
            "name": name,
            "kind": "dpo",
            "reference_mode": mode,
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "down_proj"]},
            "data": {
                "source": {"type": "bundled", "name": "preference"},
                "adapter": "pku_helpful",
                "max_length": 32,
                "max_prompt_length": 16,
                "limit": 32,
            },
            "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 2e-2,
                      "warmup_ratio": 0.0, "log_every": 1},
        }
    )  # fmt: skip


@pytest.mark.slow
def test_a_lora_stage_keeps_its_start_and_changes_only_targeted_projections(tmp_path):
    """On-the-fly and precomputed references give the same numbers; the base is untouched;
    the merged export differs from the start only in the targeted projections."""
    start = init_model(tiny(), one_device(), seed=0, init_std=0.05)
    before = jax.device_get(split_model(start)[1])
    for mode in ("on_the_fly", "precompute"):
        stage = lora_dpo_stage(mode, mode)
        run_training_stage(stage, start, start, stage_context(tmp_path, mode))
    after = jax.device_get(split_model(start)[1])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    logs = {
        mode: [r for r in read_metrics(tmp_path / "stages" / mode / "metrics.jsonl") if "loss" in r]
        for mode in ("on_the_fly", "precompute")
    }
    assert [r["step"] for r in logs["precompute"]] == [1, 2, 3, 4]
    for name in ("loss", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(
            [r[name] for r in logs["on_the_fly"]],
            [r[name] for r in logs["precompute"]],
            rtol=1e-5,
            atol=1e-6,
        )
    assert logs["precompute"][-1]["rewards/margins"] != 0.0  # the adapters moved the policy

    hf.save_checkpoint(start, str(tmp_path / "start"))
    start_file = SafetensorsReader([str(tmp_path / "start" / "model.safetensors")])
    stage_dir = tmp_path / "stages" / "precompute"
    trained_file = SafetensorsReader([str(stage_dir / "model" / "model.safetensors")])
    assert sorted(trained_file.names()) == sorted(start_file.names())
    changed = {
        name for name in start_file.names()
        if not np.array_equal(start_file.view(name), trained_file.view(name))
    }  # fmt: skip
    targeted = {
        f"model.layers.{i}.{module}.weight"
        for i in (0, 1)
        for module in ("self_attn.q_proj", "mlp.down_proj")
    }
    assert changed == targeted
    saved = json.loads((stage_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj", "down_proj"] and saved["lora_dropout"] == 0.1
