"""Train a model from a config, or evaluate a saved checkpoint: `imgllm-train` (or `python train.py`). Logic lives in
imgllm.train.

Train (resumes automatically from the work directory's latest checkpoint):
    python train.py --config=demo --workdir=runs/demo
    python train.py --config=cifar10 --config.dataset=folder:/tmp/cifar --config.num_epochs=9.9 --workdir=runs/c10
Evaluate a checkpoint (config and normalisation come from the checkpoint) on any data source:
    python train.py --mode=eval --workdir=runs/c10 --data=folder:/path/test
SIGTERM or Ctrl-C stops after the current step with its checkpoint committed (exit status 128 + the signal); the
same command resumes. Resuming on changed data is refused unless --allow_data_change.
Errors in flags, config, data or checkpoints are one line with exit status 2; --debug (or IMGLLM_DEBUG=1) shows
the traceback. --print_config prints the resolved config (no --workdir needed).
Multi-host: --coordinator_address=host:port --num_processes=N --process_id=i (or $IMGLLM_COORDINATOR_ADDRESS,
$IMGLLM_NUM_PROCESSES, $IMGLLM_PROCESS_ID), or --distributed to let JAX detect the cluster.
"""

import functools
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from imgllm import cli, parallel
from imgllm.configs.common import CONFIG_DIR, config_purposes, resolve_config_arg
from imgllm.train import demo_recipe, evaluation, loop
from imgllm.train.metrics_log import METRICS_FILE

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(CONFIG_DIR, "demo.py"),
    "config file, or the name of one in imgllm/configs:\n"
    + "\n".join(f"  {name}: {purpose}" for name, purpose in config_purposes().items()),
    lock_config=True,
)
flags.declare_key_flag("config")  # listed by --help beside the flags below
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory: checkpoints and metrics.jsonl (required)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and resume), or eval a checkpoint")
_DATA = flags.DEFINE_string(
    "data", None, "eval: data source, e.g. folder:/path/test, cifar10, demo (default: the checkpoint's dataset)"
)
_SPLIT = flags.DEFINE_string("split", "test", "eval: split of --data to evaluate")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest)")
_CONFUSION = flags.DEFINE_string(
    "confusion", None, "eval: the classifier's confusion matrix PNG (default: WORKDIR/confusion.png; empty: none)"
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: coordinator host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: auto-detect the cluster")
_ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    "allow_data_change", False, "resume even though the training data differs from the checkpoint's"
)


_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data directory, as infer.py --data-dir (sets config.data_dir; in eval, where --data's tfds splits are read)",
)
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
HELP_FLAGS = {"--help": False, "-h": False, "-?": False, "--helpshort": False, "--helpfull": True}  # flag: full?


def loaded_config():
    """The --config's ConfigDict; a config file that could not be loaded raises its error (config_flags otherwise
    hands on an object that raises only when used, and prints as its repr)."""
    error = getattr(_CONFIG.value, "_error", None)  # ml_collections' _ErrorConfig keeps the load error there
    if isinstance(error, BaseException):
        raise ValueError(f"--config cannot be loaded: {cli.error_message(error)}")
    return _CONFIG.value


def run() -> None:
    """What the flags ask for: print the config, evaluate a checkpoint, or train (the demo recipe, or one config)."""
    config = loaded_config()
    if _PRINT_CONFIG.value:
        print(config)
        return
    if _WORKDIR.value is None:
        raise ValueError("--workdir is required: the work directory for checkpoints and metrics.jsonl")
    parallel.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
    )
    if _MODE.value == "eval":
        confusion = os.path.join(_WORKDIR.value, "confusion.png") if _CONFUSION.value is None else _CONFUSION.value
        result = evaluation.evaluate_checkpoint(
            _WORKDIR.value,
            _DATA.value,
            split=_SPLIT.value,
            step=_STEP.value,
            confusion_png=confusion,
            data_dir=_DATA_DIR.value,
        )
        print(json.dumps(result))
        return
    if _DATA_DIR.value is not None:
        _CONFIG.value.data_dir = _DATA_DIR.value
    if _CONFIG.value.get("recipe") == "demo":  # classifier, then captioner, pipeline export and scores
        demo_recipe.run_demo(_WORKDIR.value, classifier_config=_CONFIG.value)
        return
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_data_change=_ALLOW_DATA_CHANGE.value)
    print(json.dumps(run_summary(result, _WORKDIR.value)))


def run_summary(result: loop.TrainResult, workdir: str) -> dict:
    """The line a finished training prints (also when it has no evaluation, as lm_tiny without eval_corpus): the
    final evaluation when there is one, the steps trained and where the checkpoints and metrics are."""
    summary = {"final_eval": result.final_eval} if result.final_eval is not None else {}
    return {**summary, "steps": result.total_steps, "workdir": workdir, "metrics": os.path.join(workdir, METRICS_FILE)}


def main(argv: Sequence[str], debug: bool = False) -> None:
    """absl's main: `run` with one-line errors (unless `debug`), and 128 + the signal after SIGTERM or Ctrl-C."""
    if len(argv) > 1:
        print(
            f"train.py: error: unexpected arguments {argv[1:]} (flags are written --name=value; train.py --help "
            "lists them)",
            file=sys.stderr,
        )
        sys.exit(cli.USAGE_STATUS)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax's INFO and WARNING lines are for its developers: --verbosity=0
    try:
        cli.user_errors_exit("train.py", run, debug=debug)
    except loop.TrainingStopped as stopped:
        print(f"train.py: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)


def parse_flags(argv: list[str], debug: bool = False) -> list[str]:
    """absl's flag parsing, with a bad flag or config override (--config.num_epoch=3) as one line, status 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        if debug:
            raise
        message = " ".join(cli.error_message(error).replace("\\n", ". ").replace("\\'", "").strip("'").split())
        if isinstance(error, AttributeError):  # ml_collections: an override of a field that does not exist
            message = f"no such config field: {message}"
        print(
            f"train.py: error: {message} (train.py --helpfull lists the flags; --print_config the config)",
            file=sys.stderr,
        )
        sys.exit(cli.USAGE_STATUS)


def help_text(full: bool) -> str:
    """What --help prints: this module's docstring and its flags (--helpfull: every flag, absl's and JAX's too)."""
    flag_help = flags.FLAGS.get_help() if full else flags.FLAGS.module_help(sys.modules[__name__])
    return f"{__doc__}\n{flag_help}"


def console_main(argv: Sequence[str] | None = None) -> int:
    """The command (`imgllm-train`, `python train.py`): argv is the program name and its arguments (sys.argv).

    --help prints the docstring and the flags and exits 0; other flags go to absl's `app.run`."""
    argv = list(sys.argv if argv is None else argv)
    help_flags = [HELP_FLAGS[arg] for arg in argv[1:] if arg in HELP_FLAGS]
    if help_flags:
        print(help_text(any(help_flags)))
        return 0
    debug = cli.debug_requested(argv)  # --debug or IMGLLM_DEBUG=1: tracebacks instead of one-line errors
    resolved = cli.user_errors_exit("train.py", resolve_config_arg, cli.without_debug_flag(argv), debug=debug)
    app.run(
        functools.partial(main, debug=debug), argv=resolved, flags_parser=functools.partial(parse_flags, debug=debug)
    )
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
