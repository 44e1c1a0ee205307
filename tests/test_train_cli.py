"""train.py end to end in subprocesses (slow): resume after SIGKILL, 8 simulated CPU devices, and two
processes joined by jax.distributed (gloo CPU collectives) all end with the parameters of one plain run.

All runs share one persistent compilation cache, so a restarted run does not compile again.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imgllm.train import evaluation, metrics_log

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 16  # cnn_tiny: 256 examples / batch 32 = 8 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def start_training(workdir, cache, *, devices=1, extra=(), log=None):
    """Starts `train.py --config=cnn_tiny` (2 epochs, checkpoint every 2 steps, no eval) in a subprocess."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config=cnn_tiny",
        f"--workdir={workdir}",
        "--config.num_epochs=2",
        "--config.checkpoint_every_steps=2",
        "--config.eval_split=",
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, (out or "")[-3000:]


def finished_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def final_variables(workdir):
    return evaluation.restore_for_eval(workdir)[3]


def assert_same_variables(actual, expected, atol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol, err_msg=str(path))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, compile_cache):
    """Final variables of an uninterrupted single-device, single-process run."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    finish(start_training(workdir, compile_cache))
    return final_variables(workdir)


def test_resume_after_sigkill_matches_uninterrupted_run(one_device, compile_cache, tmp_path):
    workdir = str(tmp_path / "killed")
    with open(tmp_path / "killed.log", "w") as log:
        proc = start_training(workdir, compile_cache, log=log)
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            if any(s >= 4 for s in finished_steps(workdir)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert 4 <= max(finished_steps(workdir)) < TOTAL_STEPS

    finish(start_training(workdir, compile_cache))  # the same command again resumes
    assert max(finished_steps(workdir)) == TOTAL_STEPS
    assert_same_variables(final_variables(workdir), one_device, atol=0.0)  # bit-identical on CPU


def test_sigterm_saves_the_step_exits_and_resumes_bit_identically(one_device, compile_cache, tmp_path):
    """What a cluster's preemption does: SIGTERM mid-run, a checkpoint at the step it stopped, a prompt exit."""
    workdir = str(tmp_path / "preempted")
    proc = start_training(workdir, compile_cache)
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and not any(s >= 4 for s in finished_steps(workdir)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert time.time() - signalled < 10
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+) of 16", out).group(1))
    assert 4 <= stopped_at < TOTAL_STEPS and max(finished_steps(workdir)) == stopped_at

    finish(start_training(workdir, compile_cache))
    assert_same_variables(final_variables(workdir), one_device, atol=0.0)
    with open(os.path.join(workdir, metrics_log.METRICS_FILE)) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert len(steps) == len(set(steps)) and max(steps) == TOTAL_STEPS


def test_eight_devices_match_one(one_device, compile_cache, tmp_path):
    finish(start_training(str(tmp_path), compile_cache, devices=8))
    # Global-batch gradients and BatchNorm statistics: only the float summation order differs.
    assert_same_variables(final_variables(str(tmp_path)), one_device, atol=2e-5)


def test_two_processes_match_one(one_device, compile_cache, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        start_training(
            str(tmp_path),
            compile_cache,
            devices=2,
            extra=(f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
        )
        for i in range(2)
    ]
    for proc in procs:
        finish(proc)
    assert_same_variables(final_variables(str(tmp_path)), one_device, atol=2e-5)
