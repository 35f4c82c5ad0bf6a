"""Padding-free packing against the unpacked computation it replaces.

Truth: the unpacked batch of the same examples (one sequence per right-padded row, whose
log-probs tests/test_chunked_logprobs.py and tests/test_llama_parity.py check against
full logits and transformers), and hand-written masks, positions and layouts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sacpo_jax import parallel
from sacpo_jax.data.dataset import Ragged, TokenizedDataset
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.packing import (
    computed_tokens,
    deal,
    first_fit_decreasing,
    real_tokens,
    round_length,
    row_length,
)
from sacpo_jax.logprobs import pair_logps
from sacpo_jax.models.llama import (
    AttentionMask,
    Llama,
    attend,
    fused_attention,
    positions_from_segments,
    tiny_config,
)
from sacpo_jax.training import objectives

VOCAB = 97


def random_dataset(kind: str, n: int = 24, seed: int = 0) -> TokenizedDataset:
    """Prompts of 0-11 tokens (an empty one: a completion that starts its segment) and
    completions of 1-29, with a float column."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, rng.integers(0, 12)) for _ in range(n)]
    prompts[0] = prompts[0][:0]
    completions = tuple(
        Ragged.from_rows([rng.integers(3, VOCAB, rng.integers(1, 30)) for _ in range(n)])
        for _ in range(2 if kind == "pair" else 1)
    )
    columns = {"margin": rng.normal(size=n)}
    return TokenizedDataset(kind, Ragged.from_rows(prompts), completions, columns)


def random_model(**overrides) -> Llama:
    # attention_block 48: packed rows of 128 or 256 tokens take several query blocks,
    # the last one padded; init_std 0.3: log-probs far from flat.
    config = tiny_config(vocab_size=VOCAB, attention_block=48, **overrides)
    return Llama(config, rngs=nnx.Rngs(0), init_std=0.3)


def batches(dataset, step: int = 0, **options) -> tuple[dict, dict]:
    """(packed, unpacked) batch of the same examples at ``step``."""
    settings = {"global_batch_size": 8, "buckets": (48,), "pad_id": 0, "seed": 1, **options}
    packed = BatchLoader(dataset, packing=True, **settings).batch(step)
    unpacked = BatchLoader(dataset, **settings).batch(step)
    return jax.tree.map(jnp.asarray, packed), jax.tree.map(jnp.asarray, unpacked)


# ----------------------------------------------------------------------------- log-probs


def test_packed_logps_and_gradients_equal_unpacked():
    packed, unpacked = batches(random_dataset("pair"))
    assert packed["input_ids"].shape[0] < 16  # fewer rows than the 16 unpacked sequences
    graphdef, params = nnx.split(random_model())

    def objective(params, batch):
        out = pair_logps(nnx.merge(graphdef, params), batch)
        values = [out[name] for name in ("chosen_logps", "rejected_logps", "chosen_logits")]
        values.append(out["rejected_lengths"])
        # Distinct weights per example, so that every output's gradient counts.
        weights = jnp.arange(1.0, 9.0)
        return sum(jnp.sum(v * weights * (i + 1)) for i, v in enumerate(values)), values

    value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (_, ours), grads = value_and_grad(params, packed)
    (_, truth), expected_grads = value_and_grad(params, unpacked)
    assert float(jnp.abs(truth[0]).max()) > 20.0  # not flat: the check has teeth
    for got, want in zip(ours, truth):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)


def test_packed_sft_batch_gives_the_unpacked_loss_and_rows():
    packed, unpacked = batches(random_dataset("sft"))
    assert packed["input_ids"].shape[0] < 8
    loss = jax.jit(objectives.sft_loss)
    model = random_model()
    coefficients = objectives.as_arrays(objectives.Coefficients(0.0))
    ours, truth = loss(model, packed, coefficients), loss(model, unpacked, coefficients)
    assert float(truth[0]) > 2.0
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(truth)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_dpo_batch_gives_the_unpacked_loss_metrics_and_rows():
    dataset = random_dataset("pair")
    rng = np.random.default_rng(5)
    for name in objectives.PAIR_REFERENCE.columns:
        dataset = dataset.add_column(name, rng.normal(-60.0, 10.0, len(dataset)))
    packed, unpacked = batches(dataset, step=1)
    rpo = objectives.DpoCoefficients(0.0, 0.1, loss_weights=(1.0, 0.5))  # sigmoid + 0.5 sft
    objective = objectives.dpo(("sigmoid", "sft"), rpo)
    coefficients = objectives.as_arrays(objective.coefficients)
    loss = jax.jit(objective.loss)
    model = random_model()
    ours, truth = loss(model, packed, coefficients), loss(model, unpacked, coefficients)
    np.testing.assert_allclose(ours[0], truth[0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(truth[1:])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the model


def test_positions_restart_at_each_segment():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 7, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(
        positions_from_segments(segments), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    )


def test_segment_mask_is_causal_within_each_segment():
    segments = np.asarray([[1, 1, 2, 2, 2, 0]])
    allowed = AttentionMask(jnp.asarray(segments > 0), segment_ids=jnp.asarray(segments))
    got = np.asarray(allowed.allowed(jnp.arange(6)))[0, 0]
    want = [[j <= i and segments[0, j] == segments[0, i] for j in range(6)] for i in range(6)]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("implementation", ["blocked", "xla"])
def test_segment_attention_equals_each_segment_alone(implementation):
    """Blocked attention (query blocks of 5, the last padded) and jax.nn's
    dot_product_attention with the mask ``fused_attention`` builds (its XLA
    implementation here; cuDNN takes the same mask on a GPU): each segment's outputs are
    those of its slice alone, attended with a plain causal mask."""
    rng = np.random.default_rng(3)
    segments = np.asarray([[4, 4, 4, 4, 9, 9, 9, 2, 2, 0, 0, 0]])
    q = jnp.asarray(rng.normal(size=(1, 12, 4, 8)) * 1.5, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 12, 2, 8)) * 1.5, jnp.float32) for _ in range(2))
    mask = AttentionMask(jnp.asarray(segments > 0), segment_ids=jnp.asarray(segments))
    if implementation == "blocked":
        out = attend(q, k, v, mask, 5, "blocked")
    else:
        out = fused_attention(q, k, v, mask, "xla")
    assert np.all(np.isfinite(out))  # padding sees padding: no query without keys
    for span in (slice(0, 4), slice(4, 7), slice(7, 9)):
        n = span.stop - span.start
        alone = attend(q[:, span], k[:, span], v[:, span], AttentionMask(jnp.ones((1, n))))
        np.testing.assert_allclose(out[:, span], alone, atol=1e-5)


def test_each_packed_sequence_gets_its_own_unpacked_hidden_states():
    """Three sequences in one row: each one's hidden states equal those of the sequence
    alone in a (right-padded) row, and changing the others' tokens changes nothing in it."""
    model = random_model()
    rng = np.random.default_rng(2)
    lengths = (50, 30, 40)  # 120 tokens, 8 padding slots: crosses query blocks of 48
    starts = np.cumsum((0,) + lengths)
    rows = np.zeros((2, 128), np.int32)  # the packed row, and one with other neighbours
    segments = np.zeros((2, 128), np.int32)
    alone = np.zeros((3, 50), np.int32)
    for k, n in enumerate(lengths):
        span = slice(starts[k], starts[k + 1])
        rows[:, span] = alone[k, :n] = rng.integers(3, VOCAB, n)
        segments[:, span] = k + 5
    rows[1, : starts[1]] = rng.integers(3, VOCAB, lengths[0])
    rows[1, starts[2] : starts[3]] = rng.integers(3, VOCAB, lengths[2])

    @jax.jit
    def hidden(model, ids, mask, segments):
        return model.hidden_states(ids, mask, segment_ids=segments)

    packed = np.asarray(hidden(model, rows, None, segments))
    expected = np.asarray(hidden(model, alone, (alone > 0).astype(np.int32), None))
    for k, n in enumerate(lengths):
        np.testing.assert_allclose(packed[0, starts[k] : starts[k + 1]], expected[k, :n], atol=2e-5)
    middle = slice(starts[1], starts[2])
    np.testing.assert_array_equal(packed[1, middle], packed[0, middle])
    assert not np.allclose(packed[1, : starts[1]], packed[0, : starts[1]])  # they did change


# ----------------------------------------------------------------------------- layouts


def test_packed_rows_hold_each_example_once_with_its_loss_mask():
    dataset = random_dataset("pair")
    loader = BatchLoader(
        dataset, global_batch_size=8, buckets=(48,), pad_id=0, seed=1, packing=True
    )
    batch = loader.batch(0)
    for i, example in enumerate(loader.local_indices(0)):
        prompt = dataset.prompts[int(example)]
        for key, completion in zip(("chosen_segment", "rejected_segment"), dataset.completions):
            at = batch["segment_ids"] == batch[key][i]
            assert at.sum() == len(prompt) + len(completion[int(example)])
            np.testing.assert_array_equal(
                batch["input_ids"][at], np.concatenate([prompt, completion[int(example)]])
            )
            assert batch["loss_mask"][at].tolist() == [0] * len(prompt) + [1] * (
                at.sum() - len(prompt)
            )
    assert sorted(np.concatenate([batch["chosen_segment"], batch["rejected_segment"]])) == list(
        range(1, 17)
    )
    assert round_length(batch["input_ids"].shape[1]) == batch["input_ids"].shape[1]
    np.testing.assert_array_equal(
        batch["margin"], dataset.columns["margin"][loader.local_indices(0)].astype(np.float32)
    )


def test_first_fit_decreasing_and_the_row_length():
    # Rows of 12, longest first: 9 -> row 0; 7 -> row 1; 5 -> row 1 (row 0 has 3 left);
    # 4 -> row 2; 3 -> row 0.
    np.testing.assert_array_equal(
        first_fit_decreasing(np.asarray([5, 9, 3, 7, 4]), 3, 12),
        [[1, 7], [0, 0], [0, 9], [1, 0], [2, 0]],
    )
    assert first_fit_decreasing(np.asarray([7, 7, 7, 3]), 2, 12) is None  # 24 tokens, no split
    # Grid: 16 apart below 256, 32 from 256, 64 from 512, 128 from 1024.
    assert [round_length(n) for n in (5, 100, 130, 256, 257, 700, 1025)] == [
        16, 112, 144, 256, 288, 704, 1152,
    ]  # fmt: skip
    # 300 tokens in 2 rows need 150 each: 160; whole sequences need 200 in a row: 208.
    assert row_length([np.asarray([100, 100, 100])], 2) == 208
    # Five of 90 in 2 rows: 225 each -> 240, but whole sequences need 270 in a row: 288.
    assert row_length([np.asarray([90] * 5)], 2) == 288
    # The length fits every group: the second one needs 288 alone.
    assert row_length([np.asarray([200]), np.asarray([90] * 5)], 2) == 288


def pku_like(kind: str, n: int = 512, seed: int = 0) -> TokenizedDataset:
    """Prompts of 10-120 tokens, responses of 20-400 (uniform), as PKU-SafeRLHF's."""
    rng = np.random.default_rng(seed)
    prompts = Ragged.from_rows([np.ones(rng.integers(10, 121), np.int32) for _ in range(n)])
    completions = tuple(
        Ragged.from_rows([np.ones(rng.integers(20, 401), np.int32) for _ in range(n)])
        for _ in range(2 if kind == "pair" else 1)
    )
    return TokenizedDataset(kind, prompts, completions)


@pytest.mark.parametrize("kind", ["pair", "sft"])
def test_real_tokens_are_90_percent_of_computed_tokens_on_pku_like_lengths(kind):
    """16 examples per batch (2 processes x 8), max_length 640 in buckets of 128."""
    dataset = pku_like(kind)
    shares = {}
    for packing in (False, True):
        real = computed = 0
        for process in (0, 1):
            loader = BatchLoader(
                dataset, global_batch_size=16, buckets=(128, 256, 384, 512, 640), pad_id=0,
                packing=packing, process_index=process, process_count=2,
            )  # fmt: skip
            for step in range(16):
                batch = loader.batch(step)
                real += real_tokens(batch)
                computed += computed_tokens(batch)
        shares[packing] = real / computed
    assert shares[True] >= 0.90, shares
    assert shares[False] < 0.75, shares  # what packing gains


# ----------------------------------------------------------------------------- processes


def test_processes_agree_and_their_rows_make_the_unpacked_global_batch():
    """Two processes, gradient accumulation 2, 4 rows per process (4 batch shards each):
    every array has one shape on both, each global micro-batch (both processes' rows, as
    ``parallel.global_batch`` joins them) holds the examples of the unpacked global
    micro-batch and gives their log-probs."""
    dataset = random_dataset("pair", n=32)
    dataset = dataset.add_column("example", np.arange(32))
    settings = {"global_batch_size": 16, "buckets": (48,), "pad_id": 0, "seed": 2}
    settings.update(grad_accum=2, process_count=2)
    shares = [
        BatchLoader(dataset, process_index=p, packing=True, row_multiple=4, **settings).batch(3)
        for p in (0, 1)
    ]
    plain = [BatchLoader(dataset, process_index=p, **settings).batch(3) for p in (0, 1)]
    assert {k: v.shape for k, v in shares[0].items()} == {k: v.shape for k, v in shares[1].items()}
    assert shares[0]["input_ids"].shape[1] % 4 == 0
    model = random_model()
    logps = jax.jit(pair_logps)
    for micro in range(2):
        packed = {k: jnp.concatenate([s[k][micro] for s in shares]) for k in shares[0]}
        unpacked = {k: jnp.concatenate([s[k][micro] for s in plain]) for k in plain[0]}
        ours, truth = logps(model, packed), logps(model, unpacked)
        order = np.argsort(packed["example"])
        np.testing.assert_array_equal(packed["example"][order], np.sort(unpacked["example"]))
        for name in truth:
            np.testing.assert_allclose(
                np.asarray(ours[name])[order],
                np.asarray(truth[name])[np.argsort(unpacked["example"])],
                rtol=1e-5,
                atol=1e-5,
            )


def test_examples_are_dealt_longest_first_to_the_lightest_process():
    totals = [10, 50, 20, 40, 30, 60]  # tokens of examples 0..5 (2 prompt + completion)
    dataset = TokenizedDataset(
        "sft",
        Ragged.from_rows([[1] * 2] * 6),
        (Ragged.from_rows([[2] * (t - 2) for t in totals]),),
    )
    batch = np.asarray([5, 0, 3, 1, 4, 2])  # totals 60, 10, 40, 50, 30, 20
    # 60 -> p0; 50 -> p1; 40 -> p1 (50 < 60); 30 -> p0 (60 < 90); 20 -> p0 (90 = 90: the
    # lower index), which is then full; 10 -> p1. Each share in the batch's order:
    np.testing.assert_array_equal(deal(dataset, batch, 2), [[5, 4, 2], [0, 3, 1]])


@pytest.mark.slow  # two train steps compiled on an 8-device mesh: ~30 s here
def test_packed_train_step_on_a_sharded_mesh_equals_the_unpacked_one():
    """One DPO step on a (data 2, fsdp 2, tensor 2) mesh: rows split over 4 shards."""
    from sacpo_jax.training.loop import Trainer
    from sacpo_jax.training.optim import make_optimizer
    from sacpo_jax.training.state import split_model

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    dataset = random_dataset("pair")
    rng = np.random.default_rng(6)
    for name in objectives.PAIR_REFERENCE.columns:
        dataset = dataset.add_column(name, rng.normal(-60.0, 10.0, len(dataset)))
    settings = {"global_batch_size": 8, "buckets": (48,), "pad_id": 0, "seed": 1}
    packed = BatchLoader(dataset, packing=True, row_multiple=4, **settings).batch(0)
    unpacked = BatchLoader(dataset, **settings).batch(0)
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(1e-3, 0.1))
    model = random_model()
    graphdef, params = split_model(model)
    results = []
    for batch in (packed, unpacked):
        trainer = Trainer(objective, graphdef, model.config, make_optimizer(2), mesh)
        _, metrics = trainer.step(trainer.fresh_state(params), trainer.place(batch))
        results.append(jax.device_get(metrics))
    ours, truth = results
    assert truth["grad_norm"] > 1.0  # the gradient is not trivially small
    for name in truth:  # loss, grad_norm, rewards, log-probs ...
        np.testing.assert_allclose(ours[name], truth[name], rtol=1e-5, atol=1e-5)


def test_packing_is_refused_where_it_is_not_exact():
    options = {"global_batch_size": 8, "buckets": (48,), "pad_id": 0, "packing": True}
    with pytest.raises(ValueError, match="packing takes training batches"):
        BatchLoader(random_dataset("sft"), shuffle=False, drop_remainder=False, **options)
    unpaired = TokenizedDataset(
        "unpaired", Ragged.from_rows([[1]] * 8), (Ragged.from_rows([[2]] * 8),),
        {"label": np.ones(8)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="not unpaired"):
        BatchLoader(unpaired, **options)
