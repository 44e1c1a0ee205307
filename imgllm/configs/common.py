"""Shared pieces of the training configs: the base fields every run has, and config-name resolution.

Each experiment file (demo.py, cifar10.py, cnn_tiny.py, ...) has a `get_config()` that starts from
`base_config()` and changes what differs. Command lines override any field: --config.num_epochs=3.
"""

from __future__ import annotations

import ast
import os

import ml_collections
from ml_collections import config_dict

from imgllm.data.augment import CIFAR10_MEAN, CIFAR10_STD

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def base_config() -> ml_collections.ConfigDict:
    """Fields used by the training loop and the classifier task, with defaults for a small CPU run."""
    c = ml_collections.ConfigDict()
    c.task = "classifier"  # Task: a name in imgllm.train.registry.TASKS
    c.seed = 0  # seeds init, data order, augmentation: same seed, same run
    c.dtype = "auto"  # compute dtype of every model (CNN, LM): "float32" | "bfloat16" | "auto"
    # (bfloat16 on GPU/TPU, float32 on CPU); params, optimizer state, losses,
    # softmaxes and BatchNorm statistics stay float32 (imgllm.precision). It
    # replaces model.dtype / lm.dtype, which are ignored when set

    # ---- data ----
    c.dataset = "demo"  # load_dataset spec: "cifar10" | "folder:<root>" | "tfds:<name>" | "demo"
    c.data_dir = config_dict.placeholder(str)  # tfds data_dir; base of relative folder roots (None: default)
    c.data_cache_dir = config_dict.placeholder(str)  # keeps decoded image folders as .npz (None: no cache)
    c.data_placement = "auto"  # training set on the devices ("device"), fed from the host ("host"), or
    # "auto": on the devices when it fits (imgllm.train.feed)
    c.train_split = "train"  # split to train on
    c.eval_split = "validation"  # split evaluated each epoch and at the end ("" for none)
    c.num_train_examples = config_dict.placeholder(int)  # use only this many training examples (None: all)
    c.num_eval_examples = config_dict.placeholder(int)  # use only this many eval examples (None: all)
    c.image_size = 32  # images are resized to image_size x image_size
    c.normalization = ml_collections.ConfigDict(
        dict(
            mean=CIFAR10_MEAN,  # per-channel mean (0..1 scale) subtracted before the model
            std=CIFAR10_STD,  # per-channel std dividing after that
        )
    )
    c.augment = ml_collections.ConfigDict(
        dict(
            translate=2,  # random shift up to this many pixels (reflect padding); 0 = off
            flip="random",  # horizontal flip: "random" | "alternating" (airbench) | "none"
        )
    )
    c.whiten_init_examples = 5000  # images that initialise the whitening stem (0: random init)
    c.label_smoothing = 0.0  # label smoothing of the cross-entropy targets
    c.tta = "flip"  # final-eval test-time augmentation: "none" | "flip" | "flip_translate"

    # ---- model (imgllm.vision.cnn.cnn_from_config) ----
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",  # "airbench94" | "tiny"; the other keys override its fields
            num_classes=10,  # classes of the dataset
            conv_impl="auto",  # "auto" (hybrid on CPU, xla on GPU/TPU) | "hybrid" | "im2col" | "xla"
        )
    )

    # ---- optimisation ----
    c.global_batch_size = 128  # examples per update, over all devices of all hosts
    c.eval_batch_size = 500  # examples per eval batch, over all devices
    c.num_epochs = 5.0  # training length; fractional epochs allowed (airbench: 9.9)
    c.optimizer = optimizer_config()
    c.lookahead = lookahead_config()

    # ---- bookkeeping ----
    c.log_every_steps = 20  # train metrics line in metrics.jsonl every N steps (and each epoch end)
    c.eval_every_epochs = 1  # evaluate on eval_split every N epochs (0: only at the end)
    c.checkpoint_every_steps = 200  # asynchronous checkpoint every N steps (and at the end)
    c.max_checkpoints_to_keep = 3  # older checkpoints are deleted
    c.progress_bar = True  # tqdm bar with loss, accuracy and images/s
    c.profile_steps = ""  # "START,END": a jax.profiler trace of those steps in <workdir>/profile
    return c


def optimizer_config() -> ml_collections.ConfigDict:
    """The optimiser's fields (imgllm.train.optim): SGD with Nesterov momentum on airbench's triangle schedule."""
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # "sgd" (with momentum / Nesterov) | "adamw" | "muon" (groups may differ)
            learning_rate=0.2,  # peak learning rate for the mean loss over the batch
            reference_batch_size=config_dict.placeholder(int),  # learning rates are for this batch size and scale
            # linearly to global_batch_size at run time (None: used as given)
            momentum=0.9,  # SGD momentum (0: none)
            nesterov=True,  # Nesterov momentum
            b1=0.9,  # adamw beta1
            b2=0.999,  # adamw beta2
            weight_decay=5e-4,  # decay coefficient; SGD: added to the gradient (scaled by the lr)
            grad_clip_norm=0.0,  # clip gradients to this global norm (0: off)
            schedule="triangle",  # "constant" | "triangle" | "warmup_cosine"
            start_factor=0.2,  # triangle: lr factor at step 0
            peak_fraction=0.25,  # triangle: fraction of training where the lr peaks
            end_factor=0.05,  # triangle: lr factor at the last step
            warmup_epochs=1.0,  # warmup_cosine: linear warm-up length
            groups=airbench_param_groups(),  # per-parameter groups (see imgllm.train.optim)
        )
    )


def lookahead_config() -> ml_collections.ConfigDict:
    """airbench's lookahead (an EMA of the parameters and BatchNorm statistics), off by default."""
    return ml_collections.ConfigDict(
        dict(
            enabled=False,  # airbench's lookahead/EMA of params and BatchNorm statistics
            start_epochs=1.0,  # epoch from which the slow weights start to average
            every_n_steps=5,  # average every this many steps
            decay_base=0.95,  # per-step decay; rho = decay_base**n * (step/total)**decay_pow
            decay_pow=3.0,  # how fast averaging strengthens towards the end of training
        )
    )


def airbench_param_groups(
    whiten_bias_epochs: float = 3.0, norm_bias_lr_scale: float = 64.0
) -> ml_collections.ConfigDict:
    """Optimizer groups for the airbench CNN: frozen whitening kernel, whitening bias trained only for
    its first epochs, BatchNorm biases with a larger lr but the same decay strength (disjoint patterns)."""
    return ml_collections.ConfigDict(
        dict(
            frozen=dict(pattern=r"(^|/)whiten_kernel$", lr_scale=0.0),
            whiten_bias=dict(
                pattern=r"(^|/)whiten_bias$", lr_scale=1.0, weight_decay_scale=1.0, train_epochs=whiten_bias_epochs
            ),
            norm_bias=dict(
                pattern=r"(^|/)norm\d*/bias$",
                lr_scale=norm_bias_lr_scale,
                weight_decay_scale=1.0 / norm_bias_lr_scale,
                train_epochs=None,
            ),
        )
    )


def config_purposes() -> dict[str, str]:
    """{name: first line of its docstring} of the configs `--config=NAME` can name (files with a get_config)."""
    purposes = {}
    for file_name in sorted(os.listdir(CONFIG_DIR)):
        path = os.path.join(CONFIG_DIR, file_name)
        if not file_name.endswith(".py") or file_name.startswith("_"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        if any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
            purposes[file_name[:-3]] = (ast.get_docstring(tree) or "").split("\n")[0]
    return purposes


def joined_config_arg(argv: list[str]) -> list[str]:
    """`argv` with absl's space form `--config NAME` (or `-config NAME`) written `--config=NAME`."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--config", "-config"):
            arg = f"--config={arg}"
            out.pop()
        out.append(arg)
    return out


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Lets `--config=demo` (or `--config demo`) stand for this package's configs/demo.py (a path works as before);
    a value that is neither a file nor a config name raises ValueError listing the names."""
    out = []
    for arg in joined_config_arg(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            name, _, rest = value.partition(":")
            candidate = os.path.join(CONFIG_DIR, f"{name}.py")
            if not os.path.exists(name) and os.path.exists(candidate):
                arg = "--config=" + candidate + (":" + rest if rest else "")
            elif not os.path.exists(name):
                raise ValueError(
                    f"--config={value}: no such config file or name; the names are {', '.join(config_purposes())}"
                )
        out.append(arg)
    return out
