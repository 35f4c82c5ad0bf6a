"""The shell's extension points: a new loss is one registry entry (trained here through
the command line), and a trainable filter freezes leaves without optimiser state."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from sacpo_jax import losses, parallel, train
from sacpo_jax.metrics_log import read_metrics
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import tiny_config
from sacpo_jax.training import objectives
from sacpo_jax.training.loop import Trainer
from sacpo_jax.training.optim import make_optimizer
from sacpo_jax.training.state import split_model

PAIRS = {
    "source": {"type": "bundled", "name": "preference"},
    "adapter": "pku_helpful",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 64,
}


def squared_margin(pairs: losses.PairLogps, coeffs) -> jax.Array:
    """A toy DPO-family loss: (beta * delta - 1)^2, minimal at a margin of 1/beta."""
    return (coeffs.beta * pairs.delta - 1.0) ** 2


def test_a_loss_registered_in_one_place_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(losses.PAIR_LOSSES, "squared_margin", losses.PairLoss(squared_margin))
    run = {
        "name": "toy",
        "run_dir": str(tmp_path / "run"),
        "model": {"random": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
        "tokenizer": {"path": "bundled:oracle"},
        "tensorboard": False,
        "progress_bar": False,
        "stages": [
            {
                "name": "dpo",
                "kind": "dpo",
                "loss_type": "squared_margin",
                "beta": 0.5,
                "data": PAIRS,
                "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3,
                          "warmup_ratio": 0.0, "log_every": 1},
            }
        ],
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert train.main(["--config", str(path)]) == 0
    records = [r for r in read_metrics(tmp_path / "run/stages/dpo/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    # Step 1 scores the start model, which is its own reference: delta = 0 (up to float32
    # rounding: the reference pass batches other rows together), loss = 1.
    assert abs(records[0]["loss"] - 1.0) < 1e-5
    # (plain DPO would log log 2 there.) Every step the loss is the mean of (z - 1)^2 over
    # the batch, z = beta * delta, whose mean the log reports as rewards/margins; by
    # Jensen it is at least (mean z - 1)^2. And it falls as the margins approach 1.
    for r in records:
        assert r["loss"] >= (r["rewards/margins"] - 1.0) ** 2 - 1e-6
    assert records[-1]["loss"] < 0.9 and records[-1]["rewards/margins"] > 0.05
    finished = json.loads((tmp_path / "run/stages/dpo/checkpoints/FINISHED.json").read_text())
    assert finished["step"] == 12


def test_frozen_leaves_stay_bit_identical_and_hold_no_optimiser_state(tmp_path):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    model = init_model(tiny_config(vocab_size=64), mesh, seed=0, init_std=0.05)
    graphdef, params = split_model(model)
    before = jax.tree.map(np.asarray, params)

    def trainable(name: str) -> bool:
        return name.startswith("layers/")

    objective = objectives.sft_loss
    trainer = Trainer(
        objectives.Objective(objective, objectives.Coefficients(1e-2)),
        graphdef,
        model.config,
        make_optimizer(8, warmup_ratio=0.0),
        mesh,
        trainable=trainable,
    )
    state = trainer.fresh_state(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(0, 64, (4, 16), dtype=np.int32)
        batch = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "loss_mask": np.ones_like(ids),
        }
        state, metrics = trainer.step(state, trainer.place(batch))
        assert np.isfinite(float(metrics["loss"]))

    after = state.model_params()
    for name in ("embed", "final_norm", "lm_head"):
        assert name in state.frozen and name not in state.params
        np.testing.assert_array_equal(np.asarray(after[name]), before[name])
        np.testing.assert_array_equal(np.asarray(params[name]), before[name])  # not donated
    changed = [
        name for name in before["layers"]
        if not np.array_equal(np.asarray(after["layers"][name]), before["layers"][name])
    ]  # fmt: skip
    assert sorted(changed) == sorted(before["layers"])  # every trainable leaf moved
    optimiser_paths = {
        parallel.path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    }
    assert optimiser_paths and all("layers/" in p for p in optimiser_paths if "/" in p)
    assert not any(p.endswith(("embed", "final_norm", "lm_head")) for p in optimiser_paths)
    assert state.saved().keys() == {"step", "params", "opt_state"}  # checkpoints skip frozen
    assert jnp.issubdtype(state.step.dtype, jnp.integer) and int(state.step) == 3
