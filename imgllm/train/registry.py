"""The explicit table of imgllm's training tasks: `config.task` names one of these, and nothing else runs.

A checkpoint's stored config names its task; restoring a work directory builds the task from this table only,
so a work directory cannot make imgllm import a module or call a function of its choosing. Names that earlier
versions stored ("module:factory" strings) are mapped to the same entries by `LEGACY_TASK_NAMES`, a fixed table.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from imgllm.train.captioner import CaptionerTask
from imgllm.train.classifier import ClassifierTask
from imgllm.train.lm_task import LMTask
from imgllm.train.task_protocol import Task

TASKS: dict[str, Callable[[ml_collections.ConfigDict], Task]] = {
    "classifier": ClassifierTask,
    "captioner": CaptionerTask,
    "lm": LMTask,
}
LEGACY_TASK_NAMES = {
    "imgllm.train.classifier:ClassifierTask": "classifier",
    "imgllm.train.captioner:CaptionerTask": "captioner",
    "imgllm.train.lm_task:LMTask": "lm",
}


class UnknownTaskError(ValueError):
    """config.task is not a name in TASKS (a checkpoint's config is refused before anything is built)."""


def canonical_task_name(name: str) -> str:
    """Today's name for a config's task name: earlier "module:factory" names mapped, any other name unchanged."""
    return LEGACY_TASK_NAMES.get(name, name)


def task_name(name: str) -> str:
    """The TASKS key for a config's task name (earlier "module:factory" names included); raises otherwise."""
    canonical = canonical_task_name(name)
    if canonical not in TASKS:
        raise UnknownTaskError(f"config.task={name!r} is not an imgllm task; expected one of {sorted(TASKS)}")
    return canonical


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The Task for config.task, built from the TASKS table."""
    return TASKS[task_name(config.task)](config)
