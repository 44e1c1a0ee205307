"""Checkpoints in the work directory with orbax's CheckpointManager.

Each checkpoint holds three items: "state" (the whole TrainState: params, optimizer, lookahead copy, base
RNG key, step), "config" (the run's config as JSON) and "meta" (data position and what evaluation needs:
step, epoch, step_in_epoch, steps_per_epoch, task metadata such as class names). Saves are asynchronous;
the last `max_to_keep` are kept. The data position follows from the step alone (epoch permutations come
from (seed, epoch)), so restoring the state is enough to continue exactly where the run stopped.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from imgllm.pipeline.checkpoint import saved_array_shapes

# Config keys that may change between a run and its resumption: they do not change what is computed. Where the
# data is read from (dataset, data_dir) may change too: resuming checks the data itself (loop.check_same_data).
RESUME_SAFE_KEYS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep", "progress_bar", "profile_steps",
    "eval_every_epochs", "eval_batch_size", "dataset", "data_dir", "data_cache_dir", "data_placement",
})


class IncompatibleConfigError(ValueError):
    """The work directory's checkpoint was made with a config this run cannot continue."""


def config_to_json(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as plain JSON types (tuples become lists), for saving and comparing."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(raw))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, current: dict, ignore=RESUME_SAFE_KEYS) -> list[str]:
    """Human-readable 'key: checkpoint X, now Y' lines for every differing config entry (dotted keys)."""
    a, b = _flatten(config_to_json(saved)), _flatten(config_to_json(current))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[-1] in ignore or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        lines.append(f"{key}: checkpoint {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return lines


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Raises IncompatibleConfigError naming every differing entry, unless the configs agree."""
    diffs = config_differences(saved, current)
    if diffs:
        raise IncompatibleConfigError(
            f"{workdir} holds a checkpoint made with a different config, so this run cannot resume it:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or run with the checkpoint's values for these keys.")


class Checkpointer:
    """A CheckpointManager on <workdir>/checkpoints with save cadence, retention and typed restore."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_every_steps: int = 1000,
                 asynchronous: bool = True, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.save_every_steps = int(save_every_steps)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               enable_async_checkpointing=asynchronous, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config", "meta"))

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None (half-written saves are not listed)."""
        return self.manager.latest_step()

    def should_save(self, step: int, *, last: bool) -> bool:
        return last or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict | dict, meta: dict) -> None:
        """Starts an asynchronous save of (state, config, meta) at `step`."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config_to_json(config)),
            meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))), force=True)

    def restore_config_and_meta(self, step: int | None = None) -> tuple[dict, dict]:
        """The (config, meta) JSON of checkpoint `step` (default: the latest)."""
        step = self._step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return dict(restored["config"]), dict(restored["meta"])

    def restore_state(self, template: Any, step: int | None = None) -> Any:
        """The state of checkpoint `step`, with the shapes, dtypes and shardings of `template`."""
        step = self._step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
        """The saved state of checkpoint `step` as nested dicts of arrays on this process's first device, with
        the structure read from the checkpoint's metadata: no model or task is built (what exporting a trained
        classifier into a pipeline needs), and a state saved from other devices (8 GPUs, say) reads the same."""
        step = self._step(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = saved_array_shapes(os.path.join(self.directory, str(step), "state"), device)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return dict(restored["state"])

    def wait(self) -> None:
        """Returns once every save started so far is committed (a kill after this loses none of them)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending asynchronous saves to be on disk, then releases the manager."""
        self.wait()
        self.manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step


def _read_only_checkpointer(workdir: str) -> Checkpointer:
    """A read-only Checkpointer of a finished or running train.py work directory; FileNotFoundError naming the
    directory when it holds no checkpoints."""
    if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir!r} is not a train.py work directory (no checkpoints/ inside)")
    return Checkpointer(workdir, read_only=True, asynchronous=False)


def read_run_config(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """(run config, checkpoint meta) of a train.py work directory's checkpoint `step` (default: the latest)."""
    checkpointer = _read_only_checkpointer(workdir)
    try:
        return checkpointer.restore_config_and_meta(step)
    finally:
        checkpointer.close()


def load_classifier(workdir: str, step: int | None = None) -> tuple[dict, dict, dict]:
    """(CNN variables, run config, checkpoint meta) of a classifier run's checkpoint (default: the latest).

    The variables are {"params": ..., **model_state} as the run's own evaluation applies them, read as arrays
    from the saved train state; nothing named in the checkpoint is imported or called.
    """
    checkpointer = _read_only_checkpointer(workdir)
    try:
        config, meta = checkpointer.restore_config_and_meta(step)
        state = checkpointer.restore_arrays(meta["step"])
    finally:
        checkpointer.close()
    variables = {"params": state["params"], **(state.get("model_state") or {})}
    return jax.device_get(variables), config, meta
