"""Checkpoint/resume through the train.py command line: a run killed with SIGKILL and started again ends
with exactly the parameters of an uninterrupted run; config comparison messages."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 24   # cnn_tiny: 256 examples / batch 32 = 8 steps per epoch, 3 epochs


def train_command(workdir):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=cnn_tiny", f"--workdir={workdir}",
            "--config.num_epochs=3", "--config.checkpoint_every_steps=2", "--config.eval_split="]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment sharing a persistent compilation cache, so restarts do not recompile."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": ""}


def finished_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, env):
    reference = str(tmp_path / "reference")
    subprocess.run(train_command(reference), env=env, check=True, timeout=900, capture_output=True)

    workdir = str(tmp_path / "killed")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(train_command(workdir), env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            if any(s >= 4 for s in finished_steps(workdir)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert 4 <= max(finished_steps(workdir)) < TOTAL_STEPS

    subprocess.run(train_command(workdir), env=env, check=True, timeout=900, capture_output=True)
    assert max(finished_steps(workdir)) == TOTAL_STEPS
    _, _, _, expected = loop.restore_for_eval(reference)
    _, meta, _, resumed = loop.restore_for_eval(workdir)
    assert meta["step"] == TOTAL_STEPS
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6, err_msg=str(path))


def test_config_differences_name_each_key_and_skip_resume_safe_ones():
    saved = {"seed": 0, "optimizer": {"learning_rate": 0.1, "groups": {"a": {"lr_scale": 64.0}}},
             "log_every_steps": 10, "normalization": {"mean": (0.5, 0.5)}}
    now = {"seed": 0, "optimizer": {"learning_rate": 0.1, "groups": {"a": {"lr_scale": 32.0}}},
           "log_every_steps": 99, "normalization": {"mean": [0.5, 0.5]}, "extra": 1}
    assert ckpt_lib.config_differences(saved, now) == [
        "extra: checkpoint '<absent>', now 1",
        "optimizer.groups.a.lr_scale: checkpoint 64.0, now 32.0",
    ]
    with pytest.raises(ckpt_lib.IncompatibleConfigError, match="runs/x holds a checkpoint"):
        ckpt_lib.check_compatible(saved, now, "runs/x")
    ckpt_lib.check_compatible(saved, {**saved, "log_every_steps": 1}, "runs/x")
