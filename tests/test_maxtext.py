"""MaxText Orbax checkpoints: parity with the torch model they were written from, errors.

Truth: torch LLaMA models (tests/fixtures/flax/<variant>/torch, and a Llama-3.1-style
model made here by transformers 5), their logits and our safetensors import of the same
weights; the Orbax files are written in MaxText's layout by fixtures_maxtext.py (which names
the MaxText source of each fact).
"""

import os
import shutil

import numpy as np
import pytest
from fixtures_maxtext import write_maxtext
from fixtures_models import save_causal_lm
from test_flax_msgpack import assert_matches_torch, fixture, one_line_error
from test_hf_io import assert_bit_exact, params_of

from sacpo_jax import parallel
from sacpo_jax.models import formats, hf


def maxtext_dir(tmp_path, torch_dir, *, scanned=True, declare=None, with_config=True):
    out = tmp_path / "maxtext"
    write_maxtext(torch_dir, str(out), scanned=scanned, declare=declare)
    if with_config:
        shutil.copy(os.path.join(torch_dir, "config.json"), out)
    return str(out)


@pytest.mark.parametrize(
    ("variant", "scanned", "mesh_shape"),
    [
        ("gqa", True, (2, 2, 2)),
        ("gqa", False, (2, 2, 2)),
        ("mha", False, None),
        ("tied", True, None),
        ("llama3_rope", True, (2, 2, 2)),
    ],
)
def test_import_matches_torch(tmp_path, variant, scanned, mesh_shape):
    if variant == "llama3_rope":  # Llama 3.1 RoPE: MaxText keeps q/k interleaved
        torch_dir = str(tmp_path / "torch")
        save_causal_lm(torch_dir, "gqa_llama3")
    else:
        torch_dir = fixture(variant, "torch")
    path = maxtext_dir(tmp_path, torch_dir, scanned=scanned)
    assert formats.detect(path) == "maxtext"
    mesh = parallel.make_mesh(*mesh_shape) if mesh_shape else None
    model = hf.load_checkpoint(path, mesh=mesh)
    assert_matches_torch(model, torch_dir)
    ours, expected = params_of(model), params_of(hf.load_checkpoint(torch_dir))
    for name in ("embed", "layers/k", "layers/o", "layers/gate", "layers/input_norm"):
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)
    if mesh_shape:
        q = model.layers.q.value
        assert q.sharding.spec == parallel.param_spec("layers/q", q.shape, mesh)


def test_step_and_items_directories_load_too(tmp_path):
    path = maxtext_dir(tmp_path, fixture("gqa", "torch"))
    config = os.path.join(path, "config.json")
    for sub in ("0", os.path.join("0", "items")):
        model = hf.load_checkpoint(os.path.join(path, sub), llama_config=config)
        assert_bit_exact(model, hf.load_checkpoint(path))


@pytest.mark.parametrize("scanned", [True, False])
def test_layout_contradicting_declared_scan_layers(tmp_path, scanned):
    path = maxtext_dir(tmp_path, fixture("gqa", "torch"), scanned=scanned, declare=not scanned)
    message = one_line_error(path)
    assert f"declares scan_layers={str(not scanned).lower()}" in message
    assert ("unscanned" in message) != scanned


def test_no_config_is_one_line(tmp_path):
    path = maxtext_dir(tmp_path, fixture("gqa", "torch"), with_config=False)
    assert "stores no Hugging Face config" in one_line_error(path)


def test_wrong_config_names_tensor_and_shapes(tmp_path):
    path = maxtext_dir(tmp_path, fixture("gqa", "torch"))
    message = one_line_error(path, llama_config=fixture("mha", "torch", "config.json"))
    assert "decoder/layers/self_attention/key/kernel" in message
    assert "(16, 2, 1, 8)" in message and "(16, 2, 2, 8)" in message
