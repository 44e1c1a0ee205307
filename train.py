"""Train a model from a config, or evaluate a saved checkpoint. Logic lives in imgllm.train.

Train (resumes automatically from the work directory's latest checkpoint):
    python train.py --config=demo --workdir=runs/demo
    python train.py --config=cifar10 --config.dataset=folder:/tmp/cifar --config.num_epochs=9.9 --workdir=runs/c10
Evaluate a checkpoint (config and normalisation come from the checkpoint) on any data source:
    python train.py --mode=eval --workdir=runs/c10 --data=folder:/path/test
SIGTERM or Ctrl-C stops after the current step with its checkpoint committed (exit status 128 + the signal); the
same command resumes. Resuming on changed data is refused unless --allow_data_change.
Multi-host: --coordinator_address=host:port --num_processes=N --process_id=i (or $IMGLLM_COORDINATOR_ADDRESS,
$IMGLLM_NUM_PROCESSES, $IMGLLM_PROCESS_ID), or --distributed to let JAX detect the cluster.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imgllm import parallel
from imgllm.configs.common import CONFIG_DIR, resolve_config_arg
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import demo_recipe, loop

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "demo.py"),
                                          "config file or name in imgllm/configs (demo, cifar10, cnn_tiny)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory: checkpoints and metrics.jsonl", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and resume), or eval a checkpoint")
_DATA = flags.DEFINE_string("data", None, "eval: data source, e.g. folder:/path/test, cifar10, demo "
                                          "(default: the checkpoint's dataset)")
_SPLIT = flags.DEFINE_string("split", "test", "eval: split of --data to evaluate")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: coordinator host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: auto-detect the cluster")
_ALLOW_DATA_CHANGE = flags.DEFINE_bool("allow_data_change", False,
                                       "resume even though the training data differs from the checkpoint's")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # quiet orbax/absl INFO lines; --verbosity=0 shows them
    parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                          auto=_DISTRIBUTED.value)
    if _MODE.value == "eval":
        result = loop.evaluate_checkpoint(_WORKDIR.value, _DATA.value, split=_SPLIT.value, step=_STEP.value)
        print(json.dumps(result))
        return
    if _CONFIG.value.get("recipe") == "demo":   # classifier, then captioner, pipeline export and scores
        demo_recipe.run_demo(_WORKDIR.value, classifier_config=_CONFIG.value)
        return
    try:
        result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_data_change=_ALLOW_DATA_CHANGE.value)
    except loop.TrainingStopped as stopped:
        print(f"train.py: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except (loop.DataChangedError, ckpt_lib.IncompatibleConfigError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if result.final_eval is not None:
        print(json.dumps({"final_eval": result.final_eval}))


if __name__ == "__main__":
    app.run(main, argv=resolve_config_arg(sys.argv))
