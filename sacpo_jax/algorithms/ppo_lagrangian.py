"""Safe RLHF's PPO-Lagrangian (Dai et al. 2024; safe-rlhf ppo_lag, REFERENCE-NEXT §1).

Per round (``onpolicy.OnPolicyRun``), from the sampled responses and the reward and cost
models' end scores r, c:

    kl_t       = log pi_old(y_t) - log pi_ref(y_t)
    reward_t   = clip(-kl_coeff * kl_t + r * 1[t = end], +-clip_range_score)
    cost_t     = clip(+kl_coeff * kl_t + c * 1[t = end], +-clip_range_score)
    A_r, R_r   = GAE(reward_t, V_r)      A_c, R_c = GAE(cost_t, V_c)   (gamma, gae_lambda)

and each update (its lambda from the host-side multiplier) minimises, over the batch's
response tokens,

    actor          masked mean of max(-A rho, -A clip(rho, 1 +- clip_range_ratio)),
                   A = (A_r - lam A_c) / (1 + lam)
    reward critic  0.5 masked mean of max((V_r - R_r)^2, (V_r,clip - R_r)^2)
    cost critic    the same for V_c, R_c (values clipped to V_old +- clip_range_value)

The actor and the two critics (value heads: score models read at every token) are one
train state (``ActorCritics``) with one optimiser per module (``multi_transform``:
each its own gradient clipping, the critics their learning rate and schedule); their
parameters are disjoint, so one step on the summed loss is safe-rlhf's actor step,
reward-critic step and cost-critic step on the same batch. Critics start from
``reward_critic`` / ``cost_critic``, by default the reward / cost model (safe-rlhf), or
for the oracle from the policy's backbone with a zero head. The reference is the frozen
start model. With LoRA (``lora``), each module gets fresh adapters on its frozen start and
only the adapters and the critics' heads train; the reference reads the actor's frozen
base without its adapters (no second copy of the weights).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sacpo_jax.algorithms.onpolicy import OnPolicyRun, policy_optimizer
from sacpo_jax.algorithms.rl_math import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    kl_shaped,
    lagrangian_advantages,
    masked_mean,
)
from sacpo_jax.algorithms.token_stats import response_token_stats, response_values
from sacpo_jax.config import ORACLE, PpoLagrangianStage
from sacpo_jax.models.init import with_score_head
from sacpo_jax.models.llama import Llama
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.objectives import Objective
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.stages import (
    is_finished,
    load_export,
    trainable_leaves,
    with_stage_adapters,
)
from sacpo_jax.training.state import TrainState, split_model

MODULES = ("actor", "reward_critic", "cost_critic")


class ActorCritics(nnx.Module):
    """The modules PPO-Lagrangian trains: the policy and its reward and cost critics."""

    def __init__(self, actor: Llama, reward_critic: Llama, cost_critic: Llama):
        self.actor, self.reward_critic, self.cost_critic = actor, reward_critic, cost_critic


class PpoCoefficients(NamedTuple):
    learning_rate: float
    clip_range_ratio: float
    clip_range_value: float


def ppo_loss(model: ActorCritics, batch: dict, coeffs: PpoCoefficients):
    """actor + reward critic + cost critic losses (module docstring); safe-rlhf's and
    TRL's metric names."""
    ids, attention_mask, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    length = mask.shape[1]
    stats = response_token_stats(model.actor, ids, attention_mask, length, entropy=True)
    lam = batch["lagrange_multiplier"][:, None]
    advantages = lagrangian_advantages(batch["reward_advantages"], batch["cost_advantages"], lam)
    clip = coeffs.clip_range_ratio
    surrogate, clipped = clipped_surrogate(stats.logps, batch["old_logps"], advantages, clip, clip)
    actor_loss = masked_mean(surrogate, mask)
    metrics = {
        "actor_loss": actor_loss,
        "policy/clipfrac": masked_mean(clipped, mask),
        "approx_kl": masked_mean(0.5 * jnp.square(stats.logps - batch["old_logps"]), mask),
        "entropy": masked_mean(stats.entropy, mask),
        "lambda": jnp.mean(lam),
    }
    loss = actor_loss
    for name in ("reward", "cost"):
        critic = getattr(model, f"{name}_critic")
        values = response_values(critic, ids, attention_mask, length)
        critic_loss, clip_fraction = clipped_value_loss(
            values,
            batch[f"old_{name}_values"],
            batch[f"{name}_returns"],
            mask,
            coeffs.clip_range_value,
        )
        metrics[f"{name}_critic_loss"] = critic_loss
        metrics[f"{name}_critic/clipfrac"] = clip_fraction
        loss = loss + critic_loss
    return loss, metrics, {}


def _token_pass(graphdef, reference_graphdef, params, reference_params, ids, mask, length):
    """log pi_old, log pi_ref and both critics' values of every response token."""
    model = nnx.merge(graphdef, params)
    reference = nnx.merge(reference_graphdef, reference_params)
    return {
        "old_logps": response_token_stats(model.actor, ids, mask, length).logps,
        "ref_logps": response_token_stats(reference, ids, mask, length).logps,
        "reward_values": response_values(model.reward_critic, ids, mask, length),
        "cost_values": response_values(model.cost_critic, ids, mask, length),
    }


def actor_critic_optimizer(stage: PpoLagrangianStage, total: int) -> optax.GradientTransformation:
    """One optimiser per module of ``ActorCritics`` over ``total`` updates, each clipping
    its own gradient norm. The step scales every update by the actor's learning rate, so
    each critic's optimiser ends with critic_lr / actor_lr."""
    critic = stage.critic_train
    b1, b2 = critic.adam_betas
    critic_optimizer = optax.chain(
        make_optimizer(
            total,
            warmup_ratio=critic.warmup_ratio,
            weight_decay=critic.weight_decay,
            max_grad_norm=critic.max_grad_norm,
            b1=b1,
            b2=b2,
            moments_dtype=stage.train.adam_dtype,
            schedule=critic.schedule,
        ),
        optax.scale(critic.learning_rate / stage.train.learning_rate),
    )
    transforms = {
        "actor": policy_optimizer(stage.train, total),
        "reward_critic": critic_optimizer,
        "cost_critic": critic_optimizer,
    }

    def labels(params: dict) -> dict:
        return {name: jax.tree.map(lambda _, n=name: n, params[name]) for name in MODULES}

    return optax.multi_transform(transforms, labels)


def fresh_copy(model: Llama) -> Llama:
    """The same module rebuilt from its parameters: its own variables, shared arrays."""
    return nnx.merge(*split_model(model))


class PpoLagrangianRun(OnPolicyRun):
    stage: PpoLagrangianStage

    def critic(self, name: str | None, score_model: str, models: dict[str, Llama]) -> Llama:
        """A critic's start: ``name``, else the score model, else (oracle) the policy's
        backbone with a zero-initialised head."""
        source = name or score_model
        if source == ORACLE:
            return with_score_head(self.reference, self.ctx.seed)
        self.check_score_model(source, "critic", models[source])
        return fresh_copy(models[source])

    def build_trainer(self, models: dict[str, Llama]) -> tuple[Trainer, dict]:
        stage = self.stage
        starts = (
            fresh_copy(self.reference),
            self.critic(stage.reward_critic, stage.reward_model, models),
            self.critic(stage.cost_critic, stage.cost_model, models),
        )
        seed = self.ctx.seed
        modules = ActorCritics(
            *(with_stage_adapters(stage, m, seed + i) for i, m in enumerate(starts))
        )
        self.graphdef, params = split_model(modules)
        self.actor_graphdef = split_model(modules.actor)[0]
        reference_graphdef, self.reference_params = split_model(self.reference)
        pass_fn = functools.partial(
            _token_pass,
            self.graphdef,
            reference_graphdef,
            length=stage.rollout.max_new_tokens,
        )
        self.compiled_pass = jax.jit(pass_fn)
        coefficients = PpoCoefficients(
            stage.train.learning_rate, stage.clip_range_ratio, stage.clip_range_value
        )
        trainer = Trainer(
            Objective(ppo_loss, coefficients),
            self.graphdef,
            self.reference.config,
            actor_critic_optimizer(stage, self.total),
            self.ctx.mesh,
            grad_accum=stage.train.grad_accum,
            trainable=trainable_leaves(stage, score_model=True),
        )
        return trainer, params

    def policy(self, state: TrainState) -> Llama:
        return nnx.merge(self.actor_graphdef, state.model_params()["actor"])

    def token_pass(self, state: TrainState, input_ids, attention_mask) -> dict[str, jax.Array]:
        return self.compiled_pass(
            state.model_params(), self.reference_params, input_ids, attention_mask
        )

    def update_columns(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """KL-shaped per-token reward and cost, their GAE advantages and returns."""
        stage, mask = self.stage, columns["response_mask"]
        kl = columns["old_logps"] - columns["ref_logps"]
        kept = ("input_ids", "attention_mask", "response_mask", "old_logps")
        out = {name: columns[name] for name in kept}
        for name, weight in (("reward", -stage.kl_coeff), ("cost", stage.kl_coeff)):
            shaped = kl_shaped(columns[f"{name}s"], kl, mask, weight, stage.clip_range_score)
            values = columns[f"{name}_values"]
            advantages, returns = gae(shaped, values, mask, stage.gamma, stage.gae_lambda)
            out[f"{name}_advantages"], out[f"{name}_returns"] = advantages, returns
            out[f"old_{name}_values"] = values
        return out


def run_ppo_lagrangian(
    stage: PpoLagrangianStage, start: Llama, models: dict[str, Llama], ctx: StageContext
) -> Llama:
    """PPO-Lagrangian from ``start`` (also the reference) with the score models in
    ``models`` (by name); returns the trained policy. A finished stage is loaded from
    its export."""
    if is_finished(ctx):
        return load_export(ctx, start)
    return PpoLagrangianRun(stage, start, models, ctx).run()
