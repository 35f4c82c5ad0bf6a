"""Every DPO-family loss, SimPO and ORPO against TRL's own code on the same log-probs.

TRL's DPO losses live inside ``DPOTrainer._compute_loss`` (no standalone function), so
it is called unbound on a stand-in trainer and a stand-in model whose per-token
log-probs are given: its own code then forms the sums, the lengths, the reference
log-ratios and the weighted combination. SimPO and ORPO are TRL's
``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss`` (with the NLL term each
trainer adds). Both sides run in float64.
"""

from __future__ import annotations

import collections
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from sacpo_jax import losses

with warnings.catch_warnings():  # "trl.experimental APIs may change": these are pinned
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

B, T = 6, 9  # pairs, sequence length (position 0 is the prompt)
CPU = torch.device("cpu")


def random_batch(seed: int, scale: float = 1.0) -> dict:
    """Per-token log-probs of 2B rows (chosen rows first) with ragged completion masks,
    and reference sums; ``scale`` multiplies every log-prob (huge margins)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T, size=2 * B)
    mask = (np.arange(T)[None, :] >= 1) & (np.arange(T)[None, :] <= lengths[:, None])
    token_logps = -rng.gamma(1.0, 0.8, size=(2 * B, T - 1)) * mask[:, 1:] * scale
    reference = rng.normal(0.0, 2.0, size=2 * B) * scale + token_logps.sum(1)
    return {"mask": mask.astype(np.int64), "token_logps": token_logps, "reference": reference}


class _Outputs:
    def __init__(self, token_logps: torch.Tensor):
        self.log_probs = token_logps
        self.entropy = torch.zeros_like(token_logps)
        self.mean_logits = torch.zeros_like(token_logps)
        self.is_top1 = torch.zeros_like(token_logps, dtype=torch.bool)


def trl_dpo(batch: dict, loss_types, loss_weights=None, **options) -> float:
    """TRL's DPO loss (a scalar) from DPOTrainer._compute_loss."""
    accelerator = types.SimpleNamespace(
        device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        beta=options.get("beta", 0.1),
        label_smoothing=options.get("label_smoothing", 0.0),
        loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types),
        args=types.SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05)),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    token_logps = torch.tensor(batch["token_logps"], dtype=torch.float64)
    mask = torch.tensor(batch["mask"])
    reference = torch.tensor(batch["reference"], dtype=torch.float64)
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": reference[:B],
        "ref_rejected_logps": reference[B:],
    }
    model = lambda **kwargs: _Outputs(token_logps)
    return float(DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False))


def pairs_of(batch: dict) -> losses.PairLogps:
    sums = batch["token_logps"].sum(1)
    lengths = batch["mask"].sum(1).astype(np.float64)
    ref = batch["reference"]
    columns = (sums[:B], sums[B:], ref[:B], ref[B:], lengths[:B], lengths[B:])
    return losses.PairLogps(*(jnp.asarray(x) for x in columns))


def ours_dpo(batch: dict, loss_types, loss_weights=None, **options) -> jax.Array:
    p = pairs_of(batch)
    per_pair, _, _ = losses.dpo_loss(
        p.policy_chosen,
        p.policy_rejected,
        p.reference_chosen,
        p.reference_rejected,
        loss_type=list(loss_types),
        loss_weights=loss_weights,
        chosen_lengths=p.chosen_lengths,
        rejected_lengths=p.rejected_lengths,
        **{"beta": 0.1, **options},
    )
    return per_pair


OPTIONS = {name: {} for name in losses.PAIR_LOSSES}
OPTIONS.update(
    robust={"label_smoothing": 0.2},
    exo_pair={"label_smoothing": 1e-3},
    aot={"label_smoothing": 0.1},
    aot_unpaired={"label_smoothing": 0.1},
    discopop={"discopop_tau": 0.05},
    ipo={"beta": 0.5},
)


def test_the_family_is_trls():
    assert set(losses.PAIR_LOSSES) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip


@pytest.mark.parametrize("loss_type", sorted(losses.PAIR_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_equals_trl(loss_type, seed):
    batch = random_batch(seed)
    with jax.enable_x64(True):
        ours = float(jnp.mean(ours_dpo(batch, [loss_type], **OPTIONS[loss_type])))
    theirs = trl_dpo(batch, [loss_type], **OPTIONS[loss_type])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", sorted(losses.PAIR_LOSSES))
def test_huge_margins_stay_finite(loss_type):
    """Log-probs scaled by 1e4: margins of thousands of nats. Every loss and its gradient
    stays finite; where TRL's value is finite too, they agree."""
    batch = random_batch(2, scale=1e4)
    options = OPTIONS[loss_type]
    with jax.enable_x64(True):
        ours = ours_dpo(batch, [loss_type], **options)
        p = pairs_of(batch)

        def total(chosen, rejected):
            moved = p._replace(policy_chosen=chosen, policy_rejected=rejected)
            coeffs = losses.PairCoefficients(
                options.get("beta", 0.1), options.get("label_smoothing", 0.0), 0.05
            )
            return jnp.sum(losses.PAIR_LOSSES[loss_type].loss(moved, coeffs))

        grads = jax.grad(total, argnums=(0, 1))(p.policy_chosen, p.policy_rejected)
        mean = float(jnp.mean(ours))
    assert np.isfinite(np.asarray(ours)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    theirs = trl_dpo(batch, [loss_type], **options)
    if np.isfinite(theirs):
        np.testing.assert_allclose(mean, theirs, rtol=1e-6, atol=1e-6)
    else:
        assert loss_type == "discopop"  # TRL's e^(-z) overflows; ours stays finite


COMBINATIONS = [
    (["sigmoid", "sft"], [1.0, 0.2]),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO-style mix
    (["ipo", "apo_zero", "discopop"], None),
    (["aot", "nca_pair"], [0.3, 2.5]),
]


@pytest.mark.parametrize(("loss_types", "weights"), COMBINATIONS)
def test_weighted_combinations_equal_trl_and_the_weighted_sum(loss_types, weights):
    batch = random_batch(3)
    eps = 0.1 if "aot" in loss_types else 0.0
    with jax.enable_x64(True):
        combined = float(jnp.mean(ours_dpo(batch, loss_types, weights, label_smoothing=eps)))
        parts = [
            float(jnp.mean(ours_dpo(batch, [t], label_smoothing=eps if t == "aot" else 0.0)))
            for t in loss_types
        ]
    weighted = sum(w * v for w, v in zip(weights or [1.0] * len(parts), parts, strict=True))
    np.testing.assert_allclose(combined, weighted, rtol=1e-12)
    theirs = trl_dpo(batch, loss_types, weights, label_smoothing=eps)
    np.testing.assert_allclose(combined, theirs, rtol=1e-6)


# ----------------------------------------------------------------------------- SimPO, ORPO


def averaged(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.tensor(batch["token_logps"].sum(1))
    avg = sums / torch.tensor(batch["mask"].sum(1), dtype=torch.float64)
    return avg[:B], avg[B:]


def trl_chosen_nll(batch: dict) -> float:
    """The cross-entropy over chosen tokens both trainers add: a token mean."""
    chosen = batch["token_logps"][:B]
    return float(-chosen.sum() / batch["mask"][:B].sum())


@pytest.mark.parametrize(
    ("beta", "gamma", "eps", "alpha"), [(2.0, 0.5, 0.0, 0.0), (0.1, 1.0, 0.1, 1.0)]
)
def test_simpo_equals_trl_cpo_trainer(beta, gamma, eps, alpha):
    batch = random_batch(4)
    trainer = types.SimpleNamespace(
        alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
        accelerator=types.SimpleNamespace(device=CPU),
    )  # fmt: skip
    per_pair, _, _ = CPOTrainer.cpo_loss(trainer, *averaged(batch))
    theirs = float(per_pair.mean()) + alpha * trl_chosen_nll(batch)  # CPOTrainer's total
    coeffs = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    with jax.enable_x64(True):
        p = pairs_of(batch)
        ours = float(jnp.mean(losses.SIMPO.loss(p, coeffs) + alpha * losses.chosen_nll(p)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_orpo_equals_trl_orpo_trainer():
    batch = random_batch(5)
    trainer = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device=CPU))
    ratio_terms, *_ = ORPOTrainer.odds_ratio_loss(trainer, *averaged(batch))
    theirs = trl_chosen_nll(batch) - float(ratio_terms.mean())  # ORPOTrainer's total
    with jax.enable_x64(True):
        p = pairs_of(batch)
        ours = losses.ORPO.loss(p, types.SimpleNamespace(beta=0.1)) + losses.chosen_nll(p)
        ours = float(jnp.mean(ours))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
