"""The demo recipe behind `python train.py --config=demo`: classifier, captioner, pipeline checkpoint, evaluation.

    <workdir>/classifier   the shape classifier (config `demo`), trained by the generic loop
    <workdir>/captioner    the captioner (config `captioner_demo`) on that frozen CNN
    <workdir>/pipeline     the pipeline checkpoint (CNN + LM + bridge + tokenizer) that infer.py reads

Each stage resumes an interrupted run and is skipped when its work directory already holds the finished
result of the same config (a different config is refused, naming the keys, as train.py does). Then the pipeline
checkpoint captions `num_eval_examples` fresh demo images (split "test", seed EVAL_SEED: never trained or
validated on) by greedy decoding and classifies them by LM likelihood; `run_demo` returns and prints
  exact_match, bleu4, cider,  generated caption vs the image's exact reference (imgllm.captions.metrics),
  lm_accuracy                 argmax over classes of the class-prompt likelihood after the visual prefix,
  cnn_accuracy                the CNN head's top-1,
  lm_colour_accuracy          the first-named object's colour (6 labels) classified by the LM alone, with the
                              prompts "a small {label}" and "a large {label}": labels the CNN was never trained on
                              (it learnt shapes), chosen at inference (`imgllm.pipeline.classify_images`),
  lm_size_accuracy            its size (2 labels), prompt "a {label}".
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from imgllm.captions.metrics import caption_metrics
from imgllm.configs import captioner_demo, demo
from imgllm.data import load_dataset
from imgllm.data.demo import COLOURS, SIZES, demo_scenes
from imgllm.pipeline import caption_images, classify_images, load_pipeline
from imgllm.pipeline.checkpoint import TOKENIZER_DIR, TOKENIZER_FILE, is_pipeline_checkpoint
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import loop, resume
from imgllm.train.export import export_pipeline_checkpoint

EVAL_SPLIT = "test"  # the demo split the final evaluation draws from (training uses "train", seed 0)
EVAL_SEED = 1  # ... with its own seed: images that no training or validation run has seen
# Questions about the first-named object that the LM answers from any label set: (labels, prompt templates).
COLOUR_QUESTION = (tuple(COLOURS), ("a small {label}", "a large {label}"))
SIZE_QUESTION = (tuple(SIZES), ("a {label}",))


def pipeline_is_whole(path: str) -> bool:
    """Whether `path` holds a whole pipeline checkpoint. Saves are swapped in whole; one that an older imgllm left
    half-written lacks its tokenizer (written last) and is exported again."""
    return is_pipeline_checkpoint(path) and os.path.isfile(os.path.join(path, TOKENIZER_DIR, TOKENIZER_FILE))


def stage_is_finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Whether `workdir` holds a finished run of `config` (last checkpoint at the final step).

    Raises IncompatibleConfigError when the work directory holds a run of a different config.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True, asynchronous=False)
    try:
        if checkpointer.latest_step() is None:
            return False
        saved_config, meta = checkpointer.restore_config_and_meta(None)
    finally:
        checkpointer.close()
    resume.check_resumable(saved_config, config, workdir)
    return meta["step"] >= meta["total_steps"]


def _run_stage(name: str, workdir: str, config: ml_collections.ConfigDict, log: Callable[[str], None]) -> bool:
    """Trains `config` in `workdir` unless already finished; returns whether it trained."""
    if stage_is_finished(workdir, config):
        log(f"[demo] {name}: finished run found in {workdir}, skipped")
        return False
    clock = _Clock()
    result = loop.train_and_evaluate(config, workdir)
    summary = (
        ""
        if result.final_eval is None
        else " " + " ".join(f"{k}={v:.4f}" for k, v in result.final_eval.items() if isinstance(v, float))
    )
    log(f"[demo] {name}: trained in {clock}{summary}")
    return True


class _Clock:
    """Wall and CPU (user + system, all threads) seconds since creation, as text: "12 s (CPU 20 s)"."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.wall:.0f} s (CPU {time.process_time() - self.cpu:.0f} s)"


def default_configs() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The (classifier, captioner) configs of the demo: configs/demo.py and configs/captioner_demo.py."""
    return demo.get_config(), captioner_demo.get_config()


def run_demo(
    workdir: str,
    *,
    classifier_config: ml_collections.ConfigDict | None = None,
    captioner_config: ml_collections.ConfigDict | None = None,
    num_eval_examples: int = 500,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Trains the demo classifier and captioner in `workdir`, exports and evaluates the pipeline checkpoint.

    classifier_config / captioner_config default to `default_configs()`; the captioner's classifier_workdir is
    set to <workdir>/classifier. The default captioner, and the evaluation, compute in the classifier config's dtype
    (config.dtype: one setting for the whole demo). Returns the evaluation of `evaluate_pipeline` on fresh images.
    """
    default_classifier, default_captioner = default_configs()
    classifier_config = classifier_config or default_classifier
    dtype = classifier_config.get("dtype") or "auto"
    if captioner_config is None:
        default_captioner.dtype = dtype
    captioner_config = ml_collections.ConfigDict((captioner_config or default_captioner).to_dict())
    workdir = os.path.abspath(workdir)
    classifier_dir, captioner_dir, pipeline_dir = (
        os.path.join(workdir, name) for name in ("classifier", "captioner", "pipeline")
    )
    captioner_config.classifier_workdir = classifier_dir
    clock = _Clock()
    _run_stage("classifier", classifier_dir, classifier_config, log)
    trained = _run_stage("captioner", captioner_dir, captioner_config, log)
    if trained or not pipeline_is_whole(pipeline_dir):
        export_clock = _Clock()
        export_pipeline_checkpoint(captioner_dir, pipeline_dir, overwrite=True)
        log(f"[demo] pipeline checkpoint {pipeline_dir} written in {export_clock}")
    eval_clock = _Clock()
    results = evaluate_pipeline(pipeline_dir, num_examples=num_eval_examples, dtype=dtype)
    log(f"[demo] evaluated in {eval_clock}")
    log(
        f"[demo] {num_eval_examples} fresh demo images ({EVAL_SPLIT!r} split, seed {EVAL_SEED}): "
        + " ".join(f"{k}={v:.4f}" for k, v in results.items())
    )
    log(f"[demo] total {clock}; caption images with: python infer.py --checkpoint={pipeline_dir} <images>")
    return results


def evaluate_pipeline(
    pipeline_dir: str, *, num_examples: int = 500, split: str = EVAL_SPLIT, seed: int = EVAL_SEED, dtype: str = "auto"
) -> dict[str, float]:
    """Greedy captions, LM classification and CNN accuracy of a pipeline checkpoint on demo images.

    One jitted `imgllm.pipeline.caption_images` call over all images with the spec `infer.py --lm-classify` uses
    (`PipelineCheckpoint.spec(lm_classify=True)`): the LM classification scores the checkpoint's
    class_prompt_templates after each image's visual prefix. dtype: the compute dtype (`imgllm.precision`).
    """
    pipe = load_pipeline(pipeline_dir)
    dataset = load_dataset("demo", split, seed=seed, num_examples=num_examples, image_size=pipe.config["image_size"])
    if tuple(dataset.class_names) != pipe.class_names:
        raise ValueError(f"{pipeline_dir}: class names {pipe.class_names} are not the demo's {dataset.class_names}")
    spec = pipe.spec(lm_classify=True, dtype=dtype)
    outputs = jax.device_get(
        jax.jit(functools.partial(caption_images, spec=spec))(pipe.params, dataset.images, jax.random.PRNGKey(0))
    )
    hypotheses = [captions[0] for captions in pipe.decode_captions(outputs["caption_ids"])]
    results = caption_metrics(hypotheses, dataset.captions)
    results["lm_accuracy"] = float(np.mean(outputs["lm_label_ids"] == dataset.labels))
    results["cnn_accuracy"] = float(np.mean(outputs["label_ids"][:, 0] == dataset.labels))
    first_objects = [
        scene.objects[0]
        for scene in demo_scenes(split, seed=seed, num_examples=num_examples, image_size=pipe.config["image_size"])
    ]
    for name, (labels, templates), truth in (
        ("colour", COLOUR_QUESTION, [o.colour for o in first_objects]),
        ("size", SIZE_QUESTION, [o.size for o in first_objects]),
    ):
        predicted = classify_images(pipe, dataset.images, labels, templates, dtype=dtype).labels
        results[f"lm_{name}_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    return results
