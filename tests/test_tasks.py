"""The explicit task table: a work directory's stored config names a task in TASKS, and nothing else is built.

Earlier versions imported "module:factory" from config.task, so a forged checkpoint naming
"subprocess:getoutput" ran a shell with the config's keys as its command line. Such a checkpoint is now refused
with UnknownTaskError (train.py: one line, exit status 2); names earlier versions stored for imgllm's own tasks
still load and resume.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from imgllm.configs import cnn_tiny
from imgllm.train import evaluation, loop
from imgllm.train.checkpoint import IncompatibleConfigError
from imgllm.train.classifier import ClassifierTask
from imgllm.train.registry import LEGACY_TASK_NAMES, TASKS, UnknownTaskError, task_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORGED_TASK = "subprocess:getoutput"


def tiny_config():
    config = cnn_tiny.get_config()
    config.num_epochs = 0.25  # 2 steps of 32 examples
    config.eval_split = ""
    return config


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A finished cnn_tiny run (2 steps, checkpoints at 2)."""
    workdir = tmp_path_factory.mktemp("tiny")
    loop.train_and_evaluate(tiny_config(), str(workdir))
    return workdir


def copy_with_stored_config(workdir, out, **changes):
    """A copy of `workdir` whose checkpoints' stored config JSON has `changes` (what a forger would write)."""
    shutil.copytree(workdir, out)
    steps = [d for d in os.listdir(out / "checkpoints") if d.isdigit()]
    assert steps
    for step in steps:
        path = out / "checkpoints" / step / "config" / "metadata"
        stored = json.loads(path.read_text())
        stored.update(changes)
        path.write_text(json.dumps(stored))
    return out


@pytest.fixture
def forged(tiny_workdir, tmp_path):
    """(work directory naming subprocess:getoutput, file its shell command would create)."""
    marker = tmp_path / "created_by_the_forged_config"
    # A key sorted first: the old loader's subprocess.getoutput(config) ran `sh -c <first key>`.
    workdir = copy_with_stored_config(tiny_workdir, tmp_path / "forged", task=FORGED_TASK, **{f" touch {marker}; #": 1})
    return workdir, marker


def test_task_names_come_from_the_table_only():
    assert {task_name(name) for name in TASKS} == set(TASKS)
    for legacy, name in LEGACY_TASK_NAMES.items():
        assert task_name(legacy) == name
    for bad in (FORGED_TASK, "os:system", "imgllm.train.classifier:remap_labels", None):
        with pytest.raises(UnknownTaskError, match=f"config.task={bad!r}"):
            task_name(bad)


def test_forged_task_is_refused_and_nothing_runs(forged):
    workdir, marker = forged
    with pytest.raises(UnknownTaskError, match=FORGED_TASK):
        evaluation.restore_for_eval(str(workdir))
    with pytest.raises(UnknownTaskError, match=FORGED_TASK):
        evaluation.evaluate_checkpoint(str(workdir), "demo")
    with pytest.raises(IncompatibleConfigError, match=f"task: checkpoint '{FORGED_TASK}', now 'classifier'"):
        loop.train_and_evaluate(tiny_config(), str(workdir))  # resuming it is refused as well
    assert not marker.exists()


def test_train_py_eval_refuses_a_forged_task(forged):
    workdir, marker = forged
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--mode=eval", f"--workdir={workdir}", "--data=demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"train.py: error: config.task={FORGED_TASK!r} is not an imgllm task; expected one of {sorted(TASKS)}"
    ), proc.stderr[-2000:]
    assert not marker.exists()


def test_legacy_task_name_loads_and_resumes(tiny_workdir, tmp_path):
    workdir = copy_with_stored_config(tiny_workdir, tmp_path / "legacy", task="imgllm.train.classifier:ClassifierTask")
    config, meta, task, _ = evaluation.restore_for_eval(str(workdir))
    assert isinstance(task, ClassifierTask) and config.task == "imgllm.train.classifier:ClassifierTask"
    result = loop.train_and_evaluate(tiny_config(), str(workdir))  # today's name "classifier": same run
    assert int(result.state.step) == result.total_steps == meta["step"]
