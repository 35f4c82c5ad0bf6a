"""What each training stage minimises: the ``Objective`` type and its registry.

An ``Objective`` holds everything that differs between training losses:

    loss(model, batch, coeffs) -> (loss, metrics, rows)
        ``loss`` the scalar to minimise, ``metrics`` batch means under TRL's names,
        ``rows`` per-example values from which evaluation recomputes metrics over any
        number of batches (``summarize``).
    coefficients   a typed pytree of traced scalars (learning rate, beta, ...): new
                   values never recompile, and a misspelt name fails at trace time.
    reference      the reference log-prob columns the loss reads from its batches and
                   how a reference model computes them (None: no reference model).
    score_model    it trains a score head (reward and cost models).
    packs          its loss reads packed batches too (several sequences per row,
                   ``data.packing``), with the same values.

``OBJECTIVES`` maps each training stage type to the function that builds its objective;
it is the only place a stage kind meets a loss. A new DPO-family loss is a function
plus an entry in ``losses.PAIR_LOSSES``; a new stage kind is a config class, an
objective builder and one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sacpo_jax import losses
from sacpo_jax.config import (
    ConfigError,
    CostStage,
    DpoStage,
    KtoStage,
    OrpoStage,
    RewardStage,
    SafeDpoStage,
    SftStage,
    SimpoStage,
    TrainedStage,
)
from sacpo_jax.data.adapters import LABEL_SMOOTHING
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.logprobs import completion_logps, example_logps, pair_logps
from sacpo_jax.models.llama import Llama

Loss = Callable[[Llama, dict, Any], tuple[jax.Array, dict, dict]]


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference log-prob columns an objective reads, and how a model computes them."""

    columns: tuple[str, ...]
    compute: Callable[[Llama, dict], dict[str, jax.Array]]


def mean_rows(sums: dict[str, float], count: float) -> dict[str, float]:
    """Evaluation metrics as the mean of each per-example row over the evaluated examples."""
    return {name: total / max(count, 1.0) for name, total in sums.items()}


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: Loss
    coefficients: Any
    reference: Reference | None = None
    score_model: bool = False
    packs: bool = False
    summarize: Callable[[dict[str, float], float], dict[str, float]] = mean_rows


# ----------------------------------------------------------------------------- coefficients


class Coefficients(NamedTuple):
    """Objectives whose only coefficient is the peak learning rate (SFT, reward, cost)."""

    learning_rate: float


class DpoCoefficients(NamedTuple):
    """beta: the KL coefficient (beta/lambda in SACPO's realignment); label_smoothing: eps
    of the losses that smooth labels; loss_weights: one weight per loss type (TRL's
    ``loss_weights``); discopop_tau: DiscoPOP's temperature."""

    learning_rate: float
    beta: float
    label_smoothing: float = 0.0
    loss_weights: tuple[float, ...] = (1.0,)
    discopop_tau: float = losses.DISCOPOP_TAU


class SafeDpoCoefficients(NamedTuple):
    """safety_margin: SafeDPO's Delta."""

    learning_rate: float
    beta: float
    safety_margin: float


class SimpoCoefficients(NamedTuple):
    learning_rate: float
    beta: float
    simpo_gamma: float
    cpo_alpha: float = 0.0
    label_smoothing: float = 0.0


class OrpoCoefficients(NamedTuple):
    """beta: ORPO's lambda, the weight of the odds-ratio term."""

    learning_rate: float
    beta: float


class KtoCoefficients(NamedTuple):
    learning_rate: float
    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def as_arrays(coefficients: NamedTuple) -> NamedTuple:
    """Python numbers -> float32 scalars, so the step traces them instead of baking them in."""
    return jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), coefficients)


# ----------------------------------------------------------------------------- DPO family


def _pair_reference(model: Llama, batch: dict) -> dict[str, jax.Array]:
    policy = pair_logps(model, batch)
    return {
        "reference_chosen_logps": policy["chosen_logps"],
        "reference_rejected_logps": policy["rejected_logps"],
    }


PAIR_REFERENCE = Reference(("reference_chosen_logps", "reference_rejected_logps"), _pair_reference)


PairTerm = Callable[[losses.PairLogps, dict, Any], jax.Array]
"""per_pair(pairs, batch, coeffs) -> [B] losses (the batch gives extra columns, e.g. safety)."""


def pair_loss(per_pair: PairTerm, *, with_reference: bool = True) -> Loss:
    """An objective over pairs: the batch mean of ``per_pair`` on the policy's log-probs
    and, ``with_reference``, the batch's reference columns (else zeros: reference-free),
    with TRL's DPO metrics (implicit rewards beta * (pi - ref))."""

    def loss(model: Llama, batch: dict, coeffs):
        policy = pair_logps(model, batch)
        if with_reference:
            reference = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            reference = (jnp.zeros_like(policy["chosen_logps"]),) * 2
        pairs = losses.PairLogps(
            policy["chosen_logps"],
            policy["rejected_logps"],
            *reference,
            policy["chosen_lengths"],
            policy["rejected_lengths"],
        )
        per_pair_losses = per_pair(pairs, batch, coeffs)
        chosen_rewards, rejected_rewards = losses.implicit_rewards(pairs, coeffs.beta)
        metrics = losses.preference_metrics(
            chosen_rewards, rejected_rewards, policy["chosen_logps"], policy["rejected_logps"]
        )
        chosen_nll = -policy["chosen_logps"] / jnp.maximum(policy["chosen_lengths"], 1.0)
        metrics["nll/chosen"] = jnp.mean(chosen_nll)
        metrics["logits/chosen"] = jnp.mean(policy["chosen_logits"])
        metrics["logits/rejected"] = jnp.mean(policy["rejected_logits"])
        rows = {
            "loss": per_pair_losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy["chosen_logps"],
            "logps/rejected": policy["rejected_logps"],
        }
        return jnp.mean(per_pair_losses), metrics, rows

    return loss


def dpo(loss_type: str | Sequence[str], coefficients: DpoCoefficients) -> Objective:
    """The DPO objective: sum_k loss_weights[k] * ``losses.PAIR_LOSSES[loss_type[k]]``
    (TRL's RPO is ("sigmoid", "sft") with weights (1, alpha)). Reference-free when no term
    reads the reference (only "sft"): no reference model is run then."""
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if len(coefficients.loss_weights) != len(loss_types):
        raise losses.LossConfigError(
            f"{len(coefficients.loss_weights)} loss weights for loss types {loss_types}"
        )

    def per_pair(pairs: losses.PairLogps, batch: dict, coeffs: DpoCoefficients) -> jax.Array:
        if LABEL_SMOOTHING in batch:  # per-pair eps from the data (cDPO with soft labels)
            coeffs = coeffs._replace(label_smoothing=batch[LABEL_SMOOTHING])
        return losses.combined_pair_loss(pairs, coeffs, loss_types, coeffs.loss_weights)

    needs_reference = any(losses.PAIR_LOSSES[t].needs_reference for t in loss_types)
    reference = PAIR_REFERENCE if needs_reference else None
    loss = pair_loss(per_pair, with_reference=needs_reference)
    return Objective(loss, coefficients, reference, packs=True)


def _safedpo_pairs(pairs: losses.PairLogps, batch: dict, coeffs: SafeDpoCoefficients):
    return losses.safedpo_loss(pairs, coeffs, batch["chosen_unsafe"], batch["rejected_unsafe"])


def _simpo_pairs(pairs: losses.PairLogps, batch: dict, coeffs: SimpoCoefficients):
    return losses.SIMPO.loss(pairs, coeffs) + coeffs.cpo_alpha * losses.chosen_nll(pairs)


def _orpo_pairs(pairs: losses.PairLogps, batch: dict, coeffs: OrpoCoefficients):
    return losses.ORPO.loss(pairs, coeffs) + losses.chosen_nll(pairs)


# ----------------------------------------------------------------------------- KTO


def _stacked(batch: dict, first: str, second: str) -> tuple[jax.Array, ...]:
    """(input_ids, attention_mask, loss_mask) of the rows named ``first*`` followed by the
    rows named ``second*``: one forward for both."""
    return tuple(
        jnp.concatenate([batch[f"{first}{name}"], batch[f"{second}{name}"]])
        for name in ("input_ids", "attention_mask", "loss_mask")
    )


def kto_loss(model: Llama, batch: dict, coeffs: KtoCoefficients):
    """KTO: one forward over [examples; mismatched KL rows], KL estimate without gradient."""
    logps = completion_logps(model, *_stacked(batch, "", "kl_")).logps
    n = batch["input_ids"].shape[0]
    kl = losses.kto_kl_estimate(logps[n:], batch["reference_kl_logps"])
    per_example, rewards = losses.kto_loss(
        logps[:n],
        batch["reference_logps"],
        batch["label"],
        kl,
        beta=coeffs.beta,
        desirable_weight=coeffs.desirable_weight,
        undesirable_weight=coeffs.undesirable_weight,
    )
    desirable = batch["label"].astype(jnp.float32)
    metrics = {
        "kl": kl,
        "rewards/chosen": _masked_mean(rewards, desirable),
        "rewards/rejected": _masked_mean(rewards, 1.0 - desirable),
        "logps/chosen": _masked_mean(logps[:n], desirable),
        "logps/rejected": _masked_mean(logps[:n], 1.0 - desirable),
    }
    rows = {"loss": per_example, "rewards": rewards, "label": desirable}
    return jnp.mean(per_example), metrics, rows


def _kto_reference(model: Llama, batch: dict) -> dict[str, jax.Array]:
    out = {}
    for prefix, name in (("", "reference_logps"), ("kl_", "reference_kl_logps")):
        out[name] = completion_logps(
            model,
            batch[f"{prefix}input_ids"],
            batch[f"{prefix}attention_mask"],
            batch[f"{prefix}loss_mask"],
        ).logps
    return out


KTO_REFERENCE = Reference(("reference_logps", "reference_kl_logps"), _kto_reference)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------- SFT


def sft_loss(model: Llama, batch: dict, coeffs: Coefficients):
    """Mean negative log-likelihood per completion token."""
    logps, counts, _ = example_logps(model, batch)
    loss = losses.sft_loss(logps, counts)
    return loss, {"nll": loss}, {"nll_sum": -logps, "tokens": counts}


def token_weighted_nll(sums: dict[str, float], count: float) -> dict[str, float]:
    """Held-out NLL per completion token over the whole evaluation set."""
    return {"nll": sums["nll_sum"] / max(sums["tokens"], 1.0)}


# ----------------------------------------------------------------------------- score models


def _pair_scores(model: Llama, batch: dict) -> tuple[jax.Array, jax.Array]:
    ids, mask, _ = _stacked(batch, "chosen_", "rejected_")
    scores = model(ids, mask)
    n = batch["chosen_input_ids"].shape[0]
    return scores[:n], scores[n:]


def reward_loss(model: Llama, batch: dict, coeffs: Coefficients):
    """Bradley-Terry on (better = chosen, worse = rejected) scores."""
    better, worse = _pair_scores(model, batch)
    per_pair = losses.bradley_terry_loss(better, worse)
    correct = (better > worse).astype(jnp.float32)
    metrics = {"accuracy": jnp.mean(correct), "scores/better": jnp.mean(better)}
    metrics["scores/worse"] = jnp.mean(worse)
    return jnp.mean(per_pair), metrics, {"loss": per_pair, "accuracy": correct}


def cost_loss(model: Llama, batch: dict, coeffs: Coefficients):
    """safe-rlhf cost loss on (safer = chosen, unsafer = rejected) with safety signs."""
    safer, unsafer = _pair_scores(model, batch)
    safer_signs, unsafer_signs = batch["chosen_sign"], batch["rejected_sign"]
    per_pair = losses.cost_loss(safer, unsafer, safer_signs, unsafer_signs)
    correct = (unsafer > safer).astype(jnp.float32)
    costs = jnp.concatenate([safer, unsafer])
    signs = jnp.concatenate([safer_signs, unsafer_signs])
    sign_known = (signs != 0).astype(jnp.float32)
    sign_right = jnp.where(signs > 0, costs > 0, costs <= 0).astype(jnp.float32)
    metrics = {
        "accuracy": jnp.mean(correct),
        "sign_accuracy": _masked_mean(sign_right, sign_known),
    }
    # Per pair: the share of its (sign-labelled) two responses with the right cost sign;
    # its mean over pairs is the evaluation's sign accuracy when every response is
    # labelled, as with the pku_cost adapter.
    n = safer.shape[0]
    pair_known = sign_known[:n] + sign_known[n:]
    pair_right = (sign_right * sign_known)[:n] + (sign_right * sign_known)[n:]
    rows = {
        "loss": per_pair,
        "accuracy": correct,
        "sign_accuracy": pair_right / jnp.maximum(pair_known, 1.0),
    }
    return jnp.mean(per_pair), metrics, rows


# ----------------------------------------------------------------------------- the registry


def _sft(stage: SftStage, dataset: TokenizedDataset) -> Objective:
    coefficients = Coefficients(stage.train.learning_rate)
    return Objective(sft_loss, coefficients, packs=True, summarize=token_weighted_nll)


def _dpo(stage: DpoStage, dataset: TokenizedDataset) -> Objective:
    if LABEL_SMOOTHING in dataset.columns:
        _check_pair_smoothing(stage, dataset.columns[LABEL_SMOOTHING])
    loss_types, weights = zip(*stage.loss_terms(), strict=True)
    coefficients = DpoCoefficients(
        stage.train.learning_rate,
        float(stage.beta),
        stage.label_smoothing,
        tuple(weights),
        stage.discopop_tau,
    )
    return dpo(loss_types, coefficients)


def _safedpo(stage: SafeDpoStage, dataset: TokenizedDataset) -> Objective:
    coefficients = SafeDpoCoefficients(
        stage.train.learning_rate, float(stage.beta), stage.safety_margin
    )
    return Objective(pair_loss(_safedpo_pairs), coefficients, PAIR_REFERENCE, packs=True)


def _simpo(stage: SimpoStage, dataset: TokenizedDataset) -> Objective:
    coefficients = SimpoCoefficients(
        stage.train.learning_rate,
        stage.beta,
        stage.simpo_gamma,
        stage.cpo_alpha,
        stage.label_smoothing,
    )
    return Objective(pair_loss(_simpo_pairs, with_reference=False), coefficients, packs=True)


def _orpo(stage: OrpoStage, dataset: TokenizedDataset) -> Objective:
    coefficients = OrpoCoefficients(stage.train.learning_rate, stage.beta)
    return Objective(pair_loss(_orpo_pairs, with_reference=False), coefficients, packs=True)


def _check_pair_smoothing(stage: DpoStage, eps) -> None:
    """Per-pair label smoothing needs losses that smooth (robust: eps < 0.5; "sft" has no
    eps) and no scalar label_smoothing beside it."""
    smoothed = [name for name, _ in stage.loss_terms() if name != "sft"]
    ignoring = [name for name in smoothed if not losses.PAIR_LOSSES[name].uses_label_smoothing]
    problem = None
    if ignoring or not smoothed:
        problem = f"loss_type '{(ignoring or ['sft'])[0]}' ignores it"
    elif stage.label_smoothing:
        problem = f"label_smoothing {stage.label_smoothing} would be ignored; set it to 0"
    elif "robust" in smoothed and float(eps.max()) >= 0.5:
        problem = "loss_type 'robust' divides by 1 - 2 eps and needs every eps < 0.5"
    if problem:
        raise ConfigError(
            f"stage '{stage.name}': its data has per-pair label_smoothing, but {problem}"
        )


def _kto(stage: KtoStage, dataset: TokenizedDataset) -> Objective:
    weight = stage.undesirable_weight
    if weight == "balanced":
        labels = dataset.columns["label"]
        weight = losses.kto_safety_undesirable_weight(int(labels.sum()), int((1 - labels).sum()))
    coefficients = KtoCoefficients(
        stage.train.learning_rate, float(stage.beta), stage.desirable_weight, float(weight)
    )
    return Objective(kto_loss, coefficients, KTO_REFERENCE)


def _reward(stage: RewardStage, dataset: TokenizedDataset) -> Objective:
    coefficients = Coefficients(stage.train.learning_rate)
    return Objective(reward_loss, coefficients, score_model=True)


def _cost(stage: CostStage, dataset: TokenizedDataset) -> Objective:
    coefficients = Coefficients(stage.train.learning_rate)
    return Objective(cost_loss, coefficients, score_model=True)


OBJECTIVES: dict[type, Callable[[Any, TokenizedDataset], Objective]] = {
    SftStage: _sft,
    DpoStage: _dpo,
    SafeDpoStage: _safedpo,
    SimpoStage: _simpo,
    OrpoStage: _orpo,
    KtoStage: _kto,
    RewardStage: _reward,
    CostStage: _cost,
}


def for_stage(stage: TrainedStage, dataset: TokenizedDataset) -> Objective:
    """The objective of a training stage on its (tokenised) training data."""
    if LABEL_SMOOTHING in dataset.columns and not isinstance(stage, DpoStage):
        raise ConfigError(
            f"stage '{stage.name}': its data has per-pair label_smoothing, which only dpo "
            "stages read"
        )
    return OBJECTIVES[type(stage)](stage, dataset)
