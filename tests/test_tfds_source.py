"""TensorFlow Datasets sources read for real: a dataset prepared in TFDS' own array_record
format, read through ``tfds.data_source``, gives the tokens the same rows give from JSONL.

Truth: the same rows written as JSONL and read by the JSONL source (tested on its own).
"""

import importlib.util
import json
from pathlib import Path

import pytest

tfds = pytest.importorskip(
    "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install '.[test]')"
)

from fixtures_tokenizers import bpe_tokenizer  # noqa: E402

from sacpo_jax.data.errors import DataError  # noqa: E402
from sacpo_jax.data.loader import BatchLoader  # noqa: E402
from sacpo_jax.data.pipeline import build_dataset  # noqa: E402
from sacpo_jax.data.spec import DataSpec  # noqa: E402

BUILDER = Path(__file__).parent / "fixtures" / "tfds_preference.py"


def _builder_module():
    spec = importlib.util.spec_from_file_location("tfds_preference", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, builder module): both configs prepared once as array_record."""
    data_dir = tmp_path_factory.mktemp("tfds")
    module = _builder_module()
    module.prepare(str(data_dir))
    return str(data_dir), module


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def tfds_spec(data_dir, config, adapter, split="train"):
    source = {"type": "tfds", "name": f"tiny_preference/{config}", "split": split}
    return DataSpec(source={**source, "data_dir": data_dir}, adapter=adapter)


def jsonl_spec(tmp_path, rows, adapter):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSpec(source={"type": "jsonl", "path": str(path)}, adapter=adapter)


def assert_same_tokens(a, b):
    assert len(a) == len(b) and a.kind == b.kind
    for x, y in zip(a.prompts, b.prompts):
        assert x.tolist() == y.tolist()
    for side_a, side_b in zip(a.completions, b.completions):
        for x, y in zip(side_a, side_b):
            assert x.tolist() == y.tolist()
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    ("config", "adapter"),
    [("pku", "pku_helpful"), ("pku", "pku_harmless"), ("pku", "pku_kto_safety"), ("pair", "pair")],
)
def test_tfds_rows_tokenize_like_the_same_jsonl_rows(
    prepared, tokenizer, tmp_path, config, adapter
):
    data_dir, module = prepared
    rows = module.ROWS if config == "pku" else module.PAIR_ROWS
    from_tfds, report = build_dataset(tfds_spec(data_dir, config, adapter), tokenizer)
    from_jsonl, jsonl_report = build_dataset(jsonl_spec(tmp_path, rows, adapter), tokenizer)
    assert report == jsonl_report
    assert len(from_tfds) > 0
    assert_same_tokens(from_tfds, from_jsonl)


def test_each_host_gets_the_loaders_share(prepared, tokenizer, tmp_path):
    data_dir, module = prepared
    from_tfds, _ = build_dataset(tfds_spec(data_dir, "pku", "pku_helpful"), tokenizer)
    from_jsonl, _ = build_dataset(jsonl_spec(tmp_path, module.ROWS, "pku_helpful"), tokenizer)
    for host in (0, 1):
        loaders = [
            BatchLoader(d, global_batch_size=4, buckets=[64], pad_id=0, process_index=host,
                        process_count=2)
            for d in (from_tfds, from_jsonl)
        ]  # fmt: skip
        assert loaders[0].local_indices(0).tolist() == loaders[1].local_indices(0).tolist()
        first, second = (loader.batch(0) for loader in loaders)
        assert first.keys() == second.keys()
        for key in first:
            assert first[key].tolist() == second[key].tolist(), key


def one_line(spec, tokenizer):
    with pytest.raises(DataError) as info:
        build_dataset(spec, tokenizer)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_wrong_split_name(prepared, tokenizer):
    data_dir, _ = prepared
    message = one_line(tfds_spec(data_dir, "pku", "pku_helpful", split="validation"), tokenizer)
    assert message.startswith("tfds:tiny_preference/pku:validation: cannot open TFDS source")
    assert "validation" in message.split("cannot open", 1)[1]


def test_missing_feature_is_named(prepared, tokenizer):
    data_dir, _ = prepared
    message = one_line(tfds_spec(data_dir, "pair", "pku_helpful"), tokenizer)
    assert "row 0" in message and "response_0" in message and "missing" in message


def test_bytes_that_are_not_text(monkeypatch, tokenizer):
    rows = [{"prompt": b"\xff\xfe binary", "chosen": b"a", "rejected": b"b"}]
    monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: rows)
    spec = DataSpec(source={"type": "tfds", "name": "blobs"}, adapter="pair")
    message = one_line(spec, tokenizer)
    assert "row 0" in message and "field 'prompt'" in message and "not UTF-8" in message
