"""Loader: determinism, exact resume, process shards, buckets, batch layouts, global arrays."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sacpo_jax import parallel
from sacpo_jax.data.dataset import Ragged, TokenizedDataset
from sacpo_jax.data.loader import BatchLoader, bucket_length, interleave_classes, kl_partners

N = 24
PAD = 0


def example_tokens(i: int):
    """Example i: prompt of 2 + i % 5 tokens, chosen of 1 + i % 7, rejected of 1 + (i * 3) % 4.

    Token values encode the example so a batch row can be traced back to it.
    """
    prompt = [1] + [100 + i] * (1 + i % 5)
    chosen = [200 + i] * (1 + i % 7)
    rejected = [300 + i] * (1 + (i * 3) % 4)
    return prompt, chosen, rejected


def make_dataset(kind: str = "pair", n: int = N) -> TokenizedDataset:
    rows = [example_tokens(i) for i in range(n)]
    prompts = Ragged.from_rows([r[0] for r in rows])
    if kind == "pair":
        completions = (
            Ragged.from_rows([r[1] for r in rows]),
            Ragged.from_rows([r[2] for r in rows]),
        )
        columns = {"margin": np.arange(n, dtype=np.float64) / 2}
    else:
        completions = (Ragged.from_rows([r[1] for r in rows]),)
        columns = {"label": np.arange(n) % 2} if kind == "unpaired" else {}
    return TokenizedDataset(kind, prompts, completions, columns)


def loader(dataset=None, **overrides) -> BatchLoader:
    options = {"global_batch_size": 8, "buckets": (8, 12, 16), "pad_id": PAD, "seed": 3}
    return BatchLoader(dataset or make_dataset(), **{**options, **overrides})


def assert_batches_equal(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_same_seed_same_batches_other_seed_other_order():
    for step in range(6):
        assert_batches_equal(loader().batch(step), loader().batch(step))
    assert not np.array_equal(loader().global_indices(0), loader(seed=4).global_indices(0))
    # every epoch is a fresh permutation of all examples
    epoch0 = np.concatenate([loader().global_indices(s) for s in range(3)])
    epoch1 = np.concatenate([loader().global_indices(s) for s in range(3, 6)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(N))
    assert not np.array_equal(epoch0, epoch1)


def test_resume_at_step_k_gives_the_uninterrupted_batches():
    uninterrupted = list(loader().iterate(num_steps=8))
    resumed = list(loader().iterate(start_step=4, num_steps=4))  # crosses the epoch boundary
    assert [step for step, _ in resumed] == [4, 5, 6, 7]
    for (_, expected), (_, got) in zip(uninterrupted[4:], resumed, strict=True):
        assert_batches_equal(expected, got)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_each_epoch(process_count):
    single = loader()
    shards = [loader(process_index=p, process_count=process_count) for p in range(process_count)]
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            parts = [shard.local_indices(step) for shard in shards]
            np.testing.assert_array_equal(np.concatenate(parts), single.global_indices(step))
            seen.extend(np.concatenate(parts).tolist())
        assert sorted(seen) == list(range(N))  # no overlap, no loss


def test_incomplete_last_batch_is_dropped_in_training():
    uneven = loader(make_dataset(n=20))
    assert uneven.steps_per_epoch == 2
    seen = np.concatenate([uneven.global_indices(s) for s in range(2)])
    assert len(set(seen.tolist())) == 16
    assert set(seen.tolist()) == set(uneven.epoch_order(0)[:16].tolist())


def test_bucket_length_is_the_smallest_that_fits():
    assert [bucket_length(n, (8, 12, 16)) for n in (1, 8, 9, 12, 13, 16)] == [8, 8, 12, 12, 16, 16]


def test_all_processes_use_the_global_bucket_length():
    dataset = make_dataset()
    lengths = dataset.sequence_lengths()
    for step in range(3):
        expected = bucket_length(int(lengths[loader().global_indices(step)].max()), (8, 12, 16))
        for p in range(4):
            batch = loader(process_index=p, process_count=4).batch(step)
            assert batch["chosen_input_ids"].shape == (2, expected)
            assert batch["rejected_input_ids"].shape == (2, expected)


def test_pair_batch_rows_are_packed_examples():
    ld = loader()
    batch = ld.batch(1)
    for row, i in enumerate(ld.local_indices(1)):
        prompt, chosen, rejected = example_tokens(int(i))
        length = batch["chosen_input_ids"].shape[1]
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            ids = batch[f"{name}_input_ids"][row]
            used = len(prompt) + len(completion)
            assert ids[:used].tolist() == prompt + completion
            assert (ids[used:] == PAD).all()
            assert batch[f"{name}_attention_mask"][row].tolist() == [1] * used + [0] * (
                length - used
            )
            loss = batch[f"{name}_loss_mask"][row]
            assert loss.tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
                length - used
            )
        assert batch["margin"][row] == np.float32(i / 2)
    assert batch["margin"].dtype == np.float32
    assert batch["chosen_input_ids"].dtype == np.int32


def test_kl_partners_form_one_cycle_through_every_example():
    for n in (2, 3, N, 1000):
        partner = kl_partners(n)
        assert sorted(partner.tolist()) == list(range(n))  # a permutation ...
        seen, i = set(), 0
        while i not in seen:
            seen.add(i)
            i = int(partner[i])
        assert len(seen) == n  # ... that is a single cycle, so no example is its own partner
    assert kl_partners(N) is kl_partners(N) and not kl_partners(N).flags.writeable


def test_kto_batch_has_labels_and_fixed_mismatched_kl_pairs():
    """Each row's KL pair is its prompt with its fixed partner's completion, whatever
    the batch (train, eval, another process), so reference KL log-probs can be stored."""
    dataset = make_dataset("unpaired")
    partner = kl_partners(N)
    batches = [
        (loader(dataset, process_index=1, process_count=2), 0),
        (loader(dataset, process_index=0, process_count=2, seed=9), 2),
        (loader(dataset, shuffle=False, drop_remainder=False, global_batch_size=5), 4),
    ]
    for ld, step in batches:
        batch, indices = ld.batch(step), ld.local_indices(step)
        assert batch["label"].dtype == np.int32
        assert batch["label"].tolist() == (np.maximum(indices, 0) % 2 * (indices >= 0)).tolist()
        for row, i in enumerate(indices):
            if i < 0:  # an eval padding row: empty
                assert batch["kl_attention_mask"][row].sum() == 0
                continue
            prompt = example_tokens(int(i))[0]
            partner_completion = example_tokens(int(partner[i]))[1]
            used = len(prompt) + len(partner_completion)
            assert batch["kl_input_ids"][row, :used].tolist() == prompt + partner_completion
            assert batch["kl_loss_mask"][row].sum() == len(partner_completion)
        assert batch["kl_input_ids"].shape == batch["input_ids"].shape


def test_gradient_accumulation_reshapes_the_batch():
    plain = loader().batch(2)
    accumulated = loader(grad_accum=4).batch(2)
    for name, array in plain.items():
        assert accumulated[name].shape == (4, 2, *array.shape[1:])
        np.testing.assert_array_equal(accumulated[name].reshape(array.shape), array)


def test_eval_loader_keeps_order_and_every_row():
    ld = loader(make_dataset("sft", n=20), shuffle=False, drop_remainder=False)
    batches = list(ld)
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [1] * 20 + [0] * 4
    firsts = np.concatenate([b["input_ids"][:, 1] for b in batches])[:20]
    assert firsts.tolist() == [100 + i for i in range(20)]  # stored order
    assert (batches[-1]["attention_mask"][4:] == 0).all()


def test_global_batch_shards_the_batch_over_data_and_fsdp():
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    local = loader().batch(0)
    batch = parallel.global_batch(local, mesh)
    ids = batch["chosen_input_ids"]
    assert ids.shape == local["chosen_input_ids"].shape
    assert ids.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(ids), local["chosen_input_ids"])
    shard_rows = {s.index[0].start for s in ids.addressable_shards}
    assert shard_rows == {0, 2, 4, 6}  # 8 rows over 4 data*fsdp groups

    accumulated = loader(grad_accum=2).batch(0)
    micro = parallel.global_batch(accumulated, mesh, grad_accum=2)
    assert micro["margin"].shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(micro["margin"]), accumulated["margin"])


def test_invalid_loader_settings_are_refused():
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        loader(process_count=3)
    with pytest.raises(ValueError, match="grad_accum 3"):
        loader(grad_accum=3)
    with pytest.raises(ValueError, match="shorter than the longest example"):
        loader(buckets=(8,))


def unbalanced_kto(n_desirable: int = 7, n_undesirable: int = 3) -> TokenizedDataset:
    """Unpaired rows: the first ``n_desirable`` desirable, then the undesirable ones."""
    dataset = make_dataset("unpaired", n_desirable + n_undesirable)
    labels = np.arange(len(dataset)) < n_desirable
    return dataset.add_column("label", labels.astype(np.int64))


def test_interleaving_is_datasets_all_exhausted_interleave():
    """TRL's KTOTrainer (the versions SACPO ran) built its epoch with
    datasets.interleave_datasets([desirable, undesirable], stopping_strategy="all_exhausted")."""
    from datasets import Dataset, interleave_datasets

    desirable, undesirable = np.array([5, 9, 2, 7, 0, 4, 8]), np.array([3, 1, 6])
    parts = [Dataset.from_dict({"i": part.tolist()}) for part in (desirable, undesirable)]
    theirs = interleave_datasets(parts, stopping_strategy="all_exhausted")["i"]
    assert interleave_classes(desirable, undesirable).tolist() == theirs
    # and the other way round (more undesirable than desirable)
    parts.reverse()
    theirs = interleave_datasets(parts, stopping_strategy="all_exhausted")["i"]
    assert interleave_classes(undesirable, desirable).tolist() == theirs


@pytest.mark.parametrize(
    ("batch_size", "steps", "desirable_per_batch"),
    [
        # 7 desirable, 3 undesirable: an epoch of 2 * 7 = 14 rows alternating d, u, d, u ...
        (4, 3, [2, 2, 2]),  # 14 // 4 = 3 full batches of d u d u
        (5, 2, [3, 2]),  # 14 // 5 = 2: d u d u d | u d u d u
        (2, 7, [1] * 7),
    ],
)
def test_interleaved_kto_epoch_length_and_desirable_share(batch_size, steps, desirable_per_batch):
    dataset = unbalanced_kto()
    loader_ = loader(dataset, global_batch_size=batch_size, interleave_labels=True)
    assert loader_.epoch_size == 14 and loader_.steps_per_epoch == steps
    labels = dataset.columns["label"]
    for epoch in range(2):
        batches = [loader_.batch(epoch * steps + s) for s in range(steps)]
        assert [int(b["label"].sum()) for b in batches] == desirable_per_batch
        order = loader_.epoch_order(epoch)
        # Every desirable row once; the 3 undesirable rows cycled over 7 slots: 3, 2, 2 times.
        assert sorted(order[0::2].tolist()) == list(range(7))
        counts = np.bincount(order[1::2], minlength=10)[7:]
        assert sorted(counts.tolist()) == [2, 2, 3]
        assert (labels[order] == np.tile([1, 0], 7)).all()
    assert not np.array_equal(loader_.epoch_order(0), loader_.epoch_order(1))  # reshuffled


def test_interleaving_needs_both_classes():
    dataset = make_dataset("unpaired", 6).add_column("label", np.ones(6, np.int64))
    with pytest.raises(ValueError, match="got 6 desirable and 0 undesirable"):
        loader(dataset, global_batch_size=2, interleave_labels=True)
