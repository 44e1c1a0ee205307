"""The command lines' errors: one line on stderr, exit status 2, for each family (config, data, checkpoint,
missing extra); --debug shows the traceback. Most cases run train.py in a subprocess, as a user would; the flag
handling of issue #25 runs its console_main in this process."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
from absl import flags

from imgllm import cli
from imgllm.commands import train as train_cli
from imgllm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, tmp_path, env=None):
    """(exit status, stderr lines) of train.py with `args` (cwd: tmp_path, CPU)."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    environment.pop(cli.DEBUG_ENV, None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    status, lines = run_train(
        "--config=cnn_tiny", "--config.dataset=folder:data/nothing", "--workdir=w", tmp_path=tmp_path
    )
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


@pytest.mark.parametrize(
    "error, expected",
    [
        (KeyError("class_names"), "class_names"),
        (ModuleNotFoundError("No module named 'x'", name="x"), "No module named 'x' (pip install -e ."),
        (ValueError(""), "ValueError"),
    ],
)
def test_error_messages(error, expected):
    assert cli.error_message(error).startswith(expected)


def run_train_main(*args):
    """(exit status, stdout, stderr lines) of train.py's console_main in this process (absl's flags reset first)."""
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = train_cli.console_main(["train.py", *args])
        except SystemExit as exit_:
            status = exit_.code or 0
    return status, out.getvalue(), [line for line in err.getvalue().splitlines() if line.strip()]


def test_print_config_needs_no_workdir_and_takes_the_config_name_after_a_space():
    """Issue #25: --print_config failed without --workdir, and `--config NAME` (absl's space form) was not resolved."""
    status, out, lines = run_train_main("--config", "cnn_tiny", "--print_config")
    assert status == 0 and not lines, lines
    assert "num_epochs" in out and "_ErrorConfig" not in out


def test_help_exits_zero_and_lists_the_flags():
    """Issue #25: `train.py --help` exited 1."""
    status, out, _ = run_train_main("--help")
    assert status == 0 and "--workdir" in out and "--print_config" in out and "--config" in out


def test_a_config_file_that_cannot_load_is_one_line(tmp_path):
    """Issue #25: a config whose loading failed printed an _ErrorConfig repr and exited 0 under --print_config."""
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    raise OSError('corpus.txt is not readable')\n")
    status, out, lines = run_train_main(f"--config={config}", "--print_config")
    assert status == 2 and lines == ["train.py: error: --config cannot be loaded: corpus.txt is not readable"], lines
    assert "_ErrorConfig" not in out


def test_training_without_workdir_or_with_stray_arguments_is_one_line():
    status, _, lines = run_train_main("--config=cnn_tiny")
    assert status == 2 and lines == [
        "train.py: error: --workdir is required: the work directory for checkpoints and metrics.jsonl"
    ], lines
    status, _, lines = run_train_main("--config=cnn_tiny", "--workdir=w", "cnn_tiny")  # absl printed its usage
    assert status == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: unexpected arguments ['cnn_tiny']")


def test_a_run_without_evaluation_still_says_what_it_did():
    """Issue #25: lm_tiny (no eval_corpus, no progress bar) trained without printing anything."""
    result = loop.TrainResult(state=None, final_eval=None, steps_per_epoch=3, total_steps=15)
    assert train_cli.run_summary(result, "runs/lm") == {
        "steps": 15,
        "workdir": "runs/lm",
        "metrics": os.path.join("runs/lm", "metrics.jsonl"),
    }
    result.final_eval = {"accuracy": 0.5}
    assert train_cli.run_summary(result, "w")["final_eval"] == {"accuracy": 0.5}
