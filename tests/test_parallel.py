"""Mesh construction, partition rules, and sharded forward == single-device forward."""

import jax
import numpy as np
import pytest
from fixtures_models import save_causal_lm
from flax import nnx
from jax.sharding import PartitionSpec as P

from sacpo_jax import parallel
from sacpo_jax.models import hf
from sacpo_jax.models.init import init_model
from sacpo_jax.models.llama import Llama, tiny_config


def test_mesh_rest_axis_and_errors():
    assert parallel.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert parallel.resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="needs 12 devices"):
        parallel.resolve_mesh_shape({"data": 3, "fsdp": 4}, 8)
    mesh = parallel.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_every_parameter_has_a_rule():
    config = tiny_config(attention_bias=True, mlp_bias=True)
    for architecture in ("LlamaForCausalLM", "LlamaForSequenceClassification"):
        model = nnx.eval_shape(
            lambda a=architecture: Llama(config.replace(architecture=a), rngs=nnx.Rngs(0))
        )
        mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
        shardings = parallel.param_shardings(nnx.state(model, nnx.Param), mesh)
        assert len(jax.tree.leaves(shardings)) >= 10


def test_indivisible_axis_is_replicated():
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=4)
    # 2 KV heads cannot split over tensor=4: that dim is replicated, fsdp still applies.
    assert parallel.param_spec("layers/k", (2, 64, 2, 16), mesh) == P(None, "fsdp", None, None)
    assert parallel.param_spec("layers/q", (2, 64, 8, 16), mesh) == P(None, "fsdp", "tensor", None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    # Weight scale 0.1 gives logits of O(1) (checked below); with larger logits fp32
    # summation-order differences between meshes approach the 1e-5 bound.
    save_causal_lm(path, "gqa_llama3", scale=0.1)
    return str(path)


def test_sharded_import_and_forward_match_single_device(checkpoint):
    assert jax.device_count() == 8
    single = hf.load_checkpoint(checkpoint)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = hf.load_checkpoint(checkpoint, mesh=mesh)

    q = sharded.layers.q[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)  # [L, D/2, H/2, hd]
    assert sharded.embed[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers.down[...].sharding.spec == P(None, "tensor", "fsdp")
    assert len(single.embed[...].devices()) == 1

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids_global = jax.device_put(ids, parallel.batch_sharding(mesh))
    mask_global = jax.device_put(mask, parallel.batch_sharding(mesh))

    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, mask)

    expected = np.asarray(forward(single, ids, mask))
    assert expected.std() > 0.3  # not flat
    got = forward(sharded, ids_global, mask_global)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_sharded_init_places_parameters():
    config = tiny_config()
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    model = init_model(config, mesh, seed=0)
    assert model.layers.gate[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.layers.gate[...].addressable_shards[0].data.shape == (2, 16, 64)


def record_initialize(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in ("SACPO_COORDINATOR", "SACPO_NUM_PROCESSES", "SACPO_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_a_cloud_tpu_vm_starts_jax_distributed_with_no_arguments(monkeypatch):
    # gcloud ... ssh --worker=all sets no pod variables: JAX's own TPU check decides
    from jax._src import cloud_tpu_init

    calls = record_initialize(monkeypatch)
    assert not parallel.initialize_distributed() and calls == []  # this CPU machine
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    assert parallel.initialize_distributed() and calls == [{}]


def test_gpu_hosts_start_from_the_environment(monkeypatch):
    calls = record_initialize(monkeypatch)
    monkeypatch.setenv("SACPO_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("SACPO_NUM_PROCESSES", "4")
    monkeypatch.setenv("SACPO_PROCESS_ID", "3")
    assert parallel.initialize_distributed()
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]
