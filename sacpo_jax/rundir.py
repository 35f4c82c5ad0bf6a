"""The run directory's integrity: one run at a time, stages that are what they claim.

- ``RunLock``: an OS file lock (``runs/<name>/.lock``); a second run on the same
  directory stops with one line naming the holder's pid and host.
- ``claim_stage_dir``: a stage directory records the identity of the stage that wrote
  it (``stage.json``). When a rerun's stage has another identity, its old directory is
  moved to ``superseded/`` (or, with ``on_change: refuse``, the run stops) with one line
  saying what changed, so no result of other settings is ever reused.
- ``record_config``: the resolved config of every run is kept (``history/``), the
  latest also as ``config.yaml``.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import jax
import yaml

from sacpo_jax.config import ConfigError, RunConfig
from sacpo_jax.errors import SacpoError

STAGE_RECORD = "stage.json"
SUPERSEDED_DIR = "superseded"
HISTORY_DIR = "history"


class RunDirectoryError(SacpoError):
    """The run directory cannot be used (locked by another run, not writable); one line."""


class RunLock:
    """An exclusive lock on a run directory for this process's lifetime (process 0 only:
    the processes of one multi-host run share it)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._handle = None

    def __enter__(self) -> RunLock:
        if jax.process_index() != 0:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
        except OSError as e:
            raise RunDirectoryError(
                f"{self.path.parent}: cannot use as a run directory ({e.strerror})"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end or set "
                "another run_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the lock
            self._handle = None


def record_config(config: RunConfig, identities: dict[str, str]) -> None:
    """``config.yaml`` (this run's resolved config) and a copy in ``history/`` with the
    stage identities, so earlier runs' settings stay on record."""
    if jax.process_index() != 0:
        return
    tree = config.model_dump(mode="json")
    directory = config.directory
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    history = directory / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    _write_atomically(history / f"{stamp}.yaml", {**tree, "stage_identities": identities})
    _write_atomically(directory / "config.yaml", tree)


def claim_stage_dir(
    stage_dir: Path, name: str, identity: str, settings: dict, *, on_change: str
) -> None:
    """Make ``stage_dir`` this stage's: keep it when it holds this identity, else move it
    aside (``on_change: retrain``) or stop (``refuse``), naming what changed."""
    if jax.process_index() == 0:
        record = _read_record(stage_dir)
        occupied = stage_dir.exists() and any(stage_dir.iterdir())
        if occupied and (record or {}).get("identity") != identity:
            change = describe_change((record or {}).get("settings"), settings)
            if on_change == "refuse":
                raise ConfigError(
                    f"stage '{name}' changed since the last run in {stage_dir.parent.parent} "
                    f"({change}); rerun with on_change=retrain or another run_dir"
                )
            old = (record or {}).get("identity", "unrecorded")[:12]
            target = stage_dir.parent.parent / SUPERSEDED_DIR / f"{name}@{old}"
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage_dir, target)
            print(f"[{name}] changed since the last run ({change}): it runs again; the old "
                  f"results are in {target}")  # fmt: skip
        stage_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(stage_dir / STAGE_RECORD, {"identity": identity, "settings": settings})
    _sync(f"claim:{stage_dir}")


def describe_change(old: dict | None, new: dict) -> str:
    """The changed settings as "key: old -> new" (at most three), or what else changed."""
    if old is None:
        return "no stage record"
    flat_old, flat_new = _flatten(old), _flatten(new)
    changed = [
        f"{key}: {flat_old.get(key, '-')} -> {flat_new.get(key, '-')}"
        for key in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(key) != flat_new.get(key)
    ]
    if not changed:
        return "an input model or its data changed"
    more = f", and {len(changed) - 3} more" if len(changed) > 3 else ""
    return "; ".join(changed[:3]) + more


def disk_use(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _read_record(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / STAGE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_atomically(path: Path, tree: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(tree, f, indent=2)
        else:
            yaml.safe_dump(tree, f, sort_keys=False)
    os.replace(tmp, path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
