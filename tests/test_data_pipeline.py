"""Sources, specs, the tokenised dataset and its cache, end to end through build_dataset."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from pydantic import ValidationError

from sacpo_jax.data import pipeline
from sacpo_jax.data.dataset import Ragged, TokenizedDataset
from sacpo_jax.data.errors import DataError
from sacpo_jax.data.pipeline import build_dataset
from sacpo_jax.data.spec import DataSpec, SourceSpec
from sacpo_jax.data.tokenize import tokenize_prompt_completions

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_tokenizers import bpe_tokenizer  # noqa: E402

ROWS = [
    {
        "prompt": f"What is the capital of country {i}?",
        "response_0": f"The capital is city {i}.",
        "response_1": "I do not know.",
        "is_response_0_safe": True,
        "is_response_1_safe": i % 2 == 0,
        "better_response_id": i % 2,
        "safer_response_id": 0,
    }
    for i in range(6)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same rows as JSON, JSONL, Parquet and CSV files."""
    root = tmp_path_factory.mktemp("rows")
    (root / "rows.json").write_text(json.dumps(ROWS))
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = pa.Table.from_pylist(ROWS)
    pyarrow.parquet.write_table(table, root / "rows.parquet")
    pyarrow.csv.write_csv(table, root / "rows.csv")
    return root


def spec(path, kind=None, **options) -> DataSpec:
    source = {"type": kind or Path(path).suffix[1:], "path": str(path)}
    return DataSpec(source=source, **{"adapter": "pku_helpful", **options})


def test_every_file_format_gives_the_same_dataset(tokenizer, files):
    reference, report = build_dataset(spec(files / "rows.jsonl"), tokenizer)
    assert report == {} and len(reference) == len(ROWS)
    for name in ("rows.json", "rows.parquet", "rows.csv"):
        dataset, _ = build_dataset(spec(files / name), tokenizer)
        assert dataset.fingerprint == reference.fingerprint, name


def test_hub_source_through_datasets_load_dataset(tokenizer, files, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hub = DataSpec(
        source={"type": "hub", "name": "json", "data_files": str(files / "rows.jsonl")},
        adapter="pku_helpful",
    )
    dataset, _ = build_dataset(hub, tokenizer, cache_dir=tmp_path / "cache")
    reference, _ = build_dataset(spec(files / "rows.jsonl"), tokenizer)
    assert dataset.fingerprint == reference.fingerprint


def test_tokens_follow_the_template_and_the_adapter(tokenizer, files):
    dataset, _ = build_dataset(spec(files / "rows.jsonl"), tokenizer)
    row = ROWS[1]  # better_response_id = 1
    prompt_ids, (chosen, rejected) = tokenize_prompt_completions(
        tokenizer,
        row["prompt"],
        [row["response_1"], row["response_0"]],
        "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:",
    )
    assert dataset.prompts[1].tolist() == prompt_ids
    assert dataset.completions[0][1].tolist() == chosen
    assert dataset.completions[1][1].tolist() == rejected
    custom, _ = build_dataset(spec(files / "rows.jsonl", template="Q: {prompt}\nA:"), tokenizer)
    expected = tokenizer("Q: " + row["prompt"] + "\nA:")["input_ids"]
    assert custom.prompts[1].tolist()[: len(expected) - 1] == expected[:-1]


def test_limit_and_kto_rows(tokenizer, files):
    dataset, _ = build_dataset(
        spec(files / "rows.jsonl", adapter="pku_kto_safety", limit=3), tokenizer
    )
    assert dataset.kind == "unpaired" and len(dataset) == 6  # two examples per row
    assert dataset.columns["label"].tolist() == [1, 1, 1, 0, 1, 1]


def test_second_build_reads_the_cache(tokenizer, files, tmp_path, monkeypatch):
    data = spec(files / "rows.jsonl", adapter="pku_cost", on_bad_row="skip")
    first, report = build_dataset(data, tokenizer, cache_dir=tmp_path)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == [
        "arrays.npz",
        "meta.json",
        "report.json",
    ]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(pipeline, "_tokenize_source", no_tokenising)
    second, second_report = build_dataset(data, tokenizer, cache_dir=tmp_path)
    assert second.fingerprint == first.fingerprint and second_report == report
    np.testing.assert_array_equal(second.columns["chosen_sign"], first.columns["chosen_sign"])
    # Other lengths, or other file content, are other entries.
    with pytest.raises(AssertionError, match="tokenised again"):
        build_dataset(data.model_copy(update={"max_length": 64}), tokenizer, cache_dir=tmp_path)
    changed = tmp_path / "changed.jsonl"
    changed.write_text((files / "rows.jsonl").read_text())
    moved = data.model_copy(update={"source": SourceSpec(type="jsonl", path=str(changed))})
    build_dataset(moved, tokenizer, cache_dir=tmp_path)  # same content: a hit
    changed.write_text((files / "rows.jsonl").read_text().replace("city", "town"))
    with pytest.raises(AssertionError, match="tokenised again"):
        build_dataset(moved, tokenizer, cache_dir=tmp_path)


def test_bundled_task_rows_through_the_pipeline(tokenizer):
    source = {"type": "bundled", "name": "preference_test", "seed": 0}
    scored = DataSpec(source=source, adapter="scored_pair", score_names=["reward", "cost"], limit=8)
    dataset, report = build_dataset(scored, tokenizer)
    assert report == {} and len(dataset) == 8
    from sacpo_jax.data.oracle_task import load_split

    rows = load_split("preference_test", 0)[:8]
    assert dataset.columns["score_1_cost"].tolist() == [r["cost_1"] for r in rows]
    unknown = DataSpec(source={**source, "name": "nope"}, adapter="pku_helpful")
    with pytest.raises(DataError, match=r"^bundled:nope:train: unknown oracle-task split"):
        build_dataset(unknown, tokenizer)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None, reason="TFDS is installed"
)
def test_tfds_missing_is_a_clear_error(tokenizer):
    tfds = DataSpec(source={"type": "tfds", "name": "pku"}, adapter="pku_helpful")
    with pytest.raises(DataError, match=r"tensorflow_datasets is not installed.*\[tfds\]"):
        build_dataset(tfds, tokenizer)


def test_chat_adapter_needs_a_chat_template(tokenizer, files):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    chat = spec(files / "rows.jsonl", adapter="chat_sft")
    with pytest.raises(
        DataError, match="adapter 'chat_sft' needs a tokenizer with a chat template"
    ):
        build_dataset(chat, plain)


def test_spec_validation():
    with pytest.raises(ValidationError, match="extra"):
        DataSpec(source={"type": "jsonl", "path": "x"}, adapter="pair", max_len=3)
    with pytest.raises(ValidationError, match="source type 'jsonl' needs 'path'"):
        SourceSpec(type="jsonl")
    with pytest.raises(ValidationError, match=r"must contain '\{prompt\}'"):
        DataSpec(source={"type": "jsonl", "path": "x"}, adapter="pair", template="USER:")
    with pytest.raises(ValidationError, match="max_prompt_length"):
        DataSpec(
            source={"type": "jsonl", "path": "x"}, adapter="pair", max_length=8, max_prompt_length=9
        )
    with pytest.raises(ValidationError, match="largest bucket"):
        DataSpec(source={"type": "jsonl", "path": "x"}, adapter="pair", bucket_lengths=[64])
    ok = DataSpec(source={"type": "jsonl", "path": "x"}, adapter="pair", bucket_lengths=[512, 128])
    assert ok.buckets() == (128, 512)


def small_pair_dataset() -> TokenizedDataset:
    prompts = Ragged.from_rows([[1, 5], [1, 6, 7], [1, 8]])
    chosen = Ragged.from_rows([[10, 2], [11, 2], [12, 12, 2]])
    rejected = Ragged.from_rows([[20, 2], [21, 21, 2], [22, 2]])
    return TokenizedDataset(
        "pair", prompts, (chosen, rejected), {"chosen_sign": np.array([1, -1, 0])}
    )


def test_dataset_save_load_without_pickle(tmp_path):
    dataset = small_pair_dataset().add_column(
        "reference_chosen_logps", np.array([-1.5, -2.0, -0.5])
    )
    dataset.save(tmp_path)
    with np.load(tmp_path / "arrays.npz", allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    loaded = TokenizedDataset.load(tmp_path)
    assert loaded.fingerprint == dataset.fingerprint
    assert loaded.completions[1][1].tolist() == [21, 21, 2]
    assert loaded.columns["reference_chosen_logps"].tolist() == [-1.5, -2.0, -0.5]


def test_add_column_select_and_swap_pairs():
    base = small_pair_dataset()
    added = base.add_column("reference_chosen_logps", np.array([-1.0, -2.0, -3.0]))
    added = added.add_column("reference_rejected_logps", np.array([-4.0, -5.0, -6.0]))
    assert "reference_chosen_logps" not in base.columns  # immutable
    assert added.fingerprint != base.fingerprint
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        base.add_column("bad", np.zeros(2))

    picked = added.select([2, 0])
    assert picked.prompts[0].tolist() == [1, 8] and picked.completions[0][1].tolist() == [10, 2]
    assert picked.columns["reference_chosen_logps"].tolist() == [-3.0, -1.0]

    swapped = added.add_column("rejected_sign", np.array([0, 1, 1])).swap_pairs(
        np.array([False, True, False])
    )
    assert [swapped.completions[0][i].tolist() for i in range(3)] == [
        [10, 2],
        [21, 21, 2],
        [12, 12, 2],
    ]
    assert [swapped.completions[1][i].tolist() for i in range(3)] == [[20, 2], [11, 2], [22, 2]]
    assert swapped.columns["reference_chosen_logps"].tolist() == [-1.0, -5.0, -3.0]
    assert swapped.columns["reference_rejected_logps"].tolist() == [-4.0, -2.0, -6.0]
    assert swapped.columns["chosen_sign"].tolist() == [1, 1, 0]
    assert swapped.columns["rejected_sign"].tolist() == [0, -1, 1]
