"""Data parallelism: 8 simulated CPU devices, and two processes joined with jax.distributed (gloo CPU
collectives), train to the same parameters as one device. Each run is a train.py subprocess."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from imgllm import parallel
from imgllm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_training(workdir, *, devices=1, extra=(), env_extra=None, wait=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env_extra or {})}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=cnn_tiny", f"--workdir={workdir}",
           "--config.num_epochs=1", "--config.eval_split=", "--config.checkpoint_every_steps=0", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        finish(proc)
    return proc


def finish(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]


def final_variables(workdir):
    return loop.restore_for_eval(workdir)[3]


def assert_same_variables(actual, expected, atol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol, err_msg=str(path))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    run_training(workdir)
    return final_variables(workdir)


@pytest.mark.slow
def test_eight_devices_match_one(one_device, tmp_path):
    run_training(str(tmp_path), devices=8)
    # Global-batch gradients and BatchNorm statistics: only float summation order differs.
    assert_same_variables(final_variables(str(tmp_path)), one_device, atol=2e-5)


@pytest.mark.slow
def test_two_processes_match_one(one_device, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [run_training(str(tmp_path), devices=2, wait=False,
                          extra=(f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"))
             for i in range(2)]
    for proc in procs:
        finish(proc)
    assert_same_variables(final_variables(str(tmp_path)), one_device, atol=2e-5)


def test_mesh_and_host_to_global():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == jax.device_count()
    batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3)}
    arrays = parallel.host_to_global(batch, mesh)
    assert arrays["x"].sharding == parallel.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), batch["x"])
    assert parallel.maybe_initialize_distributed() is False     # not asked: no coordinator given


def test_distributed_needs_process_count_and_id(monkeypatch):
    monkeypatch.delenv(parallel.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.delenv(parallel.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        parallel.maybe_initialize_distributed("localhost:1234")
