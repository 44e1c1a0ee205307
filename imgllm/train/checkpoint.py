"""Checkpoints in the work directory with orbax's CheckpointManager.

Each checkpoint holds three items: "state" (the whole TrainState: params, optimizer, lookahead copy, base
RNG key, step), "config" (the run's config as JSON) and "meta" (data position and what evaluation needs:
step, epoch, step_in_epoch, steps_per_epoch, task metadata such as class names). Saves are asynchronous;
the last `max_to_keep` are kept. The data position follows from the step alone (epoch permutations come
from (seed, epoch)), so restoring the state is enough to continue exactly where the run stopped.

A step folder that lacks an item (an empty `checkpoints/7/`) is skipped, named in a warning, and never deleted
(`CompleteSteps`). A step whose files cannot be read (truncated array chunks) raises `UnreadableCheckpointError`
naming its folder; `Checkpointer.newest_readable` then falls back to the step before it, and a resumed run moves
the unreadable folders to WORKDIR/unreadable_checkpoints/ (`Checkpointer.set_aside_newer`), where they are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from imgllm.pipeline.checkpoint import saved_array_shapes

# Config keys that may change between a run and its resumption: they do not change what is computed. Where the
# data is read from (dataset, data_dir) may change too: resuming checks the data itself (resume.check_same_data).
RESUME_SAFE_KEYS = frozenset(
    {
        "log_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "progress_bar",
        "profile_steps",
        "eval_every_epochs",
        "eval_batch_size",
        "dataset",
        "data_dir",
        "data_cache_dir",
        "data_placement",
    }
)
ITEMS = ("state", "config", "meta")  # the items of every step folder
# orbax logs this WARNING whenever a CheckpointManager is read-only, which every evaluation and export asks for.
READ_ONLY_NOTICE = "Given directory is read only="
UNREADABLE_DIR = "unreadable_checkpoints"  # WORKDIR/<this>/<step>: where a resumed run keeps a step it cannot read
T = TypeVar("T")


class IncompatibleConfigError(ValueError):
    """The work directory's checkpoint was made with a config this run cannot continue."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint step whose files cannot be read (truncated or missing arrays); the message names its folder."""


def missing_items(step_dir: str) -> list[str]:
    """The items of `ITEMS` that the step folder `step_dir` lacks: all of them for an empty folder, none for a
    complete checkpoint."""
    return [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]


def incomplete_step_folders(directory: str) -> list[str]:
    """The numeric folders of a checkpoints directory that lack an item (`missing_items`), sorted by step."""
    if not os.path.isdir(directory):
        return []
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    folders = [os.path.join(directory, str(step)) for step in steps]
    return [folder for folder in folders if missing_items(folder)]


@dataclasses.dataclass(frozen=True)
class CompleteSteps:
    """orbax's standard step names (`checkpoints/<step>/`), less the step folders that lack an item
    (`missing_items`): orbax neither lists, restores nor deletes an empty `checkpoints/7/`."""

    standard: Any = dataclasses.field(default_factory=ocp.step.standard_name_format)

    def build_name(self, step: int) -> str:
        return self.standard.build_name(step)

    def find_all(self, base_path: Any) -> Iterator[Any]:
        return (found for found in self.standard.find_all(base_path) if not missing_items(os.fspath(found.path)))

    def find_step(self, base_path: Any, step: int) -> Any:
        return self.standard.find_step(base_path, step)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, without tensorstore's spec dump and cut to `limit` characters, or the
    error's type name."""
    lines = str(error).strip().splitlines()
    line = lines[0].split(" [tensorstore_spec")[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def stray_read_errors_dropped(grace_s: float = 0.2) -> Iterator[None]:
    """Within, and for `grace_s` after an error, drops the "Event loop is closed" RuntimeErrors that tensorstore's
    pending reads report (`sys.unraisablehook`) once a failed orbax restore has closed its event loop: dozens of
    tracebacks that add nothing to the failure's one line. Other unraisable errors go to the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        time.sleep(grace_s)  # the pending reads report within milliseconds of the failure
        raise
    finally:
        sys.unraisablehook = previous


def free_path(path: str) -> str:
    """`path`, or `path.N` for the smallest N >= 1 that names nothing."""
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


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
            + "\nUse a new --workdir, or run with the checkpoint's values for these keys."
        )


class Checkpointer:
    """A CheckpointManager on <workdir>/checkpoints with save cadence, retention and typed restore."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        save_every_steps: int = 1000,
        asynchronous: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.save_every_steps = int(save_every_steps)
        # Read-only: no pruning and no save interval, which orbax would otherwise reset with a warning each.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=asynchronous,
            read_only=read_only,
            step_name_format=CompleteSteps(),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        for folder in incomplete_step_folders(self.directory):
            warnings.warn(
                f"skipping {folder}: not a checkpoint (no {', '.join(missing_items(folder))} inside)", stacklevel=2
            )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None (half-written saves and step folders that lack an
        item are not listed)."""
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        """The folder of checkpoint `step`."""
        return os.path.join(self.directory, str(step))

    @contextlib.contextmanager
    def reading(self, step: int) -> Iterator[None]:
        """Turns an error reading checkpoint `step` into UnreadableCheckpointError naming its folder (one line)."""
        try:
            with stray_read_errors_dropped():
                yield
        except (ValueError, OSError, KeyError) as error:
            raise UnreadableCheckpointError(f"{self.step_dir(step)} cannot be read: {first_line(error)}") from error

    def newest_readable(self, read: Callable[[int], T], newest: int | None = None) -> tuple[int, T]:
        """(step, read(step)) of the newest step (no newer than `newest`) that `read` reads. Each newer step whose
        read raised UnreadableCheckpointError is named in a warning with the step used instead; when none reads,
        UnreadableCheckpointError names them all (FileNotFoundError when there is no checkpoint)."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            if newest is not None and step > newest:
                continue
            try:
                result = read(step)
            except UnreadableCheckpointError as error:
                failures.append(str(error))
                continue
            for failure in failures:
                warnings.warn(f"{failure}; using step {step} instead", stacklevel=2)
            return step, result
        if not failures:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        raise UnreadableCheckpointError(
            f"no checkpoint in {self.directory} can be read ({'; '.join(failures)}); "
            "move them away or use another --workdir"
        )

    def set_aside_newer(self, step: int) -> None:
        """Moves the step folders newer than `step` (those a resumed run could not read) to
        WORKDIR/unreadable_checkpoints/<step>, each named in a warning: they are kept, the run saves those steps
        anew, and orbax's retention never deletes them. Process 0 moves; every process then reloads the steps."""
        newer = [other for other in self.manager.all_steps() if other > step]
        if not newer:
            return
        if jax.process_index() == 0:
            for other in newer:
                target = free_path(os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, str(other)))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.rename(self.step_dir(other), target)
                warnings.warn(
                    f"moved the unreadable {self.step_dir(other)} to {target} (kept: delete it once you "
                    "no longer need it)",
                    stacklevel=2,
                )
        if jax.process_count() > 1:  # the others wait for process 0's moves
            multihost_utils.sync_global_devices("imgllm: unreadable checkpoints set aside")
        self.manager.reload()

    def should_save(self, step: int, *, last: bool) -> bool:
        return last or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict | dict, meta: dict) -> None:
        """Starts an asynchronous save of (state, config, meta) at `step`."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config_to_json(config)),
                meta=ocp.args.JsonSave(json.loads(json.dumps(meta))),
            ),
            force=True,
        )

    def restore_config_and_meta(self, step: int | None = None) -> tuple[dict, dict]:
        """The (config, meta) JSON of checkpoint `step` (default: the latest)."""
        step = self._step(step)
        with self.reading(step):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
            )
        return dict(restored["config"]), dict(restored["meta"])

    def restore_state(self, template: Any, step: int | None = None) -> Any:
        """The state of checkpoint `step`, with the shapes, dtypes and shardings of `template`."""
        step = self._step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        with self.reading(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def restore_arrays(self, step: int | None = None, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
        """The saved state of checkpoint `step` as nested dicts of arrays placed by `sharding` (default: on this
        process's first device), with the structure read from the checkpoint's metadata: no model, task or optimizer
        is built, and a state saved from other devices (8 GPUs, say) reads the same."""
        step = self._step(step)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with self.reading(step):
            target = saved_array_shapes(os.path.join(self.step_dir(step), "state"), sharding)
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return dict(restored["state"])

    def restore_variables(self, step: int | None = None, sharding: jax.sharding.Sharding | None = None) -> dict:
        """The flax variables {"params": ..., **model_state} of checkpoint `step`, as the run's own evaluation
        applies them, read as arrays (`restore_arrays`): how evaluation and export read a work directory."""
        state = self.restore_arrays(step, sharding)
        return {"params": state["params"], **(state.get("model_state") or {})}

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
    """(CNN variables, run config, checkpoint meta) of a classifier run's checkpoint (default: the newest that reads).

    The variables are {"params": ..., **model_state} as the run's own evaluation applies them, read as arrays
    from the saved train state; nothing named in the checkpoint is imported or called.
    """
    checkpointer = _read_only_checkpointer(workdir)
    try:
        read = lambda at: (*checkpointer.restore_config_and_meta(at), checkpointer.restore_variables(at))
        config, meta, variables = read(step) if step is not None else checkpointer.newest_readable(read)[1]
    finally:
        checkpointer.close()
    return jax.device_get(variables), config, meta


def _is_read_only_notice(record: logging.LogRecord) -> bool:
    """False (drop it) for orbax's "Given directory is read only" notice; True for every other absl record."""
    return not record.getMessage().startswith(READ_ONLY_NOTICE)


# The notice says what the caller asked for (read_only=True); the CLIs hid it by verbosity, Python callers saw it.
# Added once: the function is the same object on each import of this module.
logging.getLogger("absl").addFilter(_is_read_only_notice)
