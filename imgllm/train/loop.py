"""The generic training loop, shared by every Task.

Data position: the global step alone fixes it (epoch, step_in_epoch = divmod(step, steps_per_epoch); the
epoch's order comes from (seed, epoch)), and the step's random key is fold_in(base_key, step). So a run
restored from its latest checkpoint continues exactly as if it had never stopped.

Each step: its batch, the train step, then the end-of-step actions (`_Run`): log, calibrate after the last step,
checkpoint, stop on a signal, evaluate. The checks before resuming are in `imgllm.train.resume`; evaluation, also of
a saved checkpoint, in `imgllm.train.evaluation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from imgllm import parallel
from imgllm.pipeline.outputs import OutputError, OutputLock
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import evaluation, optim, plot, resume, steps
from imgllm.train import feed as feed_lib
from imgllm.train.metrics_log import MetricsWriter
from imgllm.train.registry import build_task
from imgllm.train.state import TrainState, create_train_state
from imgllm.train.task_protocol import Arrays, Task, add_metrics, summarize

WORKDIR_LOCK = "train.lock"  # held by the run training in the work directory (`workdir_lock`)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


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


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run's length fixes, decided once (`run_plan`) and passed where it is needed.

    learning_rate: the default group's rate at each update (count 0 is the first step), as the optimizer applies it:
    what the train records log. lookahead: `optim.lookahead_fn` bound to the run's length, or None when the config
    has none; the one decision whether the state keeps lookahead's slow copy and the step updates it.
    """

    steps_per_epoch: int
    total_steps: int
    learning_rate: optax.Schedule
    lookahead: Callable | None

    @property
    def uses_lookahead(self) -> bool:
        return self.lookahead is not None


def run_plan(config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int) -> RunPlan:
    """The RunPlan of a run of `config` with these lengths (`schedule_lengths`)."""
    lengths = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    return RunPlan(
        **lengths,
        learning_rate=optim.default_learning_rate(config.optimizer, **lengths, batch_size=config.global_batch_size),
        lookahead=optim.lookahead_fn(config.get("lookahead"), **lengths),
    )


def make_optimizer(config: ml_collections.ConfigDict, params: Any, plan: RunPlan) -> optax.GradientTransformation:
    """`optim.make_optimizer` for `params`, a run of `plan`'s length and config.global_batch_size."""
    return optim.make_optimizer(
        config.optimizer,
        params,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        batch_size=config.global_batch_size,
        default_schedule=plan.learning_rate,
    )


def initial_state(task: Task, config: ml_collections.ConfigDict, train_arrays: Arrays, mesh, plan: RunPlan):
    """(fresh replicated TrainState, optimizer) from config.seed: model init, data-dependent init, optimizer."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax.device_get(jax.jit(task.init_variables)(init_key))
    variables = task.prepare_variables(variables, train_arrays)
    tx = make_optimizer(config, variables["params"], plan)
    init = lambda v, key: create_train_state(v, tx, key, use_lookahead=plan.uses_lookahead)
    return steps.jit_init_state(init, mesh)(variables, state_key), tx


def _abstract_state(task: Task, config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> TrainState:
    """The state's structure for a run of meta's total_steps and steps_per_epoch, as `initial_state` builds it (traced
    under eval_shape: no data is read): what lowering the train step needs (tests/test_lowering.py, benchmarks)."""
    plan = run_plan(config, steps_per_epoch=meta["steps_per_epoch"], total_steps=meta["total_steps"])
    variables = task.init_variables(jax.random.PRNGKey(0))
    tx = make_optimizer(config, variables["params"], plan)
    return create_train_state(variables, tx, jax.random.PRNGKey(0), use_lookahead=plan.uses_lookahead)


def show_phase(bar, phase: str, arrays: Arrays) -> None:
    """Names what the run does now on the progress bar, replacing the last training step's figures (which would
    read as current) with the number of images this phase goes through."""
    bar.set_description(phase)
    bar.set_postfix_str(f"{evaluation.num_examples(arrays)} images", refresh=True)


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
        run, state = _start_run(config, workdir, task, mesh, checkpointer, signals, allow_data_change, bar, writer)
        return _train_with(run, state)
    finally:
        writer.close()
        bar.close()


def _train_with(run: _Run, state: TrainState) -> TrainResult:
    """The body of `train_and_evaluate`: train from `state` and evaluate (the run comes set up by `_start_run`).

    Each step: its batch and the train step (`_Run.train_step`), then the end-of-step actions in this order.
    """
    try:
        for step in range(run.start, run.plan.total_steps):
            state = run.train_step(state, step)
            end = run.end_of_step(step + 1)
            run.log_step(end)
            run.maybe_calibrate(end, state)
            run.maybe_checkpoint(end, state)
            run.maybe_stop(end)
            run.maybe_evaluate(end, state)
        run.step_metrics.check()
    finally:
        run.profiler.stop()
    final_eval = run.final_evaluation(state)
    if run.writer.enabled:
        run.writer.flush()
        plot.plot_run(run.workdir)
    return TrainResult(
        state=state, final_eval=final_eval, steps_per_epoch=run.plan.steps_per_epoch, total_steps=run.plan.total_steps
    )


class _StepEnd(NamedTuple):
    """Where a step left the run: `done` steps taken; `last` of all; `epoch_end` (or last); `stop` asked for."""

    done: int
    last: bool
    epoch_end: bool
    stop: bool


@dataclasses.dataclass
class _Run:
    """What the step loop and its end-of-step actions share: the run's resources, plan and data (set up once by
    `_start_run`), and what changes as it goes (the calibration, the time and step of the last train record)."""

    config: ml_collections.ConfigDict
    workdir: str
    task: Task
    mesh: Any
    checkpointer: ckpt_lib.Checkpointer
    signals: StopSignals
    bar: tqdm.tqdm
    writer: MetricsWriter
    plan: RunPlan
    identity: dict[str, Any]  # the training data's (`resume.data_identity`), saved in every checkpoint's meta
    eval_arrays: Arrays | None
    start: int  # the step training starts or resumes from
    batches: Any  # the feed (`feed_lib.make_feed`)
    compiled_step: Callable | None  # None when no step is left
    compile_seconds: float | None
    eval_fn: Callable
    calibrated: dict | None  # the report stored after the last step: a finished run's, or fitted by this run
    step_metrics: _StepMetrics = dataclasses.field(init=False)
    profiler: StepProfiler = dataclasses.field(init=False)
    last_log_time: float = dataclasses.field(
        init=False
    )  # when the last train record was written (first: training began)
    last_log_step: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.step_metrics = _StepMetrics(self.plan.steps_per_epoch)
        self.profiler = StepProfiler(profile_window(self.config.get("profile_steps")), self.workdir)
        self.last_log_time, self.last_log_step = time.perf_counter(), self.start

    def train_step(self, state: TrainState, step: int) -> TrainState:
        """The update of global `step` on its batch (a new epoch's order goes to the feed first)."""
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        if index == 0 and step != self.start:
            self.batches.epoch(epoch)
        self.profiler.before_step(step)
        state, metrics = self.compiled_step(state, *self.batches.args(index))
        self.step_metrics.push(state.step, metrics)
        self.bar.update(1)
        self.profiler.after_step(step + 1, state)
        return state

    def end_of_step(self, done: int) -> _StepEnd:
        """Where `done` steps leave the run; a stop is asked for (`StopSignals.stop_requested`) before any step
        but the last."""
        last = done == self.plan.total_steps
        epoch_end = done % self.plan.steps_per_epoch == 0 or last
        return _StepEnd(done, last, epoch_end, stop=not last and self.signals.stop_requested(done))

    def log_step(self, end: _StepEnd) -> None:
        """A "train" record (the metrics' means since the last one, learning rate, speed; compile time in the first)
        every config.log_every_steps steps, at each epoch's end and after the first step; its figures on the bar."""
        done, first = end.done, end.done == self.start + 1
        if not (done % self.config.log_every_steps == 0 or end.epoch_end or first):
            return
        summary = self.step_metrics.take_summary()  # waits for the step: the rate is of finished steps
        now = time.perf_counter()
        rate = (done - self.last_log_step) / max(now - self.last_log_time, 1e-9)
        record = {
            "step": done,
            "epoch": done / self.plan.steps_per_epoch,
            "split": "train",
            **summary,
            "learning_rate": float(self.plan.learning_rate(np.int32(done - 1))),
            "steps_per_second": rate,
            "examples_per_second": rate * self.config.global_batch_size,
        }
        if first:
            record["compile_seconds"] = self.compile_seconds
        self.writer.write(record)
        accuracy = record.get("accuracy", record.get("token_accuracy", 0))  # top-1, else next-token
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", acc=f"{accuracy:.3f}", img_s=f"{record['examples_per_second']:.0f}"
        )
        self.last_log_time, self.last_log_step = now, done

    def maybe_calibrate(self, end: _StepEnd, state: TrainState) -> None:
        """After the last step, a task that calibrates fits its temperatures on the evaluation data."""
        if end.last and self.eval_arrays is not None and self.task.calibrate is not None:
            self.step_metrics.check()
            show_phase(self.bar, "calibrating", self.eval_arrays)
            self.calibrated = self.task.calibrate(
                state.variables, self.eval_arrays, batch_size=self.config.eval_batch_size
            )

    def maybe_checkpoint(self, end: _StepEnd, state: TrainState) -> None:
        """Starts saving the state every config.checkpoint_every_steps steps, after the last (with the fitted
        calibration) and before a stop; never a step whose loss was not finite."""
        if not (self.checkpointer.should_save(end.done, last=end.last) or end.stop):
            return
        self.step_metrics.check()
        steps_per_epoch = self.plan.steps_per_epoch
        meta = {
            "step": end.done,
            "epoch": end.done // steps_per_epoch,
            "step_in_epoch": end.done % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": self.plan.total_steps,
            "task": self.task.checkpoint_metadata(),
            "data": self.identity,
        }
        if end.last and self.calibrated:
            meta["calibration"] = self.calibrated  # fitted temperatures (and fusion), with their report
        self.checkpointer.save(end.done, state, self.config, meta)

    def maybe_stop(self, end: _StepEnd) -> None:
        """On a stop: raises TrainingStopped once the step's checkpoint is committed."""
        if end.stop:
            self.checkpointer.wait()
            raise TrainingStopped(end.done, self.plan.total_steps, self.signals.received or 0, self.workdir)

    def maybe_evaluate(self, end: _StepEnd, state: TrainState) -> None:
        """An "eval" record every config.eval_every_epochs epochs (not after the last step: the final evaluation)."""
        steps_per_epoch = self.plan.steps_per_epoch
        if not (
            self.eval_arrays is not None
            and end.epoch_end
            and not end.last
            and self.config.eval_every_epochs
            and (end.done // steps_per_epoch) % self.config.eval_every_epochs == 0
        ):
            return
        self.step_metrics.check()
        show_phase(self.bar, "evaluating", self.eval_arrays)
        record = evaluation.evaluate_arrays(
            self.task,
            state.variables,
            self.eval_arrays,
            self.mesh,
            batch_size=self.config.eval_batch_size,
            tta=False,
            eval_fn=self.eval_fn,
        )
        epoch = end.done / steps_per_epoch
        self.writer.write({"step": end.done, "epoch": epoch, "split": "eval", **record})
        self.bar.write(f"epoch {epoch:.2f}: eval " + " ".join(f"{k}={v:.4f}" for k, v in record.items()))
        self.bar.set_description("training")

    def final_evaluation(self, state: TrainState) -> dict[str, float] | None:
        """The final evaluation (test-time augmentation as the config says) with the calibration report: a
        "final_eval" record, and in TensorBoard the confusion matrix and sample captions. None without eval data."""
        if self.eval_arrays is None:
            return None
        total_steps, batch_size = self.plan.total_steps, self.config.eval_batch_size
        show_phase(self.bar, "final evaluation", self.eval_arrays)
        tta = evaluation.uses_tta(self.config)
        final_eval = evaluation.evaluate_arrays(
            self.task, state.variables, self.eval_arrays, self.mesh, batch_size=batch_size, tta=tta
        )
        final_eval = {**final_eval, **(self.calibrated or {})}
        epoch = total_steps / self.plan.steps_per_epoch
        self.writer.write({"step": total_steps, "epoch": epoch, "split": "final_eval", "tta": tta, **final_eval})
        evaluation.write_confusion_image(
            self.writer, self.task, state.variables, self.eval_arrays, batch_size=batch_size, tta=tta, step=total_steps
        )
        evaluation.write_sample_captions(self.writer, self.task, state.variables, self.eval_arrays, step=total_steps)
        return final_eval


def _start_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    mesh,
    checkpointer: ckpt_lib.Checkpointer,
    signals: StopSignals,
    allow_data_change: bool,
    bar: tqdm.tqdm,
    writer: MetricsWriter,
) -> tuple[_Run, TrainState]:
    """The run set up for its first step, and the state it starts from: the work directory's checkpoint, checked
    against this config and data (`imgllm.train.resume`), or a fresh state; the feed, the compiled step, the bar."""
    resumed = resume.saved_run(checkpointer, config, workdir)  # the checkpoint to continue, or None
    train_arrays = task.train_arrays()
    eval_arrays = task.eval_arrays()
    steps_per_epoch, total_steps = schedule_lengths(evaluation.num_examples(train_arrays), config)
    plan = run_plan(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    identity = resume.data_identity(train_arrays, task.checkpoint_metadata())
    if resumed is not None and not allow_data_change:
        resume.check_same_data(resumed.meta, identity, steps_per_epoch, workdir)
    state, tx = initial_state(task, config, train_arrays, mesh, plan)
    if resumed is not None:  # the newest step whose arrays read; the newer ones are kept aside, never deleted
        state = resume.restore_latest(checkpointer, state, newest=resumed.step)
    start = int(jax.device_get(state.step))
    batches = feed_lib.make_feed(
        config.get("data_placement", "auto"),
        train_arrays,
        mesh,
        seed=config.seed,
        global_batch_size=config.global_batch_size,
    )
    eval_fn = steps.jit_eval_step(task, mesh, tta=False)
    writer.rewind(start)
    compiled_step, compile_seconds = None, None
    if start < total_steps:
        compiled_step, compile_seconds = _compile_train_step(task, tx, mesh, plan, batches, state, start, bar)
    bar.reset(total=total_steps)
    bar.update(start)
    bar.set_description("training")
    return _Run(
        config=config,
        workdir=workdir,
        task=task,
        mesh=mesh,
        checkpointer=checkpointer,
        signals=signals,
        bar=bar,
        writer=writer,
        plan=plan,
        identity=identity,
        eval_arrays=eval_arrays,
        start=start,
        batches=batches,
        compiled_step=compiled_step,
        compile_seconds=compile_seconds,
        eval_fn=eval_fn,
        calibrated=resumed.meta.get("calibration") if resumed is not None else None,
    ), state


def _compile_train_step(
    task: Task, tx: optax.GradientTransformation, mesh, plan: RunPlan, batches: Any, state: TrainState, start: int, bar
) -> tuple[Callable, float]:
    """(the train step compiled for `state` and the feed's batches, the seconds that took), with the epoch of step
    `start` sent to the feed first; the bar says "compiling" meanwhile."""
    bar.set_description("compiling")
    batches.epoch(start // plan.steps_per_epoch)
    compile_start = time.perf_counter()
    jitted = steps.jit_train_step(
        task, tx, mesh, steps_per_epoch=plan.steps_per_epoch, placement=batches.placement, lookahead=plan.lookahead
    )
    compiled = jitted.lower(state, *batches.args(start % plan.steps_per_epoch)).compile()
    return compiled, time.perf_counter() - compile_start
