"""Batched text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

One compiled function does the whole generation of a batch: a prefill forward over the
(left-padded) prompts fills the key/value cache, then a ``jax.lax.while_loop`` feeds one
token per step until ``max_new_tokens`` or until every row has emitted EOS or a stop
sequence (the token ids of a stop string, see ``stop_token_sequences``). Prompts are
padded to a power-of-two length bucket and batches to a power-of-two row bucket, so a
run compiles once per (rows, prompt length, max_new_tokens, greedy or sampled).

Cache layout: slots ``0..P-1`` hold the prompt (pads included, masked out), slot
``P + t`` holds generated token ``t``. A query at slot ``s`` may attend to key slot
``j`` iff ``j <= s`` and slot ``j`` holds a real token. Positions come from the mask, so
a row with ``n`` real prompt tokens gives them positions ``0..n-1`` and its ``t``-th
generated token position ``n + t``, as if the row were unpadded.

Sampling (temperature > 0) follows the usual order: logits / temperature, keep the
``top_k`` largest (0 = all), then the smallest set of most likely tokens whose
probability reaches ``top_p`` (1.0 = all), renormalise, draw. Each row draws from its
own key ``fold_in(fold_in(rng, row_id), step)``, so a prompt's sample does not depend on
which batch, bucket or device it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sacpo_jax import parallel
from sacpo_jax.data.prompts import AUTO, CHAT, resolve_template
from sacpo_jax.data.tokenize import default_bos_id, encode_prompt
from sacpo_jax.errors import SacpoError
from sacpo_jax.models.llama import (
    AttentionMask,
    Llama,
    positions_from_mask,
    rms_norm,
    run_layers,
)
from sacpo_jax.usage import add_generated_tokens

# Stop strings of the SACPO paper's evaluation (Wachi et al., 2024, appendix).
SACPO_STOP_STRINGS = (
    "User",
    "User:",
    "USER",
    "USER:",
    "END OF CONVERSATION",
    "END OF CONVERSATION.",
    "\n\n",
)
STOP_PRESETS = {"sacpo": SACPO_STOP_STRINGS}

MIN_PROMPT_BUCKET = 16
NEG_INF = jnp.finfo(jnp.float32).min


class GenerationError(SacpoError, ValueError):
    """Invalid generation request (arguments, prompts or model)."""


class GeneratedTokens(NamedTuple):
    """Output of ``generate_tokens``; all arrays have ``max_new_tokens`` columns.

    tokens:   [b, T] int32, the new tokens; EOS (or a stop sequence) is kept, positions
              after it hold pad_id.
    logprobs: [b, T] float32, log-probability of each token under the distribution it
              was drawn from (after temperature / top-k / top-p); 0 for greedy and pads.
    mask:     [b, T] int32, 1 for emitted tokens (EOS included), 0 for pads after EOS.
    finished: [b] bool, True where the row emitted EOS or a stop sequence.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    finished: jax.Array


# ----------------------------------------------------------------------------- stop strings


def resolve_stop(stop: str | Sequence[str] | None, template: str | None = None) -> tuple[str, ...]:
    """Stop strings from a preset name ("sacpo"), a list of strings, None (none) or "auto":
    none under the chat template (the model ends its turn with an EOS id), else "sacpo"."""
    if stop is None:
        return ()
    if stop == AUTO:
        return () if template == CHAT else SACPO_STOP_STRINGS
    if isinstance(stop, str):
        if stop not in STOP_PRESETS:
            raise GenerationError(
                f"unknown stop preset {stop!r}; presets: {', '.join(STOP_PRESETS)}, auto "
                "(or pass a list of strings)"
            )
        return STOP_PRESETS[stop]
    strings = tuple(stop)
    if not all(isinstance(s, str) and s for s in strings):
        raise GenerationError(f"stop must be a list of non-empty strings, got {stop!r}")
    return strings


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


STOP_CONTEXTS = ("", " ", "\n", "a", "a ", ".")  # text a stop string may follow


def stop_token_sequences(tokenizer: Any, stop_strings: Sequence[str]) -> list[tuple[int, ...]]:
    """Token ids that end generation early: for each stop string s and each context c in
    STOP_CONTEXTS, the shortest tail of encode(c + s) whose decoding contains s.

    Only an early exit: any text generated after s is cut off by ``cut_at_stop`` anyway,
    and every sequence kept decodes to text containing s, so stopping on it changes no
    output. A stop string tokenised another way is still cut after decoding.
    """
    sequences: set[tuple[int, ...]] = set()
    for stop in stop_strings:
        for context in STOP_CONTEXTS:
            ids = list(tokenizer(context + stop, add_special_tokens=False).input_ids)
            for start in range(len(ids) - 1, -1, -1):
                if stop in tokenizer.decode(ids[start:], skip_special_tokens=True):
                    sequences.add(tuple(ids[start:]))
                    break
    return sorted(sequences)


def stop_sequence_array(sequences: Sequence[Sequence[int]]) -> jax.Array:
    """[S, L] int32, each sequence right-aligned, -1 (matches anything) on its left;
    one never-matching row (-2) when there are none."""
    if not sequences:
        return jnp.full((1, 1), -2, jnp.int32)
    width = max(len(sequence) for sequence in sequences)
    array = np.full((len(sequences), width), -1, np.int32)
    for row, sequence in enumerate(sequences):
        array[row, width - len(sequence) :] = sequence
    return jnp.asarray(array)


def ends_with_stop(recent: jax.Array, stops: jax.Array) -> jax.Array:
    """[b] bool: the last L tokens [b, L] of a row end with one of the stops [S, L]."""
    match = (recent[:, None, :] == stops[None]) | (stops[None] == -1)
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


# ----------------------------------------------------------------------------- sampling


def sampling_logprobs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Log-probs [b, vocab] of the sampling distribution; -inf-ish outside the kept set.

    z = logits / temperature; top-k keeps z >= the k-th largest z (ties may keep more);
    top-p keeps the sorted tokens whose exclusive cumulative probability is < top_p
    (always at least the most likely one); log_softmax over the kept tokens.
    """
    z = logits.astype(jnp.float32) / temperature
    descending = -jnp.sort(-z, axis=-1)
    vocab = z.shape[-1]
    kth = jnp.take(descending, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
    z = jnp.where((top_k > 0) & (z < kth), NEG_INF, z)
    descending = jnp.where((top_k > 0) & (descending < kth), NEG_INF, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    exclusive_cumsum = jnp.cumsum(probs, axis=-1) - probs
    kept = (exclusive_cumsum < top_p) | (top_p >= 1.0)
    smallest_kept = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    z = jnp.where(z < smallest_kept, NEG_INF, z)
    return jax.nn.log_softmax(z, axis=-1)


def choose_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    greedy: bool,
) -> tuple[jax.Array, jax.Array]:
    """(token [b], log-prob [b]) from last-position logits [b, vocab]; one key per row."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1])
    logprobs = sampling_logprobs(logits, temperature, top_k, top_p)
    tokens = jax.vmap(jax.random.categorical)(keys, logprobs).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- cached forward


def cached_forward(
    model: Llama,
    input_ids: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array,
    caches: tuple[jax.Array, jax.Array],
    first_slot: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Run ``input_ids`` [b, q] stored at cache slots first_slot.. ; logits of the last one.

    Returns (logits [b, vocab] float32 at the last query, updated caches).
    """
    config = model.config
    x = model.embed[...][input_ids].astype(jnp.dtype(config.dtype))
    mask = AttentionMask(key_mask, query_offset=first_slot)
    x, caches = run_layers(model.layer_weights(), x, positions, mask, config, caches, first_slot)
    hidden = rms_norm(x[:, -1:], model.final_norm[...], config.rms_norm_eps)
    return model.logits_from_hidden(hidden)[:, 0], caches


def empty_caches(model: Llama, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
    """Zero keys and values [layers, batch, max_len, kv_heads, head_dim] in compute dtype."""
    c = model.config
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
    return zeros, zeros


class _LoopState(NamedTuple):
    step: jax.Array
    caches: tuple[jax.Array, jax.Array]
    key_mask: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    finished: jax.Array
    recent: jax.Array  # [b, L] the last L tokens, for stop sequences


def data_parallel_size(mesh: Mesh) -> int:
    """Number of row shards: the product of the mesh's batch axes."""
    return math.prod(mesh.shape[axis] for axis in parallel.BATCH_AXES)


def _split_rows(mesh: Mesh | None, state: _LoopState) -> _LoopState:
    """Constrain the loop state's rows to the batch axes (cache rows are dim 1)."""
    if mesh is None:
        return state
    free = PartitionSpec.UNCONSTRAINED
    cache_rows = NamedSharding(mesh, PartitionSpec(free, parallel.BATCH_AXES, free, free, free))

    def rows(x):
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))

    return state._replace(
        caches=jax.lax.with_sharding_constraint(state.caches, cache_rows),
        key_mask=rows(state.key_mask),
        tokens=rows(state.tokens),
        logprobs=rows(state.logprobs),
        mask=rows(state.mask),
        finished=rows(state.finished),
        recent=rows(state.recent),
    )


def _decode(
    graphdef: Any,
    state: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    row_key_data: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    eos_ids: jax.Array,
    stops: jax.Array,
    pad_id: jax.Array,
    max_new_tokens: int,
    greedy: bool,
    row_mesh: Mesh | None,
    key_impl: str,
) -> GeneratedTokens:
    """Prefill, then one cached step per new token until done; see the module docstring.

    row_key_data: [b, ...] raw data of each row's key (of PRNG implementation
    ``key_impl``). row_mesh: when given, every per-row array (caches included) stays split
    over its batch axes through the loop.
    """
    model = nnx.merge(graphdef, state)
    row_keys = jax.random.wrap_key_data(row_key_data, impl=key_impl)
    batch, prompt_len = input_ids.shape
    real_lengths = jnp.sum(attention_mask, axis=-1)
    key_mask = jnp.concatenate(
        [attention_mask, jnp.zeros((batch, max_new_tokens), attention_mask.dtype)], axis=-1
    )
    caches = empty_caches(model, batch, prompt_len + max_new_tokens)

    def choose(logits, step):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        return choose_tokens(logits, keys, temperature, top_k, top_p, greedy)

    logits, caches = cached_forward(
        model, input_ids, positions_from_mask(attention_mask), key_mask, caches, 0
    )
    token, logprob = choose(logits, 0)
    new = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    recent = jnp.full((batch, stops.shape[1]), -2, jnp.int32).at[:, -1].set(token)
    init = _split_rows(
        row_mesh,
        _LoopState(
            step=jnp.int32(1),
            caches=caches,
            key_mask=key_mask,
            tokens=new.at[:, 0].set(token),
            logprobs=jnp.zeros((batch, max_new_tokens)).at[:, 0].set(logprob),
            mask=jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(1),
            finished=jnp.isin(token, eos_ids) | ends_with_stop(recent, stops),
            recent=recent,
        ),
    )

    def keep_going(s: _LoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.finished)

    def step(s: _LoopState) -> _LoopState:
        slot = prompt_len + s.step - 1
        previous = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            s.key_mask, jnp.ones((batch, 1), s.key_mask.dtype), slot, axis=1
        )
        positions = (real_lengths + s.step - 1)[:, None]
        logits, caches = cached_forward(model, previous, positions, key_mask, s.caches, slot)
        token, logprob = choose(logits, s.step)
        token = jnp.where(s.finished, pad_id, token)
        logprob = jnp.where(s.finished, 0.0, logprob)

        def put(buffer, column):
            return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], s.step, axis=1)

        recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
        stopped = jnp.isin(token, eos_ids) | ends_with_stop(recent, stops)

        return _split_rows(
            row_mesh,
            _LoopState(
                step=s.step + 1,
                caches=caches,
                key_mask=key_mask,
                tokens=put(s.tokens, token),
                logprobs=put(s.logprobs, logprob),
                mask=put(s.mask, (~s.finished).astype(jnp.int32)),
                finished=s.finished | stopped,
                recent=recent,
            ),
        )

    out = jax.lax.while_loop(keep_going, step, init)
    return GeneratedTokens(out.tokens, out.logprobs, out.mask, out.finished)


_decode_jit = jax.jit(
    _decode, static_argnames=("graphdef", "max_new_tokens", "greedy", "row_mesh", "key_impl")
)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise GenerationError for out-of-range sampling settings."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")


def place_batch(arrays: Sequence[np.ndarray], mesh: Mesh | None, split: bool) -> list[jax.Array]:
    """Host arrays (the same on every process) onto the mesh: rows split over its batch
    axes when ``split``, else replicated. Each process fills only its own devices, so
    this also works when the mesh spans several processes."""
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    placed = []
    for host in arrays:
        sharding = parallel.batch_sharding(mesh) if split else parallel.replicated(mesh)
        placed.append(
            jax.make_array_from_callback(host.shape, sharding, lambda index, a=host: a[index])
        )
    return placed


def generate_tokens(
    model: Llama,
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    stop_sequences: Sequence[Sequence[int]] = (),
    row_ids: jax.Array | np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> GeneratedTokens:
    """New tokens for a LEFT-padded batch [b, P]; greedy when temperature == 0.

    rng: a jax.random key (default key(0)); row i samples with fold_in(rng, row_ids[i])
    (row_ids default 0..b-1). eos_id: one id, several, or None (never stops early).
    stop_sequences: token-id sequences that also end a row (kept, like EOS).
    mesh: place the batch over its (data, fsdp) axes; the model's parameters stay where
    they are. Compiles once per (b, P, max_new_tokens, greedy).
    """
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    if model.config.score_model:
        raise GenerationError("generate needs a causal LM, got a score model")
    mask = np.asarray(attention_mask, np.int32)
    if mask.ndim != 2 or not (np.all(np.diff(mask, axis=-1) >= 0) and np.all(mask[:, -1] == 1)):
        raise GenerationError(
            "attention_mask must be [batch, length], left-padded, with a real last token per row"
        )
    batch = mask.shape[0]
    row_ids = np.arange(batch) if row_ids is None else row_ids
    rng = jax.random.key(0) if rng is None else rng
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(row_ids))
    eos_ids = jnp.asarray([-1] if eos_id is None else np.atleast_1d(eos_id), jnp.int32)
    split = mesh is not None and batch % data_parallel_size(mesh) == 0
    input_ids, mask, row_key_data = place_batch(
        [
            np.asarray(input_ids, np.int32),
            np.asarray(mask),
            np.asarray(jax.random.key_data(row_keys)),
        ],
        mesh,
        split,
    )
    graphdef, state = nnx.split(model)
    return _decode_jit(
        graphdef,
        state,
        input_ids,
        mask,
        row_key_data,
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(top_k),
        jnp.float32(top_p),
        eos_ids,
        stop_sequence_array(stop_sequences),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        row_mesh=mesh if split else None,
        key_impl=str(jax.random.key_impl(rng)),
    )


# ----------------------------------------------------------------------------- text API


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [len(sequences), length], each sequence right-aligned after pads."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence) :] = sequence
            mask[row, length - len(sequence) :] = 1
    return ids, mask


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], template: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt under ``template``, exactly as training and scoring
    tokenise prompts (`encode_prompt`: one BOS, never two)."""
    bos_id = default_bos_id(tokenizer)
    encoded = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt {index}: expected a string, got {type(prompt).__name__}")
        ids = encode_prompt(tokenizer, prompt, template, bos_id=bos_id)
        if not ids:
            raise GenerationError(f"prompt {index}: tokenises to no tokens (empty prompt?)")
        encoded.append(ids)
    return encoded


def eos_token_ids(model: Llama, tokenizer: Any) -> list[int]:
    """Ids that end a row: the tokenizer's EOS and every ``eos_token_id`` of the model's
    generation_config.json (chat models list their end-of-turn there)."""
    listed = model.config.generation_config.get("eos_token_id")
    ids = [tokenizer.eos_token_id] + list(np.atleast_1d(listed if listed is not None else []))
    return sorted({int(i) for i in ids if i is not None})


def row_bucket(rows: int, batch_size: int, mesh: Mesh | None) -> int:
    """Rows to compile for: next power of two, at most batch_size, a multiple of the
    mesh's data-parallel size."""
    bucket = min(next_power_of_two(rows), batch_size)
    if mesh is not None:
        shards = data_parallel_size(mesh)
        bucket = -(-bucket // shards) * shards
    return bucket


def generate(
    model: Llama,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    template: str | None = None,
    stop: str | Sequence[str] | None = None,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> list[str]:
    """Completions of ``prompts`` under ``template`` (`sacpo_jax.data.prompts`: None for
    prompts as they are, a ``{prompt}`` string, "chat" or "auto"), in order.

    Prompts are sorted by length, cut into batches of at most ``batch_size``, left-padded
    to a power-of-two length (>= 16) and a power-of-two row count (filled with copies
    whose output is dropped). A row stops at any EOS id (`eos_token_ids`) or at a stop
    string's tokens (``stop_token_sequences``); each completion is decoded with special
    tokens skipped and cut before the first stop string; ``stop="sacpo"`` is the paper's
    list, ``stop="auto"`` none under the chat template and the paper's list otherwise.
    """
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    template = resolve_template(tokenizer, template)
    stop_strings = resolve_stop(stop, template)
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    encoded = tokenize_prompts(tokenizer, prompts, template)
    eos_ids = eos_token_ids(model, tokenizer)
    stop_sequences = stop_token_sequences(tokenizer, stop_strings)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = chunk + [chunk[-1]] * (row_bucket(len(chunk), batch_size, mesh) - len(chunk))
        length = next_power_of_two(max(len(encoded[i]) for i in rows), MIN_PROMPT_BUCKET)
        ids, mask = left_pad([encoded[i] for i in rows], length, pad_id)
        out = generate_tokens(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            rng=jax.random.key(seed),
            eos_id=eos_ids or None,
            pad_id=pad_id,
            stop_sequences=stop_sequences,
            row_ids=np.asarray(rows),
            mesh=mesh,
        )
        tokens = parallel.to_host(out.tokens)
        emitted = parallel.to_host(out.mask).astype(bool)
        add_generated_tokens(emitted[: len(chunk)].sum())
        for row, prompt_index in enumerate(chunk):
            text = tokenizer.decode(tokens[row][emitted[row]].tolist(), skip_special_tokens=True)
            texts[prompt_index] = cut_at_stop(text, stop_strings)
    return texts
