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

``OBJECTIVES`` maps each training stage type to the function that builds its objective;
it is the only place a stage kind meets a loss. A new DPO-family loss is a function
plus an entry in ``losses.PAIR_LOSSES``; a new stage kind is a config class, an
objective builder and one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sacpo_jax import losses
from sacpo_jax.config import (
    ConfigError,
    CostStage,
    DpoStage,
    KtoStage,
    RewardStage,
    SftStage,
    TrainedStage,
)
from sacpo_jax.data.adapters import LABEL_SMOOTHING
from sacpo_jax.data.dataset import TokenizedDataset
from sacpo_jax.logprobs import completion_logps, pair_logps
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
    summarize: Callable[[dict[str, float], float], dict[str, float]] = mean_rows


# ----------------------------------------------------------------------------- coefficients


class Coefficients(NamedTuple):
    """Objectives whose only coefficient is the peak learning rate (SFT, reward, cost)."""

    learning_rate: float


class DpoCoefficients(NamedTuple):
    """beta: the KL coefficient (beta/lambda in SACPO's realignment); label_smoothing:
    cDPO / robust eps; rpo_alpha: weight of the chosen-response NLL (TRL's RPO)."""

    learning_rate: float
    beta: float
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0


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


def dpo_loss(pair_loss: losses.PairLoss) -> Loss:
    """A DPO-family loss over pairs; with coeffs.rpo_alpha = a > 0 (TRL's ``rpo_alpha``,
    RPO: Pang et al. 2024) the per-token NLL of the chosen response is added:
    loss = dpo + a * (-pi_c / |y_c|). It keeps the chosen answers likely, against the
    drift of both log-probs downward that plain DPO shows on small models and small beta.
    """

    def loss(model: Llama, batch: dict, coeffs: DpoCoefficients):
        if LABEL_SMOOTHING in batch:  # per-pair eps from the data (cDPO with soft labels)
            coeffs = coeffs._replace(label_smoothing=batch[LABEL_SMOOTHING])
        policy = pair_logps(model, batch)
        pairs = losses.PairLogps(
            policy["chosen_logps"],
            policy["rejected_logps"],
            batch["reference_chosen_logps"],
            batch["reference_rejected_logps"],
            policy["chosen_lengths"],
            policy["rejected_lengths"],
        )
        per_pair = pair_loss.loss(pairs, coeffs)
        chosen_rewards, rejected_rewards = losses.implicit_rewards(pairs, coeffs.beta)
        chosen_nll = -policy["chosen_logps"] / jnp.maximum(policy["chosen_lengths"], 1.0)
        per_pair = per_pair + coeffs.rpo_alpha * chosen_nll
        metrics = losses.preference_metrics(
            chosen_rewards, rejected_rewards, policy["chosen_logps"], policy["rejected_logps"]
        )
        metrics["nll/chosen"] = jnp.mean(chosen_nll)
        metrics["logits/chosen"] = jnp.mean(policy["chosen_logits"])
        metrics["logits/rejected"] = jnp.mean(policy["rejected_logits"])
        rows = {
            "loss": per_pair,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy["chosen_logps"],
            "logps/rejected": policy["rejected_logps"],
        }
        return jnp.mean(per_pair), metrics, rows

    return loss


def dpo(loss_type: str, coefficients: DpoCoefficients) -> Objective:
    """The DPO objective with ``losses.PAIR_LOSSES[loss_type]``."""
    return Objective(dpo_loss(losses.PAIR_LOSSES[loss_type]), coefficients, PAIR_REFERENCE)


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
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logps, counts, _ = completion_logps(model, ids, mask, loss_mask)
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
    return Objective(sft_loss, coefficients, summarize=token_weighted_nll)


def _dpo(stage: DpoStage, dataset: TokenizedDataset) -> Objective:
    if LABEL_SMOOTHING in dataset.columns:
        _check_pair_smoothing(stage, dataset.columns[LABEL_SMOOTHING])
    coefficients = DpoCoefficients(
        stage.train.learning_rate, float(stage.beta), stage.label_smoothing, stage.rpo_alpha
    )
    return dpo(stage.loss_type, coefficients)


def _check_pair_smoothing(stage: DpoStage, eps) -> None:
    """Per-pair label smoothing needs a loss that smooths (robust: eps < 0.5) and no
    scalar label_smoothing beside it."""
    loss = losses.PAIR_LOSSES[stage.loss_type]
    problem = None
    if not loss.uses_label_smoothing:
        problem = f"loss_type '{stage.loss_type}' ignores it"
    elif stage.label_smoothing:
        problem = f"label_smoothing {stage.label_smoothing} would be ignored; set it to 0"
    elif stage.loss_type == "robust" and float(eps.max()) >= 0.5:
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
    KtoStage: _kto,
    RewardStage: _reward,
    CostStage: _cost,
}


def for_stage(stage: TrainedStage, dataset: TokenizedDataset) -> Objective:
    """The objective of a training stage on its (tokenised) training data."""
    return OBJECTIVES[type(stage)](stage, dataset)
