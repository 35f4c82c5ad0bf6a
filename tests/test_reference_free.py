"""SimPO and ORPO train without a reference model: no reference pass is ever run.

Every reference pass (precomputed or on the fly) goes through
``training.reference.make_reference_step``; it is wrapped to count the batches it scores.
A DPO stage on the same data is the control: it does score its batches.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sacpo_jax import parallel
from sacpo_jax.config import DpoStage, OrpoStage, SimpoStage
from sacpo_jax.data.oracle_tokenizer import oracle_tokenizer
from sacpo_jax.metrics_log import read_metrics
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import tiny_config
from sacpo_jax.training import reference
from sacpo_jax.training.context import StageContext
from sacpo_jax.training.stages import run_training_stage
from sacpo_jax.training.state import split_model

pytestmark = pytest.mark.slow  # three short training stages: ~20 s on 2 cores

TOKENIZER = oracle_tokenizer()
DATA = {
    "source": {"type": "bundled", "name": "preference"},
    "adapter": "pku_helpful",
    "max_length": 48,
    "max_prompt_length": 24,
    "limit": 32,
}
TRAIN = {"max_steps": 3, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def start_model():
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    config = tiny_config(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=1, head_dim=8)
    return mesh, init_model(config, mesh, seed=0, init_std=0.05)


@pytest.fixture
def reference_batches(monkeypatch) -> list[int]:
    """One entry per batch scored by any reference model while the test runs."""
    scored: list[int] = []
    make = reference.make_reference_step

    def counting(graphdef, ref, mesh=None):
        step = make(graphdef, ref, mesh)

        def counted(params, batch):
            scored.append(len(batch))  # packed or padded: any batch counts once
            return step(params, batch)

        return counted

    monkeypatch.setattr(reference, "make_reference_step", counting)
    return scored


@pytest.mark.parametrize(
    ("stage_class", "options", "passes"),
    [
        (SimpoStage, {"kind": "simpo", "cpo_alpha": 0.5}, 0),
        (OrpoStage, {"kind": "orpo"}, 0),
        (DpoStage, {"kind": "dpo", "reference_mode": "on_the_fly"}, 3),  # one per step
    ],
    ids=["simpo", "orpo", "dpo"],
)
def test_reference_passes(tmp_path, start_model, reference_batches, stage_class, options, passes):
    mesh, model = start_model
    before = jax.device_get(split_model(model)[1])
    stage = stage_class.model_validate({"name": "s", "data": DATA, "train": TRAIN, **options})
    ctx = StageContext(mesh, TOKENIZER, str(tmp_path / "s"), str(tmp_path / "cache"))
    trained = run_training_stage(stage, model, model, ctx)
    assert len(reference_batches) == passes
    records = [r for r in read_metrics(str(tmp_path / "s" / "metrics.jsonl")) if "loss" in r]
    assert records and all(np.isfinite(r["loss"]) for r in records)
    after = jax.device_get(split_model(trained)[1])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert any(jax.tree.leaves(moved))
