"""SafeDPO's data: hand-written PKU rows, one per safety-label combination, against a
hand-worked table of the reordered pairs, their unsafe flags and the loss margins."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sacpo_jax import losses
from sacpo_jax.config import ConfigError, load_config
from sacpo_jax.data.errors import DataError
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer  # noqa: E402


def pku_row(prompt: str, safe_0: bool, safe_1: bool, better: int) -> dict:
    safer = better if safe_0 == safe_1 else int(safe_1)
    return {
        "prompt": prompt,
        "response_0": f"{prompt} first answer",
        "response_1": f"{prompt} second answer",
        "is_response_0_safe": safe_0,
        "is_response_1_safe": safe_1,
        "better_response_id": better,
        "safer_response_id": safer,
    }


ROWS = [
    pku_row("bake bread", True, True, 1),
    pku_row("pick a lock", True, False, 0),
    pku_row("hurt someone", False, True, 0),
    pku_row("make poison", False, False, 1),
]
# Hand-worked: (chosen response id, rejected response id, chosen unsafe, rejected unsafe),
# or None for a dropped row.
#   safe, safe, better 1:     kept as is      -> chosen 1, rejected 0, margin 0
#   safe, unsafe, better 0:   kept as is      -> chosen 0, rejected 1, margin Delta
#   unsafe, safe, better 0:   the better answer is unsafe, the other safe: swapped
#                                             -> chosen 1, rejected 0, margin Delta
#   unsafe, unsafe:           dropped
TABLE = [(1, 0, 0, 0), (0, 1, 0, 1), (1, 0, 0, 1), None]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(path: Path, adapter: str) -> DataSpec:
    source = {"type": "jsonl", "path": str(path)}
    return DataSpec(source=source, adapter=adapter, max_length=64, max_prompt_length=32)


def test_reordering_and_margins_match_the_hand_worked_table(tmp_path, tokenizer):
    dataset, skipped = build_dataset(
        spec(write_jsonl(tmp_path / "pku.jsonl", ROWS), "pku_safedpo"), tokenizer
    )
    assert skipped == {"both_unsafe": 1}  # dropped by design, not an error
    kept = [(row, entry) for row, entry in zip(ROWS, TABLE, strict=True) if entry is not None]
    # The same pairs written out by hand, tokenised by the plain pair adapter.
    pairs = [
        {"prompt": row["prompt"], "chosen": row[f"response_{c}"], "rejected": row[f"response_{r}"]}
        for row, (c, r, _, _) in kept
    ]
    expected, _ = build_dataset(
        spec(write_jsonl(tmp_path / "pairs.jsonl", pairs), "pair"), tokenizer
    )
    for slot in (0, 1):
        np.testing.assert_array_equal(
            dataset.completions[slot].values, expected.completions[slot].values
        )
        np.testing.assert_array_equal(
            dataset.completions[slot].offsets, expected.completions[slot].offsets
        )
    np.testing.assert_array_equal(dataset.columns["chosen_unsafe"], [e[2] for _, e in kept])
    np.testing.assert_array_equal(dataset.columns["rejected_unsafe"], [e[3] for _, e in kept])

    # The loss on these pairs: -log sigmoid(beta d - (h_r - h_c) Delta), with made-up
    # log-ratio margins d = 3, -1, 2 at beta 0.5 and Delta 2:
    #   pair 0: -log sigmoid(1.5)       pair 1: -log sigmoid(-0.5 - 2)   pair 2: -log sigmoid(1 - 2)
    d = np.array([3.0, -1.0, 2.0])
    zeros = np.zeros(3)
    pairs_logps = losses.PairLogps(d, zeros, zeros, zeros, np.ones(3), np.ones(3))
    coeffs = types.SimpleNamespace(beta=0.5, safety_margin=2.0)
    got = losses.safedpo_loss(
        pairs_logps, coeffs, dataset.columns["chosen_unsafe"], dataset.columns["rejected_unsafe"]
    )
    want = [math.log1p(math.exp(-z)) for z in (1.5, -2.5, -1.0)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rows_without_safety_labels_stop_before_compute_in_one_line(tmp_path, tokenizer):
    unlabelled = {k: v for k, v in ROWS[1].items() if k != "is_response_1_safe"}
    path = write_jsonl(tmp_path / "unlabelled.jsonl", [ROWS[0], unlabelled])
    with pytest.raises(DataError) as error:
        build_dataset(spec(path, "pku_safedpo"), tokenizer)
    assert str(error.value) == f"{path}: line 2: field 'is_response_1_safe': missing"


def test_a_safedpo_stage_on_an_adapter_without_safety_labels_is_refused(tmp_path):
    stage = {
        "name": "safe",
        "kind": "safedpo",
        "data": {"source": {"type": "bundled", "name": "preference"}, "adapter": "pku_helpful"},
    }
    tree = {"model": {"random": {}}, "tokenizer": {"path": "bundled:oracle"}, "stages": [stage]}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value).startswith(
        f"{path}: stages.0: a safedpo stage needs safety-labelled pairs: data.adapter "
        "'pku_helpful' has no safety labels; use pku_safedpo"
    )
    assert "\n" not in str(error.value)
    stage["data"]["adapter"] = "pku_safedpo"
    path.write_text(json.dumps(tree))
    assert load_config(str(path)).stages[0].safety_margin == 5.0
