"""The on-policy Lagrangian stages' pieces on tiny random models (fast): per-token
log-probs and critic values against direct computations, lambda as data (one
compilation whatever its value), and one-line errors for bad input before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_training_engine import CompileCounter

from sacpo_jax import parallel
from sacpo_jax.algorithms.grpo_lagrangian import GrpoCoefficients, GrpoLagrangianRun, grpo_loss
from sacpo_jax.algorithms.onpolicy import OnPolicyError, policy_optimizer
from sacpo_jax.algorithms.ppo_lagrangian import (
    ActorCritics,
    PpoCoefficients,
    PpoLagrangianRun,
    actor_critic_optimizer,
    ppo_loss,
)
from sacpo_jax.algorithms.token_stats import response_token_stats, response_values
from sacpo_jax.config import ConfigError, GrpoLagrangianStage, PpoLagrangianStage, load_config
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.models.init import init_model, with_score_head
from sacpo_jax.models.llama import Llama, tiny_config
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.objectives import Objective
from sacpo_jax.training.optim import schedule_shape
from sacpo_jax.training.state import split_model

TOKENIZER = oracle_tokenizer()
PROMPTS = {"source": {"type": "bundled", "name": "sft"}, "limit": 16}


def one_device_mesh():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def policy():
    """A one-layer random LLaMA over the oracle tokenizer (weights large enough that
    log-probs differ between tokens)."""
    config = tiny_config(vocab_size=len(TOKENIZER), hidden_size=32, head_dim=8)
    return init_model(config.replace(num_hidden_layers=1), one_device_mesh(), init_std=0.2)


def with_vocabulary(model, vocab_size: int):
    """``model`` with its embedding table resized to ``vocab_size`` rows (zeros)."""
    config = model.config.replace(vocab_size=vocab_size)
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))[0]
    params = split_model(model)[1]
    params["embed"] = jnp.zeros((vocab_size, config.hidden_size), jnp.float32)
    return nnx.merge(graphdef, params)


def stage_spec(kind: str, **overrides) -> dict:
    spec = {
        "name": kind,
        "kind": kind,
        "prompts": PROMPTS,
        "reward_model": "oracle",
        "cost_model": "oracle",
        "rollout": {"prompts_per_round": 4, "max_new_tokens": 4, "batch_size": 8},
        "train": {"batch_size": 4},
    }
    if kind == "grpo_lagrangian":
        spec["group_size"] = 2
    return {**spec, **overrides}


# ----------------------------------------------------------------------------- per token


def rollout_like_batch(rows: int = 4, prompt: int = 5, response: int = 4) -> tuple:
    """Left-padded prompts, then responses that end early (pads after them)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, len(TOKENIZER), size=(rows, prompt + response)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # a shorter prompt
    mask[1, -2:] = 0  # a response of two tokens
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask), response


def jitted(model, method):
    """``method(model, *arrays)`` compiled (eager model calls compile op by op)."""
    graphdef, params = split_model(model)
    compiled = jax.jit(lambda p, *arrays: method(nnx.merge(graphdef, p), *arrays))
    return lambda *arrays: compiled(params, *arrays)


def test_response_logps_are_the_logits_log_softmax_at_the_previous_position(policy):
    model = policy
    ids, mask, length = rollout_like_batch()
    stats = jitted(model, lambda m, i, k: response_token_stats(m, i, k, length, entropy=True))(
        ids, mask
    )
    logits = np.asarray(jitted(model, lambda m, i, k: m(i, k))(ids, mask), np.float64)
    prompt = ids.shape[1] - length
    for t in range(length):
        z = logits[:, prompt + t - 1]
        log_probs = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))[:, None]
        log_probs -= z.max(-1)[:, None]
        want = log_probs[np.arange(len(z)), np.asarray(ids[:, prompt + t])]
        np.testing.assert_allclose(stats.logps[:, t], want, rtol=1e-4, atol=1e-5)
        entropy = -(np.exp(log_probs) * log_probs).sum(-1)
        np.testing.assert_allclose(stats.entropy[:, t], entropy, rtol=1e-4, atol=1e-5)


def test_critic_values_are_the_score_of_each_prefix(policy):
    """The value of response token t is what the score model gives the sequence cut just
    before it (its score is read at the last real token; later tokens are masked out)."""
    graphdef, params = split_model(with_score_head(policy, seed=0))
    params["score_head"] = jnp.asarray(np.random.default_rng(1).normal(size=(32, 1)), jnp.float32)
    critic = nnx.merge(graphdef, params)
    ids, mask, length = rollout_like_batch()
    values = jitted(critic, lambda m, i, k: response_values(m, i, k, length))(ids, mask)
    score = jitted(critic, lambda m, i, k: m(i, k))
    prompt = ids.shape[1] - length
    for t in range(length):
        cut = prompt + t  # the tokens before response token t; the rest masked out
        real = np.asarray(mask[:, cut]) == 1  # pads after a response's end take no value
        scores = score(ids, mask.at[:, cut:].set(0))
        np.testing.assert_allclose(values[real, t], scores[real], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- lambda as data


def update_batch(lam: float, rows: int = 4) -> dict:
    ids, mask, length = rollout_like_batch(rows)
    rng = np.random.default_rng(2)
    response_mask = np.asarray(mask[:, -length:])

    def noise():
        return rng.normal(size=(rows, length)).astype(np.float32)

    return {
        "input_ids": np.asarray(ids),
        "attention_mask": np.asarray(mask),
        "response_mask": response_mask,
        "old_logps": noise() - 5.0,
        "ref_logps": noise() - 5.0,
        "reward_advantages": noise(),
        "cost_advantages": 3.0 * noise(),
        "reward_returns": noise(),
        "cost_returns": noise(),
        "old_reward_values": noise(),
        "old_cost_values": noise(),
        "lagrange_multiplier": np.full(rows, lam, np.float32),
    }


def ppo_trainer(actor) -> tuple[Trainer, dict]:
    stage = PpoLagrangianStage.model_validate(stage_spec("ppo_lagrangian"))
    modules = ActorCritics(actor, with_score_head(actor, 0), with_score_head(actor, 1))
    graphdef, params = split_model(modules)
    objective = Objective(ppo_loss, PpoCoefficients(1e-3, 0.2, 5.0))
    optimizer = actor_critic_optimizer(stage, 10)
    return Trainer(objective, graphdef, actor.config, optimizer, one_device_mesh()), params


def grpo_trainer(actor) -> tuple[Trainer, dict]:
    stage = GrpoLagrangianStage.model_validate(stage_spec("grpo_lagrangian"))
    graphdef, params = split_model(actor)
    objective = Objective(grpo_loss, GrpoCoefficients(1e-3, 0.04, 0.2, 0.2))
    optimizer = policy_optimizer(stage.train, 10)
    return Trainer(objective, graphdef, actor.config, optimizer, one_device_mesh()), params


@pytest.mark.parametrize("build", [ppo_trainer, grpo_trainer], ids=["ppo", "grpo"])
def test_new_lambdas_never_recompile_the_update(build, policy):
    trainer, params = build(policy)
    losses = []
    with CompileCounter() as counter:
        for lam in (0.0, 1.0, 4.0, 0.25):
            state = trainer.fresh_state(params)  # the same start, so only lambda differs
            _, metrics = trainer.step(state, trainer.place(update_batch(lam)))
            assert float(metrics["lambda"]) == pytest.approx(lam)
            losses.append(float(metrics["actor_loss" if "actor_loss" in metrics else "loss"]))
    assert counter.count("jit(step)") == 1
    assert trainer.train_step.compiled._cache_size() == 1
    assert len(set(losses)) == 4  # lambda reached the loss each time


def test_actor_and_critics_step_with_their_own_learning_rates(policy):
    """Adam's first step moves each parameter by lr * |m / sqrt(v)| = lr (up to eps), so
    the largest change of each module is its own learning rate (the critics' reach the
    step as critic_lr / actor_lr in their optimiser). The critics' constant schedule is
    a linear warmup, then flat."""
    train = {"batch_size": 4, "learning_rate": 2e-3, "warmup_ratio": 0.0}
    spec = stage_spec("ppo_lagrangian", train=train)
    spec["critic_train"] = {"learning_rate": 5e-4, "warmup_ratio": 0.0}
    stage = PpoLagrangianStage.model_validate(spec)
    modules = ActorCritics(policy, with_score_head(policy, 0), with_score_head(policy, 1))
    graphdef, params = split_model(modules)
    objective = Objective(ppo_loss, PpoCoefficients(2e-3, 0.2, 5.0))
    optimizer = actor_critic_optimizer(stage, 100)
    trainer = Trainer(objective, graphdef, policy.config, optimizer, one_device_mesh())
    before = jax.device_get(params)
    state, _ = trainer.step(trainer.fresh_state(params), trainer.place(update_batch(1.0)))
    after = jax.device_get(state.params)
    for module, lr in (("actor", 2e-3), ("reward_critic", 5e-4), ("cost_critic", 5e-4)):
        moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), after[module], before[module])
        assert max(jax.tree.leaves(moved)) == pytest.approx(lr, rel=1e-3), module
    constant = schedule_shape(100, 0.1, "constant")
    np.testing.assert_allclose([constant(s) for s in (0, 5, 10, 99)], [0.0, 0.5, 1.0, 1.0])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("grpo_lagrangian", {"group_size": 0}, "group_size: Input should be greater than 1"),
        ("grpo_lagrangian", {"group_size": -3}, "group_size: Input should be greater than 1"),
        ("ppo_lagrangian", {"lambda_init": 2.0, "lambda_max": 1.0}, "lambda_max 1.0 is below"),
        ("grpo_lagrangian", {"cost_model": None}, "stages.0.cost_model"),
        ("ppo_lagrangian", {"reward_model": "no_such_rm"}, "names 'no_such_rm', which is"),
        ("ppo_lagrangian", {"train": {"batch_size": 3}}, "does not divide the 4 responses"),
        ("ppo_lagrangian", {"train": {"max_steps": 3}}, "set the stage's rounds"),
        ("grpo_lagrangian", {"lora": {"dropout": 0.05}}, "lora.dropout 0.05: on-policy stages"),
    ],
)
def test_config_errors_are_one_line(tmp_path, kind, overrides, message):
    spec = stage_spec(kind, **overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    config = {"model": {"random": {}}, "tokenizer": {"path": "bundled:oracle"}, "stages": [spec]}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["ppo_lagrangian", "grpo_lagrangian"])
def test_a_quantized_base_needs_a_lora_block(tmp_path, kind):
    """A frozen quantized base cannot be fully fine-tuned: refused in one line without a
    ``lora`` block, accepted with one (QLoRA)."""
    path = tmp_path / "c.yaml"
    model = {"random": {}, "quantize": "nf4"}
    config = {"model": model, "tokenizer": {"path": "bundled:oracle"}}
    path.write_text(json.dumps({**config, "stages": [stage_spec(kind)]}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert f"stage '{kind}' trains the full model" in str(error.value)
    assert "\n" not in str(error.value)
    lora = {"rank": 4, "targets": ["q_proj", "v_proj"]}
    path.write_text(json.dumps({**config, "stages": [{**stage_spec(kind), "lora": lora}]}))
    stage = load_config(str(path)).stages[0]
    assert stage.lora.rank == 4 and not stage.trains_full_model


def context(tmp_path) -> StageContext:
    return StageContext(
        mesh=one_device_mesh(),
        tokenizer=TOKENIZER,
        stage_dir=str(tmp_path / "stage"),
        cache_dir=str(tmp_path / "cache"),
        tensorboard=False,
        progress_bar=False,
    )


@pytest.mark.parametrize("run", [PpoLagrangianRun, GrpoLagrangianRun], ids=["ppo", "grpo"])
def test_score_models_are_checked_before_any_compute(tmp_path, run, policy):
    kind = "ppo_lagrangian" if run is PpoLagrangianRun else "grpo_lagrangian"
    stage = PpoLagrangianStage if run is PpoLagrangianRun else GrpoLagrangianStage
    spec = stage.model_validate(stage_spec(kind, reward_model="rm", cost_model="cm"))
    scorer = with_score_head(policy, 0)
    wider = with_vocabulary(scorer, len(TOKENIZER) + 8)
    cases = [
        ({"rm": policy, "cm": scorer}, "reward_model 'rm' is a causal LM"),
        (
            {"rm": scorer, "cm": wider},
            f"cost_model 'cm' has a vocabulary of {len(TOKENIZER) + 8} tokens but the policy "
            f"has {len(TOKENIZER)}",
        ),
    ]
    for models, message in cases:
        with pytest.raises(OnPolicyError) as error:
            run(spec, policy, models, context(tmp_path))
        assert message in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "stage").exists()  # nothing written, nothing computed


# ----------------------------------------------------------------------------- recipes

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["safe_rlhf_ppo_lag_7b.yaml", "safe_rlhf_ppo_lag_7b_tpu.yaml"])
def test_safe_rlhf_recipe_has_the_published_settings(name):
    """safe-rlhf scripts/ppo-lag.sh (REFERENCE-NEXT §1), on 8 devices' worth of batches."""
    config = load_config(str(CONFIGS / name))
    stage = next(s for s in config.stages if s.kind == "ppo_lagrangian")
    assert config.model.path == "PKU-Alignment/alpaca-7b-reproduced" and config.seed == 42
    assert (stage.reward_model, stage.cost_model) == (
        "PKU-Alignment/beaver-7b-v1.0-reward",
        "PKU-Alignment/beaver-7b-v1.0-cost",
    )
    assert stage.reward_critic is None and stage.cost_critic is None  # from the RM and CM
    r = stage.rollout
    assert (r.temperature, r.top_p, stage.samples_per_prompt) == (1.0, 1.0, 1)
    assert r.max_prompt_length + r.max_new_tokens == 512
    assert r.prompts_per_round == stage.train.batch_size == 16 * 8
    assert (stage.train.epochs, stage.update_epochs, stage.train.grad_accum) == (1, 1, 1)
    t, c = stage.train, stage.critic_train
    assert (t.learning_rate, t.weight_decay, t.warmup_ratio) == (1e-5, 0.01, 0.03)
    assert (c.learning_rate, c.weight_decay, c.warmup_ratio, c.schedule) == (
        5e-6, 0.0, 0.03, "constant",
    )  # fmt: skip
    assert t.adam_betas == c.adam_betas == (0.9, 0.95)
    assert (stage.kl_coeff, stage.clip_range_ratio, stage.clip_range_value) == (0.01, 0.2, 5.0)
    assert (stage.clip_range_score, stage.gamma, stage.gae_lambda) == (50.0, 1.0, 0.95)
    lagrangian = (stage.threshold, stage.lambda_init, stage.lambda_lr, stage.lambda_max)
    assert lagrangian == (0.0, 1.0, 0.1, 5.0) and stage.episode_cost_window == 128
    assert config.model.compute_dtype == "bfloat16" and config.model.remat


def test_tpu_recipe_differs_from_the_gpu_recipe_only_in_placement():
    gpu = load_config(str(CONFIGS / "safe_rlhf_ppo_lag_7b.yaml"))
    tpu = load_config(str(CONFIGS / "safe_rlhf_ppo_lag_7b_tpu.yaml"))
    assert (gpu.mesh.fsdp, tpu.mesh.fsdp) == (8, -1) and tpu.run_dir.startswith("gs://")
    placement = {"name", "run_dir", "mesh"}
    assert gpu.model_dump(exclude=placement) == tpu.model_dump(exclude=placement)


@pytest.mark.parametrize("kind", ["ppo_lagrangian", "grpo_lagrangian"])
def test_lora_dropout_defaults_to_zero_in_on_policy_stages(kind):
    """The ratio pi / pi_old must be 1 at the sampling policy: no dropout unless asked (and
    asking is refused: test_config_errors_are_one_line)."""
    stage = PpoLagrangianStage if kind == "ppo_lagrangian" else GrpoLagrangianStage
    assert stage.model_validate(stage_spec(kind, lora={"rank": 4})).lora.dropout == 0.0
