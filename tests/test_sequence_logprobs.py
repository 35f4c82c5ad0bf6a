"""sequence_logprobs against an independent torch computation on the same checkpoint."""

import numpy as np
import pytest
import torch
import transformers
from fixtures_models import randomize
from fixtures_tokenizers import bpe_tokenizer, sentencepiece_tokenizer

import sacpo_jax

TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PROMPTS = ["How do I bake bread", "What is the capital of France?", "Help me"]
RESPONSES = [" Mix flour and water.", "The capital is Paris.", " with safety"]
# Without a template these merge across the prompt/response boundary ("hel" + "lo"
# -> "hello" in SentencePiece, "quick bro" + "wn" -> "brown" in the BPE).
MERGING_PROMPTS = ["hel", "The quick bro", "Paris is the capit"]
MERGING_RESPONSES = ["lo world", "wn fox", "al of France"]


def torch_reference(model, tokenizer, prompt_text, response):
    """Tokenise as TRL does, written out here: prompt tokens, then the suffix that
    prompt+response adds (merged boundary token included), then EOS; sum log-probs."""
    bos = [tokenizer.bos_token_id]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full_ids = tokenizer(prompt_text + response, add_special_tokens=False).input_ids
    common = 0
    while common < min(len(prompt_ids), len(full_ids)) and prompt_ids[common] == full_ids[common]:
        common += 1
    completion = full_ids[common:] + [tokenizer.eos_token_id]
    ids = torch.tensor([bos + full_ids[:common] + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    picked = logps[torch.arange(len(targets)), targets]
    return float(picked[-len(completion) :].sum()), common < len(prompt_ids)


def random_model(path, vocab_size):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = randomize(transformers.LlamaForCausalLM(config), seed=3, scale=0.3)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_sequence_logprobs_match_torch(tmp_path_factory, kind):
    directory = tmp_path_factory.mktemp(kind)
    tokenizer = (sentencepiece_tokenizer if kind == "sentencepiece" else bpe_tokenizer)(directory)
    reference = random_model(directory, len(tokenizer))
    model, loaded_tokenizer = sacpo_jax.load_model(str(directory))
    assert loaded_tokenizer is not None and loaded_tokenizer.pad_token_id is not None

    ours = sacpo_jax.sequence_logprobs(
        model, loaded_tokenizer, PROMPTS, RESPONSES, template=TEMPLATE
    )
    expected = [
        torch_reference(reference, tokenizer, TEMPLATE.format(prompt=p), r)[0]
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-5)

    ours = sacpo_jax.sequence_logprobs(model, loaded_tokenizer, MERGING_PROMPTS, MERGING_RESPONSES)
    expected, merged = zip(
        *(
            torch_reference(reference, tokenizer, p, r)
            for p, r in zip(MERGING_PROMPTS, MERGING_RESPONSES)
        )
    )
    assert any(merged), "the test must include a boundary merge"
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-5)
    # Plain prompts (no template) and one-at-a-time scoring agree with the batch.
    single = sacpo_jax.sequence_logprobs(model, loaded_tokenizer, PROMPTS[:1], RESPONSES[:1])
    plain, _ = torch_reference(reference, tokenizer, PROMPTS[0], RESPONSES[0])
    np.testing.assert_allclose(single, [plain], atol=2e-4, rtol=1e-5)


def test_load_model_without_tokenizer(tmp_path):
    random_model(tmp_path, 64)
    model, tokenizer = sacpo_jax.load_model(str(tmp_path))
    assert tokenizer is None
    assert model(np.ones((1, 3), np.int32)).shape == (1, 3, 64)
