"""The mesh, shardings and distributed start-up (multi-device and multi-process training runs are in
test_train_cli.py)."""

import jax
import numpy as np
import pytest

from imgllm import parallel


def test_mesh_and_host_to_global():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == jax.device_count()
    batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3)}
    arrays = parallel.host_to_global(batch, mesh)
    assert arrays["x"].sharding == parallel.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), batch["x"])
    assert parallel.maybe_initialize_distributed() is False  # not asked: no coordinator given


def test_distributed_needs_process_count_and_id(monkeypatch):
    monkeypatch.delenv(parallel.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.delenv(parallel.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        parallel.maybe_initialize_distributed("localhost:1234")


def test_local_mesh_batch_multiple_and_barrier_in_one_process():
    """One process: the local mesh is every device, batches round to the device count, the barrier returns at once
    (the multi-process behaviour is tests/test_infer_multiprocess.py's)."""
    mesh = parallel.make_local_mesh()
    assert mesh.devices.size == len(jax.local_devices()) == jax.device_count()
    assert parallel.process_device_counts() == [jax.device_count()]
    assert parallel.local_batch_multiple() == jax.device_count()
    parallel.wait_for_processes("nobody else", timeout_s=0.001)
