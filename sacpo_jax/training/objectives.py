"""What each stage kind minimises, written against a model and a batch.

An objective is ``objective(model, batch, coeffs) -> (loss, metrics, rows)``:
``loss`` is the scalar to minimise, ``metrics`` are batch means under TRL's names, and
``rows`` are per-example values from which evaluation recomputes metrics over any
number of batches. Coefficients (beta, label_smoothing, KTO weights ...) come in
``coeffs`` as traced scalars; the DPO ``loss_type`` is bound when the objective is built.

Reference log-probs are read from the batch (``reference_chosen_logps`` etc.), whether
they were precomputed before training or computed just before the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sacpo_jax import losses
from sacpo_jax.logprobs import completion_logps
from sacpo_jax.models.llama import Llama

Objective = Callable[[Llama, dict, dict], tuple[jax.Array, dict, dict]]


def _concat(batch: dict, first: str, second: str) -> tuple[jax.Array, ...]:
    return tuple(
        jnp.concatenate([batch[f"{first}_{name}"], batch[f"{second}_{name}"]])
        for name in ("input_ids", "attention_mask", "loss_mask")
    )


def policy_pair_logps(model: Llama, batch: dict) -> dict[str, jax.Array]:
    """Chosen and rejected in ONE forward over the concatenated [2B] batch."""
    ids, mask, loss_mask = _concat(batch, "chosen", "rejected")
    logps, counts, mean_logits = completion_logps(model, ids, mask, loss_mask)
    n = batch["chosen_input_ids"].shape[0]
    return {
        "chosen_logps": logps[:n],
        "rejected_logps": logps[n:],
        "chosen_lengths": counts[:n],
        "rejected_lengths": counts[n:],
        "chosen_logits": mean_logits[:n],
        "rejected_logits": mean_logits[n:],
    }


def dpo_objective(model: Llama, batch: dict, coeffs: dict, *, loss_type: str = "sigmoid"):
    """DPO family (sigmoid / cDPO / robust / hinge / IPO) with coefficient coeffs["beta"].

    With coeffs["rpo_alpha"] = a > 0 (TRL's ``rpo_alpha``, RPO: Pang et al. 2024) the
    per-token NLL of the chosen response is added: loss = dpo + a * (-pi_c / |y_c|).
    It keeps the chosen answers likely, against the drift of both log-probs downward
    that plain DPO shows on small models and small beta.
    """
    policy = policy_pair_logps(model, batch)
    per_pair, chosen_rewards, rejected_rewards = losses.dpo_loss(
        policy["chosen_logps"],
        policy["rejected_logps"],
        batch["reference_chosen_logps"],
        batch["reference_rejected_logps"],
        beta=coeffs["beta"],
        loss_type=loss_type,
        label_smoothing=coeffs.get("label_smoothing", 0.0),
        chosen_lengths=policy["chosen_lengths"],
        rejected_lengths=policy["rejected_lengths"],
    )
    chosen_nll = -policy["chosen_logps"] / jnp.maximum(policy["chosen_lengths"], 1.0)
    per_pair = per_pair + coeffs.get("rpo_alpha", 0.0) * chosen_nll
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


def kto_objective(model: Llama, batch: dict, coeffs: dict):
    """KTO: one forward over [examples; mismatched KL rows], KL estimate without gradient."""
    ids = jnp.concatenate([batch["input_ids"], batch["kl_input_ids"]])
    mask = jnp.concatenate([batch["attention_mask"], batch["kl_attention_mask"]])
    loss_mask = jnp.concatenate([batch["loss_mask"], batch["kl_loss_mask"]])
    logps = completion_logps(model, ids, mask, loss_mask).logps
    n = batch["input_ids"].shape[0]
    kl = losses.kto_kl_estimate(logps[n:], batch["reference_kl_logps"])
    per_example, rewards = losses.kto_loss(
        logps[:n],
        batch["reference_logps"],
        batch["label"],
        kl,
        beta=coeffs["beta"],
        desirable_weight=coeffs.get("desirable_weight", 1.0),
        undesirable_weight=coeffs.get("undesirable_weight", 1.0),
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


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_objective(model: Llama, batch: dict, coeffs: dict):
    """Mean negative log-likelihood per completion token."""
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logps, counts, _ = completion_logps(model, ids, mask, loss_mask)
    loss = losses.sft_loss(logps, counts)
    return loss, {"nll": loss}, {"nll_sum": -logps, "tokens": counts}


def _pair_scores(model: Llama, batch: dict) -> tuple[jax.Array, jax.Array]:
    ids, mask, _ = _concat(batch, "chosen", "rejected")
    scores = model(ids, mask)
    n = batch["chosen_input_ids"].shape[0]
    return scores[:n], scores[n:]


def reward_objective(model: Llama, batch: dict, coeffs: dict):
    """Bradley-Terry on (better = chosen, worse = rejected) scores."""
    better, worse = _pair_scores(model, batch)
    per_pair = losses.bradley_terry_loss(better, worse)
    correct = (better > worse).astype(jnp.float32)
    metrics = {"accuracy": jnp.mean(correct), "scores/better": jnp.mean(better)}
    metrics["scores/worse"] = jnp.mean(worse)
    return jnp.mean(per_pair), metrics, {"loss": per_pair, "accuracy": correct}


def cost_objective(model: Llama, batch: dict, coeffs: dict):
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


def build_objective(kind: str, loss_type: str = "sigmoid") -> Objective:
    """The objective of a stage kind: dpo | kto | sft | reward | cost."""
    objectives = {
        "dpo": functools.partial(dpo_objective, loss_type=loss_type),
        "kto": kto_objective,
        "sft": sft_objective,
        "reward": reward_objective,
        "cost": cost_objective,
    }
    if kind not in objectives:
        raise ValueError(f"unknown objective {kind!r}; valid: {', '.join(objectives)}")
    return objectives[kind]


def reference_columns(kind: str) -> tuple[str, ...]:
    """The reference log-prob columns an objective reads from its batches."""
    return {
        "dpo": ("reference_chosen_logps", "reference_rejected_logps"),
        "kto": ("reference_logps", "reference_kl_logps"),
    }.get(kind, ())


def reference_logps(model: Llama, batch: dict, kind: str) -> dict[str, jax.Array]:
    """The reference model's log-probs for a batch, under the names the objective reads."""
    if kind == "dpo":
        policy = policy_pair_logps(model, batch)
        return {
            "reference_chosen_logps": policy["chosen_logps"],
            "reference_rejected_logps": policy["rejected_logps"],
        }
    if kind == "kto":
        out = {}
        for prefix, name in (("", "reference_logps"), ("kl_", "reference_kl_logps")):
            out[name] = completion_logps(
                model,
                batch[f"{prefix}input_ids"],
                batch[f"{prefix}attention_mask"],
                batch[f"{prefix}loss_mask"],
            ).logps
        return out
    return {}
