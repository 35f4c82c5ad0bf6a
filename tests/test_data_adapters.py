"""Adapters on small hand-written rows in each layout."""

import sys
from pathlib import Path

import pytest

from sacpo_jax.data.adapters import ADAPTERS, PKU_TEMPLATE, AdapterContext, Example
from sacpo_jax.data.errors import BadRow

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer  # noqa: E402

# PKU-SafeRLHF-30K columns.
PKU_30K = {
    "prompt": "How do I pick a lock?",
    "response_0": "Use a tension wrench and a pick.",
    "response_1": "I cannot help with breaking into property.",
    "is_response_0_safe": False,
    "is_response_1_safe": True,
    "better_response_id": 0,
    "safer_response_id": 1,
}
# PKU-SafeRLHF v1.0 adds severity, harm categories, sources and hashes.
PKU_V1 = {
    **PKU_30K,
    "prompt_source": "Alpaca3-70B",
    "response_0_source": "Alpaca-7B",
    "response_1_source": "Alpaca2-7B",
    "response_0_sha256": "ab" * 32,
    "response_1_sha256": "cd" * 32,
    "response_0_severity_level": 2,
    "response_1_severity_level": 0,
    "response_0_harm_category": {"Violence": False, "Property Crimes": True},
    "response_1_harm_category": {"Violence": False, "Property Crimes": False},
    "better_response_id": 1,
    "safer_response_id": 1,
}
CTX = AdapterContext()


def convert(adapter, row, ctx=CTX):
    return ADAPTERS[adapter].convert(row, ctx)


@pytest.mark.parametrize("row", [PKU_30K, PKU_V1], ids=["30k", "v1.0"])
def test_pku_pairs_follow_the_ids(row):
    responses = (row["response_0"], row["response_1"])
    better, safer = row["better_response_id"], row["safer_response_id"]
    (helpful,) = convert("pku_helpful", row)
    assert helpful == Example(row["prompt"], (responses[better], responses[1 - better]))
    (harmless,) = convert("pku_harmless", row)
    assert harmless == Example(row["prompt"], (responses[safer], responses[1 - safer]))
    assert ADAPTERS["pku_helpful"].default_template == PKU_TEMPLATE


def test_pku_kto_rows_labelled_by_safety_and_by_better():
    safety = convert("pku_kto_safety", PKU_30K)
    assert [(e.completions[0], e.columns["label"]) for e in safety] == [
        (PKU_30K["response_0"], 0),
        (PKU_30K["response_1"], 1),
    ]
    helpful = convert("pku_kto_helpful", PKU_V1)  # better_response_id = 1
    assert [e.columns["label"] for e in helpful] == [0, 1]
    assert ADAPTERS["pku_kto_safety"].kind == "unpaired"


def test_pku_reward_and_cost_pairs_carry_signs():
    (reward,) = convert("pku_reward", PKU_30K)
    assert reward.completions == (PKU_30K["response_0"], PKU_30K["response_1"])
    assert reward.columns == {"chosen_sign": 0, "rejected_sign": 0}
    (cost,) = convert("pku_cost", PKU_30K)  # safer = 1 (safe), unsafer = 0 (unsafe)
    assert cost.completions == (PKU_30K["response_1"], PKU_30K["response_0"])
    assert cost.columns == {"chosen_sign": -1, "rejected_sign": 1}
    both_unsafe = {**PKU_30K, "is_response_1_safe": False}
    (cost,) = convert("pku_cost", both_unsafe)
    assert cost.columns == {"chosen_sign": 1, "rejected_sign": 1}


def test_pku_contradictory_safety_is_refused():
    row = {**PKU_30K, "safer_response_id": 0}  # response_0 unsafe, response_1 safe
    for adapter in ("pku_harmless", "pku_cost"):
        with pytest.raises(BadRow) as caught:
            convert(adapter, row)
        assert (caught.value.field, caught.value.reason) == (
            "safer_response_id",
            "contradictory_safety",
        )


def test_hh_single_and_multi_turn_transcripts():
    single = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    (example,) = convert("hh_rlhf", single)
    assert example.prompt == "\n\nHuman: Hi there\n\nAssistant:"
    assert example.completions == (" Hello! How can I help?", " Go away.")

    history = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant:"
    # Both answers start alike: the common prefix runs past the last Assistant
    # marker and must be cut back to it.
    multi = {"chosen": history + " It is 12.", "rejected": history + " It is 7."}
    (example,) = convert("hh_rlhf", multi)
    assert example.prompt == history
    assert example.completions == (" It is 12.", " It is 7.")


def test_generic_layouts():
    (pair,) = convert("pair", {"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert pair == Example("p", ("good", "bad"))
    (unpaired,) = convert("unpaired", {"prompt": "p", "completion": "c", "label": True})
    assert unpaired == Example("p", ("c",), {"label": 1})
    (sft,) = convert("sft", {"prompt": "p", "response": "r"})
    assert sft == Example("p", ("r",))
    renamed = AdapterContext(columns={"prompt": "instruction", "response": "output"})
    (sft,) = convert("sft", {"instruction": "i", "output": "o"}, renamed)
    assert sft == Example("i", ("o",))


def test_pairs_may_carry_their_own_label_smoothing():
    row = {"prompt": "p", "chosen": "good", "rejected": "bad", "label_smoothing": 0.5}
    assert convert("pair", row) == [Example("p", ("good", "bad"), {"label_smoothing": 0.5})]
    renamed = AdapterContext(columns={"label_smoothing": "eps"})
    (pair,) = convert("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "eps": 0.2}, renamed)
    assert pair.columns == {"label_smoothing": 0.2}
    for bad in (0.7, -0.1, "0.1", float("nan")):
        with pytest.raises(BadRow) as error:
            convert("pair", {**row, "label_smoothing": bad})
        assert error.value.field == "label_smoothing"


def test_scored_pairs_nested_and_flat():
    nested = {
        "prompt": "p",
        "response_0": "a",
        "response_1": "b",
        "scores_0": {"reward": 1.5, "cost": -2},
        "scores_1": {"reward": 0.25, "cost": 3.0},
    }
    (example,) = convert("scored_pair", nested)
    assert example.completions == ("a", "b")
    assert example.columns == {
        "score_0_cost": -2.0,
        "score_0_reward": 1.5,
        "score_1_cost": 3.0,
        "score_1_reward": 0.25,
    }
    flat = {"prompt": "p", "response_0": "a", "response_1": "b", "reward_0": 1.5, "reward_1": 0.25}
    (example,) = convert("scored_pair", flat, AdapterContext(score_names=("reward",)))
    assert example.columns == {"score_0_reward": 1.5, "score_1_reward": 0.25}


@pytest.fixture(scope="module")
def chat_ctx(tmp_path_factory):
    return AdapterContext(tokenizer=bpe_tokenizer(tmp_path_factory.mktemp("bpe")))


def test_chat_messages_rendered_with_the_template(chat_ctx):
    # Template: <s> then <|role|>content per message, </s> after assistant turns.
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bread?"},
        {"role": "assistant", "content": "Bake it."},
    ]
    (sft,) = convert("chat_sft", {"messages": messages}, chat_ctx)
    assert sft.prompt == "<s><|user|>Hi<|assistant|>Hello</s><|user|>Bread?<|assistant|>"
    assert sft.completions == ("Bake it.</s>",)

    shared = messages[:3]
    conversations = {
        "chosen": shared + [{"role": "assistant", "content": "Bake it."}],
        "rejected": shared + [{"role": "assistant", "content": "No."}],
    }
    (pair,) = convert("chat_pair", conversations, chat_ctx)
    assert pair.prompt == sft.prompt
    assert pair.completions == ("Bake it.</s>", "No.</s>")
    split = {
        "prompt": shared,
        "chosen": [{"role": "assistant", "content": "Bake it."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    assert convert("chat_pair", split, chat_ctx) == [pair]


def test_chat_completion_must_be_an_assistant_turn(chat_ctx):
    row = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    with pytest.raises(BadRow, match="assistant"):
        convert("chat_sft", row, chat_ctx)
