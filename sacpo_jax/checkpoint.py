"""Checkpoints of one training stage: async Orbax saves, preemption, exact resume.

A stage directory holds Orbax step directories, each with two items:
    state   the train-state pytree of jax.Arrays (params, optimiser state, step,
            RNG key data), written by every process, each its own shards;
    meta    a small JSON dict: data position, epoch, metrics so far, dual
            variables, anything else the loop needs to continue exactly.
Orbax writes each step into a temporary directory and renames it when every
file is complete, so a process killed mid-write leaves no step that
`latest_step` would pick. A finished stage also gets `FINISHED.json`, written
after its final save completed; a rerun of the chain skips such a stage.

RNG: Orbax versions differ in how they store typed keys (`jax.random.key`),
so the train state keeps its key as raw key data, `jax.random.key_data(key)`
(uint32), and the step rebuilds it with `jax.random.wrap_key_data`. `save`
rejects typed keys with a clear error.

Protocol for a training loop (every process runs the same code):

    checkpointer = StageCheckpointer(stage_dir, save_every=100, keep=3)
    step = checkpointer.latest_step()
    if step is None:
        state, meta, step = initial_state, {"position": 0}, 0
    else:
        state, meta = checkpointer.restore(abstract_state, step)
    with PreemptionGuard() as guard:
        while step < total_steps:
            state, meta = train_step(state, meta)   # meta["position"] advances
            step += 1
            if guard.should_stop(step):             # same answer on every process
                checkpointer.save(step, state, meta, force=True)
                checkpointer.close()                # waits for the write
                return                              # exit 0; rerun to resume
            checkpointer.save(step, state, meta)    # only every save_every steps
    checkpointer.save(step, state, meta, force=True)
    checkpointer.mark_finished({"step": step})      # waits, then FINISHED.json
    checkpointer.close()

`abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype,
sharding=...)`, e.g. `jax.eval_shape` of the initialiser with the current
mesh's shardings attached; restoring onto another mesh (or fewer processes)
reshards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sacpo_jax.errors import SacpoError

FINISHED_FILE = "FINISHED.json"


class CheckpointError(SacpoError):
    """A checkpoint cannot be written or read as asked."""


class StageCheckpointer:
    """Async Orbax saves of (state, meta) every `save_every` steps, keeping the last `keep`.

    Opening one removes half-written steps left by a killed run, so open it only
    from the run that owns the directory (or after that run has ended).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int) -> None:
        if save_every < 1 or keep < 1:
            raise CheckpointError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        """The newest complete step on disk, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start an async save of `state` and `meta` at `step`; True if one was started.

        Without `force`, saves only when `step` is a multiple of `save_every`.
        A step already on disk is never written twice. Every process must call this.
        """
        _reject_typed_keys(state)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint meta at step {step} is not JSON: {err}") from err
        if (step % self.save_every and not force) or step in self._manager.all_steps():
            return False
        self._check_free_space(step, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # The interval rule is ours (Orbax's default policy would also save the first step).
        return self._manager.save(step, args=args, force=True)

    def _check_free_space(self, step: int, state: Any) -> None:
        """Fail before writing when the disk cannot hold this process's share of a save."""
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) // jax.process_count()
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointError(
                f"{self.directory}: {free / 2**30:.2f} GiB free, but the checkpoint of step "
                f"{step} needs {needed / 2**30:.2f} GiB; free space, lower max_checkpoints or "
                "set another run_dir (the last complete checkpoint is kept)"
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest), placed as `abstract_state` says.

        `abstract_state` leaves are `jax.ShapeDtypeStruct`s with a `sharding` (or
        arrays, whose sharding is used); a different mesh than the saving one reshards.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

    def wait(self) -> None:
        """Block until the pending async save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads."""
        self._manager.close()

    def mark_finished(self, info: dict) -> None:
        """After the last save completed, atomically write `<directory>/FINISHED.json`."""
        self.wait()
        mark_finished(self.directory, info)

    def __enter__(self) -> StageCheckpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def is_finished(stage_dir: str | os.PathLike) -> dict | None:
    """The info written by `mark_finished` for `stage_dir`, or None if not finished."""
    path = Path(stage_dir) / FINISHED_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def mark_finished(directory: str | os.PathLike, info: dict) -> None:
    """Atomically write ``<directory>/FINISHED.json`` (process 0; the others wait)."""
    if jax.process_index() == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_json_atomically(Path(directory) / FINISHED_FILE, info)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"finished:{directory}")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Write a directory all at once: yields a temporary path beside ``path`` (cleared of
    any leftover from a killed run), which replaces ``path`` when the block completes
    and is removed when it fails. Every process enters it; process 0 renames."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield str(tmp)
    except BaseException:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"written:{tmp}")
    if jax.process_index() == 0:
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def _write_json_atomically(path: Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _reject_typed_keys(state: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise CheckpointError(
                f"state{jax.tree_util.keystr(path)} is a typed PRNG key; "
                "store jax.random.key_data(key) in the train state instead"
            )


class Preempted(SacpoError):
    """The run stopped on a preemption notice (SIGTERM) or Ctrl-C after saving what it
    had; rerunning the same command resumes. Exit code 75 (EX_TEMPFAIL: try again)."""

    exit_code = 75


class PreemptionGuard:
    """Turns SIGTERM (a preemption notice) and SIGINT (Ctrl-C) into a flag that long
    phases poll between their units of work (training steps, reference batches, models
    to evaluate, stages).

    The handler only sets a flag; on True the phase saves what it has and raises
    ``Preempted``. A second Ctrl-C stops at once (KeyboardInterrupt). With several
    processes ``should_stop`` is a collective, so every process must call it at the
    same points: it returns True on all of them together when any one got a signal (an
    all-gather of the flags), or when JAX's preemption service (``jax.distributed``,
    which catches SIGTERM itself if it was set up after this guard) reports its sync
    point. Entering the guard starts a fresh watch (the flag is cleared); entering an
    entered guard again is a no-op; the previous handlers come back when the outermost
    ``with`` exits.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self._depth = 0

    @property
    def requested(self) -> bool:
        """True once this process received one of the signals."""
        return self._flag.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        """Whether all processes should save and exit after `step` (same answer everywhere)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags)) or _reached_preemption_sync_point(step)

    def __enter__(self) -> PreemptionGuard:
        if self._depth == 0:
            self._flag.clear()  # a new watch: signals before it belong to an earlier run
            if threading.current_thread() is threading.main_thread():
                for signum in self.signals:
                    self._previous[signum] = signal.signal(signum, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        for signum, previous in self._previous.items():
            # None: the old handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def _reached_preemption_sync_point(step: int) -> bool:
    """JAX's preemption-service answer; False when the service is disabled."""
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:
        return False
