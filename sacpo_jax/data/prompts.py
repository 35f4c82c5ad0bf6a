"""Prompts: the templates a prompt (and a response) is rendered with before
tokenisation, and the prompt sets that generation reads.

A template is one of:

- a string with ``{prompt}``: every ``{prompt}`` is replaced by the prompt, and a
  response follows the text directly (e.g. the PKU / SACPO template);
- ``None``: the prompt as it is;
- ``"chat"``: the tokenizer's chat template, the prompt as one user message
  (``add_generation_prompt=True``); a response is rendered as the assistant's turn;
- ``"auto"``: ``"chat"`` when the tokenizer has a chat template, else the PKU template
  (PKU-style models such as Alpaca-7B have none).

Conversational text follows TRL's convention: the completion is what the rendered whole
conversation adds after the rendered prompt, the template's end of turn included, and
no EOS is appended to it (the template ends the turn). Plain text gets EOS appended.

Prompt sets: {prompt, category} rows from any data source; SACPO's evaluation sets
(../shared/data/sacpo_eval/*.json) are JSON lists of {prompt, category}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sacpo_jax.data.errors import DataError
from sacpo_jax.data.sources import read_rows, source_label
from sacpo_jax.data.spec import SourceSpec

PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
CHAT = "chat"
AUTO = "auto"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer: Any, template: str | None) -> str | None:
    """The template in force: ``"auto"`` becomes ``"chat"`` or the PKU template.
    Raises `DataError` (one line) for a template that cannot be used."""
    if template == AUTO:
        return CHAT if has_chat_template(tokenizer) else PKU_TEMPLATE
    if template == CHAT and not has_chat_template(tokenizer):
        raise DataError("template", "'chat' needs a tokenizer with a chat template")
    if template not in (None, CHAT) and "{prompt}" not in template:
        raise DataError("template", f"{template!r} must contain '{{prompt}}' (or be chat / auto)")
    return template


def apply_template(template: str | None, prompt: str) -> str:
    """``template`` with each ``{prompt}`` replaced; the prompt itself if None."""
    return prompt if template is None else template.replace("{prompt}", prompt)


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """``messages`` rendered with the chat template, ending with the assistant's header."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def chat_conversation(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """A whole conversation rendered with the chat template (no generation prompt)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def render_prompt(tokenizer: Any, template: str | None, prompt: str) -> str:
    """The text a model is asked to continue: ``prompt`` under ``template``."""
    template = resolve_template(tokenizer, template)
    if template == CHAT:
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return apply_template(template, prompt)


def render_texts(
    tokenizer: Any, template: str | None, prompt: str, completions: Sequence[str]
) -> tuple[str, list[str], bool]:
    """(prompt text, [prompt text + completion text], conversational).

    Under the chat template each completion is the assistant's reply to ``prompt`` and
    its text is the rendered conversation; ``conversational`` then says that the
    template ends each turn itself (no EOS to append).
    """
    template = resolve_template(tokenizer, template)
    if template != CHAT:
        text = apply_template(template, prompt)
        return text, [text + completion for completion in completions], False
    user = {"role": "user", "content": prompt}
    conversations = [
        chat_conversation(tokenizer, [user, {"role": "assistant", "content": completion}])
        for completion in completions
    ]
    return chat_prompt(tokenizer, [user]), conversations, True


def read_prompts(source: SourceSpec, field: str = "prompt", limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows' ``field`` as {prompt, category} (category "all" if absent)."""
    prompts = []
    for index, row in enumerate(read_rows(source)):
        if limit is not None and index >= limit:
            break
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(source_label(source), "missing or empty", row=index, field=field)
        prompts.append({"prompt": text, "category": str(row.get("category", "all"))})
    if not prompts:
        raise DataError(source_label(source), "no prompts")
    return prompts
