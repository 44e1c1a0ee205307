"""The shared image → caption function: one jitted, data-parallel computation from uint8 pixels to caption ids.

    images uint8 [B,H,W,3] ─ resize (if needed), normalise ─ CNN → logits, features
        ├─ softmax → top-k label ids and probabilities
        │     └─ prompt token ids, assembled from precomputed token tables (gathered inside jit)
        └─ visual prefix (optional, when the parameters hold a "bridge") → prefix embeddings
              └─ generate_tokens (prefill + cached decode) → caption token ids

Text is handled outside jit, once: `build_prompt_tables` tokenises the template's literal pieces, every class
name and the percentages 0..100 into small padded tables before compilation; `decode_captions` turns ids into
strings after. Everything in between is `caption_images`, a pure function of (parameters, images, RNG key,
static `PipelineSpec`) that a researcher can `jax.jit`, `vmap` or shard; `make_captioner` jits it with the batch
split over a device mesh.

Prompt templates use slots: ``{label}``/``{labelN}`` (the N-th most probable class name, N = 1..top_k),
``{prob}``/``{probN}`` (its probability as a whole percentage) and ``{topk}`` (shorthand for
``{label1} ({prob1}%), {label2} ({prob2}%), ...`` over all top_k labels); ``{{``/``}}`` are literal braces.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TEMPLATE = "A photo of a {label}."

# Percentages are phrased as whole numbers 0..100; their token ids come from one table of 101 rows.
_PERCENT_VALUES = 101
_SLOT = re.compile(r"^(label|prob)(\d*)$")


# ----------------------------------------------------------------------------------------------- prompt tables


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """Token ids of a list of strings, right-padded: ids[i][:lengths[i]] tokenises string i.

    Tuples, not arrays, so that a `PipelineSpec` holding tables stays hashable (a static jit argument).
    """

    ids: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]

    @property
    def width(self) -> int:
        return len(self.ids[0])


@dataclasses.dataclass(frozen=True)
class PromptPiece:
    """One piece of a template: literal token ids (kind "text"), or a slot filled per image from a table.

    kind "label" takes row `topk_ids[:, rank]` of `tables[table]`; kind "prob" takes row `percent[:, rank]`.
    """

    kind: str
    ids: tuple[int, ...] = ()
    rank: int = 0
    table: int = 0


@dataclasses.dataclass(frozen=True)
class PromptTables:
    """A tokenised template: the pieces in order and the tables their slots select rows from."""

    template: str
    pieces: tuple[PromptPiece, ...]
    tables: tuple[TokenTable, ...]
    num_classes: int
    top_k: int

    @property
    def width(self) -> int:
        """Static prompt length (the longest possible prompt; shorter ones are left-padded to it)."""
        return sum(len(p.ids) if p.kind == "text" else self.tables[p.table].width for p in self.pieces)


def expand_template(template: str, top_k: int) -> str:
    """Replaces the ``{topk}`` shorthand by explicit ``{labelN} ({probN}%)`` slots joined with ", "."""
    listing = ", ".join(f"{{label{n}}} ({{prob{n}}}%)" for n in range(1, top_k + 1))
    return template.replace("{topk}", listing)


def parse_template(template: str, top_k: int) -> list[tuple[str, Any]]:
    """Splits a template into [("text", str) | ("label", rank) | ("prob", rank)], ranks counted from 0.

    Raises ValueError naming the template and the slot when a slot is unknown or asks for a rank above top_k.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    parts: list[tuple[str, Any]] = []
    for literal, field, spec, conversion in string.Formatter().parse(expand_template(template, top_k)):
        if literal:
            parts.append(("text", literal))
        if field is None:
            continue
        match = _SLOT.match(field)
        if match is None or spec or conversion:
            raise ValueError(f"prompt template {template!r}: unknown slot {{{field}}}; use {{label}}, {{labelN}}, "
                             "{prob}, {probN} or {topk}")
        rank = int(match.group(2) or 1) - 1
        if not 0 <= rank < top_k:
            raise ValueError(f"prompt template {template!r}: slot {{{field}}} needs top_k >= {rank + 1}, "
                             f"but top_k={top_k}")
        parts.append((match.group(1), rank))
    if not parts:
        raise ValueError("prompt template is empty; the language model needs at least one prompt token")
    return parts


def token_table(encode: Callable[[str], Sequence[int]], texts: Sequence[str], pad_id: int) -> TokenTable:
    """Tokenises every text once into a right-padded table (pad_id fills, lengths say what is real)."""
    rows = [tuple(int(i) for i in encode(text)) for text in texts]
    empty = [text for text, row in zip(texts, rows) if not row]
    if empty:
        raise ValueError(f"these prompt values tokenise to nothing: {empty[:5]}")
    width = max(len(row) for row in rows)
    return TokenTable(ids=tuple(row + (pad_id,) * (width - len(row)) for row in rows),
                      lengths=tuple(len(row) for row in rows))


def build_prompt_tables(encode: Callable[[str], Sequence[int]], template: str, class_names: Sequence[str],
                        top_k: int, pad_id: int, *, bos_id: int | None = None) -> PromptTables:
    """Tokenises a template's pieces once: literal segments, class names and percentages.

    Byte-level BPE (GPT-2) attaches a space to the word after it (" cat" is one token, "cat" another), and its
    pre-tokeniser never merges across a space or punctuation boundary. So a space just before a slot moves into
    the slot's values (the table of " cat", " dog", ...), and tokenising the pieces separately gives the same ids
    as tokenising the whole filled-in prompt. `encode` maps a string to ids without special tokens.
    bos_id: start every prompt with this token (the visual-prefix convention: [prefix][BOS][text]); the
    template may then be empty.
    """
    if not class_names:
        raise ValueError("build_prompt_tables needs at least one class name")
    if top_k > len(class_names):
        raise ValueError(f"top_k={top_k} exceeds the number of classes ({len(class_names)})")
    values = {"label": list(class_names), "prob": [str(n) for n in range(_PERCENT_VALUES)]}
    tables: list[TokenTable] = []
    table_index: dict[tuple[str, str], int] = {}
    pieces = [PromptPiece("text", ids=(int(bos_id),))] if bos_id is not None else []
    parts = parse_template(template, top_k) if template or bos_id is None else []
    for position, (kind, value) in enumerate(parts):
        if kind == "text":
            followed_by_slot = position + 1 < len(parts) and parts[position + 1][0] != "text"
            text = value[:-1] if followed_by_slot and value.endswith(" ") else value
            if text:
                pieces.append(PromptPiece("text", ids=tuple(int(i) for i in encode(text))))
            continue
        previous = parts[position - 1] if position else None
        space = " " if previous is not None and previous[0] == "text" and previous[1].endswith(" ") else ""
        if (kind, space) not in table_index:
            table_index[kind, space] = len(tables)
            tables.append(token_table(encode, [space + v for v in values[kind]], pad_id))
        pieces.append(PromptPiece(kind, rank=value, table=table_index[kind, space]))
    return PromptTables(template=template, pieces=tuple(pieces), tables=tuple(tables),
                        num_classes=len(class_names), top_k=top_k)


def fill_template(template: str, labels: Sequence[str], percents: Sequence[int]) -> str:
    """The prompt string for one image (what `assemble_prompts` builds as ids); for checks and display."""
    top_k = len(labels)
    values = {f"label{n + 1}": labels[n] for n in range(top_k)}
    values.update({f"prob{n + 1}": str(int(percents[n])) for n in range(top_k)})
    values.update(label=labels[0], prob=str(int(percents[0])))
    return expand_template(template, top_k).format(**values)


def probability_percents(probs: jax.Array) -> jax.Array:
    """Probabilities in [0, 1] → whole percentages 0..100 (int32), rounded to nearest."""
    return jnp.clip(jnp.round(probs * 100.0), 0, _PERCENT_VALUES - 1).astype(jnp.int32)


def assemble_prompts(tables: PromptTables, topk_ids: jax.Array, percents: jax.Array,
                     pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Builds left-padded prompt ids and mask [B, P] from the tables, inside jit.

    Each piece contributes a fixed-width block (a literal, or the selected table row with its padding marked
    invalid); concatenating the blocks gives the prompt with holes. A stable sort on the validity bit then moves
    the holes to the left while keeping the real tokens in order: the left-padded prompt generation expects.
    """
    batch = topk_ids.shape[0]
    blocks, valid = [], []
    for piece in tables.pieces:
        if piece.kind == "text":
            blocks.append(jnp.broadcast_to(jnp.asarray(piece.ids, jnp.int32), (batch, len(piece.ids))))
            valid.append(jnp.ones((batch, len(piece.ids)), bool))
            continue
        table = tables.tables[piece.table]
        rows = (topk_ids if piece.kind == "label" else percents)[:, piece.rank]
        blocks.append(jnp.asarray(table.ids, jnp.int32)[rows])
        lengths = jnp.asarray(table.lengths, jnp.int32)[rows]
        valid.append(jnp.arange(table.width)[None, :] < lengths[:, None])
    ids, valid = jnp.concatenate(blocks, axis=1), jnp.concatenate(valid, axis=1)
    order = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)
    ids = jnp.take_along_axis(ids, order, axis=1)
    mask = jnp.take_along_axis(valid, order, axis=1)
    return jnp.where(mask, ids, pad_id).astype(jnp.int32), mask.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class LMClassPrompts:
    """`imgllm.scoring.PromptTable` as nested tuples (hashable, so it can live in the static spec).

    With it, the pipeline also classifies each image by the LM: the class whose prompts are most likely after the
    image's visual prefix (`imgllm.scoring.classify_by_lm`), reported beside the CNN's labels.
    """

    input_ids: tuple
    target_mask: tuple

    @classmethod
    def from_table(cls, table) -> "LMClassPrompts":
        return cls(input_ids=_nested_tuple(np.asarray(table.input_ids)),
                   target_mask=_nested_tuple(np.asarray(table.target_mask)))

    def to_table(self):
        from imgllm.scoring import PromptTable

        return PromptTable(input_ids=jnp.asarray(self.input_ids, jnp.int32),
                           target_mask=jnp.asarray(self.target_mask, jnp.float32))


def _nested_tuple(array: np.ndarray):
    return tuple(_nested_tuple(row) for row in array) if array.ndim > 1 else tuple(array.tolist())


# ----------------------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything static about a caption pipeline (hashable: a static argument of `caption_images`).

    cnn: the classifier module (`imgllm.models.cnn.CNN`); lm_config: the `GPT2Config`; prompts: the tokenised
    template (`build_prompt_tables`); generation: a `GenerationConfig`; bridge: the visual-prefix module used
    when the parameters hold "bridge" (None otherwise); image_size: the CNN's input resolution (other sizes are
    resized inside jit); mean/std: per-channel normalisation as `imgllm.data.augment.normalize` takes it (None:
    its CIFAR-10 defaults); flip_tta: average the CNN's logits over the image and its mirror; lm_class_prompts:
    also classify by LM likelihood after the visual prefix (needs a bridge).
    """

    cnn: Any
    lm_config: Any
    prompts: PromptTables
    generation: Any
    pad_id: int
    image_size: int = 32
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bridge: Any = None
    flip_tta: bool = False
    lm_class_prompts: LMClassPrompts | None = None

    @property
    def top_k(self) -> int:
        return self.prompts.top_k


def preprocess(images: jax.Array, spec: PipelineSpec) -> jax.Array:
    """uint8 [B,H,W,3] → normalised float32 [B,S,S,3] at the CNN's resolution S (resized when H,W differ)."""
    from imgllm.data import augment

    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
    size = spec.image_size
    if images.shape[1:3] != (size, size):
        resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, 3), "linear")
        images = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    kwargs = {} if spec.mean is None else dict(mean=spec.mean, std=spec.std)
    return augment.normalize(images, **kwargs)


def classify(cnn_variables: Mapping[str, Any], images: jax.Array, spec: PipelineSpec) -> tuple[jax.Array, jax.Array]:
    """CNN inference: (logits [B, C] float32, features [B, F]); with flip_tta, logits averaged with the mirror."""
    from imgllm.models.bridge import cnn_outputs

    x = preprocess(images, spec)
    source = "pooled" if spec.bridge is None else spec.bridge.feature_source   # what the visual prefix reads
    logits, features = cnn_outputs(spec.cnn, cnn_variables, x, source)
    if spec.flip_tta:
        mirrored, _ = spec.cnn.apply(cnn_variables, x[:, :, ::-1, :], train=False)
        logits = (logits + mirrored) / 2
    return logits.astype(jnp.float32), features


def visual_prefix(params: Mapping[str, Any], features: jax.Array, spec: PipelineSpec) -> jax.Array | None:
    """Prefix embeddings [B, K, D] from the CNN features when the parameters hold a "bridge", else None."""
    if "bridge" not in params:
        return None
    bridge_params = params["bridge"]
    variables = bridge_params if "params" in bridge_params else {"params": bridge_params}
    return spec.bridge.apply(variables, features)


def caption_images(params: Mapping[str, Any], images: jax.Array, rng: jax.Array, *,
                   spec: PipelineSpec) -> dict[str, jax.Array]:
    """Images → labels, prompts and caption token ids; pure and jit-traceable (spec is static).

    params: {"cnn": CNN variables, "lm": GPT-2 params, "bridge": optional PrefixMapper params}.
    Returns (B images, k = top_k, n = num_return_sequences, T = max_new_tokens):
      logits [B, C] float32, label_ids [B, k] int32, label_probs [B, k] float32 (descending),
      prompt_ids / prompt_mask [B, P] int32 (left-padded), caption_ids [B, n, T] int32 (pad after EOS),
      caption_scores [B, n] float32; with spec.lm_class_prompts also lm_label_ids [B] and lm_scores [B, C].
    """
    from imgllm.generate import generate_tokens

    if "bridge" in params and spec.bridge is None:
        raise ValueError('pipeline params hold "bridge" but PipelineSpec.bridge (the PrefixMapper module) is None')
    if spec.lm_class_prompts is not None and "bridge" not in params:
        raise ValueError("LM classification (PipelineSpec.lm_class_prompts) needs a visual prefix: params have no "
                         '"bridge"')
    logits, features = classify(params["cnn"], images, spec)
    probs = jax.nn.softmax(logits, axis=-1)
    label_probs, label_ids = jax.lax.top_k(probs, spec.top_k)
    prompt_ids, prompt_mask = assemble_prompts(spec.prompts, label_ids, probability_percents(label_probs),
                                               spec.pad_id)
    prefix = visual_prefix(params, features, spec)
    shared_prompts = prompts_are_per_class(spec, prefix is not None, num_classes=logits.shape[-1],
                                           batch=images.shape[0])
    if shared_prompts and not spec.generation.do_sample:
        tokens, scores = _captions_per_class(params["lm"], spec, label_ids[:, 0], logits.shape[-1], rng)
    elif shared_prompts and spec.generation.num_beams == 1:
        tokens, scores = _sample_from_class_prefills(params["lm"], spec, label_ids[:, 0], logits.shape[-1], rng)
    else:
        tokens, scores = generate_tokens(params["lm"], spec.lm_config, prompt_ids, prompt_mask, rng,
                                         spec.generation, prefix_embeds=prefix)
    batch = images.shape[0]
    extra = {}
    if spec.lm_class_prompts is not None:
        from imgllm.scoring import classify_by_lm

        lm_label_ids, lm_scores = classify_by_lm(params["lm"], spec.lm_config, spec.lm_class_prompts.to_table(),
                                                 prefix)
        extra = dict(lm_label_ids=lm_label_ids.astype(jnp.int32), lm_scores=lm_scores.astype(jnp.float32))
    return dict(**extra, logits=logits, label_ids=label_ids.astype(jnp.int32), label_probs=label_probs,
                prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                caption_ids=tokens.reshape(batch, -1, tokens.shape[-1]).astype(jnp.int32),
                caption_scores=jnp.asarray(scores, jnp.float32).reshape(batch, -1))


def prompts_are_per_class(spec: PipelineSpec, has_prefix: bool, *, num_classes: int, batch: int) -> bool:
    """Whether each image's LM input is one of `num_classes` class prompts, so the LM work per prompt can be shared.

    True with no visual prefix and a prompt that names only the top label (no lower-ranked label, no probability),
    when the batch holds more images than there are classes (the common case: a batch of 1024 CIFAR images has
    10 distinct prompts). Then greedy or beam captions are a function of the class: they are made once per class
    and gathered per image (`_captions_per_class`). Sampled captions differ per image, but the prompts' prefill
    (the LM pass over the prompt tokens) is still done once per class and gathered (`_sample_from_class_prefills`;
    beam sampling is not shared). Both give the same tokens as running every image's prompt.
    """
    label_only_prompt = all(piece.kind == "text" or (piece.kind == "label" and piece.rank == 0)
                            for piece in spec.prompts.pieces)
    return not has_prefix and label_only_prompt and num_classes < batch


def _class_prompts(spec: PipelineSpec, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """The prompt ids and mask [C, P] of every class as the top label."""
    class_ids = jnp.arange(num_classes, dtype=jnp.int32)[:, None]
    return assemble_prompts(spec.prompts, class_ids, jnp.zeros_like(class_ids), spec.pad_id)


def _captions_per_class(lm_params: Any, spec: PipelineSpec, top_labels: jax.Array, num_classes: int,
                        rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Caption tokens [B * n, T] and scores [B * n] of deterministic decoding, made once per class prompt and
    gathered per image (see `prompts_are_per_class`)."""
    from imgllm.generate import generate_tokens

    class_prompts, class_masks = _class_prompts(spec, num_classes)
    tokens, scores = generate_tokens(lm_params, spec.lm_config, class_prompts, class_masks, rng, spec.generation)
    per_class = tokens.shape[0] // num_classes            # num_return_sequences rows per prompt
    tokens = tokens.reshape(num_classes, per_class, -1)[top_labels]
    scores = jnp.asarray(scores).reshape(num_classes, per_class)[top_labels]
    return tokens.reshape(-1, tokens.shape[-1]), scores.reshape(-1)


def _sample_from_class_prefills(lm_params: Any, spec: PipelineSpec, top_labels: jax.Array, num_classes: int,
                                rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sampled caption tokens [B * n, T] and scores [B * n]: the class prompts are prefilled once, gathered per
    image, then every image samples its own caption (see `prompts_are_per_class`)."""
    from imgllm.generate import gather_prefilled, prefill, sample_after_prefill

    class_prompts, class_masks = _class_prompts(spec, num_classes)
    prefilled = prefill(lm_params, spec.lm_config, class_prompts, class_masks, spec.generation.max_new_tokens)
    return sample_after_prefill(lm_params, spec.lm_config, gather_prefilled(prefilled, top_labels), rng,
                                spec.generation)


def make_captioner(spec: PipelineSpec, mesh=None) -> Callable[[Any, Any, jax.Array], dict[str, jax.Array]]:
    """`caption_images` jitted for `spec`, batch split over the mesh's 'data' axis, parameters replicated.

    The returned function takes (params, images, rng); the batch must be a multiple of the device count
    (`imgllm.parallel.global_batch_divisor`). It compiles once per image shape, and the same (spec, mesh) gives
    the same function, so repeated calls (and repeated infer runs in one process) reuse its compilations.
    """
    from imgllm import parallel

    return _jitted_captioner(spec, parallel.make_mesh() if mesh is None else mesh)


@functools.lru_cache(maxsize=8)
def _jitted_captioner(spec: PipelineSpec, mesh) -> Callable[[Any, Any, jax.Array], dict[str, jax.Array]]:
    from imgllm import parallel

    data, replicated = parallel.data_sharding(mesh), parallel.replicated_sharding(mesh)
    return jax.jit(functools.partial(caption_images, spec=spec), in_shardings=(replicated, data, replicated),
                   out_shardings=data)


def compile_captioner(spec: PipelineSpec, mesh, params_shapes: Any, batch_size: int, image_size: int | None = None):
    """Ahead-of-time compiled captioner for parameter *shapes* (ShapeDtypeStructs) and a batch of uint8 images.

    Compiling needs no weights, so a caller can compile while the weights are still being read (infer.py does).
    Call the result as compiled(params, images, rng) with params placed by `place_params` and images by
    `place_images`. Cached per (spec, mesh, shapes), like `make_captioner`.
    """
    leaves, treedef = jax.tree.flatten(params_shapes)
    key = (spec, mesh, treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves), int(batch_size),
           int(image_size or spec.image_size))
    if key not in _COMPILED:
        from imgllm import parallel

        replicated = parallel.replicated_sharding(mesh)
        size = image_size or spec.image_size
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                       params_shapes)
        images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=parallel.data_sharding(mesh))
        rng = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32, sharding=replicated)
        _COMPILED[key] = make_captioner(spec, mesh).lower(abstract_params, images, rng).compile()
    return _COMPILED[key]


_COMPILED: dict[Any, Any] = {}


def inference_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Pipeline params as captioning reads them fastest: on CPU the LM's block kernels in the [out, in] layout
    (`imgllm.models.lm.kernels_out_in`). Convert once after loading; works on ShapeDtypeStructs through
    ``jax.eval_shape``. The captions are the same either way."""
    if jax.default_backend() != "cpu":
        return dict(params)
    from imgllm.models.lm import kernels_out_in

    return {**params, "lm": kernels_out_in(params["lm"])}


def place_params(params: Any, mesh) -> Any:
    """The parameters replicated on every device of the mesh."""
    from imgllm import parallel

    return jax.device_put(params, parallel.replicated_sharding(mesh))


def place_images(images: np.ndarray, mesh) -> jax.Array:
    """A batch of images split over the mesh's 'data' axis."""
    from imgllm import parallel

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
                row = row[:row.index(eos_id)]
            captions.append([t for t in row if t != pad_id])
        result.append(captions)
    return result


def decode_captions(decode: Callable[[Sequence[int]], str], caption_ids: np.ndarray, eos_id: int,
                    pad_id: int) -> list[list[str]]:
    """Caption ids [B, n, T] → strings (per image, n captions), cut at EOS, whitespace-stripped."""
    return [[decode(ids).strip() for ids in captions]
            for captions in caption_token_lists(caption_ids, eos_id, pad_id)]


__all__ = [
    "DEFAULT_TEMPLATE", "LMClassPrompts", "PipelineSpec", "PromptPiece", "PromptTables", "TokenTable",
    "assemble_prompts", "build_prompt_tables", "caption_images", "caption_token_lists", "classify",
    "compile_captioner", "decode_captions", "expand_template", "fill_template", "make_captioner", "parse_template",
    "place_images", "place_params", "preprocess", "probability_percents", "token_table", "visual_prefix",
]
