"""Config comparison for resuming (the SIGKILL resume itself is in test_train_cli.py)."""

import pytest

from imgllm import configs
from imgllm.configs import captioner_tiny, cifar10, cnn_tiny  # noqa: F401  (read through getattr(configs, ...))
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import resume


def test_config_differences_name_each_key_and_skip_resume_safe_ones():
    saved = {
        "seed": 0,
        "optimizer": {"learning_rate": 0.1, "groups": {"a": {"lr_scale": 64.0}}},
        "log_every_steps": 10,
        "normalization": {"mean": (0.5, 0.5)},
    }
    now = {
        "seed": 0,
        "optimizer": {"learning_rate": 0.1, "groups": {"a": {"lr_scale": 32.0}}},
        "log_every_steps": 99,
        "normalization": {"mean": [0.5, 0.5]},
        "extra": 1,
    }
    assert ckpt_lib.config_differences(saved, now) == [
        "extra: checkpoint '<absent>', now 1",
        "optimizer.groups.a.lr_scale: checkpoint 64.0, now 32.0",
    ]
    with pytest.raises(ckpt_lib.IncompatibleConfigError, match="runs/x holds a checkpoint"):
        ckpt_lib.check_compatible(saved, now, "runs/x")
    ckpt_lib.check_compatible(saved, {**saved, "log_every_steps": 1}, "runs/x")


@pytest.mark.parametrize("config_name", ["cnn_tiny", "cifar10", "captioner_tiny"])
def test_configs_saved_before_batch_scaled_rates_and_the_task_table_still_resume(config_name):
    """A config stored by earlier versions: no optimizer.reference_batch_size (rates as given, i.e. for its own
    batch) and the task as a "module:factory" string. Today's config of the same run may continue it."""
    today = getattr(configs, config_name).get_config()
    saved = ckpt_lib.config_to_json(today)
    del saved["optimizer"]["reference_batch_size"]
    saved["task"] = {
        "classifier": "imgllm.train.classifier:ClassifierTask",
        "captioner": "imgllm.train.captioner:CaptionerTask",
    }[today.task]
    resume.check_resumable(saved, today, "runs/x")
    # Another batch size under the old config means other learning rates: refused, naming the keys.
    saved["global_batch_size"] = today.global_batch_size // 2
    with pytest.raises(ckpt_lib.IncompatibleConfigError, match="global_batch_size"):
        resume.check_resumable(saved, today, "runs/x")
