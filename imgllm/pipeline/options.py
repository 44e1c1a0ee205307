"""Captioning options as two values: what shapes a record (`CaptionOptions`), and what does not (`RunSettings`).

    from imgllm.pipeline import CaptionOptions, RunSettings, caption_files

    options = CaptionOptions(method="sample", top_p=0.9, num_captions=3, seed=1, batch_size=256)
    caption_files("runs/demo/pipeline", ["photos/"], options, output="captions.jsonl", settings=RunSettings(workers=8))

`CaptionOptions` is what `caption_files`, `ImageToText` and `infer.py` caption with: its values are checked when it
is made (a bad one fails before anything is loaded), its dtype is resolved once ("auto" becomes the backend's), and
`PipelineCheckpoint.spec_for` turns it into the static `PipelineSpec`. An output's run options
(`imgllm.pipeline.batch.run_options`, kept in `<output>.run.json`) are derived from it: resuming with other
`CaptionOptions` that change the records is refused. `RunSettings` change how fast a run goes and what it reads,
never its records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from imgllm.data.images import DEFAULT_MAX_PIXELS
from imgllm.language.decoding import GenerationConfig
from imgllm.pipeline.caption import CLASSIFIERS, LM_SCORINGS
from imgllm.precision import resolve_dtype

DECODING_METHODS = ("greedy", "beam", "sample")  # CaptionOptions.method
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imgllm", "jax"
)


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """What shapes a record, independent of any checkpoint (None: the checkpoint's value).

    Decoding: method "greedy", "beam" (num_beams) or "sample" (temperature, then top_k (0: off), then top_p);
    num_captions: captions per image (at most num_beams with beam search); max_new_tokens: caption length in tokens.
    `generation_config` resolves them against a checkpoint.
    Labels and prompts: template (the caption prompt, `imgllm.pipeline.prompts`), top_labels (labels per image),
    tta (average the CNN over the image and its mirror), classify ("cnn", "lm" or "fused": where "labels" come from),
    lm_classify (also the LM's label, "lm_label", scoring the checkpoint's class_prompt_templates; needs a bridge),
    lm_labels and lm_templates (the LM's label among any labels, e.g. colours, with the checkpoint's class templates
    or these; "lm_label" and "lm_probs"), lm_scoring ("likelihood" or "information_gain"); see
    `PipelineCheckpoint.spec`.
    dtype: the CNN's and the LM's compute dtype, "auto" (bfloat16 on GPU/TPU, float32 on CPU), "float32" or
    "bfloat16" (`imgllm.precision`), resolved when the options are made: the field then holds "float32" or
    "bfloat16". seed: batch i draws the random key fold_in(PRNGKey(seed), i); batch_size: images per step (rounded
    up to a multiple of the devices by `caption_files`). Lists of labels and templates are kept as tuples.
    """

    method: str = "greedy"
    num_beams: int = 4
    top_p: float = 0.9
    top_k: int = 0
    temperature: float = 1.0
    num_captions: int = 1
    max_new_tokens: int | None = None
    template: str | None = None
    top_labels: int | None = None
    tta: bool = False
    lm_classify: bool = False
    classify: str | None = None
    lm_labels: tuple[str, ...] | None = None
    lm_templates: tuple[str, ...] | None = None
    lm_scoring: str = "likelihood"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if self.method not in DECODING_METHODS:
            raise ValueError(f"decoding method must be one of {DECODING_METHODS}, got {self.method!r}")
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise ValueError(f"num_captions {self.num_captions} exceeds num_beams {self.num_beams}")
        if not 0 < self.temperature < math.inf:  # NaN fails too: it would sample garbage or nothing
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0 or self.num_beams < 1:
            raise ValueError(f"top_k must be >= 0 and num_beams >= 1, got {self.top_k} and {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:  # 0 is not "the checkpoint's length"
            raise ValueError(f"max_new_tokens must be >= 1 (None: the checkpoint's), got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not -(2**63) <= self.seed < 2**63:  # what jax.random.PRNGKey takes
            raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**63), got {self.seed}")
        if self.classify is not None and self.classify not in CLASSIFIERS:
            raise ValueError(f"classify must be one of {CLASSIFIERS}, got {self.classify!r}")
        if self.lm_scoring not in LM_SCORINGS:
            raise ValueError(f"lm_scoring must be one of {LM_SCORINGS}, got {self.lm_scoring!r}")
        for name in ("lm_labels", "lm_templates"):
            object.__setattr__(self, name, as_tuple(getattr(self, name), name))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))  # once: a bad name fails here

    def generation_config(self, pipeline_config: Mapping[str, Any]) -> GenerationConfig:
        """The `GenerationConfig` of the decoding options for a pipeline checkpoint's config (its length and ids)."""
        sample = self.method == "sample"
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens or pipeline_config["max_new_tokens"],
            do_sample=sample,
            temperature=self.temperature,
            top_k=self.top_k if sample else 0,
            top_p=self.top_p if sample else 1.0,
            num_beams=self.num_beams if self.method == "beam" else 1,
            num_return_sequences=self.num_captions,
            eos_token_id=pipeline_config["eos_id"],
            pad_token_id=pipeline_config["pad_id"],
        )


def as_tuple(texts: Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    """A list of labels or templates as a tuple (None stays None); one string is refused, not split into letters."""
    if texts is None:
        return None
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, got the string {texts!r}")
    return tuple(texts)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a run goes, not how an image is captioned: left out of the run options, so a run may resume with others.

    workers: threads decoding image files; progress: a progress bar and messages on stderr; compilation_cache: a
    directory for JAX's persistent compilation cache (`imgllm.pipeline.batch.enable_compilation_cache`; None or "":
    JAX's settings are left alone; infer.py's default is DEFAULT_COMPILATION_CACHE); max_pixels: an image with more
    pixels than this (read from its header, before decoding) gets an error record instead of filling memory (None:
    no limit).
    """

    workers: int = 4
    progress: bool = False
    compilation_cache: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS


__all__ = ["DECODING_METHODS", "DEFAULT_COMPILATION_CACHE", "CaptionOptions", "RunSettings", "as_tuple"]
