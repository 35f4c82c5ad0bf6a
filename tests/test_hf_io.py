"""Hugging Face import/export: round trips, sharded files, score layouts, rejections."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from fixtures_models import save_causal_lm, save_sequence_classifier, torch_logits
from flax import nnx

from sacpo_jax.models import hf
from sacpo_jax.models.safetensors_io import SafetensorsReader


def params_of(model):
    return {
        "/".join(str(k.key) for k in path if hasattr(k, "key")): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }


def assert_bit_exact(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_export_reloads_in_transformers_with_same_logits(tmp_path):
    original = save_causal_lm(tmp_path / "in", "gqa_llama3")
    model = hf.load_checkpoint(str(tmp_path / "in"))
    hf.save_checkpoint(model, str(tmp_path / "out"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.default_rng(0).integers(3, 96, (2, 9))
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(
        torch_logits(reloaded, ids, mask), torch_logits(original, ids, mask)
    )


@pytest.mark.parametrize("variant", ["tied_head_dim", "linear_rope_biases"])
def test_import_export_import_is_bit_exact(tmp_path, variant):
    save_causal_lm(tmp_path / "in", variant)
    first = hf.load_checkpoint(str(tmp_path / "in"))
    hf.save_checkpoint(first, str(tmp_path / "out"))
    second = hf.load_checkpoint(str(tmp_path / "out"))
    assert_bit_exact(first, second)
    assert first.config == second.config
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        exported["rope_parameters"]
        == json.loads((tmp_path / "in" / "config.json").read_text())["rope_parameters"]
    )


def test_bf16_sharded_checkpoint_round_trip(tmp_path):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in", max_shard_size="40KB")
    assert (tmp_path / "in" / "model.safetensors.index.json").exists()
    first = hf.load_checkpoint(str(tmp_path / "in"))
    assert first.embed[...].dtype == jax.numpy.bfloat16
    hf.save_checkpoint(first, str(tmp_path / "out"), max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert_bit_exact(first, hf.load_checkpoint(str(tmp_path / "out")))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    original = {k: v for k, v in model.state_dict().items()}
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_sequence_classifier_round_trip(tmp_path):
    save_sequence_classifier(tmp_path / "in", "mha_untied")
    model = hf.load_checkpoint(str(tmp_path / "in"))
    assert model.config.score_model
    hf.save_checkpoint(model, str(tmp_path / "out"))
    reader = SafetensorsReader([str(tmp_path / "out" / "model.safetensors")])
    assert "score.weight" in reader and "lm_head.weight" not in reader
    assert_bit_exact(model, hf.load_checkpoint(str(tmp_path / "out")))
    transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "out")


def make_safe_rlhf_score_model(src, dst):
    """safe-rlhf's LlamaModelForScore layout: model.* plus score_head.weight."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(architectures=["LlamaModelForScore"], score_dim=1, bias=False)
    config.pop("num_labels", None)
    config.pop("id2label", None)
    config.pop("label2id", None)
    (dst / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(dst / "model.safetensors"))
    tensors["score_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, str(dst / "model.safetensors"))


def test_safe_rlhf_score_layout(tmp_path):
    save_sequence_classifier(tmp_path / "cls", "gqa_llama3")
    make_safe_rlhf_score_model(tmp_path / "cls", tmp_path / "beaver")
    classifier = hf.load_checkpoint(str(tmp_path / "cls"))
    beaver = hf.load_checkpoint(str(tmp_path / "beaver"))
    assert beaver.config.architecture == "LlamaModelForScore"
    ids = np.random.default_rng(1).integers(3, 96, (2, 7))
    np.testing.assert_array_equal(np.asarray(beaver(ids)), np.asarray(classifier(ids)))
    hf.save_checkpoint(beaver, str(tmp_path / "out"))
    reader = SafetensorsReader([str(tmp_path / "out" / "model.safetensors")])
    assert "score_head.weight" in reader
    assert json.loads((tmp_path / "out" / "config.json").read_text())["score_dim"] == 1


# ----------------------------------------------------------------------------- rejections


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_causal_lm(path, "mha_untied")
    return path


def copy_with(good, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(good, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def one_line_error(path):
    with pytest.raises(hf.CheckpointError) as info:
        hf.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_architecture(good_checkpoint, tmp_path):
    path = copy_with(
        good_checkpoint, tmp_path / "m", lambda c: c.update(architectures=["GPT2LMHeadModel"])
    )
    message = one_line_error(path)
    assert "unknown architecture 'GPT2LMHeadModel'" in message and "LlamaForCausalLM" in message


def test_missing_tensor_is_named(good_checkpoint, tmp_path):
    path = copy_with(
        good_checkpoint,
        tmp_path / "m",
        edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
    )
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in one_line_error(path)


def test_shape_mismatch_names_tensor_and_shapes(good_checkpoint, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)

    path = copy_with(good_checkpoint, tmp_path / "m", edit_tensors=shrink)
    message = one_line_error(path)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "(32, 64)" in message and "(64, 64)" in message


def test_pickle_checkpoint_is_refused(good_checkpoint, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good_checkpoint, dst)
    os.remove(dst / "model.safetensors")
    (dst / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    message = one_line_error(str(dst))
    assert "pytorch_model.bin" in message and "pickle" in message
    assert "safetensors" in message and "save_pretrained" in message


def test_unsupported_rope_type(good_checkpoint, tmp_path):
    path = copy_with(
        good_checkpoint,
        tmp_path / "m",
        lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
    )
    assert "rope type 'yarn' is not supported" in one_line_error(path)


def test_legacy_rope_fields_are_read(good_checkpoint, tmp_path):
    def legacy(config):
        config.pop("rope_parameters")
        config.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})

    model = hf.load_checkpoint(copy_with(good_checkpoint, tmp_path / "m", legacy))
    assert model.config.rope.rope_type == "linear"
    assert model.config.rope.theta == 5e5 and model.config.rope.factor == 2.0
