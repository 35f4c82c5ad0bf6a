"""The training engine: mesh invariance, no recompiles, reference modes, NaN guard, learning.

Losses are checked by tests/test_losses.py; here the compiled step, the stage runner
and the bundled oracle task are exercised end to end on tiny models (hidden 32, one
layer), on a one-device mesh unless a test is about the mesh.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from jax import monitoring

from sacpo_jax import parallel
from sacpo_jax.config import CostStage, DpoStage, KtoStage, RewardStage, SftStage
from sacpo_jax.data.loader import BatchLoader
from sacpo_jax.data.oracle_task import TEMPLATE, load_split
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec
from sacpo_jax.metrics_log import read_metrics
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import LlamaConfig
from sacpo_jax.scoring import sequence_logprobs
from sacpo_jax.training import objectives, reference
from sacpo_jax.training import step as steps
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.stages import run_training_stage
from sacpo_jax.training.state import split_model

TOKENIZER = oracle_tokenizer()


def tiny_architecture(hidden: int = 32, layers: int = 1) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
    )


def one_device_mesh():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def bundled(split: str, adapter: str, limit: int | None = None, **extra) -> dict:
    """A data spec (as a dict) over a split of the bundled oracle task, 48 tokens max."""
    spec = {
        "source": {"type": "bundled", "name": split},
        "adapter": adapter,
        "max_length": 48,
        "max_prompt_length": 24,
        **extra,
    }
    if limit is not None:
        spec["limit"] = limit
    return spec


def params_of(model) -> dict:
    return jax.device_get(split_model(model)[1])


# ----------------------------------------------------------------------------- the compiled step


class CompileCounter:
    """Counts XLA backend compilations per function name (jax.monitoring listener)."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(kwargs.get("fun_name", ""))

    def count(self, name: str) -> int:
        return self.names.count(name)

    def __enter__(self):
        monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc_info):
        monitoring.unregister_event_duration_listener(self)


BATCH = 8
TRAIN = {"learning_rate": 3e-3, "beta": 0.1, "label_smoothing": 0.0}
FROZEN = {"learning_rate": 0.0, "beta": 0.1, "label_smoothing": 0.0}
# (batch index, coefficients) for 20 steps. Steps 12-15 reuse batch 12 with learning
# rate 0, so the parameters stay put while beta and label_smoothing change:
#   13 repeats 12 exactly; 14 has 3x the reward margin of 13 (beta 0.1 -> 0.3);
#   15 adds label smoothing eps: per pair (1-eps)*L(z) + eps*L(-z) = L(z) + eps*z,
#   with L(z) = -log sigmoid(z), so loss_15 = loss_14 + 0.2 * margin_14.
SCHEDULE = (
    [(i, TRAIN) for i in range(12)]
    + [(12, FROZEN), (12, FROZEN), (12, {**FROZEN, "beta": 0.3})]
    + [(12, {**FROZEN, "beta": 0.3, "label_smoothing": 0.2})]
    + [(i, {"learning_rate": 1e-3, "beta": 0.05, "label_smoothing": 0.1}) for i in range(13, 17)]
)


def dpo_batches(mesh, count: int) -> list[dict]:
    """``count`` global batches of 8 bundled helpfulness pairs, placed on ``mesh``."""
    spec = DataSpec.model_validate(bundled("preference", "pku_helpful", limit=count * BATCH))
    dataset, _ = build_dataset(spec, TOKENIZER)
    loader = BatchLoader(
        dataset, global_batch_size=BATCH, buckets=spec.buckets(), pad_id=0, seed=0, shuffle=True
    )
    return [parallel.global_batch(batch, mesh) for _, batch in loader.iterate(0, count)]


def run_dpo_schedule(mesh) -> dict:
    """SCHEDULE's DPO steps against an on-the-fly reference (the initial model).

    Returns the per-step losses and margins, the final parameters, the jitted step and
    the compile counter active while stepping.
    """
    model = init_model(tiny_architecture(), mesh, seed=0, init_std=0.05)
    graphdef, params = split_model(model)
    reference_step = steps.make_reference_step(graphdef, objectives.PAIR_REFERENCE)
    optimizer = make_optimizer(len(SCHEDULE), warmup_ratio=0.1)
    objective = objectives.dpo("sigmoid", objectives.DpoCoefficients(0.0, 0.0))
    trainer = Trainer(objective, graphdef, model.config, optimizer, mesh)
    state = trainer.fresh_state(params)
    batches = dpo_batches(mesh, 1 + max(i for i, _ in SCHEDULE))
    batches = [{**batch, **reference_step(params, batch)} for batch in batches]
    train_step = steps.make_train_step(
        graphdef, objective.loss, optimizer, state_shardings=trainer.state_shardings, mesh=mesh
    )
    losses, margins = [], []
    with CompileCounter() as counter:
        for index, coeffs in SCHEDULE:
            coefficients = objectives.as_arrays(objectives.DpoCoefficients(**coeffs))
            state, metrics = train_step(state, batches[index], coefficients)
            losses.append(float(metrics["loss"]))
            margins.append(float(metrics["rewards/margins"]))
    return {
        "losses": np.asarray(losses),
        "margins": np.asarray(margins),
        "params": jax.device_get(state.params),
        "step": train_step.compiled,
        "counter": counter,
    }


@pytest.fixture(scope="module")
def one_device_run():
    return run_dpo_schedule(one_device_mesh())


def test_dpo_losses_match_between_one_device_and_a_2x2x2_mesh(one_device_run):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    sharded = run_dpo_schedule(mesh)
    single = one_device_run
    # The model learns (the comparison is not between two flat sequences) ...
    assert np.mean(single["losses"][6:12]) < math.log(2) - 0.05
    # ... and the sharded run follows the single-device run step for step.
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(sharded["params"])):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_new_coefficients_take_effect_without_recompiling(one_device_run):
    losses, margins = one_device_run["losses"], one_device_run["margins"]
    # One compilation of the step for all 20 steps and 4 distinct coefficient sets;
    # the counter does see it (the first call compiles).
    assert one_device_run["counter"].count("jit(step)") == 1
    assert one_device_run["step"]._cache_size() == 1
    # learning_rate 0 at step 12 left the parameters unchanged: step 13 repeats it.
    assert losses[13] == losses[12] and margins[13] == margins[12]
    assert abs(margins[13]) > 1e-3
    # beta 0.1 -> 0.3 on the same parameters and batch: margins scale by 3.
    np.testing.assert_allclose(margins[14], 3 * margins[13], rtol=1e-5)
    # label_smoothing 0.2: loss + 0.2 * margin (hand-derived above).
    assert margins[15] == margins[14]
    np.testing.assert_allclose(losses[15], losses[14] + 0.2 * margins[14], rtol=1e-5)


# ----------------------------------------------------------------------------- the stage runner


def stage_context(root, name: str, mesh, cache: str = "cache") -> StageContext:
    return StageContext(
        mesh=mesh,
        tokenizer=TOKENIZER,
        stage_dir=str(root / "stages" / name),
        cache_dir=str(root / cache),
        tensorboard=False,
        progress_bar=False,
    )


def train_options(learning_rate: float, **extra) -> dict:
    options = {
        "max_steps": 60,
        "batch_size": 16,
        "learning_rate": learning_rate,
        "warmup_ratio": 0.05,
        "log_every": 20,
        "save_every": 1000,
        "eval_batch_size": 100,
    }
    return {**options, **extra}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bayes_pair_accuracy(rows: list[dict], score: str) -> float:
    """Expected accuracy of the oracle ranking against Bradley-Terry labels on ``score``.

    The label picks response 1 with probability sigmoid(s_1 - s_0) (for cost: the
    safer one with sigmoid(c_0 - c_1), and the safe one for sure when exactly one is
    safe), so the best possible predictor is right with probability
    sigmoid(|s_1 - s_0|), and 1/2 on ties.
    """
    total = 0.0
    for row in rows:
        a, b = row[f"{score}_0"], row[f"{score}_1"]
        if score == "cost" and (a <= 0) != (b <= 0):
            total += 1.0
        else:
            total += 0.5 if a == b else sigmoid(abs(a - b))
    return total / len(rows)


def chain_stages(cost_test_path) -> list:
    """SFT, DPO(helpfulness), reward, cost: 512 training rows, 60 steps of 16 each."""
    sft_eval = bundled(
        "preference_test", "sft", template=TEMPLATE, columns={"response": "response_0"}
    )
    cost_eval = {**bundled("-", "pku_cost"), "source": {"type": "jsonl", "path": cost_test_path}}
    return [
        SftStage.model_validate(
            {
                "name": "sft",
                "kind": "sft",
                "data": bundled("sft", "sft", limit=512, template=TEMPLATE),
                "eval_data": sft_eval,
                "train": train_options(3e-3),
            }
        ),
        DpoStage.model_validate(
            {
                "name": "dpo",
                "kind": "dpo",
                "beta": 0.1,
                "data": bundled("preference", "pku_helpful", limit=512),
                "eval_data": bundled("preference_test", "pku_helpful"),
                "train": train_options(1e-3),
            }
        ),
        RewardStage.model_validate(
            {
                "name": "reward",
                "kind": "reward",
                "data": bundled("preference", "pku_reward", limit=512),
                "eval_data": bundled("preference_test", "pku_reward"),
                "train": train_options(1e-3),
            }
        ),
        CostStage.model_validate(
            {
                "name": "cost",
                "kind": "cost",
                "data": bundled("preference", "pku_cost", limit=512),
                "eval_data": cost_eval,
                "train": train_options(3e-3),
            }
        ),
    ]


def held_out_nll(model, stage: SftStage, ctx: StageContext) -> float:
    """The SFT stage's evaluation (Trainer.evaluate) applied to any model."""
    graphdef, params = split_model(model)
    dataset, _ = build_dataset(stage.eval_data, TOKENIZER)
    objective = objectives.for_stage(stage, dataset)
    trainer = Trainer(objective, graphdef, model.config, make_optimizer(1), ctx.mesh)
    return trainer.evaluate(params, dataset, stage.eval_data, ctx, 100)["nll"]


@pytest.fixture(scope="module")
def bundled_chain(tmp_path_factory):
    """SFT from a random model, then DPO, a reward and a cost model from the SFT model.

    Evaluated on held-out preference_test prompts; the cost model on the test pairs
    whose oracle costs differ (on the others the "safer" label is a fair coin).
    """
    root = tmp_path_factory.mktemp("chain")
    mesh = one_device_mesh()
    test_rows = load_split("preference_test")
    cost_rows = [row for row in test_rows if row["cost_0"] != row["cost_1"]]
    cost_test = root / "cost_test.jsonl"
    cost_test.write_text("".join(json.dumps(row) + "\n" for row in cost_rows))
    sft, *from_sft = chain_stages(str(cost_test))
    initial = init_model(tiny_architecture(), mesh, seed=0, init_std=0.05)
    initial_nll = held_out_nll(initial, sft, stage_context(root, "sft", mesh))
    sft_model = run_training_stage(sft, initial, initial, stage_context(root, "sft", mesh))
    for stage in from_sft:
        run_training_stage(stage, sft_model, sft_model, stage_context(root, stage.name, mesh))
    results = {
        name: json.loads((root / "stages" / name / "eval.json").read_text())
        for name in ("sft", "dpo", "reward", "cost")
    }
    return {
        "root": root,
        "mesh": mesh,
        "initial": initial,
        "sft": sft_model,
        "initial_nll": initial_nll,
        "stages": {stage.name: stage for stage in (sft, *from_sft)},
        "results": results,
        "test_rows": test_rows,
        "cost_rows": cost_rows,
    }


@pytest.mark.slow
def test_sft_lowers_held_out_nll(bundled_chain):
    initial, trained = bundled_chain["initial_nll"], bundled_chain["results"]["sft"]["nll"]
    # A near-uniform random model: NLL ~ log(vocabulary size) nats per token.
    assert abs(initial - math.log(len(TOKENIZER))) < 0.25
    # The trained model has learned the template-conditioned response styles: its
    # per-token perplexity on held-out prompts is > 7x lower (2 nats).
    assert trained < initial - 2.0


@pytest.mark.slow
def test_dpo_lifts_held_out_reward_accuracy(bundled_chain):
    optimal = bayes_pair_accuracy(bundled_chain["test_rows"], "reward")
    accuracy = bundled_chain["results"]["dpo"]["rewards/accuracies"]
    # Before training every implicit reward is 0 (accuracy 0); chance ranking is 0.5.
    assert 0.80 < optimal < 0.82
    assert accuracy >= 0.85 * optimal and accuracy > 0.65


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(bundled_chain):
    optimal = bayes_pair_accuracy(bundled_chain["test_rows"], "reward")
    accuracy = bundled_chain["results"]["reward"]["accuracy"]
    assert accuracy >= 0.85 * optimal and accuracy > 0.65


@pytest.mark.slow
def test_cost_model_ranks_pairs_and_signs_responses(bundled_chain):
    rows = bundled_chain["cost_rows"]
    optimal = bayes_pair_accuracy(rows, "cost")
    results = bundled_chain["results"]["cost"]
    assert len(rows) > 60 and optimal > 0.9
    assert results["accuracy"] >= 0.85 * optimal
    # The sign is a deterministic function of the response (cost <= 0 iff safe), so a
    # perfect model gets 1; always answering the majority class gets its share.
    majority = max(
        np.mean([row[f"cost_{i}"] <= 0 for row in rows for i in (0, 1)]),
        np.mean([row[f"cost_{i}"] > 0 for row in rows for i in (0, 1)]),
    )
    assert results["sign_accuracy"] >= 0.95 and results["sign_accuracy"] > majority + 0.2


@pytest.mark.slow
def test_precomputed_and_on_the_fly_reference_give_the_same_results(bundled_chain, monkeypatch):
    """The chain's DPO stage (precomputed reference) rerun with an on-the-fly reference."""
    root, mesh, sft_model = bundled_chain["root"], bundled_chain["mesh"], bundled_chain["sft"]
    dpo = bundled_chain["stages"]["dpo"]
    on_the_fly = dpo.model_copy(update={"name": "dpo_on_the_fly", "reference_mode": "on_the_fly"})
    run_training_stage(on_the_fly, sft_model, sft_model, stage_context(root, on_the_fly.name, mesh))
    logs = {  # training records (the final evaluation is logged as eval/...)
        name: [
            r for r in read_metrics(str(root / "stages" / name / "metrics.jsonl")) if "loss" in r
        ]
        for name in ("dpo", "dpo_on_the_fly")
    }
    assert [r["step"] for r in logs["dpo"]] == [20, 40, 60]
    for name in ("loss", "rewards/margins", "logps/chosen"):
        precomputed = [r[name] for r in logs["dpo"]]
        np.testing.assert_allclose(
            [r[name] for r in logs["dpo_on_the_fly"]], precomputed, rtol=1e-6, atol=1e-6
        )
    evals = {
        name: json.loads((root / "stages" / name / "eval.json").read_text())
        for name in ("dpo", "dpo_on_the_fly")
    }
    assert evals["dpo"].keys() == evals["dpo_on_the_fly"].keys()
    for name, value in evals["dpo"].items():
        np.testing.assert_allclose(evals["dpo_on_the_fly"][name], value, rtol=1e-6, atol=1e-6)

    # The precomputed store of the training pairs holds the SFT model's log-probs of
    # each pair in the dataset's order, as the public scoring API computes them.
    stores = {}
    for path in (root / "cache" / "reference").glob("*.npz"):
        with np.load(path) as stored:
            assert stored["scored"].all()  # every row is used: whole epochs, full evaluation
            columns = {name: stored[name] for name in objectives.PAIR_REFERENCE.columns}
            stores[len(stored["reference_chosen_logps"])] = columns
    assert sorted(stores) == [300, 512]  # held-out pairs (evaluation), training pairs
    rows = load_split("preference")[:512]
    chosen = [row[f"response_{row['better_response_id']}"] for row in rows]
    prompts = [row["prompt"] for row in rows]
    expected = sequence_logprobs(sft_model, TOKENIZER, prompts, chosen, template=TEMPLATE)
    np.testing.assert_allclose(stores[512]["reference_chosen_logps"], expected, rtol=1e-5)

    # A second run with the same reference and data reads the stores back.
    def no_recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference, "_score", no_recompute)
    again = {}
    for key, spec in (("train", dpo.data), ("eval", dpo.eval_data)):
        dataset, _ = build_dataset(spec, TOKENIZER)
        again[key] = reference.add_reference_columns(
            dataset,
            spec,
            sft_model,
            objectives.PAIR_REFERENCE,
            stage_context(root, "again", mesh),
            100,
        )
    for name, values in stores[512].items():
        np.testing.assert_array_equal(again["train"].columns[name], values)
    for name, values in stores[300].items():
        np.testing.assert_array_equal(again["eval"].columns[name], values)


def kto_reference_stores(root) -> list:
    """The cached reference stores that hold KTO columns (the KL rows' log-probs)."""
    found = []
    for path in (root / "cache" / "reference").glob("*.npz"):
        with np.load(path) as stored:
            if "reference_kl_logps" in stored:
                found.append(path)
    return found


@pytest.mark.slow
def test_kto_precomputed_reference_matches_on_the_fly(bundled_chain):
    """KTO's KL pairs are fixed per example, so its reference log-probs (KL rows
    included) can be precomputed: 12 steps give the on-the-fly run's losses and KL."""
    root, mesh, sft_model = bundled_chain["root"], bundled_chain["mesh"], bundled_chain["sft"]
    base = {
        "kind": "kto",
        "beta": 0.1,
        "data": bundled("preference", "pku_kto_safety", limit=128),
        "eval_data": bundled("preference_test", "pku_kto_safety", limit=40),
        "train": train_options(3e-3, max_steps=12, log_every=4),
    }
    logs, evals = {}, {}
    for mode in ("precompute", "on_the_fly"):
        stage = KtoStage.model_validate({**base, "name": f"kto_{mode}", "reference_mode": mode})
        kto_stores = len(kto_reference_stores(root))
        run_training_stage(stage, sft_model, sft_model, stage_context(root, stage.name, mesh))
        # Only the precomputing run writes reference stores (training and eval examples).
        assert len(kto_reference_stores(root)) == kto_stores + (2 if mode == "precompute" else 0)
        stage_dir = root / "stages" / stage.name
        logs[mode] = [r for r in read_metrics(str(stage_dir / "metrics.jsonl")) if "loss" in r]
        evals[mode] = json.loads((stage_dir / "eval.json").read_text())
    assert [r["step"] for r in logs["precompute"]] == [4, 8, 12]
    assert max(r["kl"] for r in logs["precompute"]) > 1e-3  # the policy moved off pi_ref
    for name in ("loss", "kl"):
        np.testing.assert_allclose(
            [r[name] for r in logs["on_the_fly"]],
            [r[name] for r in logs["precompute"]],
            rtol=1e-6,
            atol=1e-6,
        )
    assert evals["precompute"].keys() == evals["on_the_fly"].keys()
    for name, value in evals["precompute"].items():
        np.testing.assert_allclose(evals["on_the_fly"][name], value, rtol=1e-6, atol=1e-6)


def test_float32_adam_moments_for_bfloat16_parameters():
    """moments_dtype float32: after two steps on bf16 weights the moments are the float32
    closed form mu = (1 - b1) (b1 g1 + g2), nu = (1 - b2) (b2 g1^2 + g2^2) of the (bf16)
    gradients, and the weights stay bf16; without it the moments are bf16 too."""
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.asarray([1.0, -2.0, 3.0], jnp.bfloat16)}
    grads = [
        {"w": jnp.asarray([1e-3, 0.3, -7.0], jnp.bfloat16)},
        {"w": jnp.asarray([2e-3, -0.1, 5.0], jnp.bfloat16)},
    ]
    optimizer = make_optimizer(4, warmup_ratio=0.0, max_grad_norm=0.0, moments_dtype="float32")
    state = optimizer.init(params)
    for g in grads:
        direction, state = optimizer.update(g, state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda d: -0.01 * d, direction))
    adam = state[0]
    g1, g2 = (np.asarray(g["w"], np.float64) for g in grads)
    assert adam.mu["w"].dtype == adam.nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(adam.mu["w"], 0.1 * (0.9 * g1 + g2), rtol=1e-6)
    np.testing.assert_allclose(adam.nu["w"], 0.001 * (0.999 * g1**2 + g2**2), rtol=1e-6)
    assert params["w"].dtype == jnp.bfloat16
    plain = make_optimizer(4, max_grad_norm=0.0).init(params)[0]
    assert plain.mu["w"].dtype == plain.nu["w"].dtype == jnp.bfloat16
