"""GRPO-Lagrangian: a critic-free constrained policy optimisation (REFERENCE-NEXT §2).

Each prompt is answered G times (``group_size``). Reward and cost are standardised
separately within each group (TRL's GRPO advantage, Bessel std + 1e-4), then combined
with the multiplier, advantages not raw scores (Girgis et al.: combining the scores
before standardising rescales each by its own spread and corrupts lambda):

    A = (Z_r - lam * Z_c) / (1 + lam)            one value per response, on every token

and the update minimises, per response token t (masked mean over the batch's tokens,
TRL's "bnpo" aggregation),

    max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps_high)) + beta * k3_t,
    rho_t = pi(y_t) / pi_old(y_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

with pi_old the policy that sampled the round and ref the frozen start model (with LoRA:
the policy's frozen base, read without the adapters). The
(1 + lam) normalisation is safe-rlhf's (PPO-Lagrangian's): the clipped term stays on
one scale and beta keeps its weight as lambda grows. Only the policy trains: no critics,
so a third of PPO-Lagrangian's trained parameters and optimiser state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sacpo_jax.algorithms.onpolicy import OnPolicyRun, policy_optimizer
from sacpo_jax.algorithms.rl_math import (
    clipped_surrogate,
    group_advantages,
    k3_kl,
    lagrangian_advantages,
    masked_mean,
)
from sacpo_jax.algorithms.token_stats import response_token_stats
from sacpo_jax.config import GrpoLagrangianStage
from sacpo_jax.models.llama import Llama
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.objectives import Objective
from sacpo_jax.training.stages import (
    is_finished,
    load_export,
    trainable_leaves,
    with_stage_adapters,
)
from sacpo_jax.training.state import TrainState, split_model


class GrpoCoefficients(NamedTuple):
    learning_rate: float
    beta: float
    epsilon: float
    epsilon_high: float


def grpo_loss(model: Llama, batch: dict, coeffs: GrpoCoefficients):
    """The GRPO-Lagrangian loss of a batch (module docstring), with TRL's metric names."""
    ids, attention_mask, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    stats = response_token_stats(model, ids, attention_mask, mask.shape[1], entropy=True)
    lam = batch["lagrange_multiplier"][:, None]
    advantages = lagrangian_advantages(
        batch["reward_advantages"][:, None], batch["cost_advantages"][:, None], lam
    )
    surrogate, clipped = clipped_surrogate(
        stats.logps, batch["old_logps"], advantages, coeffs.epsilon, coeffs.epsilon_high
    )
    kl = k3_kl(stats.logps, batch["ref_logps"])
    loss = masked_mean(surrogate + coeffs.beta * kl, mask)
    metrics = {
        "policy_loss": masked_mean(surrogate, mask),
        "kl": masked_mean(kl, mask),
        "clip_ratio": masked_mean(clipped, mask),
        "entropy": masked_mean(stats.entropy, mask),
        "lambda": jnp.mean(lam),
    }
    return loss, metrics, {}


def _token_pass(
    graphdef, reference_graphdef, params, reference_params, input_ids, attention_mask, length
):
    """log pi_old and log pi_ref of every response token."""
    policy = nnx.merge(graphdef, params)
    reference = nnx.merge(reference_graphdef, reference_params)
    return {
        "old_logps": response_token_stats(policy, input_ids, attention_mask, length).logps,
        "ref_logps": response_token_stats(reference, input_ids, attention_mask, length).logps,
    }


class GrpoLagrangianRun(OnPolicyRun):
    stage: GrpoLagrangianStage

    def build_trainer(self, models: dict[str, Llama]) -> tuple[Trainer, dict]:
        stage = self.stage
        coefficients = GrpoCoefficients(
            stage.train.learning_rate,
            stage.beta,
            stage.epsilon,
            stage.epsilon if stage.epsilon_high is None else stage.epsilon_high,
        )
        policy = with_stage_adapters(stage, self.reference, self.ctx.seed)
        self.graphdef, params = split_model(policy)
        reference_graphdef, self.reference_params = split_model(self.reference)
        pass_fn = functools.partial(
            _token_pass, self.graphdef, reference_graphdef, length=stage.rollout.max_new_tokens
        )
        self.compiled_pass = jax.jit(pass_fn)
        trainer = Trainer(
            Objective(grpo_loss, coefficients),
            self.graphdef,
            self.reference.config,
            policy_optimizer(stage.train, self.total),
            self.ctx.mesh,
            grad_accum=stage.train.grad_accum,
            trainable=trainable_leaves(stage, score_model=False),
        )
        return trainer, params

    def policy(self, state: TrainState) -> Llama:
        return nnx.merge(self.graphdef, state.model_params())

    def token_pass(self, state: TrainState, input_ids, attention_mask) -> dict[str, jax.Array]:
        return self.compiled_pass(
            state.model_params(), self.reference_params, input_ids, attention_mask
        )

    def update_columns(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rollout tokens and log-probs, and each response's group advantages."""
        group = self.stage.group_size
        kept = ("input_ids", "attention_mask", "response_mask", "old_logps", "ref_logps")
        out = {name: columns[name] for name in kept}
        out["reward_advantages"] = group_advantages(columns["rewards"], group)
        out["cost_advantages"] = group_advantages(columns["costs"], group)
        return out


def run_grpo_lagrangian(
    stage: GrpoLagrangianStage, start: Llama, models: dict[str, Llama], ctx: StageContext
) -> Llama:
    """GRPO-Lagrangian from ``start`` (also the reference) scored by ``models`` (by name);
    returns the trained policy. A finished stage is loaded from its export."""
    if is_finished(ctx):
        return load_export(ctx, start)
    return GrpoLagrangianRun(stage, start, models, ctx).run()
