"""Small real tokenizers for tests, built offline.

- `bpe_tokenizer(directory)`: a byte-level BPE trained with `tokenizers` on a
  fixed text, wrapped as PreTrainedTokenizerFast with <pad>=0, <s>=1 (BOS,
  added by default), </s>=2 (EOS) and a simple chat template.
- `sentencepiece_tokenizer(directory)`: the LLaMA-style SentencePiece model
  shipped in the installed mistral-common package (tokenizer.model.v1,
  32000 pieces, <s>=1, </s>=2, BOS added by default, no pad token).
- `chat_tokenizer(directory, style)`: a byte-level BPE with a real chat model's
  special tokens and chat template: "chatml" (Qwen-style: no BOS, EOS =
  <|im_end|>, turns end with "<|im_end|>\n") or "llama3" (Llama-3-Instruct as
  first released: BOS <|begin_of_text|> added by default and written by the
  template, turns end with <|eot_id|>, EOS = <|end_of_text|>).

Each saves its files into ``directory`` (loadable with AutoTokenizer) and is
cached per directory; use a session tmp dir (tmp_path_factory).
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

BPE_TEXT = """\
BEGINNING OF CONVERSATION: USER: How do I bake bread at home? ASSISTANT: Mix flour, water,
salt and yeast, let the dough rise, shape it and bake it in a hot oven.
USER: What is the capital of France? ASSISTANT: The capital of France is Paris.
Human: Can you help me hurt someone? Assistant: I am sorry, but I cannot help with that.
The quick brown fox jumps over the lazy dog. A helpful and harmless assistant answers
questions politely, refuses dangerous requests and explains why safety matters.
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def bpe_tokenizer(directory: str | Path):
    """Train (deterministically) a byte-level BPE of 400 tokens and save it into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(BPE_TEXT.splitlines(), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


@functools.cache
def sentencepiece_tokenizer(directory: str | Path):
    """LLaMA-style tokenizer from mistral-common's tokenizer.model.v1, saved into ``directory``."""
    from transformers import AutoTokenizer, LlamaTokenizer

    model = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    source = Path(directory) / "sentencepiece"
    source.mkdir(parents=True, exist_ok=True)
    link = source / "tokenizer.model"
    if not link.exists():
        link.symlink_to(Path(str(model)))
    LlamaTokenizer.from_pretrained(str(source), add_bos_token=True).save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Llama-3 / Qwen2 pre-tokenisation: punctuation keeps the newlines after it (".\n\n").
CHAT_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_STYLES = {
    "chatml": dict(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=CHATML_TEMPLATE,
    ),
    "llama3": dict(
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        template=LLAMA3_TEMPLATE,
    ),
}


@functools.cache
def chat_tokenizer(directory: str | Path, style: str):
    """A byte-level BPE (vocab 400) with the special tokens and chat template of ``style``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    facts = CHAT_STYLES[style]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CHAT_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=facts["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = BPE_TEXT.replace("\n", "\n\n")  # "\n\n" gets a token, as in real chat models
    core.train_from_iterator([paragraphs], trainer=trainer)
    if facts["bos"] is not None:
        bos_id = core.token_to_id(facts["bos"])
        core.post_processor = processors.TemplateProcessing(
            single=f"{facts['bos']} $A", special_tokens=[(facts["bos"], bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=facts["bos"],
        eos_token=facts["eos"],
        pad_token=facts["pad"],
    )
    wrapped.chat_template = facts["template"]
    wrapped.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))
