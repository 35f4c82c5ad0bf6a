"""Bad rows: one small file per problem (line 2 is the bad one, lines 1 and 3 are good).

Policy error: a one-line DataError naming the file, the row, the field and the
problem. Policy skip: the row is dropped and counted under its reason.
"""

import sys
from pathlib import Path

import pytest

from sacpo_jax.data.errors import DataError
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer  # noqa: E402

BAD_ROWS = Path(__file__).parent / "data" / "bad_rows"

CASES = [
    # file, adapter, max_prompt_length, field, problem, reason
    ("missing_field", "pku_helpful", 20, "better_response_id", "missing", "missing_field"),
    (
        "wrong_type",
        "pku_helpful",
        20,
        "better_response_id",
        "expected 0 or 1, got str",
        "wrong_type",
    ),
    ("empty_string", "pku_helpful", 20, "response_0", "empty string", "empty_string"),
    (
        "identical_responses",
        "pku_harmless",
        20,
        "response_1",
        "the two responses are identical",
        "identical_responses",
    ),
    (
        "identical_tokens",
        "pku_helpful",
        20,
        "rejected",
        "chosen and rejected have identical tokens",
        "identical_tokens",
    ),
    ("invalid_id", "pku_helpful", 20, "better_response_id", "expected 0 or 1, got 2", "invalid_id"),
    (
        "contradictory_safety",
        "pku_harmless",
        20,
        "safer_response_id",
        "response_0 is marked safer but labelled unsafe while the other is safe",
        "contradictory_safety",
    ),
    (
        "no_room",
        "pku_helpful",
        40,
        "prompt",
        "40 prompt tokens leave no room for a response (max_length 40)",
        "no_room_for_response",
    ),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def spec_for(name: str, adapter: str, max_prompt_length: int, policy: str) -> DataSpec:
    return DataSpec(
        source={"type": "jsonl", "path": str(BAD_ROWS / f"{name}.jsonl")},
        adapter=adapter,
        max_length=40,
        max_prompt_length=max_prompt_length,
        on_bad_row=policy,
    )


@pytest.mark.parametrize(("name", "adapter", "prompt_len", "field", "problem", "reason"), CASES)
def test_error_policy_gives_one_line(tokenizer, name, adapter, prompt_len, field, problem, reason):
    spec = spec_for(name, adapter, prompt_len, "error")
    with pytest.raises(DataError) as caught:
        build_dataset(spec, tokenizer)
    path = BAD_ROWS / f"{name}.jsonl"
    assert str(caught.value) == f"{path}: line 2: field '{field}': {problem}"
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("name", "adapter", "prompt_len", "field", "problem", "reason"), CASES)
def test_skip_policy_counts_the_reason(
    tokenizer, name, adapter, prompt_len, field, problem, reason
):
    dataset, report = build_dataset(spec_for(name, adapter, prompt_len, "skip"), tokenizer)
    assert report == {reason: 1}
    assert len(dataset) == 2


def test_unparsable_line_is_a_one_line_error_or_a_counted_skip(tokenizer):
    with pytest.raises(DataError) as caught:
        build_dataset(spec_for("bad_json", "pku_helpful", 20, "error"), tokenizer)
    message = str(caught.value)
    assert message.startswith(f"{BAD_ROWS / 'bad_json.jsonl'}: line 2: invalid JSON")
    assert "\n" not in message
    dataset, report = build_dataset(spec_for("bad_json", "pku_helpful", 20, "skip"), tokenizer)
    assert report == {"invalid_json": 1} and len(dataset) == 2


def test_all_rows_skipped_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"prompt": "p"}\n{"prompt": "q"}\n')
    spec = DataSpec(source={"type": "jsonl", "path": str(path)}, adapter="pair", on_bad_row="skip")
    with pytest.raises(DataError, match=r"no usable rows \(skipped: \{'missing_field': 2\}\)"):
        build_dataset(spec, tokenizer)


def test_missing_file_is_a_one_line_error(tokenizer, tmp_path):
    spec = DataSpec(source={"type": "jsonl", "path": str(tmp_path / "nope.jsonl")}, adapter="pair")
    with pytest.raises(DataError, match="nope.jsonl: cannot read file"):
        build_dataset(spec, tokenizer)
