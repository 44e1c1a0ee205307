"""Evaluation: of variables on arrays (during and after training), and of a work directory's saved checkpoint.

A checkpoint is read for evaluation from its own metadata (`Checkpointer.restore_variables`), as export reads it:
the task comes from the saved config, and no optimizer is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from imgllm import calibration, parallel
from imgllm.data.batching import PADDING_INDEX, epoch_batch_indices
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import plot, steps
from imgllm.train.metrics_log import MetricsWriter
from imgllm.train.registry import build_task, task_name
from imgllm.train.task_protocol import Arrays, Task, add_metrics, summarize


def num_examples(arrays: Arrays) -> int:
    """The common leading dimension of `arrays` (error naming the keys when they disagree)."""
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays have different lengths: {sizes}")
    return next(iter(sizes.values()))


def take(arrays: Arrays, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `rows` of every array."""
    return {k: np.asarray(v[rows]) for k, v in arrays.items()}


def uses_tta(config: Mapping[str, Any]) -> bool:
    """Whether a config's final evaluation uses test-time augmentation: config.tta names the views ("flip",
    "flip_translate"); "none", an empty value or no key means none."""
    return config.get("tta") not in (None, False, "", "none")


def evaluate_arrays(
    task: Task, variables: Any, arrays: Arrays, mesh, *, batch_size: int, tta: bool, eval_fn: Callable | None = None
) -> dict[str, float]:
    """Summarised metrics of `task` over all of `arrays` (padded to whole batches, padding masked out).

    Every process holds all of `arrays` and feeds its own slice of each global batch: the rows of
    `imgllm.data.batching.epoch_batch_indices` in order, whose padding slots repeat the last example with mask 0.
    """
    eval_fn = eval_fn or steps.jit_eval_step(task, mesh, tta=tta)
    n = num_examples(arrays)
    batches = epoch_batch_indices(
        n,
        batch_size,
        seed=0,
        epoch=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle=False,
        drop_remainder=False,
    )
    totals = None
    for rows in batches:
        real = rows != PADDING_INDEX
        batch = take(arrays, np.where(real, rows, n - 1))
        batch["mask"] = real.astype(np.float32)
        metrics = eval_fn(variables, parallel.host_to_global(batch, mesh))
        totals = add_metrics(totals, jax.device_get(metrics))
    return summarize(totals)


def write_confusion_image(
    writer: MetricsWriter, task: Task, variables: Any, arrays: Arrays, *, batch_size: int, tta: bool, step: int
) -> None:
    """Draws a classifier's confusion matrix on `arrays` (`plot.confusion_figure`) into TensorBoard: split
    "final_eval", tag "confusion_matrix". Nothing for a task without `confusion` (None) or a writer without
    TensorBoard.

    Every process computes the matrix (the model's variables span them all); process 0 writes it.
    """
    if task.confusion is None or writer.tensorboard_dir is None:
        return
    matrix = task.confusion(variables, arrays, batch_size=batch_size, tta=tta)
    if writer.enabled:
        names = task.checkpoint_metadata().get("class_names") or [str(n) for n in range(len(matrix))]
        title = f"final evaluation{' (TTA)' if tta else ''}, step {step}"
        writer.image("final_eval", "confusion_matrix", plot.confusion_figure(matrix, names, title), step)


def write_sample_captions(writer: MetricsWriter, task: Task, variables: Any, arrays: Arrays, *, step: int) -> None:
    """A captioner's greedy captions of a few evaluation images (`sample_captions`) as TensorBoard text: split
    "final_eval", tag "sample_captions", one Markdown line per image. Nothing for other tasks or without TensorBoard.
    Every process decodes (the variables span them all); process 0 writes."""
    if task.sample_captions is None or writer.tensorboard_dir is None:
        return
    samples = task.sample_captions(variables, arrays)
    if writer.enabled:
        writer.text(
            "final_eval",
            "sample_captions",
            "\n\n".join(f"**{name}**: {caption or '(empty)'}" for name, caption in samples),
            step,
        )


def restore_for_eval(workdir: str, step: int | None = None, mesh=None):
    """(config, meta, task, variables) of a saved checkpoint; the config comes from the checkpoint itself and the
    variables, replicated on `mesh`, from the checkpoint's own metadata (no optimizer is built)."""
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
    variables = checkpointer.restore_variables(step, parallel.replicated_sharding(mesh))
    return config, meta, task, variables


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
    if fitted is not None and task.calibrate is not None:  # the stored calibration, measured on this data
        result.update(task.calibrate(variables, arrays, batch_size=batch_size, fitted=fitted))
    if confusion_png and task.confusion is not None:
        matrix = task.confusion(variables, arrays, batch_size=batch_size, tta=tta)
        title = f"{data or config.dataset} ({split}), step {meta['step']}"
        result["confusion_png"] = plot.save_figure(
            plot.confusion_figure(matrix, meta["task"]["class_names"], title), confusion_png
        )
    return result
