"""transformers 4.x Flax msgpack checkpoints: the wire format, import parity, export, errors.

Truth: fixtures made by transformers 4.49's own FlaxLlamaForCausalLM (from_pt=True) from
torch models saved by transformers 5 (tests/fixtures/make_flax_fixtures.py), the torch
models' logits, and flax.serialization's own encoder/decoder.
"""

import os
import shutil

import flax.serialization
import ml_dtypes
import numpy as np
import pytest
import transformers
from fixtures_models import torch_logits
from test_hf_io import assert_bit_exact, params_of

from sacpo_jax import parallel
from sacpo_jax.models import formats, hf, msgpack_tensors
from sacpo_jax.models.safetensors_io import PlannedTensor

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "flax")
PARITY_ATOL = 1e-4  # the bound test_llama_parity holds our safetensors import to


def fixture(*parts):
    return os.path.join(FIXTURES, *parts)


def batch():
    ids = np.array([[1, 5, 9, 3, 17, 30, 4, 8], [0, 0, 1, 7, 21, 11, 6, 29]])
    return ids, (ids != 0).astype(np.int32)


def assert_matches_torch(model, variant):
    """Logits equal the torch model's: ``variant`` names a fixture, or is a torch directory."""
    torch_dir = variant if os.path.isdir(str(variant)) else fixture(variant, "torch")
    torch_model = transformers.LlamaForCausalLM.from_pretrained(torch_dir).eval()
    ids, mask = batch()
    expected = torch_logits(torch_model, ids, mask)
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=PARITY_ATOL, rtol=0)


# ----------------------------------------------------------------------------- wire format


def planned(tree):
    return {
        k: planned(v) if isinstance(v, dict) else PlannedTensor(k, v.dtype, v.shape, lambda v=v: v)
        for k, v in tree.items()
    }


@pytest.mark.parametrize("chunk", [2**30, 24])
def test_writer_matches_flax_bytes_and_reader_matches_flax_restore(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(msgpack_tensors, "MAX_CHUNK_SIZE", chunk)
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", chunk)
    rng = np.random.default_rng(0)
    tree = {
        "model": {
            "kernel": rng.normal(size=(3, 5)).astype(np.float32),
            "weight": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        },
        "big": rng.normal(size=(10, 3)).astype(np.float16),
        "ids": rng.integers(0, 9, (2, 2, 2)).astype(np.int32),
    }
    path = str(tmp_path / "tree.msgpack")
    msgpack_tensors.write_tree(path, planned(tree))
    with open(path, "rb") as f:
        assert f.read() == flax.serialization.msgpack_serialize(tree)
    reader = msgpack_tensors.MsgpackReader(msgpack_tensors.read_tree(path))
    with open(path, "rb") as f:
        restored = flax.traverse_util.flatten_dict(
            flax.serialization.msgpack_restore(f.read()), sep="/"
        )
    assert sorted(reader.names()) == sorted(restored)
    for name, value in restored.items():
        view = reader.view(name)
        assert view.dtype == value.dtype and view.shape == value.shape
        np.testing.assert_array_equal(view.view(np.uint8), value.view(np.uint8))


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize(
    ("variant", "files"), [("gqa", "flax"), ("gqa", "flax_sharded"), ("mha", "flax")]
)
@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_import_matches_torch_and_safetensors_import(variant, files, mesh_shape):
    mesh = parallel.make_mesh(*mesh_shape) if mesh_shape else None
    path = fixture(variant, files)
    assert formats.detect(path) == "flax_msgpack"
    model = hf.load_checkpoint(path, mesh=mesh)
    assert_matches_torch(model, variant)
    assert_bit_exact(model, hf.load_checkpoint(fixture(variant, "torch")))
    if mesh_shape:
        q = model.layers.q.value
        assert q.sharding.spec == parallel.param_spec("layers/q", q.shape, mesh)


def test_tied_checkpoint_with_fresh_lm_head_uses_embeddings_and_says_so():
    path = fixture("tied", "flax")
    with pytest.warns(UserWarning, match="ties the output layer .* using the embeddings") as w:
        model = hf.load_checkpoint(path)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert "lm_head" not in params_of(model)
    assert_matches_torch(model, "tied")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_export_round_trips_bit_exactly(tmp_path, variant, recwarn):
    first = hf.load_checkpoint(fixture(variant, "torch"))
    out = str(tmp_path / "out")
    hf.save_checkpoint(first, out, msgpack=True)
    assert formats.detect(out) == "safetensors"  # the safetensors beside it win
    second = hf.load_checkpoint(out, format="flax_msgpack")
    assert_bit_exact(first, second)
    assert first.config == second.config
    assert not recwarn.list  # a tied export's lm_head equals the embeddings: no warning


def test_export_checked_by_transformers_4():
    """make_flax_fixtures.py loaded our exports with transformers 4.49's Flax class."""
    import json

    with open(fixture("export_check.json")) as f:
        check = json.load(f)
    assert check["transformers"].startswith("4.")
    assert set(check["max_abs_logit_difference"]) == {"gqa", "mha", "tied"}
    assert max(check["max_abs_logit_difference"].values()) < PARITY_ATOL


def test_score_models_are_not_exported(tmp_path):
    from fixtures_models import save_sequence_classifier

    save_sequence_classifier(tmp_path / "rm", "mha_untied")
    model = hf.load_checkpoint(str(tmp_path / "rm"))
    with pytest.raises(hf.CheckpointError, match="Flax LLaMA has no LlamaForSequenceClass"):
        hf.save_checkpoint(model, str(tmp_path / "out"), msgpack=True)


# ----------------------------------------------------------------------------- bad input


def one_line_error(path, **kwargs):
    with pytest.raises(hf.CheckpointError) as info:
        hf.load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def rewritten(tmp_path, edit):
    """The gqa fixture with its tree edited and written back by flax itself."""
    dst = tmp_path / "m"
    shutil.copytree(fixture("gqa", "flax"), dst)
    weights = dst / "flax_model.msgpack"
    tree = flax.serialization.msgpack_restore(weights.read_bytes())
    edit(tree)
    weights.write_bytes(flax.serialization.msgpack_serialize(tree))
    return str(dst)


def test_missing_tensor_is_named(tmp_path):
    path = rewritten(tmp_path, lambda t: t["model"]["layers"]["1"]["mlp"].pop("up_proj"))
    assert "missing tensor model/layers/1/mlp/up_proj/kernel" in one_line_error(path)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    def shrink(tree):
        tree["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"] = np.zeros((16, 4), "f4")

    message = one_line_error(rewritten(tmp_path, shrink))
    assert "model/layers/0/self_attn/k_proj/kernel" in message
    assert "(16, 4)" in message and "(16, 8)" in message


@pytest.mark.parametrize("content", [b"not msgpack at all\n", b"\x81\xa1a\xc7\x20\x01\x93"])
def test_a_file_that_is_not_msgpack(tmp_path, content):
    dst = tmp_path / "m"
    shutil.copytree(fixture("gqa", "flax"), dst)
    (dst / "flax_model.msgpack").write_bytes(content)
    message = one_line_error(str(dst))
    assert "flax_model.msgpack" in message and "msgpack" in message.split(":", 1)[1]


def test_hub_repositories_without_safetensors_are_fetched_as_msgpack():
    assert "*.msgpack" in hf.hub_patterns(["config.json", "flax_model.msgpack"])
    both = hf.hub_patterns(["config.json", "model.safetensors", "flax_model.msgpack"])
    assert "*.safetensors" in both and "*.msgpack" not in both
    pickles = hf.hub_patterns(["config.json", "pytorch_model.bin", "flax_model.msgpack"])
    assert not any(p.endswith(".bin") or p == "*" for p in pickles)
