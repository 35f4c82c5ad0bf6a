"""Tokenisation: masks and truncation against hand-worked examples; boundary merges."""

import sys
from pathlib import Path

import numpy as np
import pytest

from sacpo_jax.data.adapters import PKU_TEMPLATE
from sacpo_jax.data.errors import BadRow
from sacpo_jax.data.tokenize import (
    load_tokenizer,
    pack,
    tokenize_prompt_completion,
    tokenize_prompt_completions,
    tokenizer_fingerprint,
    truncate,
)

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer, sentencepiece_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_pack_masks_completion_positions_only():
    input_ids, attention, loss = pack([1, 5, 6], [7, 2], length=8, pad_id=0)
    np.testing.assert_array_equal(input_ids, [1, 5, 6, 7, 2, 0, 0, 0])
    np.testing.assert_array_equal(attention, [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(loss, [0, 0, 0, 1, 1, 0, 0, 0])
    assert input_ids.dtype == attention.dtype == loss.dtype == np.int32
    # Trainer convention: logits[:-1] score input_ids[1:] weighted by loss[1:]:
    # the scored targets are exactly the completion (7 then EOS 2).
    assert input_ids[1:][loss[1:] == 1].tolist() == [7, 2]
    with pytest.raises(ValueError, match="does not fit"):
        pack([1, 2, 3], [4, 5], length=4, pad_id=0)


PROMPT10 = list(range(10, 20))


@pytest.mark.parametrize(
    ("prompt", "completions", "expected_prompt", "expected_completions"),
    [
        # fits: unchanged
        ([1, 2, 3], [[4, 5, 6, 7], [8, 9]], [1, 2, 3], [[4, 5, 6, 7], [8, 9]]),
        # too long: keep the last 4 prompt tokens; then 4 + 3 <= 8
        (PROMPT10, [[1, 2, 3], [4]], [16, 17, 18, 19], [[1, 2, 3], [4]]),
        # still too long after the prompt cut: completions cut to 8 - 4 = 4
        (PROMPT10, [[1, 2, 3, 4, 5, 6], [7]], [16, 17, 18, 19], [[1, 2, 3, 4], [7]]),
        # a prompt within max_prompt_length is kept whole; completion cut to 6
        ([1, 2], [list(range(30, 40))], [1, 2], [[30, 31, 32, 33, 34, 35]]),
    ],
)
def test_truncation_hand_worked(prompt, completions, expected_prompt, expected_completions):
    result = truncate(prompt, completions, max_length=8, max_prompt_length=4)
    assert result == (expected_prompt, expected_completions)


def test_truncation_keeps_bos_and_the_end_of_the_prompt():
    prompt = [1, *PROMPT10]
    kept, completions = truncate(prompt, [[5] * 6], max_length=8, max_prompt_length=4, bos_id=1)
    assert kept == [1, 17, 18, 19]
    assert completions == [[5, 5, 5, 5]]


def test_no_room_for_a_response():
    with pytest.raises(BadRow) as caught:
        truncate(PROMPT10, [[1, 2]], max_length=8, max_prompt_length=8)
    assert (caught.value.field, caught.value.reason) == ("prompt", "no_room_for_response")


def test_sentencepiece_merge_across_the_boundary_goes_to_the_completion(sp):
    # "hel" alone is "▁hel"; "hello world" is "▁hell" "o" "▁world": the merged
    # token crosses the boundary, so the prompt keeps only BOS.
    prompt_ids, completion_ids = tokenize_prompt_completion(sp, "hel", "lo world")
    whole = sp("hello world")["input_ids"]
    assert whole[0] == sp.bos_token_id == 1
    assert prompt_ids == [1]
    assert completion_ids == [*whole[1:], sp.eos_token_id]
    assert sp.convert_ids_to_tokens(completion_ids[:3]) == ["▁hell", "o", "▁world"]


def test_pku_template_without_merge(sp):
    prompt_ids, completion_ids = tokenize_prompt_completion(sp, "hi", "Sure", PKU_TEMPLATE)
    prompt_text = "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    assert prompt_ids == sp(prompt_text)["input_ids"]
    assert completion_ids == [sp.convert_tokens_to_ids("Sure"), sp.eos_token_id]


def test_pair_completions_share_the_shortest_prompt(sp):
    # "help me" is "▁help" "▁me" and "hello" is "▁hell" "o": neither starts with
    # "▁hel", so the shared prompt shrinks to BOS.
    prompt_ids, (first, second) = tokenize_prompt_completions(sp, "hel", ["lo", "p me"])
    assert prompt_ids == [1]
    assert prompt_ids + first[:-1] == sp("hello")["input_ids"]
    assert prompt_ids + second[:-1] == sp("help me")["input_ids"]
    # " lo" does not merge with "▁hel": the prompt keeps its token.
    prompt_ids, (first, second) = tokenize_prompt_completions(sp, "hel", [" lo", " lo lo"])
    assert prompt_ids == sp("hel")["input_ids"]
    assert first == [sp.convert_tokens_to_ids("▁lo"), 2]


def test_bpe_bos_not_doubled_and_eos_not_doubled(bpe):
    # The chat template already writes <s> and </s> as text.
    prompt_ids, completion_ids = tokenize_prompt_completion(
        bpe, "<s><|user|>hi<|assistant|>", "Hello</s>"
    )
    assert prompt_ids[0] == 1 and 1 not in prompt_ids[1:]
    assert completion_ids[-1] == 2 and 2 not in completion_ids[:-1]
    plain_prompt, plain_completion = tokenize_prompt_completion(bpe, "hi", " there")
    assert plain_prompt[0] == 1
    assert plain_prompt + plain_completion == [*bpe("hi there")["input_ids"], 2]


def test_load_tokenizer_sets_pad_to_eos_and_fingerprints_differ(sp, bpe, tmp_path):
    sp.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id == 2
    assert tokenizer_fingerprint(loaded) != tokenizer_fingerprint(bpe)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(loaded)
