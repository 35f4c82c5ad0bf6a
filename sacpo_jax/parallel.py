"""Meshes, partition rules and sharded placement. The only module that names mesh axes.

The mesh has three axes:
    data    pure data parallelism (parameters replicated),
    fsdp    data parallelism with parameters and optimiser state sharded over one dim,
    tensor  tensor parallelism over attention heads, MLP width and vocabulary.
A batch is split over ("data", "fsdp"). Each parameter gets a PartitionSpec from
PARAM_RULES; an axis that does not divide its dimension is dropped (replicated), so
every config runs on every mesh, e.g. 2 KV heads on a tensor axis of 4.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter path (joined with "/") -> preferred axis per dimension (the projections'
# rules follow below).
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "score_head": ("fsdp", None),
    "final_norm": (None,),
    "layers/input_norm": (None, None),
    "layers/post_attention_norm": (None, None),
    "layers/q_bias": (None, "tensor", None),
    "layers/k_bias": (None, "tensor", None),
    "layers/v_bias": (None, "tensor", None),
    "layers/o_bias": (None, None),
    "layers/gate_bias": (None, "tensor"),
    "layers/up_bias": (None, "tensor"),
    "layers/down_bias": (None, None),
}

# The seven projections' axes: (input dims, output dims) after the layer axis.
_PROJECTION_AXES: dict[str, tuple[tuple[str | None, ...], tuple[str | None, ...]]] = {
    "q": (("fsdp",), ("tensor", None)),
    "k": (("fsdp",), ("tensor", None)),
    "v": (("fsdp",), ("tensor", None)),
    "o": (("tensor", None), ("fsdp",)),
    "gate": (("fsdp",), ("tensor",)),
    "up": (("fsdp",), ("tensor",)),
    "down": (("tensor",), ("fsdp",)),
}


def _projection_rules() -> dict[str, tuple[str | None, ...]]:
    """The projection weights [layers, *in, *out]. LoRA: A [layers, *in, rank] shards its
    inputs as the weight does, B [layers, rank, *out] its outputs; the rank axis is
    replicated. A quantised base: codes and absmax [layers, in / rows per element, out]
    (inputs and outputs flattened) shard over the first input and first output axis."""
    rules = {}
    for name, (inputs, outputs) in _PROJECTION_AXES.items():
        rules[f"layers/{name}"] = (None, *inputs, *outputs)
        rules[f"layers/{name}_lora_a"] = (None, *inputs, None)
        rules[f"layers/{name}_lora_b"] = (None, None, *outputs)
        rules[f"layers/{name}_codes"] = (None, inputs[0], outputs[0])
        rules[f"layers/{name}_absmax"] = (None, inputs[0], outputs[0])
    return rules


PARAM_RULES.update(_projection_rules())


def resolve_mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order; one size may be -1, meaning "the rest"."""
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if device_count % known:
            raise ValueError(f"mesh {sizes}: {device_count} devices do not divide by {known}")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) != device_count:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {device_count} are available"
        )
    return tuple(shape)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices; -1 = the rest."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def fit_spec(
    preferred: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh
) -> PartitionSpec:
    """Drop each axis that does not divide its dimension (or is trivial on this mesh)."""
    axes = []
    for axis, dim in zip(preferred, shape):
        size = mesh.shape[axis] if axis else 1
        axes.append(axis if axis and size > 1 and dim % size == 0 else None)
    return PartitionSpec(*axes)


def path_name(path: tuple) -> str:
    """'layers/q' from a pytree key path, ignoring non-dict keys (e.g. a Variable's value)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name != "value":
            parts.append(name)
    return "/".join(parts)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one parameter, by its path name."""
    if name not in PARAM_RULES:
        raise KeyError(f"no partition rule for parameter {name!r}")
    return fit_spec(PARAM_RULES[name], shape, mesh)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching ``params`` (arrays or ShapeDtypeStructs)."""

    def sharding(path, leaf):
        return NamedSharding(mesh, param_spec(path_name(path), tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(sharding, params)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for any pytree holding parameter-shaped leaves (params, Adam moments ...).

    A leaf whose path ends in a parameter name (e.g. ``opt_state/.../mu/layers/q``)
    follows that parameter's rule; every other leaf (step counters, rng) is replicated.
    """

    def sharding(path, leaf):
        parts = path_name(path).split("/")
        for start in range(len(parts)):
            name = "/".join(parts[start:])
            if name in PARAM_RULES and len(PARAM_RULES[name]) == len(leaf.shape):
                return NamedSharding(mesh, param_spec(name, tuple(leaf.shape), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh, grad_accum: int = 1) -> NamedSharding:
    """Rows split over (data, fsdp), the other dims replicated; with gradient accumulation
    a batch is [accum, micro, ...] and the row axis is axis 1."""
    lead = (None,) if grad_accum > 1 else ()
    return NamedSharding(mesh, PartitionSpec(*lead, BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch axes split a batch's rows into."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_shardings(mesh: Mesh, batch: dict, grad_accum: int = 1) -> dict:
    """``batch_sharding`` of every array of a batch."""
    return {name: batch_sharding(mesh, grad_accum) for name in batch}


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, grad_accum: int = 1) -> dict:
    """This process's numpy batch -> global jax.Arrays, rows split over the batch axes
    (every process passes its own rows; together they make the global batch)."""
    sharding = batch_sharding(mesh, grad_accum)
    return {name: jax.make_array_from_process_local_data(sharding, x) for name, x in batch.items()}


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x`` with its rows (axis 0) split over the batch axes of the mesh in context
    (``jax.set_mesh`` outside a jitted function, ``jax.sharding.use_abstract_mesh``
    inside one) and its other axes replicated; unchanged when no mesh is set.

    Keeps activations row-sharded through a layer, so that parameters sharded over fsdp
    are all-gathered for the layer (FSDP) instead of the batch's activations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES, *[None] * (x.ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_host(x: jax.Array) -> np.ndarray:
    """The full value on this host (every process takes part when it spans several)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-process numpy array, in process order."""
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def place_from_host(
    shape: tuple[int, ...],
    dtype: Any,
    sharding: NamedSharding,
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
    """Build a global array shard by shard: ``read(index)`` returns only that block.

    No process ever holds more of the array than its own devices' shards (plus the
    block being read), so large checkpoints load without a full replicated copy.
    """

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        # A private copy: the block must not alias a memory-mapped file.
        return np.array(read(index), dtype=dtype, copy=True)

    return jax.make_array_from_callback(shape, sharding, callback)


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: JAX's import-time check found libtpu and TPU chips, or
    the variables GKE and multislice set are present."""
    from jax._src import cloud_tpu_init  # the flag JAX's own cluster detection reads

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)) or any(
        name in os.environ for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start jax.distributed when running on several hosts; returns True if it started.

    On a Cloud TPU VM JAX finds the slice's hosts itself (metadata server or GKE
    variables), so it starts with no arguments, on one host as on a pod. For GPU and
    CPU hosts the three values come from the arguments or from SACPO_COORDINATOR,
    SACPO_NUM_PROCESSES and SACPO_PROCESS_ID.
    """
    coordinator_address = coordinator_address or os.environ.get("SACPO_COORDINATOR")
    if num_processes is None and "SACPO_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["SACPO_NUM_PROCESSES"])
    if process_id is None and "SACPO_PROCESS_ID" in os.environ:
        process_id = int(os.environ["SACPO_PROCESS_ID"])
    if coordinator_address and num_processes and num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    if on_cloud_tpu_vm():
        jax.distributed.initialize()
        return True
    return False
