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
