"""The oracle task's tokenizer: word level, generated from the task's vocabulary.

No training and no download: every word the task writes (`oracle_task.vocabulary()`,
template words included) gets one id, so decode(encode(text)) gives back the
whitespace-normalised text of any task text.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sacpo_jax.data.oracle_task import MAX_LENGTH, vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def oracle_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary()`, generated (no training, no download).

    Ids: <pad> 0, <s> 1 (bos, prepended to every encoding), </s> 2 (eos, never added
    automatically), <unk> 3, then the sorted vocabulary. Text is split on whitespace
    and after every ":" (so "ASSISTANT:sure" reads as "ASSISTANT:" "sure"); decoding
    joins tokens with single spaces.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(":", "merged_with_previous")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def save_oracle_tokenizer(path: str) -> None:
    """Write `oracle_tokenizer()` to directory `path` with save_pretrained."""
    oracle_tokenizer().save_pretrained(path)
