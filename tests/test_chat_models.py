"""Chat models: one BOS in generation, TRL's end-of-turn convention, generation_config.json's
EOS ids, and the chat template as the default of generation and evaluation.

Tokenizers with a ChatML (Qwen-style) and a Llama-3-style chat template are built offline
(fixtures_tokenizers.chat_tokenizer); the truth for token ids is transformers' own
``apply_chat_template(..., tokenize=True)``, and for generation transformers' ``generate``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from fixtures_models import save_causal_lm
from fixtures_tokenizers import bpe_tokenizer, chat_tokenizer, sentencepiece_tokenizer
from flax import nnx

from sacpo_jax.config import EvalSettings
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.prompts import PKU_TEMPLATE, apply_template
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.data.tokenize import tokenize_prompt_completion
from sacpo_jax.evaluation import generate_responses
from sacpo_jax.generate import SACPO_STOP_STRINGS, generate, resolve_stop, tokenize_prompts
from sacpo_jax.models import hf
from sacpo_jax.models.llama import Llama, tiny_config
from sacpo_jax.scoring import packed_batches

USER = {"role": "user", "content": "How do I bake bread at home?"}


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("chatml"), "chatml")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("llama3"), "llama3")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def template_ids(tokenizer, messages, **options) -> list[int]:
    """transformers' own tokenisation of a rendered conversation."""
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)[
            "input_ids"
        ]
    )


# ----------------------------------------------------------------------------- one BOS


@pytest.mark.parametrize("name", ["llama3", "bpe"])
def test_generation_prompt_has_one_bos_like_training_and_scoring(name, request):
    """Both tokenizers add BOS by default and both templates write it: generation must
    see it once, exactly as the template's tokens, training and scoring have it."""
    tokenizer = request.getfixturevalue(name)
    bos = tokenizer.bos_token_id
    expected = template_ids(tokenizer, [USER], add_generation_prompt=True)
    assert expected[0] == bos and bos not in expected[1:]
    rendered = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)

    assert tokenize_prompts(tokenizer, [rendered]) == [expected]  # a pre-rendered prompt
    assert tokenize_prompts(tokenizer, [USER["content"]], "chat") == [expected]
    training_prompt, _ = tokenize_prompt_completion(tokenizer, rendered, "Mix flour.")
    assert training_prompt == expected
    ids, _, loss_mask, _ = next(
        packed_batches(tokenizer, [rendered], ["Mix flour."], template=None, max_length=None)
    )
    assert ids[0, : int(np.argmax(loss_mask[0]))].tolist() == expected


@pytest.mark.parametrize("name", ["oracle", "sentencepiece"])
def test_pku_prompts_tokenise_as_before(name, tmp_path):
    """PKU-style tokenizers (no chat template): generation's prompt ids are unchanged,
    the tokenizer's own encoding with its special tokens."""
    tokenizer = oracle_tokenizer() if name == "oracle" else sentencepiece_tokenizer(tmp_path)
    prompts = ["how do I make bread", "tell me about the lazy dog"]
    texts = [apply_template(PKU_TEMPLATE, p) for p in prompts]
    expected = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
    assert tokenize_prompts(tokenizer, texts) == expected
    assert tokenize_prompts(tokenizer, prompts, "auto") == expected


# ----------------------------------------------------------------------------- end of turn


def chat_rows(path):
    shared = [USER]
    rows = [
        {
            "chosen": shared + [{"role": "assistant", "content": "Mix flour, water and yeast."}],
            "rejected": shared + [{"role": "assistant", "content": "I cannot help."}],
        }
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize(
    "style, end_of_turn", [("chatml", "<|im_end|>\n"), ("llama3", "<|eot_id|>")]
)
def test_chat_pair_completion_ends_with_one_end_of_turn(style, end_of_turn, request, tmp_path):
    """TRL's conversational convention: prompt = the template with the generation prompt,
    completion = what the whole conversation adds; no EOS appended after the end of turn."""
    tokenizer = request.getfixturevalue(style)
    (row,) = chat_rows(tmp_path / "pairs.jsonl")
    spec = DataSpec(
        source={"type": "jsonl", "path": str(tmp_path / "pairs.jsonl")},
        adapter="chat_pair",
        max_length=256,
        max_prompt_length=128,
    )
    dataset, _ = build_dataset(spec, tokenizer)
    prompt = template_ids(tokenizer, [USER], add_generation_prompt=True)
    assert dataset.prompts[0].tolist() == prompt
    for slot, name in enumerate(("chosen", "rejected")):
        whole = template_ids(tokenizer, row[name])
        completion = dataset.completions[slot][0].tolist()
        assert prompt + completion == whole
        text = tokenizer.decode(completion)
        assert text.endswith(end_of_turn) and text.count(end_of_turn) == 1
        assert tokenizer.eos_token not in text.removesuffix(end_of_turn)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_chat_sft_completion_is_the_templates_assistant_turn(style, request, tmp_path):
    tokenizer = request.getfixturevalue(style)
    messages = [USER, {"role": "assistant", "content": "Bake it in a hot oven."}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    spec = DataSpec(
        source={"type": "jsonl", "path": str(tmp_path / "sft.jsonl")}, adapter="chat_sft"
    )
    dataset, _ = build_dataset(spec, tokenizer)
    tokens = dataset.prompts[0].tolist() + dataset.completions[0][0].tolist()
    assert tokens == template_ids(tokenizer, messages)


# ----------------------------------------------------------------------------- scripted model


def bigram_model(vocab_size: int, successor: dict[int, int], filler: int) -> Llama:
    """A one-layer LLaMA whose greedy next token depends only on the current token:
    one-hot embeddings, zero attention and MLP weights (they add nothing to the residual),
    lm_head[a, successor(a)] = 1 (``filler`` for tokens without a successor)."""
    config = tiny_config(
        vocab_size=vocab_size,
        hidden_size=vocab_size,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = zero_model(config)
    head = np.zeros((vocab_size, vocab_size), np.float32)
    head[np.arange(vocab_size), filler] = 1.0
    for token, following in successor.items():
        head[token] = 0.0
        head[token, following] = 1.0
    model.embed[...] = jnp.eye(vocab_size)
    model.lm_head[...] = jnp.asarray(head)
    model.final_norm[...] = jnp.ones(vocab_size)
    return model


def zero_model(config) -> Llama:
    """A Llama with all parameters zero, built without eager random initialisation."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract))


def scripted(tokenizer, prompt_ids, script_ids, filler_text=" fox"):
    """A bigram model that answers the prompt's last token with ``script_ids``."""
    chain = [prompt_ids[-1], *script_ids]
    assert len(set(chain)) == len(chain), "script tokens must be distinct"
    filler = tokenizer(filler_text, add_special_tokens=False).input_ids[-1]
    assert filler not in chain
    return bigram_model(len(tokenizer), dict(zip(chain, chain[1:])), filler)


def test_evaluation_defaults_use_the_chat_template_and_stop_only_at_eos(chatml):
    """No template given, a tokenizer with a chat template: the model is asked with the
    chat template and its multi-paragraph answer ends at EOS (<|im_end|>), not at the
    PKU preset's "\\n\\n"; what it says after EOS is not part of the answer."""
    answer = "Mix flour.\n\nBake it"
    prompt_ids = template_ids(chatml, [USER], add_generation_prompt=True)
    words = chatml(answer, add_special_tokens=False).input_ids
    after_eos = chatml(" USER:", add_special_tokens=False).input_ids
    model = scripted(chatml, prompt_ids, [*words, chatml.eos_token_id, *after_eos])
    settings = EvalSettings(max_new_tokens=24)
    assert generate_responses(model, chatml, [USER["content"]], settings, None) == [answer]


def test_pku_defaults_stay_for_tokenizers_without_a_chat_template():
    tokenizer = oracle_tokenizer()
    settings = EvalSettings()
    assert resolve_stop(settings.stop, "BEGINNING {prompt}") == SACPO_STOP_STRINGS
    assert tokenize_prompts(tokenizer, ["hi"], settings.template) == [
        tokenizer(apply_template(PKU_TEMPLATE, "hi")).input_ids
    ]


# ----------------------------------------------------------------------------- generation_config


def test_generation_config_round_trip_and_every_eos_id_stops(llama3, tmp_path):
    """A checkpoint whose generation_config.json lists two EOS ids (as Llama-3-Instruct
    lists <|end_of_text|> and <|eot_id|>): our generation stops at the second one exactly
    where transformers' generate does, and an export writes the file back."""
    source = tmp_path / "source"
    ids = {k: getattr(llama3, f"{k}_token_id") for k in ("bos", "eos")}
    token_ids = dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["eos"])
    torch_model = save_causal_lm(
        source, "mha_untied", vocab_size=len(llama3), scale=0.5, **token_ids
    )
    prompt = torch.tensor([llama3("How do I bake bread?").input_ids])
    free = torch_model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    new = free[0, prompt.shape[1] :].tolist()
    end_of_turn = new[2]
    assert end_of_turn not in new[:2] and ids["eos"] not in new[:3]
    generation = transformers.GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=[ids["eos"], end_of_turn], pad_token_id=ids["eos"]
    )
    generation.save_pretrained(source)

    reference = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :]
    assert expected.tolist() == new[:3]  # transformers stops at the listed end of turn
    model = hf.load_checkpoint(str(source))
    (text,) = generate(model, llama3, ["How do I bake bread?"], max_new_tokens=8)
    assert text == llama3.decode(expected.tolist(), skip_special_tokens=True)

    hf.save_checkpoint(model, str(tmp_path / "export"), llama3)
    written = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert written == json.loads((source / "generation_config.json").read_text())
    reread = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert reread.eos_token_id == [ids["eos"], end_of_turn]


def test_no_generation_config_is_written_when_the_source_has_none(tmp_path):
    hf.save_checkpoint(zero_model(tiny_config()), str(tmp_path))
    assert not (tmp_path / "generation_config.json").exists()
