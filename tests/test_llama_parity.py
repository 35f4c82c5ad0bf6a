"""Our Flax LLaMA against transformers' torch LlamaForCausalLM on random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_models import VARIANTS, save_causal_lm, save_sequence_classifier, torch_logits

from sacpo_jax.models import hf


def padded_batch(padding_side: str, vocab: int = 96, seed: int = 0):
    """Three rows of lengths 11, 7 and 4 (tokens >= 3, so never pad/bos/eos)."""
    rng = np.random.default_rng(seed)
    length = 11
    ids = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), np.int32)
    for row, n in enumerate((11, 7, 4)):
        tokens = rng.integers(3, vocab, n)
        where = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, where] = tokens
        mask[row, where] = 1
    return ids, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(tmp_path, variant, padding_side):
    reference = save_causal_lm(tmp_path, variant)
    model = hf.load_checkpoint(str(tmp_path))
    ids, mask = padded_batch(padding_side)
    expected = torch_logits(reference, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(expected).max() > 1.0  # logits are not flat, so the check has teeth
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


def test_padding_does_not_change_real_tokens(tmp_path):
    save_causal_lm(tmp_path, "gqa_llama3")
    model = hf.load_checkpoint(str(tmp_path))
    ids, mask = padded_batch("left")
    batched = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    row = 2
    alone = ids[row][mask[row].astype(bool)][None]
    single = np.asarray(model(jnp.asarray(alone)))
    np.testing.assert_allclose(batched[row][mask[row].astype(bool)], single[0], atol=1e-5)


@pytest.mark.parametrize("scan_layers,remat", [(False, False), (True, True)])
def test_execution_options_do_not_change_logits(tmp_path, scan_layers, remat):
    save_causal_lm(tmp_path, "mha_untied")
    baseline = hf.load_checkpoint(str(tmp_path))
    variant = hf.load_checkpoint(str(tmp_path), scan_layers=scan_layers, remat=remat)
    ids, mask = padded_batch("right")
    np.testing.assert_allclose(
        np.asarray(variant(ids, mask)), np.asarray(baseline(ids, mask)), atol=1e-5
    )


def test_bf16_compute_stays_close(tmp_path):
    reference = save_causal_lm(tmp_path, "mha_untied")
    model = hf.load_checkpoint(str(tmp_path), compute_dtype="bfloat16")
    ids, mask = padded_batch("right")
    expected = torch_logits(reference, ids, mask)
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    relative = np.abs(ours[real] - expected[real]).max() / np.abs(expected[real]).max()
    assert relative < 0.05


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_score_model_matches_sequence_classifier(tmp_path, padding_side):
    import torch

    reference = save_sequence_classifier(tmp_path, "gqa_llama3")
    model = hf.load_checkpoint(str(tmp_path))
    ids, mask = padded_batch(padding_side)
    positions = (torch.as_tensor(mask).cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=positions,
        ).logits.numpy()[:, 0]
    np.testing.assert_allclose(np.asarray(model(ids, mask)), expected, atol=1e-4)
