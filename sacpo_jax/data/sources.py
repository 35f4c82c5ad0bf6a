"""Sources of raw rows: Hugging Face hub datasets, local files, TFDS and the bundled task.

Three functions of a `SourceSpec`: a label for messages, a fingerprint that
changes when the rows can change (the cache key uses it), and the rows
themselves as plain Python dicts. Problems reading a source raise a one-line
`DataError`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sacpo_jax.data.errors import DataError
from sacpo_jax.data.spec import SourceSpec


def source_label(spec: SourceSpec) -> str:
    """A short name for messages: the file path, or ``type:name[/config]:split``."""
    if spec.path is not None:
        return spec.path
    config = f"/{spec.config}" if spec.config else ""
    return f"{spec.type}:{spec.name}{config}:{spec.split}"


def source_fingerprint(spec: SourceSpec) -> str:
    """A hex digest that changes whenever the rows of the source can change.

    Local files: the file's content hash. Hub with a pinned revision: the spec;
    without one: the fingerprint `datasets` gives the loaded split. Bundled: the
    spec and the generator's source code. TFDS: the spec.
    """
    spec_json = spec.model_dump_json()
    if spec.path is not None:
        return _sha256(spec.type.encode(), _file_digest(spec).encode())
    if spec.type == "hub" and spec.revision is None:
        return _sha256(spec_json.encode(), _load_hub(spec)._fingerprint.encode())
    if spec.type == "bundled":
        module_file = Path(_import_oracle_task(spec).__file__)
        return _sha256(spec_json.encode(), module_file.read_bytes())
    return _sha256(spec_json.encode())


def read_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    """Yield the source's rows, in order, as dicts of plain Python values."""
    label = source_label(spec)
    if spec.type == "jsonl":
        yield from _read_jsonl(spec.path, label)
    elif spec.type == "json":
        yield from _read_json(spec.path, label)
    elif spec.type in ("parquet", "csv"):
        yield from _read_arrow_file(spec, label)
    elif spec.type == "hub":
        yield from _load_hub(spec)
    elif spec.type == "tfds":
        for row, element in enumerate(_tfds_source(spec, label)):
            yield _tfds_row(element, label, row)
    elif spec.type == "bundled":
        yield from _bundled_rows(spec, label)


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(hashlib.sha256(chunk).digest())
    return digest.hexdigest()


def _file_digest(spec: SourceSpec) -> str:
    digest = hashlib.sha256()
    try:
        with open(spec.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise DataError(spec.path, f"cannot read file: {err}") from None
    return digest.hexdigest()


def _read_text(path: str, label: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(label, f"cannot read file: {err}") from None


def _read_jsonl(path: str, label: str) -> Iterator[dict[str, Any]]:
    lines = (line for line in _read_text(path, label).splitlines() if line.strip())
    for row, line in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(label, f"invalid JSON: {err.msg}", row=row) from None
        if not isinstance(value, dict):
            raise DataError(label, "a row must be a JSON object", row=row)
        yield value


def _read_json(path: str, label: str) -> Iterator[dict[str, Any]]:
    try:
        value = json.loads(_read_text(path, label))
    except json.JSONDecodeError as err:
        raise DataError(label, f"invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(value, list):
        raise DataError(label, "a JSON source must hold a list of row objects")
    for row, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(label, "a row must be a JSON object", row=row)
        yield item


def _read_arrow_file(spec: SourceSpec, label: str) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if spec.type == "parquet":
            table = pyarrow.parquet.read_table(spec.path)
        else:
            table = pyarrow.csv.read_csv(spec.path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(label, f"cannot read {spec.type} file: {err}") from None
    yield from table.to_pylist()


def _load_hub(spec: SourceSpec):
    import datasets

    label = source_label(spec)
    try:
        return datasets.load_dataset(
            spec.name,
            spec.config,
            split=spec.split,
            revision=spec.revision,
            data_dir=spec.data_dir,
            data_files=spec.data_files,
        )
    except Exception as err:  # noqa: BLE001 - any loading failure is a one-line data error
        raise DataError(label, f"cannot load dataset: {type(err).__name__}: {err}") from None


def _tfds_source(spec: SourceSpec, label: str):
    try:
        tfds = importlib.import_module("tensorflow_datasets")
    except ImportError:
        raise DataError(
            label,
            "tensorflow_datasets is not installed; "
            "install the extra: pip install 'sacpo_jax[tfds]'",
        ) from None
    try:
        return tfds.data_source(spec.name, split=spec.split, data_dir=spec.data_dir)
    except Exception as err:  # noqa: BLE001 - any loading failure is a one-line data error
        raise DataError(label, f"cannot open TFDS source: {type(err).__name__}: {err}") from None


def _tfds_row(element: dict[str, Any], label: str, row: int) -> dict[str, Any]:
    """A TFDS element (numpy values, text as bytes) as plain Python values."""
    out = {}
    for name, value in element.items():
        try:
            out[name] = _to_python(value)
        except UnicodeDecodeError as err:
            problem = f"bytes that are not UTF-8 text ({err.reason})"
            raise DataError(label, problem, row=row, field=name) from None
    return out


def _bundled_rows(spec: SourceSpec, label: str) -> list[dict[str, Any]]:
    oracle_task = _import_oracle_task(spec)
    try:
        return oracle_task.load_split(spec.name, spec.seed)
    except ValueError as err:  # the task's own one-line errors (unknown split, bad seed)
        raise DataError(label, str(err)) from None


def _import_oracle_task(spec: SourceSpec):
    try:
        return importlib.import_module("sacpo_jax.data.oracle_task")
    except ImportError as err:
        raise DataError(source_label(spec), f"bundled task unavailable: {err}") from None


def _to_python(value: Any) -> Any:
    """TFDS elements hold numpy values and bytes; turn them into str/int/float/bool/list/dict."""
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(item) for item in value.tolist()] if value.ndim else value.item()
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, list | tuple):
        return [_to_python(item) for item in value]
    return value
