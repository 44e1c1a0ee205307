"""Config comparison for resuming (the SIGKILL resume itself is in test_train_cli.py)."""
import pytest

from imgllm.train import checkpoint as ckpt_lib


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
