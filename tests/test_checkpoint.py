"""Checkpoints: bit-exact round trips, keep-last-K, resharding, SIGTERM and kill -9 resumes.

The resume tests run a toy training loop in subprocesses (the loop follows the
protocol in sacpo_jax/checkpoint.py) and compare the final values with an
uninterrupted run of the same loop, byte for byte.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from sacpo_jax.checkpoint import (
    CheckpointError,
    PreemptionGuard,
    StageCheckpointer,
    is_finished,
)
from sacpo_jax.parallel import make_mesh


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "norm": jnp.asarray(rng.normal(size=8), jnp.bfloat16),
    }
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)  # nonzero moments, count 1
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(41, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(5)),
    }
    meta = {"position": 123, "epoch": 2, "lambdas": [0.5, 1.25], "metrics": {"loss": [0.7, 0.6]}}
    with StageCheckpointer(tmp_path / "stage", save_every=1, keep=3) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(41, state, meta)
    restored_state, restored_meta = StageCheckpointer(
        tmp_path / "stage", save_every=1, keep=3
    ).restore(_abstract(state))
    _assert_bit_equal(restored_state, state)
    assert restored_meta == meta


def test_bad_inputs_raise_clear_errors(tmp_path):
    checkpointer = StageCheckpointer(tmp_path, save_every=1, keep=1)
    with pytest.raises(CheckpointError, match=r"state\['rng'\] is a typed PRNG key"):
        checkpointer.save(1, {"rng": jax.random.key(0)}, {})
    with pytest.raises(CheckpointError, match="meta at step 1 is not JSON"):
        checkpointer.save(1, {"x": jnp.zeros(2)}, {"bad": object()})
    with pytest.raises(CheckpointError, match="no checkpoint at step None"):
        checkpointer.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    checkpointer.close()


def test_interval_and_keep_last_k(tmp_path):
    with StageCheckpointer(tmp_path, save_every=2, keep=2) as checkpointer:
        saved = [
            checkpointer.save(s, {"x": jnp.full(3, s, jnp.float32)}, {"s": s}) for s in range(1, 8)
        ]
        assert saved == [False, True, False, True, False, True, False]
        assert checkpointer.save(7, {"x": jnp.full(3, 7.0)}, {"s": 7}, force=True)
        assert not checkpointer.save(
            7, {"x": jnp.full(3, 7.0)}, {"s": 7}, force=True
        )  # never twice
        checkpointer.wait()
        assert checkpointer.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]
    state, meta = StageCheckpointer(tmp_path, save_every=2, keep=2).restore(
        {
            "x": jax.ShapeDtypeStruct(
                (3,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
            )
        },
        step=6,
    )
    assert np.array_equal(state["x"], np.full(3, 6.0, np.float32)) and meta == {"s": 6}


def test_restore_reshards_onto_another_mesh(tmp_path):
    values = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    fsdp8 = NamedSharding(make_mesh(fsdp=8), PartitionSpec("fsdp", None))
    with StageCheckpointer(tmp_path, save_every=1, keep=1) as checkpointer:
        checkpointer.save(1, {"w": jax.device_put(values, fsdp8)}, {})
    targets = {
        "mesh 2x2x2": NamedSharding(
            make_mesh(data=2, fsdp=2, tensor=2), PartitionSpec("fsdp", "tensor")
        ),
        "one device": SingleDeviceSharding(jax.devices()[3]),
    }
    for name, sharding in targets.items():
        abstract = {"w": jax.ShapeDtypeStruct(values.shape, values.dtype, sharding=sharding)}
        state, _ = StageCheckpointer(tmp_path, save_every=1, keep=1).restore(abstract)
        assert state["w"].sharding == sharding, name
        assert np.array_equal(np.asarray(state["w"]), values), name
        for shard in state["w"].addressable_shards:
            assert np.array_equal(np.asarray(shard.data), values[shard.index]), name


def test_finished_marker(tmp_path):
    assert is_finished(tmp_path) is None
    with StageCheckpointer(tmp_path, save_every=1, keep=1) as checkpointer:
        checkpointer.save(3, {"x": jnp.zeros(2)}, {})
        checkpointer.mark_finished({"step": 3, "stage": "helpful"})
    assert is_finished(tmp_path) == {"step": 3, "stage": "helpful"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    (tmp_path / "FINISHED.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="FINISHED.json: not valid JSON"):
        is_finished(tmp_path)


def test_guard_sets_flag_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes
        assert guard.requested and guard.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is previous


# A toy stage: x <- x * 1.001 + mean(batch) + step + noise, with a data position and an RNG
# that must both resume exactly; `marker` is filled with the step (and makes saves slow).
TOY_LOOP = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from sacpo_jax.checkpoint import PreemptionGuard, StageCheckpointer, is_finished

stage_dir, total, size, save_every, delay, out = sys.argv[1:7]
total, size, save_every, delay = int(total), int(size), int(save_every), float(delay)
DATA = (np.arange(10_000, dtype=np.float32) * 7) % 13
BATCH = 3

@jax.jit
def train_step(state, batch):
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    noise = 1e-3 * jax.random.normal(noise_key, state["x"].shape)
    x = state["x"] * 1.001 + batch.mean() + state["step"] + noise
    step = state["step"] + 1
    marker = jnp.full_like(state["marker"], step)
    return {"x": x, "step": step, "rng": jax.random.key_data(key), "marker": marker}

if is_finished(stage_dir):
    print("already finished", flush=True)
    sys.exit(0)
state = {
    "x": jnp.linspace(0.0, 1.0, size, dtype=jnp.float32),
    "step": jnp.asarray(0, jnp.int32),
    "rng": jax.random.key_data(jax.random.key(7)),
    "marker": jnp.zeros(size, jnp.float32),
}
meta, step = {"position": 0}, 0
checkpointer = StageCheckpointer(stage_dir, save_every=save_every, keep=2)
if checkpointer.latest_step() is not None:
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    state, meta = checkpointer.restore(abstract)
    step = int(state["step"])
    print(f"resumed from {step}", flush=True)
with PreemptionGuard() as guard:
    while step < total:
        position = meta["position"]
        state = train_step(state, DATA[position : position + BATCH])
        meta = {"position": position + BATCH}
        step += 1
        print(f"step {step}", flush=True)
        if guard.should_stop(step):
            checkpointer.save(step, state, meta, force=True)
            checkpointer.close()
            print(f"preempted at {step}", flush=True)
            sys.exit(0)
        checkpointer.save(step, state, meta)
        time.sleep(delay)
checkpointer.save(step, state, meta, force=True)
checkpointer.mark_finished({"step": step})
checkpointer.close()
np.save(out, np.asarray(state["x"]))
print("done", flush=True)
"""

TOTAL, SIZE = 20, 200_000


def _toy_env():
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }


def _start_toy(tmp_path, save_every, delay):
    script = tmp_path / "toy_loop.py"
    script.write_text(TOY_LOOP)
    args = [tmp_path / "stage", TOTAL, SIZE, save_every, delay, tmp_path / "final_x.npy"]
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_toy_env())


def _read_until(process, line_wanted):
    lines = []
    while (line := process.stdout.readline()) and line.strip() != line_wanted:
        lines.append(line.strip())
    assert line, f"process ended before printing {line_wanted!r}: {lines}"


def _single_device(tree):
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


TOY_STATE = {
    "x": jax.ShapeDtypeStruct((SIZE,), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    "marker": jax.ShapeDtypeStruct((SIZE,), jnp.float32),
}


def test_stage_preempted_then_killed_resumes_bit_identically(tmp_path):
    """An uninterrupted run vs. SIGTERM at step ~6, resume, kill -9 mid-save, resume to the end."""
    (tmp_path / "uninterrupted").mkdir()
    uninterrupted = _start_toy(tmp_path / "uninterrupted", save_every=10, delay=0.0)
    stage = tmp_path / "stage"

    # 1. SIGTERM: the loop saves at once and exits 0.
    process = _start_toy(tmp_path, save_every=5, delay=0.1)
    _read_until(process, "step 6")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    stopped_at = int(output.splitlines()[-1].removeprefix("preempted at "))
    assert 6 <= stopped_at < TOTAL - 3
    with StageCheckpointer(stage, save_every=1, keep=2) as checkpointer:
        assert checkpointer.all_steps() == [5 * ((stopped_at - 1) // 5), stopped_at]

    # 2. The same command resumes there; kill -9 while the async save of a step is being written.
    process = _start_toy(tmp_path, save_every=1, delay=0.0)
    assert process.stdout.readline().strip() == f"resumed from {stopped_at}"
    # "step n" comes before save(n), which waits for save(n - 1): here save(n - 1) is running.
    _read_until(process, f"step {stopped_at + 3}")
    process.kill()
    process.wait(timeout=30)
    assert [
        p.name for p in stage.iterdir() if ".orbax-checkpoint-tmp" in p.name
    ]  # a half-written step
    with StageCheckpointer(stage, save_every=1, keep=2) as checkpointer:
        last = checkpointer.latest_step()
        assert stopped_at < last < TOTAL
        state, meta = checkpointer.restore(_single_device(TOY_STATE))
    assert int(state["step"]) == last and meta == {"position": 3 * last}
    assert np.all(np.asarray(state["marker"]) == last)

    # 3. Resume again and finish; the result is the uninterrupted one, byte for byte.
    output, _ = _start_toy(tmp_path, save_every=1, delay=0.0).communicate(timeout=120)
    assert output.splitlines()[0] == f"resumed from {last}" and output.splitlines()[-1] == "done"
    assert not [p for p in stage.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert is_finished(stage) == {"step": TOTAL}
    output, _ = uninterrupted.communicate(timeout=120)
    assert output.splitlines()[-1] == "done"
    resumed_x = np.load(tmp_path / "final_x.npy")
    assert resumed_x.tobytes() == np.load(tmp_path / "uninterrupted" / "final_x.npy").tobytes()


# Two processes, 4 CPU devices each, one array sharded over all 8: x <- x + (step - 1).
TWO_PROCESS_LOOP = """
import sys, time
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
process_id, port, stage_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from sacpo_jax.checkpoint import PreemptionGuard, StageCheckpointer

sharding = NamedSharding(jax.make_mesh((8,), ("fsdp",)), PartitionSpec("fsdp"))
start = np.arange(64, dtype=np.float32).reshape(16, 4)
x = jax.make_array_from_callback(start.shape, sharding, lambda index: start[index])
add = jax.jit(lambda x, s: x + s, out_shardings=sharding)
checkpointer = StageCheckpointer(stage_dir, save_every=1000, keep=1)
with PreemptionGuard() as guard:
    for step in range(1, 1000):
        x = add(x, step - 1)
        print(f"step {step}", flush=True)
        if guard.should_stop(step):
            checkpointer.save(step, {"x": x}, {"step": step}, force=True)
            checkpointer.close()
            print(f"preempted at {step}", flush=True)
            break
        time.sleep(0.02)
jax.distributed.shutdown()
"""


def test_two_processes_stop_together_and_restore_in_one(tmp_path):
    script = tmp_path / "two_process_loop.py"
    script.write_text(TWO_PROCESS_LOOP)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**_toy_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "stage")],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    _read_until(processes[1], "step 5")
    processes[1].send_signal(signal.SIGTERM)  # only one process gets the notice
    outputs = [p.communicate(timeout=60)[0].splitlines() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert outputs[0][-1] == outputs[1][-1]
    stopped_at = int(outputs[0][-1].removeprefix("preempted at "))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
    abstract = {"x": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)}
    with StageCheckpointer(tmp_path / "stage", save_every=1000, keep=1) as checkpointer:
        state, meta = checkpointer.restore(abstract)
    expected = np.arange(64, dtype=np.float32).reshape(16, 4) + stopped_at * (stopped_at - 1) / 2
    assert meta == {"step": stopped_at} and state["x"].sharding == sharding
    assert np.array_equal(np.asarray(state["x"]), expected)
