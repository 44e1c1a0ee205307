"""Train a model from a config, or evaluate a saved checkpoint. Logic lives in imgllm.train.

Train (resumes automatically from the work directory's latest checkpoint):
    python train.py --config=demo --workdir=runs/demo
    python train.py --config=cifar10 --config.dataset=folder:/tmp/cifar --config.num_epochs=9.9 --workdir=runs/c10
Evaluate a checkpoint (config and normalisation come from the checkpoint) on any data source:
    python train.py --mode=eval --workdir=runs/c10 --data=folder:/path/test
SIGTERM or Ctrl-C stops after the current step with its checkpoint committed (exit status 128 + the signal); the
same command resumes. Resuming on changed data is refused unless --allow_data_change.
Errors in flags, config, data or checkpoints are one line with exit status 2; --debug (or IMGLLM_DEBUG=1) shows
the traceback. --print_config prints the resolved config.
Multi-host: --coordinator_address=host:port --num_processes=N --process_id=i (or $IMGLLM_COORDINATOR_ADDRESS,
$IMGLLM_NUM_PROCESSES, $IMGLLM_PROCESS_ID), or --distributed to let JAX detect the cluster.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imgllm import cli, parallel
from imgllm.configs.common import CONFIG_DIR, config_purposes, resolve_config_arg
from imgllm.train import demo_recipe, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(CONFIG_DIR, "demo.py"),
    "config file, or the name of one in imgllm/configs:\n" +
    "\n".join(f"  {name}: {purpose}" for name, purpose in config_purposes().items()), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory: checkpoints and metrics.jsonl", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and resume), or eval a checkpoint")
_DATA = flags.DEFINE_string("data", None, "eval: data source, e.g. folder:/path/test, cifar10, demo "
                                          "(default: the checkpoint's dataset)")
_SPLIT = flags.DEFINE_string("split", "test", "eval: split of --data to evaluate")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest)")
_CONFUSION = flags.DEFINE_string("confusion", None, "eval: the classifier's confusion matrix PNG "
                                                    "(default: WORKDIR/confusion.png; empty: none)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: coordinator host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: auto-detect the cluster")
_ALLOW_DATA_CHANGE = flags.DEFINE_bool("allow_data_change", False,
                                       "resume even though the training data differs from the checkpoint's")


_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory, as infer.py --data-dir (sets config.data_dir; "
                                 "in eval, where --data's tfds splits are read)")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
DEBUG = cli.debug_requested(sys.argv)     # --debug or IMGLLM_DEBUG=1: tracebacks instead of one-line errors


def run() -> None:
    """What the flags ask for: evaluate a checkpoint, or train (the demo recipe, or one config)."""
    parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                          auto=_DISTRIBUTED.value)
    if _MODE.value == "eval":
        confusion = os.path.join(_WORKDIR.value, "confusion.png") if _CONFUSION.value is None else _CONFUSION.value
        result = loop.evaluate_checkpoint(_WORKDIR.value, _DATA.value, split=_SPLIT.value, step=_STEP.value,
                                          confusion_png=confusion, data_dir=_DATA_DIR.value)
        print(json.dumps(result))
        return
    if _DATA_DIR.value is not None:
        _CONFIG.value.data_dir = _DATA_DIR.value
    if _CONFIG.value.get("recipe") == "demo":   # classifier, then captioner, pipeline export and scores
        demo_recipe.run_demo(_WORKDIR.value, classifier_config=_CONFIG.value)
        return
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_data_change=_ALLOW_DATA_CHANGE.value)
    if result.final_eval is not None:
        print(json.dumps({"final_eval": result.final_eval}))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value)
        return
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)   # orbax's INFO and WARNING lines are for its developers: --verbosity=0
    try:
        cli.user_errors_exit("train.py", run, debug=DEBUG)
    except loop.TrainingStopped as stopped:
        print(f"train.py: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override (--config.num_epoch=3) as one line, status 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
        if DEBUG:
            raise
        message = " ".join(cli.error_message(error).replace("\\n", ". ").replace("\\'", "").strip("'").split())
        if isinstance(error, AttributeError):           # ml_collections: an override of a field that does not exist
            message = f"no such config field: {message}"
        print(f"train.py: error: {message} (train.py --helpfull lists the flags; --print_config the config)",
              file=sys.stderr)
        sys.exit(cli.USAGE_STATUS)


if __name__ == "__main__":
    app.run(main, argv=cli.user_errors_exit("train.py", resolve_config_arg, cli.without_debug_flag(sys.argv),
                                            debug=DEBUG), flags_parser=parse_flags)
