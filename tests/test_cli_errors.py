"""The command lines' errors: one line on stderr, exit status 2, for each family (config, data, checkpoint,
missing extra); --debug shows the traceback. Each case runs train.py in a subprocess, as a user would."""
import os
import subprocess
import sys

import pytest

from imgllm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, tmp_path, env=None):
    """(exit status, stderr lines) of train.py with `args` (cwd: tmp_path, CPU)."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    environment.pop(cli.DEBUG_ENV, None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_error(status, lines, *fragments):
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_config_name_lists_the_names(tmp_path):
    status, lines = run_train("--config=cifar100", "--workdir=w", tmp_path=tmp_path)
    assert_one_line_error(status, lines, "--config=cifar100", "cifar10, cifar10_muon, cnn_tiny, demo")


def test_misspelt_config_field_suggests_the_right_one(tmp_path):
    status, lines = run_train("--config=cnn_tiny", "--config.num_epoch=3", "--workdir=w", tmp_path=tmp_path)
    assert_one_line_error(status, lines, "no such config field: num_epoch", 'Did you mean "num_epochs"')


def test_missing_checkpoint(tmp_path):
    """(A bad config value such as num_epochs=inf: test_train_safety.py, in process.)"""
    status, lines = run_train("--mode=eval", "--workdir=nothing_here", tmp_path=tmp_path)
    assert_one_line_error(status, lines, "nothing_here")


def test_data_folder_without_the_split(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    status, lines = run_train("--config=cnn_tiny", "--config.dataset=folder:data/nothing", "--workdir=w",
                              tmp_path=tmp_path)
    assert_one_line_error(status, lines, "data/nothing")


def test_missing_extra_names_the_module(tmp_path):
    """tensorflow-datasets shadowed by a module that fails as it does without its extras."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    failure = "raise ModuleNotFoundError(\"No module named 'importlib_resources'\", name='importlib_resources')\n"
    (shadow / "tensorflow_datasets.py").write_text(failure)
    env = {"PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ("--config=cnn_tiny", "--config.dataset=cifar10", "--workdir=w")
    status, lines = run_train(*args, tmp_path=tmp_path, env=env)
    assert_one_line_error(status, lines, "importlib_resources")


def test_debug_re_raises_for_the_traceback():
    def fail():
        raise FileNotFoundError("no such file: x")

    with pytest.raises(FileNotFoundError):
        cli.user_errors_exit("train.py", fail, debug=True)
    with pytest.raises(SystemExit) as exit_:
        cli.user_errors_exit("train.py", fail, debug=False)
    assert exit_.value.code == cli.USAGE_STATUS
    assert cli.debug_requested(["--debug"]) and not cli.debug_requested(["--x"])


@pytest.mark.parametrize("error, expected", [
    (KeyError("class_names"), "class_names"),
    (ModuleNotFoundError("No module named 'x'", name="x"), "No module named 'x' (pip install -e ."),
    (ValueError(""), "ValueError"),
])
def test_error_messages(error, expected):
    assert cli.error_message(error).startswith(expected)
