"""EasyLM streaming checkpoints: parity with the torch model they were written from, errors.

Truth: the torch models of tests/fixtures/flax/<variant>/torch (their logits, and our
safetensors import of the same weights, bit for bit); the files are written in EasyLM's
layout by fixtures_easylm.py (which names the EasyLM source of each fact).
"""

import os
import shutil

import pytest
from fixtures_easylm import write_streaming
from test_flax_msgpack import assert_matches_torch, fixture, one_line_error
from test_hf_io import assert_bit_exact

from sacpo_jax import parallel
from sacpo_jax.models import formats, hf


def easylm_dir(tmp_path, variant, *, with_config=True, train_state=False):
    out = tmp_path / variant
    out.mkdir()
    name = "streaming_train_state" if train_state else "streaming_params"
    write_streaming(fixture(variant, "torch"), str(out / name), train_state=train_state)
    if with_config:
        shutil.copy(fixture(variant, "torch", "config.json"), out)
    return str(out)


@pytest.mark.parametrize(
    ("variant", "mesh_shape"), [("gqa", None), ("gqa", (2, 2, 2)), ("mha", None), ("tied", None)]
)
def test_streaming_params_match_torch(tmp_path, variant, mesh_shape):
    path = easylm_dir(tmp_path, variant)
    assert formats.detect(path) == "easylm"
    mesh = parallel.make_mesh(*mesh_shape) if mesh_shape else None
    model = hf.load_checkpoint(path, mesh=mesh)
    assert_matches_torch(model, variant)
    assert_bit_exact(model, hf.load_checkpoint(fixture(variant, "torch")))


def test_train_state_file_with_config_from_the_run(tmp_path):
    path = easylm_dir(tmp_path, "gqa", with_config=False, train_state=True)
    file = os.path.join(path, "streaming_train_state")
    assert formats.detect(file) == "easylm"
    config = fixture("gqa", "torch", "config.json")
    model = hf.load_checkpoint(file, llama_config=config)
    assert_bit_exact(model, hf.load_checkpoint(fixture("gqa", "torch")))


def test_no_model_config_is_one_line(tmp_path):
    message = one_line_error(easylm_dir(tmp_path, "gqa", with_config=False))
    assert "stores no model config" in message and "llama_config" in message


def test_standard_config_name_is_used_and_checked(tmp_path):
    path = easylm_dir(tmp_path, "gqa", with_config=False)
    message = one_line_error(path, llama_config="7b")
    assert "transformer/wte/embedding" in message and "(32000, 4096)" in message
    assert "neither a config.json" in one_line_error(path, llama_config="8b")


def test_several_checkpoints_in_one_directory(tmp_path):
    path = easylm_dir(tmp_path, "gqa")
    shutil.copy(os.path.join(path, "streaming_params"), os.path.join(path, "streaming_params_10"))
    message = one_line_error(path)
    assert "streaming_params, streaming_params_10" in message and "give the file" in message


def test_a_stream_that_is_not_easylm(tmp_path):
    path = easylm_dir(tmp_path, "gqa")
    with open(os.path.join(path, "streaming_params"), "wb") as f:
        f.write(b"\x92\xa1x\xa1y")  # one record, but its value is not bytes
    assert "not a stream of [key, bytes] records" in one_line_error(path)


def test_writer_follows_easylms_own_converter():
    """convert_easylm_to_hf.py: q_proj = permute(wq.T), permute(w) =
    w.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(dim, dim)."""
    import numpy as np
    from fixtures_easylm import easylm_tree
    from safetensors.numpy import load_file

    torch_dir = fixture("mha", "torch")
    wq = easylm_tree(torch_dir)[("transformer", "h", "1", "attention", "wq", "kernel")]
    heads, dim = 2, wq.shape[0]
    permuted = wq.T.reshape(heads, dim // heads // 2, 2, dim).transpose(0, 2, 1, 3)
    expected = load_file(os.path.join(torch_dir, "model.safetensors"))
    np.testing.assert_array_equal(
        permuted.reshape(dim, dim), expected["model.layers.1.self_attn.q_proj.weight"]
    )
