"""The shared image → caption function: one jitted, data-parallel computation from uint8 pixels to caption ids.

    images uint8 [B,H,W,3] ─ resize (if needed), normalise ─ CNN → logits, features
        ├─ softmax → top-k label ids and probabilities
        │     └─ prompt token ids, assembled from precomputed token tables (gathered inside jit)
        └─ visual prefix (optional, when the parameters hold a "bridge") → prefix embeddings
              └─ generate_tokens (prefill + cached decode) → caption token ids

Text is handled outside jit, once: `tokenize_template` tokenises the template's literal pieces, every class
name and the percentages 0..100 into small padded tables before compilation; `decode_captions` turns ids into
strings after. Everything in between is `caption_images`, a pure function of (parameters, images, RNG key,
static `PipelineSpec`) that a researcher can `jax.jit`, `vmap` or shard; `make_captioner` jits it with the batch
split over a device mesh.

Prompt templates and their tables: `imgllm.pipeline.prompts`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imgllm import parallel
from imgllm.language.decoding import gather_prefilled, generate_tokens, prefill, sample_after_prefill
from imgllm.language.matmul_cpu import kernels_out_in
from imgllm.language.scoring import ClassPromptTable, classify_by_lm
from imgllm.pipeline.prompts import TokenizedTemplate, assemble_prompts, probability_percents
from imgllm.vision.features import image_logits_and_features, images_for_cnn

# ----------------------------------------------------------------------------------------------- the pipeline

CLASSIFIERS = ("cnn", "lm", "fused")  # PipelineSpec.classify
LM_SCORINGS = ("likelihood", "information_gain")  # PipelineSpec.lm_scoring


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything static about a caption pipeline (hashable: a static argument of `caption_images`).

    cnn: the classifier module (`imgllm.vision.cnn.CNN`); lm_config: the LM's config (`imgllm.language.model`); prompts:
    the tokenised template (`tokenize_template`); generation: a `GenerationConfig`; bridge: the visual-prefix module
    used when the parameters hold "bridge" (None otherwise); image_size: the CNN's input resolution (other sizes are
    resized inside jit); mean/std: per-channel normalisation as `imgllm.data.augment.normalize` takes it (None: its
    CIFAR-10 defaults); flip_tta: average the CNN's logits over the image and its mirror.

    Classification by the LM (needs a bridge): lm_class_prompts, the prompts of the CNN's own classes
    (`imgllm.language.scoring.build_prompt_table`; `PipelineCheckpoint.spec(lm_classify=True)` builds them from the
    checkpoint's class_prompt_templates); lm_label_prompts with lm_label_names, the prompts of any other label set
    chosen at inference (colours, sizes, ...); lm_scoring: "likelihood" (the prompts' log-likelihood after the
    image's prefix) or "information_gain" (minus their log-likelihood after the neutral prefix, the bridge's output
    for all-zero features: removes the LM's prior over the labels).
    classify: where the labels (and the caption prompt's {label}) come from: "cnn" (the head), "lm" (the LM's
    scores of lm_class_prompts) or "fused" (both, `class_log_probs`).
    Calibration (`imgllm.calibration`, fitted on a validation split): cnn_temperature and lm_temperature divide the
    CNN's logits and the LM's scores before their softmax; fusion_weight and fusion_temperature make the fused
    classifier softmax((log p_cnn + fusion_weight * log p_lm) / fusion_temperature). They are fitted on likelihood
    scores, so the labels of classify="lm"/"fused" always come from likelihood scores, and information-gain
    "lm_probs" are softmax(scores) with no temperature (`lm_probs_temperature`): none was fitted for them.
    """

    cnn: Any
    lm_config: Any
    prompts: TokenizedTemplate
    generation: Any
    pad_id: int
    image_size: int = 32
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bridge: Any = None
    flip_tta: bool = False
    lm_class_prompts: ClassPromptTable | None = None
    cnn_temperature: float = 1.0
    lm_label_prompts: ClassPromptTable | None = None
    lm_label_names: tuple[str, ...] | None = None
    lm_scoring: str = "likelihood"
    classify: str = "cnn"
    lm_temperature: float = 1.0
    fusion_weight: float = 0.0
    fusion_temperature: float = 1.0

    def __post_init__(self):
        if self.classify not in CLASSIFIERS:
            raise ValueError(f"classify must be one of {CLASSIFIERS}, got {self.classify!r}")
        if self.lm_scoring not in LM_SCORINGS:
            raise ValueError(f"lm_scoring must be one of {LM_SCORINGS}, got {self.lm_scoring!r}")
        if self.classify != "cnn" and self.lm_class_prompts is None:
            raise ValueError(f"classify={self.classify!r} needs lm_class_prompts (the CNN classes' prompts)")
        if (self.lm_label_prompts is None) != (self.lm_label_names is None) or (
            self.lm_label_prompts is not None and self.lm_label_prompts.num_classes != len(self.lm_label_names)
        ):
            raise ValueError("lm_label_prompts and lm_label_names go together, one prompt row per label name")
        for name in ("cnn_temperature", "lm_temperature", "fusion_temperature"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")

    @property
    def top_k(self) -> int:
        return self.prompts.top_k

    @property
    def lm_probs_temperature(self) -> float:
        """The temperature of "lm_probs": lm_temperature for likelihood scores (what it was fitted on), 1 for
        information gain (no temperature was fitted on those scores; the stored one would mislabel them calibrated)."""
        return self.lm_temperature if self.lm_scoring == "likelihood" else 1.0

    @property
    def scores_labels_by_lm(self) -> bool:
        """Whether the outputs hold the LM's label (lm_label_ids, lm_scores, lm_probs)."""
        return self.lm_label_prompts is not None or self.lm_class_prompts is not None


def preprocess(images: jax.Array, spec: PipelineSpec) -> jax.Array:
    """uint8 [B,H,W,3] → normalised float32 [B,S,S,3] at the CNN's resolution S (resized when H,W differ)."""
    return images_for_cnn(images, spec.image_size, spec.mean, spec.std)


def cnn_logits_and_features(
    cnn_variables: Mapping[str, Any], images: jax.Array, spec: PipelineSpec
) -> tuple[jax.Array, jax.Array]:
    """uint8 images → (logits [B, C] float32, the features the visual prefix reads [B, F]); with flip_tta the
    logits are averaged with the mirror's (`imgllm.vision.features.image_logits_and_features`)."""
    source = "pooled" if spec.bridge is None else spec.bridge.feature_source
    return image_logits_and_features(
        spec.cnn,
        cnn_variables,
        images,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
        feature_source=source,
        flip_tta=spec.flip_tta,
    )


def visual_prefix(params: Mapping[str, Any], features: jax.Array, spec: PipelineSpec) -> jax.Array | None:
    """Prefix embeddings [B, K, D] from the CNN features when the parameters hold a "bridge", else None."""
    if "bridge" not in params:
        return None
    bridge_params = params["bridge"]
    variables = bridge_params if "params" in bridge_params else {"params": bridge_params}
    return spec.bridge.apply(variables, features)


def lm_label_scores(
    params: Mapping[str, Any],
    features: jax.Array,
    prefix: jax.Array,
    table: ClassPromptTable,
    spec: PipelineSpec,
    scoring: str | None = None,
) -> jax.Array:
    """[B, L] scores of each label of `table` after each image's prefix: the prompts' log-likelihood, or with
    scoring (None: spec.lm_scoring) "information_gain" that minus their log-likelihood after the neutral prefix (the
    bridge's output for all-zero features), which removes what the LM prefers whatever the image."""
    scores = classify_by_lm(params["lm"], spec.lm_config, table, prefix)[1]
    if (scoring or spec.lm_scoring) == "information_gain":
        neutral = visual_prefix(params, jnp.zeros_like(features[:1]), spec)
        scores = scores - classify_by_lm(params["lm"], spec.lm_config, table, neutral)[1]
    return scores.astype(jnp.float32)


def lm_classify_images(params: Mapping[str, Any], images: jax.Array, *, spec: PipelineSpec) -> dict[str, jax.Array]:
    """uint8 images → the LM's labels without captioning: lm_label_ids [B], lm_scores [B, L], lm_probs [B, L] over
    spec.lm_label_prompts (else the CNN's classes, spec.lm_class_prompts), as `caption_images` returns them.
    Pure and jit-traceable (spec is static)."""
    table = spec.lm_label_prompts if spec.lm_label_prompts is not None else spec.lm_class_prompts
    if table is None or "bridge" not in params:
        raise ValueError(
            'lm_classify_images needs a visual prefix (params with a "bridge") and label prompts '
            "(PipelineSpec.lm_label_prompts or lm_class_prompts)"
        )
    _, features = cnn_logits_and_features(params["cnn"], images, spec)
    scores = lm_label_scores(params, features, visual_prefix(params, features, spec), table, spec)
    return dict(
        lm_label_ids=jnp.argmax(scores, axis=-1).astype(jnp.int32),
        lm_scores=scores,
        lm_probs=jax.nn.softmax(scores / spec.lm_probs_temperature, axis=-1),
    )


def class_log_probs(logits: jax.Array, lm_scores: jax.Array | None, spec: PipelineSpec) -> jax.Array:
    """[B, C] calibrated log-probabilities of the CNN's classes from the classifier spec.classify names:
    "cnn" log_softmax(logits / T_cnn), "lm" log_softmax(lm_scores / T_lm), "fused"
    log_softmax((log p_cnn + w * log p_lm) / T_fused) (`imgllm.calibration.fused_log_probs` on the host)."""
    cnn = jax.nn.log_softmax(logits.astype(jnp.float32) / spec.cnn_temperature, axis=-1)
    if spec.classify == "cnn":
        return cnn
    lm = jax.nn.log_softmax(lm_scores / spec.lm_temperature, axis=-1)
    if spec.classify == "lm":
        return lm
    return jax.nn.log_softmax((cnn + spec.fusion_weight * lm) / spec.fusion_temperature, axis=-1)


def caption_images(
    params: Mapping[str, Any], images: jax.Array, rng: jax.Array, *, spec: PipelineSpec
) -> dict[str, jax.Array]:
    """Images → labels, prompts and caption token ids; pure and jit-traceable (spec is static).

    params: {"cnn": CNN variables, "lm": the LM's params, "bridge": optional PrefixMapper params}.
    Returns (B images, k = top_k, n = num_return_sequences, T = max_new_tokens):
      logits [B, C] float32 (the CNN's), label_ids [B, k] int32, label_probs [B, k] float32 (descending,
      calibrated; from the classifier spec.classify names), prompt_ids / prompt_mask [B, P] int32 (left-padded),
      caption_ids [B, n, T] int32 (pad after EOS), caption_scores [B, n] float32 (each caption's summed token
      log-probability; for beam search the length-normalised beam score); when the LM scores labels
      (`PipelineSpec.scores_labels_by_lm`: over lm_label_prompts when given, else the CNN's classes)
      lm_label_ids [B] int32, lm_scores [B, L] and lm_probs [B, L] = softmax(lm_scores / lm_probs_temperature).
    The labels of classify="lm"/"fused" come from likelihood scores whatever spec.lm_scoring: the calibration that
    weighs them was fitted on those.
    """
    if "bridge" in params and spec.bridge is None:
        raise ValueError('pipeline params hold "bridge" but PipelineSpec.bridge (the PrefixMapper module) is None')
    if spec.scores_labels_by_lm and "bridge" not in params:
        raise ValueError(
            "LM classification (PipelineSpec.lm_class_prompts / lm_label_prompts) needs a visual prefix: "
            'params have no "bridge"'
        )
    logits, features = cnn_logits_and_features(params["cnn"], images, spec)
    prefix = visual_prefix(params, features, spec)
    class_scores = None
    own_classes_by_likelihood = spec.lm_label_prompts is None and spec.lm_scoring == "likelihood"
    if spec.lm_class_prompts is not None and (spec.classify != "cnn" or own_classes_by_likelihood):
        class_scores = lm_label_scores(params, features, prefix, spec.lm_class_prompts, spec, "likelihood")
    label_probs, label_ids = jax.lax.top_k(jnp.exp(class_log_probs(logits, class_scores, spec)), spec.top_k)
    prompt_ids, prompt_mask = assemble_prompts(spec.prompts, label_ids, probability_percents(label_probs), spec.pad_id)
    shared_prompts = prompts_are_per_class(
        spec, prefix is not None, num_classes=logits.shape[-1], batch=images.shape[0]
    )
    if shared_prompts and not spec.generation.do_sample:
        tokens, scores = _captions_per_class(params["lm"], spec, label_ids[:, 0], logits.shape[-1], rng)
    elif shared_prompts and spec.generation.num_beams == 1:
        tokens, scores = _sample_from_class_prefills(params["lm"], spec, label_ids[:, 0], logits.shape[-1], rng)
    else:
        tokens, scores = generate_tokens(
            params["lm"], spec.lm_config, prompt_ids, prompt_mask, rng, spec.generation, prefix_embeds=prefix
        )
    batch = images.shape[0]
    extra = {}
    if spec.scores_labels_by_lm:
        table = spec.lm_class_prompts if spec.lm_label_prompts is None else spec.lm_label_prompts
        lm_scores = (
            class_scores if own_classes_by_likelihood else lm_label_scores(params, features, prefix, table, spec)
        )
        extra = dict(
            lm_label_ids=jnp.argmax(lm_scores, axis=-1).astype(jnp.int32),
            lm_scores=lm_scores,
            lm_probs=jax.nn.softmax(lm_scores / spec.lm_probs_temperature, axis=-1),
        )
    return dict(
        **extra,
        logits=logits,
        label_ids=label_ids.astype(jnp.int32),
        label_probs=label_probs,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        caption_ids=tokens.reshape(batch, -1, tokens.shape[-1]).astype(jnp.int32),
        caption_scores=jnp.asarray(scores, jnp.float32).reshape(batch, -1),
    )


def prompts_are_per_class(spec: PipelineSpec, has_prefix: bool, *, num_classes: int, batch: int) -> bool:
    """Whether each image's LM input is one of `num_classes` class prompts, so the LM work per prompt can be shared.

    True with no visual prefix and a prompt that names only the top label (no lower-ranked label, no probability),
    when the batch holds more images than there are classes (the common case: a batch of 1024 CIFAR images has
    10 distinct prompts). Then greedy or beam captions are a function of the class: they are made once per class
    and gathered per image (`_captions_per_class`). Sampled captions differ per image, but the prompts' prefill
    (the LM pass over the prompt tokens) is still done once per class and gathered (`_sample_from_class_prefills`;
    beam sampling is not shared). Both give the same tokens as running every image's prompt.
    """
    label_only_prompt = all(
        piece.kind == "text" or (piece.kind == "label" and piece.rank == 0) for piece in spec.prompts.pieces
    )
    return not has_prefix and label_only_prompt and num_classes < batch


def _class_prompts(spec: PipelineSpec, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """The prompt ids and mask [C, P] of every class as the top label."""
    class_ids = jnp.arange(num_classes, dtype=jnp.int32)[:, None]
    return assemble_prompts(spec.prompts, class_ids, jnp.zeros_like(class_ids), spec.pad_id)


def _captions_per_class(
    lm_params: Any, spec: PipelineSpec, top_labels: jax.Array, num_classes: int, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Caption tokens [B * n, T] and scores [B * n] of deterministic decoding, made once per class prompt and
    gathered per image (see `prompts_are_per_class`)."""
    class_prompts, class_masks = _class_prompts(spec, num_classes)
    tokens, scores = generate_tokens(lm_params, spec.lm_config, class_prompts, class_masks, rng, spec.generation)
    per_class = tokens.shape[0] // num_classes  # num_return_sequences rows per prompt
    tokens = tokens.reshape(num_classes, per_class, -1)[top_labels]
    scores = jnp.asarray(scores).reshape(num_classes, per_class)[top_labels]
    return tokens.reshape(-1, tokens.shape[-1]), scores.reshape(-1)


def _sample_from_class_prefills(
    lm_params: Any, spec: PipelineSpec, top_labels: jax.Array, num_classes: int, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sampled caption tokens [B * n, T] and scores [B * n]: the class prompts are prefilled once, gathered per
    image, then every image samples its own caption (see `prompts_are_per_class`)."""
    class_prompts, class_masks = _class_prompts(spec, num_classes)
    prefilled = prefill(lm_params, spec.lm_config, class_prompts, class_masks, spec.generation.max_new_tokens)
    return sample_after_prefill(
        lm_params, spec.lm_config, gather_prefilled(prefilled, top_labels), rng, spec.generation
    )


def make_captioner(spec: PipelineSpec, mesh=None) -> Callable[[Any, Any, jax.Array], dict[str, jax.Array]]:
    """`caption_images` jitted for `spec`, batch split over the mesh's 'data' axis, parameters replicated.

    The returned function takes (params, images, rng); the batch must be a multiple of the device count
    (`imgllm.parallel.global_batch_divisor`). It compiles once per image shape, and the same (spec, mesh) gives
    the same function (`COMPILED`), so repeated calls (and repeated infer runs in one process) reuse its compilations.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    return COMPILED.get(("captioner", spec, mesh), lambda: _jit_captioner(spec, mesh))


def _jit_captioner(spec: PipelineSpec, mesh) -> Callable[[Any, Any, jax.Array], dict[str, jax.Array]]:
    data, replicated = parallel.data_sharding(mesh), parallel.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(caption_images, spec=spec), in_shardings=(replicated, data, replicated), out_shardings=data
    )


def compile_captioner(spec: PipelineSpec, mesh, params_shapes: Any, batch_size: int, image_size: int | None = None):
    """Ahead-of-time compiled captioner for parameter *shapes* (ShapeDtypeStructs) and a batch of uint8 images.

    Compiling needs no weights, so a caller can compile while the weights are still being read (infer.py does).
    Call the result as compiled(params, images, rng) with params placed by `place_params` and images by
    `place_images`. Cached per (spec, mesh, shapes) in `COMPILED`, like `make_captioner`.
    """
    leaves, treedef = jax.tree.flatten(params_shapes)
    size = int(image_size or spec.image_size)
    key = (
        "compiled captioner",
        spec,
        mesh,
        treedef,
        tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves),
        int(batch_size),
        size,
    )

    def compile_now():
        replicated = parallel.replicated_sharding(mesh)
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params_shapes
        )
        images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=parallel.data_sharding(mesh))
        rng = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32, sharding=replicated)
        return _jit_captioner(spec, mesh).lower(abstract_params, images, rng).compile()

    return COMPILED.get(key, compile_now)


class CompiledCache:
    """Compiled (or jitted) functions by key, at most `size` of them: past that the least recently used is dropped,
    and its programs are freed once nothing else holds them. One cache, `COMPILED`, serves `make_captioner`,
    `compile_captioner` and `imgllm.pipeline.classify`, so a process that captions with many specs (a notebook, a
    test session) holds a bounded number of programs; a key starts with what made the function."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"the cache size must be >= 1, got {size}")
        self.size = size
        self._entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The function under `key`; when absent, make() makes it (outside the lock: compiling takes seconds)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


COMPILED = CompiledCache(size=32)  # every compiled captioner and LM classifier of this process


def inference_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Pipeline params as captioning reads them fastest: on CPU the LM's block kernels in the [out, in] layout
    (`imgllm.language.matmul_cpu.kernels_out_in`). Convert once after loading; works on ShapeDtypeStructs through
    ``jax.eval_shape``. The captions are the same either way."""
    if jax.default_backend() != "cpu":
        return dict(params)
    return {**params, "lm": kernels_out_in(params["lm"])}


def place_params(params: Any, mesh) -> Any:
    """The parameters replicated on every device of the mesh."""
    return jax.device_put(params, parallel.replicated_sharding(mesh))


def place_images(images: np.ndarray, mesh) -> jax.Array:
    """A batch of images split over the mesh's 'data' axis."""
    return jax.device_put(images, parallel.data_sharding(mesh))


# ----------------------------------------------------------------------------------------------- after jit


def caption_token_lists(caption_ids: np.ndarray, eos_id: int, pad_id: int) -> list[list[list[int]]]:
    """[B, n, T] ids → per image, per caption, the ids before the first EOS (pad ids dropped)."""
    result = []
    for image in np.asarray(caption_ids):
        captions = []
        for row in image:
            row = row.tolist()
            if eos_id in row:
                row = row[: row.index(eos_id)]
            captions.append([t for t in row if t != pad_id])
        result.append(captions)
    return result


def decode_captions(
    decode: Callable[[Sequence[int]], str], caption_ids: np.ndarray, eos_id: int, pad_id: int
) -> list[list[str]]:
    """Caption ids [B, n, T] → strings (per image, n captions), cut at EOS, whitespace-stripped."""
    return [[decode(ids).strip() for ids in captions] for captions in caption_token_lists(caption_ids, eos_id, pad_id)]


__all__ = [
    "CLASSIFIERS",
    "COMPILED",
    "CompiledCache",
    "LM_SCORINGS",
    "PipelineSpec",
    "caption_images",
    "caption_token_lists",
    "class_log_probs",
    "cnn_logits_and_features",
    "compile_captioner",
    "lm_classify_images",
    "lm_label_scores",
    "decode_captions",
    "inference_params",
    "make_captioner",
    "place_images",
    "place_params",
    "preprocess",
    "visual_prefix",
]
