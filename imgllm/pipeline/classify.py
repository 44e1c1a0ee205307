"""Classification by the language model among any labels, chosen at inference, from Python.

    from imgllm.pipeline import classify_images, load_pipeline

    pipe = load_pipeline("runs/demo/pipeline")
    colours = classify_images(pipe, images, ["red", "green", "blue", "yellow", "purple", "white"],
                              ["a small {label}", "a large {label}"])
    colours.names[colours.label_ids[0]], colours.probs[0]          # image 0's colour, every colour's probability

Each label is scored by the likelihood the LM gives its prompts after the image's visual prefix (several
templates per label combine as a mixture: the mean of the prompts' likelihoods; `imgllm.language.scoring`), and
the probabilities are softmax(scores / T) with the checkpoint's fitted LM temperature. The computation is
`imgllm.pipeline.caption.lm_classify_images`, jitted once per batch shape (kept in `caption.COMPILED`);
`infer.py --lm-labels/--lm-templates` does the same while captioning.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from imgllm.data.batching import padded_batch_outputs
from imgllm.pipeline.caption import COMPILED, lm_classify_images
from imgllm.pipeline.checkpoint import PipelineCheckpoint


@dataclasses.dataclass(frozen=True)
class LabelPredictions:
    """The LM's classification of N images among `names`: label_ids int [N] (into names), probs float32 [N, L]
    (calibrated), scores float32 [N, L] (the log-likelihoods, or information gains, before calibration)."""

    names: tuple[str, ...]
    label_ids: np.ndarray
    probs: np.ndarray
    scores: np.ndarray

    @property
    def labels(self) -> list[str]:
        """The predicted label name of every image."""
        return [self.names[i] for i in self.label_ids]


def classify_images(
    pipeline: PipelineCheckpoint,
    images: np.ndarray,
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    lm_scoring: str = "likelihood",
    score_end: bool | None = None,
    dtype: str = "auto",
    batch_size: int = 256,
) -> LabelPredictions:
    """Classifies uint8 images [N, H, W, 3] (N may be 0) by the LM among `labels` (any strings, several tokens
    allowed; labels and templates are stripped of surrounding whitespace, as the command line's are).

    templates: the label's prompts (None: the checkpoint's class prompt templates, scored as whole captions);
    score_end: see `imgllm.language.scoring.build_prompt_table` (None: from the templates' shape); lm_scoring:
    "likelihood" or "information_gain" (`imgllm.pipeline.caption.PipelineSpec`). Images go through in batches of
    `batch_size` (the last one padded), so one shape is compiled.
    """
    if pipeline.params is None:
        raise ValueError(
            "classify_images needs a pipeline loaded with its parameters (load_pipeline(read_params=True))"
        )
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    spec = pipeline.spec(
        lm_labels=list(labels), lm_templates=templates, lm_scoring=lm_scoring, dtype=dtype, lm_score_end=score_end
    )
    if len(images) == 0:  # nothing to compile: empty answers of the right shapes
        empty = np.zeros((0, len(spec.lm_label_names)), np.float32)
        return LabelPredictions(names=spec.lm_label_names, label_ids=np.zeros(0, np.int32), probs=empty, scores=empty)
    classify = _jitted(spec)
    joined = padded_batch_outputs(lambda batch: classify(pipeline.params, batch), images, min(batch_size, len(images)))
    return LabelPredictions(
        names=spec.lm_label_names,
        label_ids=joined["lm_label_ids"],
        probs=joined["lm_probs"],
        scores=joined["lm_scores"],
    )


def _jitted(spec):
    """`lm_classify_images` jitted for `spec`, kept in the pipeline's one cache of compiled functions."""
    return COMPILED.get(("lm classifier", spec), lambda: jax.jit(functools.partial(lm_classify_images, spec=spec)))


__all__ = ["LabelPredictions", "classify_images"]
