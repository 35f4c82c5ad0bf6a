"""KV-cache generation against an uncached argmax loop, stop strings, padding, sampling,
and sharding on the forced 8-device CPU mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sacpo_jax import parallel
from sacpo_jax.generate import (
    SACPO_STOP_STRINGS,
    GenerationError,
    cut_at_stop,
    generate,
    generate_tokens,
    left_pad,
    next_power_of_two,
    resolve_stop,
    sampling_logprobs,
    stop_token_sequences,
)
from sacpo_jax.models.llama import Llama, tiny_config

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread at home? Mix flour, water and yeast.",
    "User: tell me a story. Assistant: Once upon a time there was a fox.",
    "Safety first: never mix bleach and ammonia.",
] * 20

NEW = 10  # new tokens everywhere, so tests share compiled shapes

PROMPTS = [
    "How do I bake",
    "Tell me about the lazy dog.",
    "Hi",
    "Safety first: never mix",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE that prepends <s> and knows <pad> and </s>."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random LLaMA with std-0.5 matrices (peaked logits) and norms near 1,
    drawn with numpy: eager jax.random init costs seconds of compiles per shape."""
    config = tiny_config(vocab_size=len(tokenizer))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        is_norm = "norm" in parallel.path_name(path)
        return jnp.asarray(1.0 + 0.1 * noise if is_norm else 0.5 * noise)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def full_logits(model, ids, buffer=32):
    """Uncached logits [len(ids), vocab] of one unpadded row (right-filled to a fixed
    buffer so that one compile serves every call; causal attention ignores the fill)."""
    padded = np.zeros((1, buffer), np.int32)
    padded[0, : len(ids)] = ids
    mask = (np.arange(buffer) < len(ids)).astype(np.int32)[None]
    return _forward(*nnx.split(model), padded, mask)[0, : len(ids)]


def reference_greedy(model, prompt_ids, steps, eos_id=None):
    """Argmax decoding that recomputes the full unpadded forward for every token."""
    ids = list(prompt_ids)
    new = []
    for _ in range(steps):
        token = int(jnp.argmax(full_logits(model, ids)[-1]))
        new.append(token)
        ids.append(token)
        if token == eos_id:
            break
    return new


def random_prompts(vocab, seed=0):
    """Four prompts of different lengths (tokens >= 3: never pad, BOS or EOS)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in (9, 4, 1, 6)]


def test_cut_at_stop_by_hand():
    assert cut_at_stop("Sure, here it is.\n\nUser: next", SACPO_STOP_STRINGS) == "Sure, here it is."
    assert cut_at_stop("ok USER: more", SACPO_STOP_STRINGS) == "ok "
    assert cut_at_stop("Bye. END OF CONVERSATION. x", SACPO_STOP_STRINGS) == "Bye. "
    assert cut_at_stop("a\nb\nc", SACPO_STOP_STRINGS) == "a\nb\nc"
    assert cut_at_stop("xx\n\nyy User", ["User", "\n\n"]) == "xx"  # earliest wins
    assert cut_at_stop("Username", ["User"]) == ""
    assert cut_at_stop("abc", []) == "abc"
    assert resolve_stop("sacpo") == SACPO_STOP_STRINGS
    assert resolve_stop(["END"]) == ("END",)
    assert resolve_stop(None) == ()
    with pytest.raises(GenerationError, match="unknown stop preset"):
        resolve_stop("vicuna")


def test_buckets_and_left_padding():
    assert [next_power_of_two(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]
    ids, mask = left_pad([[5, 6], [7, 8, 9]], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])


def test_sampling_logprobs_by_hand():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    one, off = jnp.float32(1.0), jnp.int32(0)
    nucleus = np.exp(sampling_logprobs(logits, one, off, jnp.float32(0.7)))[0]
    np.testing.assert_allclose(nucleus, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    top2 = np.exp(sampling_logprobs(logits, one, jnp.int32(2), jnp.float32(1.0)))[0]
    np.testing.assert_allclose(top2, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    hot = np.exp(sampling_logprobs(logits, jnp.float32(2.0), off, jnp.float32(1.0)))[0]
    np.testing.assert_allclose(hot, np.sqrt(probs) / np.sqrt(probs).sum(), atol=1e-6)
    full = np.exp(sampling_logprobs(logits, one, off, jnp.float32(1.0)))[0]
    np.testing.assert_allclose(full, probs, atol=1e-6)


def test_greedy_with_cache_equals_full_recompute(model):
    prompts = random_prompts(model.config.vocab_size)
    ids, mask = left_pad(prompts, 16, pad_id=0)
    out = generate_tokens(model, ids, mask, max_new_tokens=NEW, eos_id=None, pad_id=0)
    for row, prompt in enumerate(prompts):
        assert np.asarray(out.tokens[row]).tolist() == reference_greedy(model, prompt, NEW)
    assert np.all(np.asarray(out.mask) == 1) and not np.any(np.asarray(out.finished))


def test_eos_stops_rows_and_pads_after(model):
    prompts = random_prompts(model.config.vocab_size)
    free = [reference_greedy(model, p, NEW) for p in prompts]
    eos = free[0][3]  # row 0 emits it at step 3 at the latest
    ids, mask = left_pad(prompts, 16, pad_id=0)
    out = generate_tokens(model, ids, mask, max_new_tokens=NEW, eos_id=eos, pad_id=0)
    for row, tokens in enumerate(free):
        stop = tokens.index(eos) + 1 if eos in tokens else NEW
        assert np.asarray(out.tokens[row]).tolist() == tokens[:stop] + [0] * (NEW - stop)
        assert np.asarray(out.mask[row]).tolist() == [1] * stop + [0] * (NEW - stop)
        assert bool(out.finished[row]) == (eos in tokens)


def test_stop_sequences_end_rows_like_eos(model):
    """A row ends right after the first occurrence of a stop sequence (one or two tokens),
    kept and followed by pads; up to there it is the free run's output."""
    prompts = random_prompts(model.config.vocab_size)
    free = [reference_greedy(model, p, NEW) for p in prompts]
    stops = [(free[0][3],), tuple(free[1][2:4])]
    ids, mask = left_pad(prompts, 16, pad_id=0)
    out = generate_tokens(
        model, ids, mask, max_new_tokens=NEW, eos_id=None, pad_id=0, stop_sequences=stops
    )

    def end_of_first_stop(tokens: list[int]) -> int | None:
        for end in range(1, len(tokens) + 1):
            if any(tuple(tokens[max(0, end - len(s)) : end]) == s for s in stops):
                return end
        return None

    assert end_of_first_stop(free[0]) <= 4 and end_of_first_stop(free[1]) <= 4
    for row, tokens in enumerate(free):
        end = end_of_first_stop(tokens) or NEW
        assert np.asarray(out.tokens[row]).tolist() == tokens[:end] + [0] * (NEW - end)
        assert np.asarray(out.mask[row]).tolist() == [1] * end + [0] * (NEW - end)
        assert bool(out.finished[row]) == (end_of_first_stop(tokens) is not None)


def test_stop_token_sequences_decode_to_their_stop_string(tokenizer):
    stops = ["User:", "\n\n", "END OF CONVERSATION"]
    sequences = stop_token_sequences(tokenizer, stops)
    for sequence in sequences:
        text = tokenizer.decode(list(sequence), skip_special_tokens=True)
        assert any(stop in text for stop in stops), (sequence, text)
    for text in ("Sure. User: next", "a\n\nb", "ok END OF CONVERSATION"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        windows = {tuple(ids[i:j]) for i in range(len(ids)) for j in range(i + 1, len(ids) + 1)}
        assert windows & set(sequences), text  # the early exit fires on this text


def test_sampled_logprobs_are_the_model_logprobs(model):
    """At temperature 1 without filters, the reported log-prob of each sampled token is
    log_softmax of an uncached forward over prompt + sampled tokens."""
    prompts = random_prompts(model.config.vocab_size, seed=1)
    ids, mask = left_pad(prompts, 16, pad_id=0)
    out = generate_tokens(
        model,
        ids,
        mask,
        max_new_tokens=NEW,
        temperature=1.0,
        rng=jax.random.key(3),
        eos_id=None,
        pad_id=0,
    )
    for row, prompt in enumerate(prompts):
        sampled = np.asarray(out.tokens[row]).tolist()
        logits = full_logits(model, prompt + sampled)[len(prompt) - 1 : -1]
        expected = jax.nn.log_softmax(logits)[np.arange(NEW), np.asarray(sampled)]
        np.testing.assert_allclose(out.logprobs[row], expected, atol=1e-4)
    # Row i samples with its own key fold_in(rng, row_ids[i]): reordering rows together
    # with their ids reorders the samples and changes nothing else.
    order = np.array([2, 0, 3, 1])
    shuffled = generate_tokens(
        model,
        ids[order],
        mask[order],
        max_new_tokens=NEW,
        temperature=1.0,
        rng=jax.random.key(3),
        eos_id=None,
        pad_id=0,
        row_ids=order,
    )
    np.testing.assert_array_equal(shuffled.tokens, np.asarray(out.tokens)[order])


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, tokenizer):
    kwargs = dict(max_new_tokens=NEW, temperature=1.5)
    first = generate(model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert generate(model, tokenizer, PROMPTS, seed=7, **kwargs) == first
    assert generate(model, tokenizer, PROMPTS, seed=8, **kwargs) != first
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)
    assert generate(model, tokenizer, PROMPTS, top_k=1, seed=3, **kwargs) == greedy


def test_left_padded_batch_equals_single_unpadded_prompts(model, tokenizer):
    batch = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)
    for prompt, text in zip(PROMPTS, batch):
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id
        new = reference_greedy(model, ids, NEW, eos_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_stop_strings_end_to_end(model, tokenizer):
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)
    row = max(range(len(texts)), key=lambda i: len(texts[i]))
    full = texts[row]
    assert len(full) >= 6
    marker = full[3:5]
    stopped = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, stop=[marker, "\x00never"])
    assert stopped[row] == full[: full.index(marker)]
    assert stopped == [t[: t.index(marker)] if marker in t else t for t in texts]


def test_bad_requests_are_clear_errors(model, tokenizer):
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, top_p=0.0)
    with pytest.raises(GenerationError, match="prompt 1"):
        generate(model, tokenizer, ["ok", 3], max_new_tokens=4)
    with pytest.raises(GenerationError, match="left-padded"):
        generate_tokens(model, [[5, 0]], [[1, 0]], max_new_tokens=2, eos_id=None, pad_id=0)


def test_sharded_equals_unsharded(model):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, parallel.param_shardings(state, mesh)))
    ids, mask = left_pad(random_prompts(model.config.vocab_size, seed=2), 16, pad_id=0)
    # Sampled only: greedy runs the same sharded forward, and an 8-device compile costs
    # ~10 s on a busy 2-core machine.
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, eos_id=2, pad_id=0)
    plain = generate_tokens(model, ids, mask, **kwargs)
    spread = generate_tokens(sharded, ids, mask, mesh=mesh, **kwargs)
    assert spread.tokens.sharding.spec[0] == parallel.BATCH_AXES
    np.testing.assert_array_equal(np.asarray(spread.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(spread.logprobs, plain.logprobs, atol=1e-4)
