"""The generic training loop and checkpoint evaluation, shared by every Task.

Data position: the global step alone fixes it (epoch, step_in_epoch = divmod(step, steps_per_epoch); the
epoch's order comes from (seed, epoch)), and the step's random key is fold_in(base_key, step). So a run
restored from its latest checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from imgllm import calibration, parallel, precision
from imgllm.pipeline.records import OutputError, OutputLock
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import feed as feed_lib
from imgllm.train import optim, plot, steps
from imgllm.train.metrics_log import MetricsWriter
from imgllm.train.state import TrainState, create_train_state
from imgllm.train.task import Arrays, Task, add_metrics, summarize
from imgllm.train.tasks import build_task, canonical_task_name, task_name

WORKDIR_LOCK = "train.lock"  # held by the run training in the work directory (`workdir_lock`)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


class DataChangedError(ValueError):
    """The training data differs from the data the work directory's checkpoint was trained on."""


class WorkdirInUseError(OSError):
    """Another train.py runs in the work directory (it holds WORKDIR/train.lock)."""


class TrainingStopped(RuntimeError):
    """Training stopped on a signal (SIGTERM, SIGINT) after committing a checkpoint at `step`; rerunning resumes."""

    def __init__(self, step: int, total_steps: int, signum: int, workdir: str):
        self.step, self.total_steps, self.signum = step, total_steps, signum
        name = signal.Signals(signum).name if signum else "preemption notice"
        super().__init__(
            f"stopped by {name} at step {step} of {total_steps}; the checkpoint at step {step} is saved "
            f"in {workdir}: run the same command to resume"
        )


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    final_eval: dict[str, float] | None
    steps_per_epoch: int
    total_steps: int


def num_examples(arrays: Arrays) -> int:
    """The common leading dimension of `arrays` (error naming the keys when they disagree)."""
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays have different lengths: {sizes}")
    return next(iter(sizes.values()))


def take(arrays: Arrays, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `rows` of every array."""
    return {k: np.asarray(v[rows]) for k, v in arrays.items()}


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


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Fails fast (before any compile) on values the loop cannot run with."""
    devices = parallel.global_batch_divisor(mesh)
    for key in ("global_batch_size", "eval_batch_size"):
        value = config.get(key)
        if value is None or value <= 0 or value % devices:
            raise ValueError(f"config.{key}={value!r} must be a positive multiple of the {devices} devices")
    if config.get("data_placement", "auto") not in feed_lib.PLACEMENTS:
        raise ValueError(f"config.data_placement={config.data_placement!r} must be one of {feed_lib.PLACEMENTS}")
    profile_window(config.get("profile_steps"))
    if not 0 < config.num_epochs < math.inf:
        raise ValueError(f"config.num_epochs={config.num_epochs!r} must be a finite number > 0")
    for key, meaning in (
        ("log_every_steps", "a metrics line every N steps"),
        ("max_checkpoints_to_keep", "the checkpoints kept; resuming needs one"),
    ):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be an integer >= 1 ({meaning})")


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


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary (a context manager).

    The first signal sets `received`; the handler then steps aside, so a second one acts as it normally would
    (SIGTERM ends the process, Ctrl-C raises KeyboardInterrupt). Handlers can only be set from the main thread;
    elsewhere, and with several processes (where JAX's own preemption notice is used), nothing is installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def stop_requested(self, step: int) -> bool:
        """Whether to stop after `step`: this process got a signal, or (several processes) JAX's preemption sync
        point says every process is to stop at this step."""
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax_enable_preemption_service is off: no notice can come
                return False
        return self.received is not None


def schedule_lengths(n_train: int, config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(steps_per_epoch, total_steps): full global batches per epoch; ceil of a fractional epoch count."""
    steps_per_epoch = n_train // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_train} training examples are fewer than config.global_batch_size={config.global_batch_size}"
        )
    return steps_per_epoch, int(math.ceil(steps_per_epoch * config.num_epochs))


def initial_state(
    task: Task, config: ml_collections.ConfigDict, train_arrays: Arrays, mesh, *, total_steps: int, steps_per_epoch: int
):
    """(fresh replicated TrainState, optimizer) from config.seed: model init, data-dependent init, optimizer."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax.device_get(jax.jit(task.init_variables)(init_key))
    variables = task.prepare_variables(variables, train_arrays)
    tx = optim.make_optimizer(
        config.optimizer,
        variables["params"],
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.global_batch_size,
    )
    use_lookahead = bool(config.get("lookahead") and config.lookahead.get("enabled", False))
    init = lambda v, key: create_train_state(v, tx, key, use_lookahead=use_lookahead)
    return steps.jit_init_state(init, mesh)(variables, state_key), tx


def evaluate_arrays(
    task: Task, variables: Any, arrays: Arrays, mesh, *, batch_size: int, tta: bool, eval_fn: Callable | None = None
) -> dict[str, float]:
    """Summarised metrics of `task` over all of `arrays` (padded to whole batches, padding masked out).

    Every process holds all of `arrays` and feeds its own slice of each global batch.
    """
    eval_fn = eval_fn or steps.jit_eval_step(task, mesh, tta=tta)
    n = num_examples(arrays)
    num_batches = -(-n // batch_size)
    per_host = batch_size // jax.process_count()
    totals = None
    for b in range(num_batches):
        first = b * batch_size + jax.process_index() * per_host
        rows = np.arange(first, first + per_host)
        mask = (rows < n).astype(np.float32)
        batch = take(arrays, np.minimum(rows, n - 1))
        batch["mask"] = mask
        metrics = eval_fn(variables, parallel.host_to_global(batch, mesh))
        totals = add_metrics(totals, jax.device_get(metrics))
    return summarize(totals)


def write_confusion_image(
    writer: MetricsWriter, task: Task, variables: Any, arrays: Arrays, *, batch_size: int, tta: bool, step: int
) -> None:
    """Draws a classifier's confusion matrix on `arrays` (`plot.confusion_figure`) into TensorBoard: split
    "final_eval", tag "confusion_matrix". Nothing for a task without `confusion` or a writer without TensorBoard.

    Every process computes the matrix (the model's variables span them all); process 0 writes it.
    """
    if not hasattr(task, "confusion") or writer.tensorboard_dir is None:
        return
    matrix = task.confusion(variables, arrays, batch_size=batch_size, tta=tta)
    if writer.enabled:
        names = task.checkpoint_metadata().get("class_names") or [str(n) for n in range(len(matrix))]
        title = f"final evaluation{' (TTA)' if tta else ''}, step {step}"
        writer.image("final_eval", "confusion_matrix", plot.confusion_figure(matrix, names, title), step)


def show_phase(bar, phase: str, arrays: Arrays) -> None:
    """Names what the run does now on the progress bar, replacing the last training step's figures (which would
    read as current) with the number of images this phase goes through."""
    bar.set_description(phase)
    bar.set_postfix_str(f"{num_examples(arrays)} images", refresh=True)


def write_sample_captions(writer: MetricsWriter, task: Task, variables: Any, arrays: Arrays, *, step: int) -> None:
    """A captioner's greedy captions of a few evaluation images (`sample_captions`) as TensorBoard text: split
    "final_eval", tag "sample_captions", one Markdown line per image. Nothing for other tasks or without TensorBoard.
    Every process decodes (the variables span them all); process 0 writes."""
    if not hasattr(task, "sample_captions") or writer.tensorboard_dir is None:
        return
    samples = task.sample_captions(variables, arrays)
    if writer.enabled:
        writer.text(
            "final_eval",
            "sample_captions",
            "\n\n".join(f"**{name}**: {caption or '(empty)'}" for name, caption in samples),
            step,
        )


def profile_window(value: str | tuple | list | None) -> tuple[int, int] | None:
    """config.profile_steps as (first, last) global steps to trace, or None: "START,END" (or a pair) with
    0 <= START < END; empty means no profiling."""
    if value in (None, "", (), []):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        first, last = (int(part) for part in parts)
    except (TypeError, ValueError):
        first, last = -1, -1
    if not 0 <= first < last:
        raise ValueError(f"config.profile_steps={value!r}: write it as START,END with 0 <= START < END, e.g. 10,20")
    return first, last


class StepProfiler:
    """A `jax.profiler` trace of global steps (first, last] into <workdir>/profile (view it in TensorBoard's profile
    tab or Perfetto). The trace waits for the last traced step to finish, so it holds its device work."""

    def __init__(self, window: tuple[int, int] | None, workdir: str):
        self.window, self.directory, self.active = window, os.path.join(workdir, "profile"), False

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0] and jax.process_index() == 0:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, done: int, state: Any) -> None:
        if self.active and done >= self.window[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


NO_BAD_STEP = np.iinfo(np.int32).max


@jax.jit
def _add_step_metrics(totals: Any, first_bad: jax.Array, metrics: Any, step: jax.Array) -> tuple[Any, jax.Array]:
    """Running metric sums plus `metrics`, and the first step whose objective was not finite (NO_BAD_STEP: none)."""
    totals = jax.tree.map(lambda a, b: a + b, totals, metrics)
    finite = jnp.isfinite(metrics["objective"][0])
    return totals, jnp.where(finite, first_bad, jnp.minimum(first_bad, step.astype(jnp.int32)))


class _StepMetrics:
    """Each step's metric sums, added up on the device: the host fetches them only for a log line or before a
    checkpoint, so no step waits for the host. A non-finite loss is reported naming the first step that had one."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.totals = None
        self.first_bad = None

    def push(self, step: jax.Array, metrics: Any) -> None:
        """Adds the metrics of the step that ended at global `step` (a device scalar: nothing is fetched)."""
        if self.totals is None:
            self.totals = jax.tree.map(jnp.zeros_like, metrics)
            self.first_bad = jnp.asarray(NO_BAD_STEP, jnp.int32)
        self.totals, self.first_bad = _add_step_metrics(self.totals, self.first_bad, metrics, step)

    def check(self) -> None:
        """Raises NonFiniteLossError when any step since the last summary had a NaN or infinite loss."""
        if self.first_bad is None:
            return
        bad = int(jax.device_get(self.first_bad))
        if bad != NO_BAD_STEP:
            epoch, index = divmod(bad - 1, self.steps_per_epoch)
            raise NonFiniteLossError(
                f"training loss is not finite at step {bad} (epoch {epoch}, batch {index} of "
                f"the epoch); stopping without saving this step"
            )

    def take_summary(self) -> dict[str, float]:
        """The mean of each metric over the steps since the last summary (fetched from the device), then reset."""
        self.check()
        totals, self.totals, self.first_bad = jax.device_get(self.totals), None, None
        return summarize(add_metrics(None, totals or {}))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    task: Task | None = None,
    mesh=None,
    allow_data_change: bool = False,
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state and eval.

    Writes metrics.jsonl (train: loss, accuracy, l2_grads, l2_params, steps/s, examples/s; eval per epoch;
    final_eval with test-time augmentation) and checkpoints (every config.checkpoint_every_steps and at
    the end), saved asynchronously while training goes on. A checkpoint made with a different config, or on
    other data (class names, example count, fingerprint; unless `allow_data_change`), is refused with the list of
    differences before anything compiles. SIGTERM or Ctrl-C stops training after the current step: its checkpoint
    is committed and TrainingStopped is raised; the same call again resumes exactly.
    """
    mesh = mesh or parallel.make_mesh()
    validate_config(config, mesh)
    with workdir_lock(workdir):
        task = task or build_task(config)
        checkpointer = ckpt_lib.Checkpointer(
            workdir, max_to_keep=config.max_checkpoints_to_keep, save_every_steps=config.checkpoint_every_steps
        )
        try:
            with StopSignals() as signals:
                return _train(config, workdir, task, mesh, checkpointer, signals, allow_data_change)
        finally:
            checkpointer.close()


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """One training run per work directory: WORKDIR/train.lock is held (flock) from the start to the end of the run,
    and a second run raises WorkdirInUseError instead of interleaving metrics and checkpoints with the first. Held by
    process 0 alone (the processes of one multi-host run share the directory); a killed run's lock is dropped by the
    kernel."""
    if jax.process_index() != 0:
        yield
        return
    lock = OutputLock(
        workdir,
        path=os.path.join(workdir, WORKDIR_LOCK),
        advice="wait for it to end, or give this run another --workdir",
    )
    try:
        lock.acquire()
    except OutputError as error:
        raise WorkdirInUseError(str(error)) from None
    try:
        yield
    finally:
        lock.release()


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    mesh,
    checkpointer: ckpt_lib.Checkpointer,
    signals: StopSignals,
    allow_data_change: bool,
) -> TrainResult:
    """`train_and_evaluate` once its checkpointer and signal handlers are set up (the caller closes them)."""
    bar = tqdm.tqdm(
        total=0,
        desc="loading data",
        disable=not config.progress_bar or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )
    writer = MetricsWriter(workdir)
    try:
        return _train_with(config, workdir, task, mesh, checkpointer, signals, allow_data_change, bar, writer)
    finally:
        writer.close()
        bar.close()


def _train_with(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    mesh,
    checkpointer: ckpt_lib.Checkpointer,
    signals: StopSignals,
    allow_data_change: bool,
    bar: tqdm.tqdm,
    writer: MetricsWriter,
) -> TrainResult:
    """The body of `train_and_evaluate`: check, load, compile, train, evaluate (its resources come set up)."""
    latest = checkpointer.latest_step()
    saved_meta = None
    if latest is not None:  # the newest step whose config and meta read (a newer one is named in a warning)
        latest, (saved_config, saved_meta) = checkpointer.newest_readable(checkpointer.restore_config_and_meta)
        check_resumable(saved_config, config, workdir)

    train_arrays = task.train_arrays()
    eval_arrays = task.eval_arrays()
    n_train = num_examples(train_arrays)
    steps_per_epoch, total_steps = schedule_lengths(n_train, config)
    identity = data_identity(train_arrays, task.checkpoint_metadata())
    if saved_meta is not None and not allow_data_change:
        check_same_data(saved_meta, identity, steps_per_epoch, workdir)
    state, tx = initial_state(
        task, config, train_arrays, mesh, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    if latest is not None:  # the newest step whose arrays read; the newer ones are kept aside, never deleted
        template = state
        restored, state = checkpointer.newest_readable(
            lambda at: checkpointer.restore_state(template, at), newest=latest
        )
        checkpointer.set_aside_newer(restored)
    start = int(jax.device_get(state.step))
    learning_rate = optim.default_learning_rate(
        config.optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=config.global_batch_size
    )

    batches = feed_lib.make_feed(
        config.get("data_placement", "auto"),
        train_arrays,
        mesh,
        seed=config.seed,
        global_batch_size=config.global_batch_size,
    )
    eval_fn = steps.jit_eval_step(task, mesh, tta=False)
    writer.rewind(start)
    step_metrics = _StepMetrics(steps_per_epoch)
    meta = lambda s: {
        "step": s,
        "epoch": s // steps_per_epoch,
        "step_in_epoch": s % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "task": task.checkpoint_metadata(),
        "data": identity,
    }
    profiler = StepProfiler(profile_window(config.get("profile_steps")), workdir)
    if start < total_steps:
        bar.set_description("compiling")
        batches.epoch(start // steps_per_epoch)
        compile_start = time.perf_counter()
        train_step = (
            steps.jit_train_step(
                task,
                tx,
                mesh,
                steps_per_epoch=steps_per_epoch,
                placement=batches.placement,
                lookahead=optim.lookahead_fn(
                    config.get("lookahead"), steps_per_epoch=steps_per_epoch, total_steps=total_steps
                ),
            )
            .lower(state, *batches.args(start % steps_per_epoch))
            .compile()
        )
        compile_seconds = time.perf_counter() - compile_start
    bar.reset(total=total_steps)
    bar.update(start)
    bar.set_description("training")
    last_log_time, last_log_step = time.perf_counter(), start
    calibrated = saved_meta.get("calibration") if saved_meta is not None else None
    try:
        for step in range(start, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 and step != start:
                batches.epoch(epoch)
            profiler.before_step(step)
            state, metrics = train_step(state, *batches.args(index))
            step_metrics.push(state.step, metrics)
            bar.update(1)
            done = step + 1
            profiler.after_step(done, state)
            last = done == total_steps
            epoch_end = done % steps_per_epoch == 0 or last
            if done % config.log_every_steps == 0 or epoch_end or step == start:
                summary = step_metrics.take_summary()  # waits for the step: the rate is of finished steps
                now = time.perf_counter()
                rate = (done - last_log_step) / max(now - last_log_time, 1e-9)
                record = {
                    "step": done,
                    "epoch": done / steps_per_epoch,
                    "split": "train",
                    **summary,
                    "learning_rate": float(learning_rate(np.int32(done - 1))),
                    "steps_per_second": rate,
                    "examples_per_second": rate * config.global_batch_size,
                }
                if step == start:
                    record["compile_seconds"] = compile_seconds
                writer.write(record)
                accuracy = record.get("accuracy", record.get("token_accuracy", 0))  # top-1, else next-token
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", acc=f"{accuracy:.3f}", img_s=f"{record['examples_per_second']:.0f}"
                )
                last_log_time, last_log_step = now, done
            stop = not last and signals.stop_requested(done)
            if last and eval_arrays is not None and hasattr(task, "calibrate"):
                step_metrics.check()
                show_phase(bar, "calibrating", eval_arrays)
                calibrated = task.calibrate(state.variables, eval_arrays, batch_size=config.eval_batch_size)
            if checkpointer.should_save(done, last=last) or stop:
                step_metrics.check()
                saved = meta(done)
                if last and calibrated:
                    saved["calibration"] = calibrated  # fitted temperatures (and fusion), with their report
                checkpointer.save(done, state, config, saved)
            if stop:
                checkpointer.wait()
                raise TrainingStopped(done, total_steps, signals.received or 0, workdir)
            if (
                eval_arrays is not None
                and epoch_end
                and not last
                and config.eval_every_epochs
                and (done // steps_per_epoch) % config.eval_every_epochs == 0
            ):
                step_metrics.check()
                show_phase(bar, "evaluating", eval_arrays)
                record = evaluate_arrays(
                    task,
                    state.variables,
                    eval_arrays,
                    mesh,
                    batch_size=config.eval_batch_size,
                    tta=False,
                    eval_fn=eval_fn,
                )
                writer.write({"step": done, "epoch": done / steps_per_epoch, "split": "eval", **record})
                bar.write(
                    f"epoch {done / steps_per_epoch:.2f}: eval " + " ".join(f"{k}={v:.4f}" for k, v in record.items())
                )
                bar.set_description("training")
        step_metrics.check()
    finally:
        profiler.stop()

    final_eval = None
    if eval_arrays is not None:
        show_phase(bar, "final evaluation", eval_arrays)
        tta = uses_tta(config)
        final_eval = evaluate_arrays(
            task, state.variables, eval_arrays, mesh, batch_size=config.eval_batch_size, tta=tta
        )
        final_eval = {**final_eval, **(calibrated or {})}
        writer.write(
            {
                "step": total_steps,
                "epoch": total_steps / steps_per_epoch,
                "split": "final_eval",
                "tta": tta,
                **final_eval,
            }
        )
        write_confusion_image(
            writer, task, state.variables, eval_arrays, batch_size=config.eval_batch_size, tta=tta, step=total_steps
        )
        write_sample_captions(writer, task, state.variables, eval_arrays, step=total_steps)
    if writer.enabled:
        writer.flush()
        plot.plot_run(workdir)
    return TrainResult(state=state, final_eval=final_eval, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def uses_tta(config: Mapping[str, Any]) -> bool:
    """Whether a config's final evaluation uses test-time augmentation: config.tta names the views ("flip",
    "flip_translate"); "none", an empty value or no key means none."""
    return config.get("tta") not in (None, False, "", "none")


def restore_for_eval(workdir: str, step: int | None = None, mesh=None):
    """(config, meta, task, variables) of a saved checkpoint; the config comes from the checkpoint itself."""
    mesh = mesh or parallel.make_mesh()
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True, asynchronous=False)
    try:
        read = lambda at: _restore_step_for_eval(checkpointer, at, mesh)
        # The newest step that reads when none is asked for (an unreadable one is named in a warning).
        return read(step) if step is not None else checkpointer.newest_readable(read)[1]
    finally:
        checkpointer.close()


def _restore_step_for_eval(checkpointer: ckpt_lib.Checkpointer, step: int, mesh):
    """`restore_for_eval` of checkpoint `step`: UnreadableCheckpointError names its folder when its files do not
    read."""
    saved_config, meta = checkpointer.restore_config_and_meta(step)
    task_name(saved_config.get("task"))  # a name outside TASKS is refused before anything else is read
    config = ml_collections.ConfigDict(saved_config)
    task = build_task(config)
    template = jax.eval_shape(lambda: _abstract_state(task, config, meta))
    sharding = parallel.replicated_sharding(mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
    state = checkpointer.restore_state(template, step)
    return config, meta, task, state.variables


def _abstract_state(task: Task, config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> TrainState:
    """The state's structure for restoring (traced under eval_shape: no data is read)."""
    variables = task.init_variables(jax.random.PRNGKey(0))
    tx = optim.make_optimizer(
        config.optimizer,
        variables["params"],
        total_steps=meta["total_steps"],
        steps_per_epoch=meta["steps_per_epoch"],
        batch_size=config.global_batch_size,
    )
    use_lookahead = bool(config.get("lookahead") and config.lookahead.get("enabled", False))
    return create_train_state(variables, tx, jax.random.PRNGKey(0), use_lookahead=use_lookahead)


def evaluate_checkpoint(
    workdir: str,
    data: str | None = None,
    *,
    split: str = "test",
    step: int | None = None,
    batch_size: int | None = None,
    tta: bool | None = None,
    mesh=None,
    confusion_png: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics (top-1 accuracy for classifiers) of the checkpoint in `workdir` on a data source.

    `data` is any load_dataset spec ("cifar10", "folder:/path/test", "demo"); None uses the checkpoint's own
    dataset and `split`. Model, normalisation and test-time augmentation come from the saved config. For a
    classifier, `confusion_png` also draws its confusion matrix there (the result names the file). data_dir: where
    tfds data is read (and relative folder roots resolve), instead of the saved config's.
    """
    mesh = mesh or parallel.make_mesh()
    config, meta, task, variables = restore_for_eval(workdir, step, mesh)
    if data_dir is not None:
        task.config.data_dir = data_dir
    arrays = task.eval_arrays(split=split, source=data, metadata=meta["task"])
    batch_size = batch_size or config.eval_batch_size
    devices = parallel.global_batch_divisor(mesh)
    batch_size = -(-batch_size // devices) * devices
    tta = uses_tta(config) if tta is None else tta
    result = evaluate_arrays(task, variables, arrays, mesh, batch_size=batch_size, tta=tta)
    result = {"step": meta["step"], "num_examples": num_examples(arrays), "tta": tta, **result}
    fitted = calibration.stored_fit(meta.get("calibration"))
    if fitted is not None and hasattr(task, "calibrate"):  # the stored calibration, measured on this data
        result.update(task.calibrate(variables, arrays, batch_size=batch_size, fitted=fitted))
    if confusion_png and hasattr(task, "confusion"):
        matrix = task.confusion(variables, arrays, batch_size=batch_size, tta=tta)
        title = f"{data or config.dataset} ({split}), step {meta['step']}"
        result["confusion_png"] = plot.save_figure(
            plot.confusion_figure(matrix, meta["task"]["class_names"], title), confusion_png
        )
    return result
