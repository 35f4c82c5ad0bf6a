"""Adapters: one raw row -> examples (a prompt, its completions, per-example scalars).

An adapter knows one row layout; the config picks it by name. Each returns a
list of `Example`s (PKU rows give two unpaired examples for KTO) or raises
`BadRow` naming the field and the problem.

Layouts (field names; ``DataSpec.columns`` can rename them):

- ``pku_*``: PKU-SafeRLHF, both the 30K and the v1.0 column sets: prompt,
  response_0, response_1, better_response_id, safer_response_id,
  is_response_0_safe, is_response_1_safe (other columns are ignored).
  - ``pku_helpful``: pair, chosen = response[better_response_id].
  - ``pku_harmless``: pair, chosen = response[safer_response_id]; refuses the
    contradictory row whose "safer" response is labelled unsafe while the
    other is safe.
  - ``pku_kto_safety``: two unpaired examples, label = is_response_i_safe.
  - ``pku_kto_helpful``: two unpaired examples, label = (i == better_response_id).
  - ``pku_reward``: score pair, chosen = better, rejected = worse, signs 0.
  - ``pku_cost``: score pair, chosen = safer, rejected = unsafer, with signs
    s = +1 unsafe, -1 safe (contradictory rows refused as for pku_harmless).
  - ``pku_safedpo``: SafeDPO's pairs (Kim et al. 2025): the helpfulness pair
    (chosen = better) reordered by the safety labels, with columns chosen_unsafe,
    rejected_unsafe (1 = unsafe). better safe: kept; better unsafe and the other
    safe: swapped, so the safe answer is chosen; both unsafe: dropped (counted as
    ``both_unsafe`` in the skip report). So the chosen answer is always safe.
- ``hh_rlhf``: Anthropic HH-RLHF, chosen and rejected whole transcripts; the
  prompt is their common prefix cut back to the end of its last
  "\\n\\nAssistant:"; each completion is the rest of its transcript.
- ``pair``: {prompt, chosen, rejected}, optionally ``label_smoothing``: a per-pair
  probability in [0, 0.5] that the label is flipped (cDPO's eps for this pair; 0.5 is a
  tie), stored as the column ``label_smoothing``, which replaces the stage's scalar.
- ``unpaired``: {prompt, completion, label}; label a bool or 0/1 (1 = desirable).
- ``sft``: {prompt, response}.
- ``chat_sft``: {messages: [{role, content}, ...]}, the last message the
  assistant's; rendered with the tokenizer's chat template.
- ``chat_pair``: {chosen: [messages], rejected: [messages]} whole
  conversations sharing their leading messages (the prompt), or
  {prompt: [messages], chosen: [messages], rejected: [messages]}.
  Chat adapters are *conversational* (TRL's convention): the prompt is the rendered
  prompt messages with the generation prompt, a completion is what the rendered whole
  conversation adds to it (the template's end of turn included, e.g. ``<|im_end|>\n``
  or ``<|eot_id|>``), and tokenisation adds neither BOS nor EOS to the template's text.
- ``scored_pair``: two responses with per-response scores, for
  pseudo-labelling: {prompt, response_0, response_1, scores_0: {name: float},
  scores_1: {name: float}}, or flat columns ``<name>_0``, ``<name>_1`` for each
  name in ``DataSpec.score_names``. Stored as a pair with chosen = response_0
  and rejected = response_1 (an order, not a preference) and float columns
  ``score_0_<name>``, ``score_1_<name>``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sacpo_jax.data import errors
from sacpo_jax.data.errors import BadRow, DroppedRow
from sacpo_jax.data.prompts import PKU_TEMPLATE, chat_conversation, chat_prompt

HH_ASSISTANT = "\n\nAssistant:"

# Kinds of examples, and so of batches.
PAIR = "pair"
UNPAIRED = "unpaired"
SFT = "sft"
SCORE_PAIR = "score_pair"


@dataclass(frozen=True)
class Example:
    """A prompt and its completions (pair: chosen, rejected) plus scalar columns."""

    prompt: str
    completions: tuple[str, ...]
    columns: dict[str, float | int] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterContext:
    """What an adapter may consult besides the row."""

    columns: Mapping[str, str] = field(default_factory=dict)
    score_names: tuple[str, ...] | None = None
    tokenizer: Any = None


@dataclass(frozen=True)
class Adapter:
    """A row layout: the kind of examples it makes, its default template, its converter.

    ``conversational``: examples are texts rendered by the tokenizer's chat template
    (which the tokenizer must have), tokenised as the template renders them.
    ``safety_labels``: its pairs carry ``chosen_unsafe`` / ``rejected_unsafe`` columns.
    """

    kind: str
    convert: Callable[[Mapping[str, Any], AdapterContext], list[Example]]
    default_template: str | None = None
    conversational: bool = False
    safety_labels: bool = False  # pairs carry chosen_unsafe / rejected_unsafe (SafeDPO)


# ---------------------------------------------------------------- field readers


def _get(row: Mapping[str, Any], ctx: AdapterContext, name: str) -> Any:
    value = row.get(ctx.columns.get(name, name))
    if value is None:
        raise BadRow(name, errors.MISSING_FIELD, "missing")
    return value


def _text(row: Mapping[str, Any], ctx: AdapterContext, name: str) -> str:
    value = _get(row, ctx, name)
    _check_text(value, name)
    return value


def _check_text(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise BadRow(name, errors.WRONG_TYPE, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(name, errors.EMPTY_STRING, "empty string")


def _binary(row: Mapping[str, Any], ctx: AdapterContext, name: str, *, allow_bool: bool) -> int:
    """An int in {0, 1} (or a bool where allowed)."""
    value = _get(row, ctx, name)
    if isinstance(value, bool):
        if allow_bool:
            return int(value)
        raise BadRow(name, errors.WRONG_TYPE, "expected 0 or 1, got a bool")
    if not isinstance(value, int):
        raise BadRow(name, errors.WRONG_TYPE, f"expected 0 or 1, got {type(value).__name__}")
    if value not in (0, 1):
        raise BadRow(name, errors.INVALID_ID, f"expected 0 or 1, got {value}")
    return value


def _flag(row: Mapping[str, Any], ctx: AdapterContext, name: str) -> bool:
    value = _get(row, ctx, name)
    if not isinstance(value, bool):
        raise BadRow(name, errors.WRONG_TYPE, f"expected a bool, got {type(value).__name__}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRow(name, errors.WRONG_TYPE, f"expected a finite number, got {value!r}")
    return float(value)


def _distinct(first: str, second: str, name: str) -> None:
    if first == second:
        raise BadRow(name, errors.IDENTICAL_RESPONSES, "the two responses are identical")


# ---------------------------------------------------------------- PKU-SafeRLHF


def _prompt_and_responses(row: Mapping[str, Any], ctx: AdapterContext) -> tuple[str, str, str]:
    prompt = _text(row, ctx, "prompt")
    first, second = _text(row, ctx, "response_0"), _text(row, ctx, "response_1")
    return prompt, first, second


def _pku_safety(row: Mapping[str, Any], ctx: AdapterContext) -> tuple[int, tuple[bool, bool]]:
    """safer_response_id and (is_response_0_safe, is_response_1_safe); refuses contradictions."""
    safer = _binary(row, ctx, "safer_response_id", allow_bool=False)
    safe = (_flag(row, ctx, "is_response_0_safe"), _flag(row, ctx, "is_response_1_safe"))
    if safe[1 - safer] and not safe[safer]:
        raise BadRow(
            "safer_response_id",
            errors.CONTRADICTORY_SAFETY,
            f"response_{safer} is marked safer but labelled unsafe while the other is safe",
        )
    return safer, safe


def _pku_helpful(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    better = _binary(row, ctx, "better_response_id", allow_bool=False)
    return [Example(prompt, (responses[better], responses[1 - better]))]


def _pku_harmless(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    safer, _ = _pku_safety(row, ctx)
    return [Example(prompt, (responses[safer], responses[1 - safer]))]


def _pku_kto_safety(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    safe = (_flag(row, ctx, "is_response_0_safe"), _flag(row, ctx, "is_response_1_safe"))
    return [Example(prompt, (responses[i],), {"label": int(safe[i])}) for i in (0, 1)]


def _pku_kto_helpful(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    better = _binary(row, ctx, "better_response_id", allow_bool=False)
    return [Example(prompt, (responses[i],), {"label": int(i == better)}) for i in (0, 1)]


def _pku_reward(row, ctx):
    (example,) = _pku_helpful(row, ctx)
    return [Example(example.prompt, example.completions, {"chosen_sign": 0, "rejected_sign": 0})]


def _pku_cost(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    safer, safe = _pku_safety(row, ctx)
    unsafer = 1 - safer
    signs = {"chosen_sign": -1 if safe[safer] else 1, "rejected_sign": -1 if safe[unsafer] else 1}
    return [Example(prompt, (responses[safer], responses[unsafer]), signs)]


def _pku_safedpo(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    better = _binary(row, ctx, "better_response_id", allow_bool=False)
    safe = (_flag(row, ctx, "is_response_0_safe"), _flag(row, ctx, "is_response_1_safe"))
    if not (safe[0] or safe[1]):
        raise DroppedRow(errors.BOTH_UNSAFE)
    chosen = better if safe[better] else 1 - better
    rejected = 1 - chosen
    unsafe = {"chosen_unsafe": 0, "rejected_unsafe": int(not safe[rejected])}
    return [Example(prompt, (responses[chosen], responses[rejected]), unsafe)]


# ---------------------------------------------------------------- HH-RLHF


def _hh_rlhf(row, ctx):
    chosen, rejected = _text(row, ctx, "chosen"), _text(row, ctx, "rejected")
    _distinct(chosen, rejected, "rejected")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("chosen", errors.MALFORMED, "no shared Assistant turn in the transcripts")
    prompt = common[: cut + len(HH_ASSISTANT)]
    completions = (chosen[len(prompt) :], rejected[len(prompt) :])
    for name, text in zip(("chosen", "rejected"), completions, strict=True):
        _check_text(text, name)
    return [Example(prompt, completions)]


# ---------------------------------------------------------------- generic layouts


LABEL_SMOOTHING = "label_smoothing"


def _pair(row, ctx):
    prompt = _text(row, ctx, "prompt")
    chosen, rejected = _text(row, ctx, "chosen"), _text(row, ctx, "rejected")
    _distinct(chosen, rejected, "rejected")
    columns = {}
    if ctx.columns.get(LABEL_SMOOTHING, LABEL_SMOOTHING) in row:
        eps = _number(_get(row, ctx, LABEL_SMOOTHING), LABEL_SMOOTHING)
        if not 0.0 <= eps <= 0.5:
            raise BadRow(
                LABEL_SMOOTHING, errors.WRONG_TYPE, f"expected a number in [0, 0.5], got {eps}"
            )
        columns[LABEL_SMOOTHING] = eps
    return [Example(prompt, (chosen, rejected), columns)]


def _unpaired(row, ctx):
    prompt, completion = _text(row, ctx, "prompt"), _text(row, ctx, "completion")
    label = _binary(row, ctx, "label", allow_bool=True)
    return [Example(prompt, (completion,), {"label": label})]


def _sft(row, ctx):
    return [Example(_text(row, ctx, "prompt"), (_text(row, ctx, "response"),))]


def _scored_pair(row, ctx):
    prompt, *responses = _prompt_and_responses(row, ctx)
    _distinct(*responses, "response_1")
    columns = {}
    for i in (0, 1):
        for name, value in _scores(row, ctx, i).items():
            columns[f"score_{i}_{name}"] = value
    return [Example(prompt, tuple(responses), columns)]


def _scores(row: Mapping[str, Any], ctx: AdapterContext, i: int) -> dict[str, float]:
    if ctx.score_names is not None:
        return {n: _number(_get(row, ctx, f"{n}_{i}"), f"{n}_{i}") for n in ctx.score_names}
    scores = _get(row, ctx, f"scores_{i}")
    if not isinstance(scores, Mapping) or not scores:
        raise BadRow(f"scores_{i}", errors.WRONG_TYPE, "expected a non-empty {name: number} dict")
    return {str(n): _number(v, f"scores_{i}.{n}") for n, v in sorted(scores.items())}


# ---------------------------------------------------------------- chat messages


def _messages(row: Mapping[str, Any], ctx: AdapterContext, name: str) -> list[dict[str, str]]:
    value = _get(row, ctx, name)
    if not isinstance(value, list) or not value:
        raise BadRow(name, errors.WRONG_TYPE, "expected a non-empty list of messages")
    for message in value:
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRow(name, errors.WRONG_TYPE, "each message needs string 'role' and 'content'")
        if not message["content"].strip():
            raise BadRow(name, errors.EMPTY_STRING, "a message has empty content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render_split(tokenizer, prompt_messages, messages, name: str) -> tuple[str, str]:
    """(prompt text, completion text): the prompt rendered with a generation prompt,
    the completion the rest of the rendered whole conversation."""
    if len(messages) <= len(prompt_messages) or messages[len(prompt_messages)]["role"] != (
        "assistant"
    ):
        raise BadRow(name, errors.MALFORMED, "the completion must start with an assistant message")
    prompt = chat_prompt(tokenizer, prompt_messages)
    full = chat_conversation(tokenizer, messages)
    if not full.startswith(prompt):
        raise BadRow(name, errors.MALFORMED, "the chat template does not extend the prompt")
    completion = full[len(prompt) :]
    _check_text(completion, name)
    return prompt, completion


def _chat_sft(row, ctx):
    messages = _messages(row, ctx, "messages")
    prompt, completion = _render_split(ctx.tokenizer, messages[:-1], messages, "messages")
    return [Example(prompt, (completion,))]


def _chat_pair(row, ctx):
    chosen, rejected = _messages(row, ctx, "chosen"), _messages(row, ctx, "rejected")
    if ctx.columns.get("prompt", "prompt") in row:
        prompt_messages = _messages(row, ctx, "prompt")
        chosen, rejected = prompt_messages + chosen, prompt_messages + rejected
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt_messages = chosen[:shared]
    if chosen == rejected:
        raise BadRow("rejected", errors.IDENTICAL_RESPONSES, "the two responses are identical")
    prompt, chosen_text = _render_split(ctx.tokenizer, prompt_messages, chosen, "chosen")
    _, rejected_text = _render_split(ctx.tokenizer, prompt_messages, rejected, "rejected")
    return [Example(prompt, (chosen_text, rejected_text))]


ADAPTERS: dict[str, Adapter] = {
    "pku_helpful": Adapter(PAIR, _pku_helpful, PKU_TEMPLATE),
    "pku_harmless": Adapter(PAIR, _pku_harmless, PKU_TEMPLATE),
    "pku_kto_safety": Adapter(UNPAIRED, _pku_kto_safety, PKU_TEMPLATE),
    "pku_kto_helpful": Adapter(UNPAIRED, _pku_kto_helpful, PKU_TEMPLATE),
    "pku_reward": Adapter(SCORE_PAIR, _pku_reward, PKU_TEMPLATE),
    "pku_cost": Adapter(SCORE_PAIR, _pku_cost, PKU_TEMPLATE),
    "pku_safedpo": Adapter(PAIR, _pku_safedpo, PKU_TEMPLATE, safety_labels=True),
    "hh_rlhf": Adapter(PAIR, _hh_rlhf),
    "pair": Adapter(PAIR, _pair),
    "unpaired": Adapter(UNPAIRED, _unpaired),
    "sft": Adapter(SFT, _sft),
    "chat_sft": Adapter(SFT, _chat_sft, conversational=True),
    "chat_pair": Adapter(PAIR, _chat_pair, conversational=True),
    "scored_pair": Adapter(PAIR, _scored_pair),
}
