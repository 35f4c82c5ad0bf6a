"""Invalid stage combinations are refused by ``load_config`` with one line, before any
model, tokenizer or data is touched (each case here fails before the chain starts)."""

from __future__ import annotations

import json

import pytest

from sacpo_jax.config import ConfigError, load_config

PAIRS = {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"}
UNPAIRED = {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_kto_safety"}
SFT = {"source": {"type": "bundled", "name": "sft"}, "adapter": "sft"}
COSTS = {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_cost"}
PROMPTS = {"source": {"type": "bundled", "name": "eval_prompts"}}


def config(*stages: dict) -> dict:
    return {
        "model": {"random": {}},
        "tokenizer": {"path": "bundled:oracle"},
        "stages": list(stages),
    }


def load(tmp_path, tree: dict, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(tree))
    return load_config(str(path), list(overrides)), path


def refused(tmp_path, tree: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, tree, overrides)
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_valid_chain_loads(tmp_path):
    tree = config(
        {"name": "sft", "kind": "sft", "data": SFT},
        {"name": "dpo", "kind": "dpo", "data": PAIRS, "beta": [0.1, 0.2]},
        {"name": "kto", "kind": "kto", "start": "sft", "data": UNPAIRED},
        {"name": "cost", "kind": "cost", "start": "sft", "data": COSTS},
        {"name": "eval", "kind": "evaluate", "prompts": PROMPTS, "oracle": True},
    )
    loaded, _ = load(tmp_path, tree)
    names = [s.name for s in loaded.expanded_stages()]
    assert names == ["sft", "dpo@beta=0.1", "dpo@beta=0.2", "kto", "cost", "eval"]
    assert loaded.expanded_stages()[-1].models == ["sft", "dpo@beta=0.1", "dpo@beta=0.2", "kto"]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        # Each kind accepts only its own fields.
        (
            {"name": "k", "kind": "kto", "data": UNPAIRED, "loss_type": "ipo"},
            "unknown key 'stages.0.loss_type'",
        ),
        (
            {"name": "k", "kind": "kto", "data": UNPAIRED, "rpo_alpha": 1.0},
            "unknown key 'stages.0.rpo_alpha'",
        ),
        (
            {"name": "s", "kind": "sft", "data": SFT, "beta": 0.1},
            "unknown key 'stages.0.beta'",
        ),
        # A loss option its loss ignores.
        (
            {
                "name": "d",
                "kind": "dpo",
                "data": PAIRS,
                "loss_type": "hinge",
                "label_smoothing": 0.3,
            },
            "label_smoothing 0.3 is ignored by loss_type 'hinge'",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "loss_type": "cdpo"},
            "loss_type: unknown 'cdpo'; valid: sigmoid, robust, hinge, ipo, exo_pair, nca_pair, "
            "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, "
            "sigmoid_norm",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "loss_type": ["sigmoid", "ipoo"]},
            "loss_type: unknown 'ipoo'; valid: sigmoid,",
        ),
        (
            {
                "name": "d",
                "kind": "dpo",
                "data": PAIRS,
                "loss_type": ["sigmoid", "sft"],
                "loss_weights": [1.0, 0.2, 0.5],
            },
            "loss_weights: 3 weights for 2 loss types (sigmoid, sft); give one weight per loss",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "loss_weights": [1.0, 0.2]},
            "loss_weights: 2 weights for 1 loss types (sigmoid)",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "loss_type": "exo_pair"},
            "loss_type exo_pair needs label_smoothing > 0",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "discopop_tau": 0.1},
            "discopop_tau is read only by loss_type 'discopop'",
        ),
        (
            {
                "name": "d",
                "kind": "dpo",
                "data": PAIRS,
                "loss_type": ["sigmoid", "sft"],
                "rpo_alpha": 0.5,
            },
            "rpo_alpha adds an 'sft' term and loss_type already has one",
        ),
        (
            {"name": "s", "kind": "simpo", "data": PAIRS, "reference": "start"},
            "unknown key 'stages.0.reference'",
        ),
        (
            {"name": "k", "kind": "kto", "data": UNPAIRED, "sampling": "balanced"},
            "stages.0.sampling: Input should be 'shuffle' or 'interleave'",
        ),
        # Adapters that do not make the rows the kind trains on.
        (
            {"name": "k", "kind": "kto", "data": PAIRS},
            "data.adapter 'pku_helpful' does not make unpaired labelled rows",
        ),
        (
            {"name": "d", "kind": "dpo", "data": SFT},
            "data.adapter 'sft' does not make pairs or scored pairs",
        ),
        (
            {"name": "s", "kind": "sft", "data": PAIRS},
            "data.adapter 'pku_helpful' does not make prompt-response rows",
        ),
        (
            {"name": "c", "kind": "cost", "data": PAIRS},
            "data.adapter 'pku_helpful' does not make scored pairs",
        ),
        (
            {"name": "r", "kind": "reward", "data": UNPAIRED},
            "data.adapter 'pku_kto_safety' does not make pairs or scored pairs",
        ),
        (
            {"name": "d", "kind": "dpo", "data": PAIRS, "eval_data": SFT},
            "eval_data.adapter 'sft' does not make pairs",
        ),
        # Names that would write outside the run directory.
        (
            {"name": "../../x", "kind": "merge", "models": ["a", "b"], "q": 0.5},
            "stage name '../../x' must be non-empty",
        ),
        (
            {"name": "..", "kind": "evaluate", "prompts": PROMPTS, "oracle": True},
            "stage name '..' must be non-empty",
        ),
    ],
)
def test_invalid_stage_is_refused_in_one_line(tmp_path, stage, message):
    assert message in refused(tmp_path, config(stage))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [{"name": "dpo", "kind": "dpo", "start": "sftt", "data": PAIRS}],
            "stage 'dpo' names 'sftt', which is neither an earlier stage",
        ),
        (
            [
                {"name": "dpo", "kind": "dpo", "reference": "later", "data": PAIRS},
                {"name": "later", "kind": "sft", "data": SFT},
            ],
            "stage 'dpo' names 'later', which is neither an earlier stage",
        ),
        (
            [
                {"name": "dpo", "kind": "dpo", "data": PAIRS, "beta": [0.1, 0.2]},
                {"name": "merge", "kind": "merge", "models": ["dpo", "dpo@beta=0.1"], "q": 0.5},
            ],
            "stage 'merge' names 'dpo', which is neither an earlier stage",
        ),
        (
            [
                {"name": "dpo", "kind": "dpo", "data": PAIRS},
                {"name": "eval", "kind": "evaluate", "prompts": PROMPTS, "cost_model": "cm"},
            ],
            "stage 'eval' names 'cm', which is neither an earlier stage",
        ),
        (
            [
                {"name": "dpo", "kind": "dpo", "data": PAIRS},
                {
                    "name": "e",
                    "kind": "evaluate",
                    "prompts": PROMPTS,
                    "oracle": True,
                    "baseline": "sft",
                },
            ],
            "baseline 'sft' is not among its models ['dpo']",
        ),
        (
            [
                {"name": "dpo", "kind": "dpo", "data": PAIRS, "beta": [0.1, 0.2]},
                {"name": "next", "kind": "dpo", "data": PAIRS},
            ],
            "stage 'next' follows a sweep: name its start explicitly",
        ),
    ],
)
def test_unknown_model_names_are_refused_before_anything_runs(tmp_path, stages, message):
    assert message in refused(tmp_path, config(*stages))


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("stages.0.beta=.nan", "stages.0.beta"),
        ("stages.0.train.learning_rate=.inf", "stages.0.train.learning_rate"),
        ("stages.0.data.max_length=.nan", "stages.0.data.max_length"),
        ("stages.0.train.epochs=.inf", "stages.0.train.epochs"),
    ],
)
def test_nan_and_infinity_are_refused_anywhere(tmp_path, override, where):
    text = refused(tmp_path, config({"name": "d", "kind": "dpo", "data": PAIRS}), [override])
    assert where in text


def test_override_syntax_errors_are_one_line(tmp_path):
    tree = config({"name": "d", "kind": "dpo", "data": PAIRS})
    assert "not of the form key.path=value" in refused(tmp_path, tree, ["stages.0.beta"])
    assert "invalid YAML value" in refused(tmp_path, tree, ["stages.0.beta=[0.1"])
    assert "no list element named 'dpo'" in refused(tmp_path, tree, ["stages.dpo.beta=0.2"])


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text \(byte 9\)$"):
        load_config(str(path))
