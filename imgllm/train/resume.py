"""What a run checks before it continues a work directory's checkpoint, and reading the point it continues from.

config   the saved config must be one this run may continue (`check_resumable`: resume-safe keys aside, in
         `comparable_config` form, so configs stored by earlier versions compare as today's)
data     the training data must be the data the checkpoint trained on (`check_same_data`: example count,
         fingerprint and class names, as `data_identity` records them in every checkpoint's meta)
state    the newest step whose config, meta and arrays read (`saved_run`, `restore_latest`); newer steps that do
         not read are named in warnings and kept aside, never deleted
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from imgllm import precision
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train.evaluation import num_examples
from imgllm.train.registry import canonical_task_name
from imgllm.train.task_protocol import Arrays


class DataChangedError(ValueError):
    """The training data differs from the data the work directory's checkpoint was trained on."""


def comparable_config(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as JSON in the form resuming compares: what earlier versions stored, written as today's.

    The task under today's TASKS name (a checkpoint's legacy "module:factory" name compares equal; an unknown name
    is left as it is), and optimizer.reference_batch_size, absent from configs saved before learning rates scaled
    with the batch, or None (rates used as given), as the run's own global_batch_size: the same rates either way.
    The compute dtype as `precision.comparable_dtype` writes it (absent: the legacy model/lm dtype; "auto": what
    it means on this backend).
    """
    raw = ckpt_lib.config_to_json(config)
    optimizer = raw.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("reference_batch_size") is None:
        raw["optimizer"] = {**optimizer, "reference_batch_size": raw.get("global_batch_size")}
    return precision.comparable_dtype({**raw, "task": canonical_task_name(raw.get("task"))})


def check_resumable(saved_config: Mapping[str, Any], config: ml_collections.ConfigDict | dict, workdir: str) -> None:
    """Raises IncompatibleConfigError naming the differing keys unless a run of `config` may continue the
    checkpoint made with `saved_config` (compared in `comparable_config` form)."""
    ckpt_lib.check_compatible(comparable_config(saved_config), comparable_config(config), workdir)


def arrays_fingerprint(arrays: Arrays) -> str:
    """A hex digest of every array's name, dtype, shape and bytes: equal exactly when the data is the same."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def data_identity(arrays: Arrays, task_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its training data: example count, fingerprint and class names (if any)."""
    identity = {"num_examples": num_examples(arrays), "fingerprint": arrays_fingerprint(arrays)}
    if task_metadata.get("class_names") is not None:
        identity["class_names"] = list(task_metadata["class_names"])
    return identity


def data_differences(saved_meta: Mapping[str, Any], identity: Mapping[str, Any], steps_per_epoch: int) -> list[str]:
    """'what: checkpoint X, now Y' lines for every way the data differs from a checkpoint's.

    Checkpoints written before the data was recorded are compared on what they hold: class names and steps
    per epoch.
    """
    saved = saved_meta.get("data")
    if saved is None:
        saved = {"class_names": (saved_meta.get("task") or {}).get("class_names")}
        lines = (
            []
            if saved_meta.get("steps_per_epoch") in (None, steps_per_epoch)
            else [f"steps_per_epoch: checkpoint {saved_meta['steps_per_epoch']}, now {steps_per_epoch}"]
        )
    else:
        lines = [
            f"{key}: checkpoint {saved.get(key)}, now {identity.get(key)}"
            for key in ("num_examples", "fingerprint")
            if saved.get(key) != identity.get(key)
        ]
    before, now = saved.get("class_names"), identity.get("class_names")
    if before is not None and now is not None and list(before) != list(now):
        added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        lines.insert(
            0,
            f"class_names: checkpoint {len(before)} classes, now {len(now)} (added {added}, removed "
            f"{removed}{', reordered' if not added and not removed else ''})",
        )
    return lines


def check_same_data(
    saved_meta: Mapping[str, Any], identity: Mapping[str, Any], steps_per_epoch: int, workdir: str
) -> None:
    """Raises DataChangedError listing what changed unless the data is the one the checkpoint trained on."""
    lines = data_differences(saved_meta, identity, steps_per_epoch)
    if lines:
        raise DataChangedError(
            f"the training data differs from the data {workdir}'s checkpoint at step {saved_meta.get('step')} "
            "was trained on:\n  " + "\n  ".join(lines) + "\nLabels or the schedule would shift under the "
            "trained weights. Restore the data, use a new --workdir, or pass --allow_data_change "
            "(allow_data_change=True) to continue anyway."
        )


class SavedRun(NamedTuple):
    """The checkpoint a run continues: its step and its meta (data position, task, data, calibration)."""

    step: int
    meta: dict


def saved_run(checkpointer: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict, workdir: str) -> SavedRun | None:
    """The newest checkpoint whose config and meta read (a newer one is named in a warning), once `check_resumable`
    lets `config` continue it; None when the work directory holds no checkpoint."""
    if checkpointer.latest_step() is None:
        return None
    step, (saved_config, saved_meta) = checkpointer.newest_readable(checkpointer.restore_config_and_meta)
    check_resumable(saved_config, config, workdir)
    return SavedRun(step, saved_meta)


def restore_latest(checkpointer: ckpt_lib.Checkpointer, template: Any, newest: int) -> Any:
    """The state of the newest step, no newer than `newest`, whose arrays read into `template`'s shapes and
    shardings; the newer steps that do not read are moved aside (`Checkpointer.set_aside_newer`), never deleted."""
    restored, state = checkpointer.newest_readable(lambda at: checkpointer.restore_state(template, at), newest=newest)
    checkpointer.set_aside_newer(restored)
    return state
