"""The pipeline checkpoint format: one directory with everything caption inference needs, and its loader.

A pipeline checkpoint is an orbax `CompositeCheckpointHandler` directory (items saved with orbax's
`Checkpointer`, not a `CheckpointManager`, so there are no step subdirectories):

    <dir>/params/           orbax StandardSave (an OCDBT array store) of the parameter tree
                              "cnn":    the CNN's variables ({"params", "batch_stats"}), applied by
                                        `imgllm.vision.cnn.cnn_from_config(config["cnn"])`
                              "lm":     the LM's parameters (`imgllm.language.gpt2` or `.llama`, kernels [in, out])
                              "bridge": PrefixMapper parameters; present exactly when config["bridge"] is not None
    <dir>/config/metadata   orbax JsonSave: the config dict below, as JSON (`make_pipeline_config` makes and checks it)
    <dir>/tokenizer/        the tokenizer's files as `save_pretrained` writes them; tokenizer.json (a fast tokenizer)
                            is required: inference reads it with the `tokenizers` library, not transformers
    (plus orbax's bookkeeping: _CHECKPOINT_METADATA and commit_success.txt files)

Config keys:

    format             "imgllm-pipeline/2" (FORMAT); "imgllm-pipeline/1" (made before the Llama family, its LM always
                       GPT-2) is read as well; another value is refused
    cnn                the CNN config: {"preset": name in `imgllm.vision.cnn.PRESETS`, other CNN fields that override
                       the preset's, e.g. "num_classes", "conv_impl"}; no "dtype": the compute dtype is chosen when
                       the checkpoint is used (`PipelineCheckpoint.spec(dtype=)`), and the parameters are float32
    lm                 the LM's config as Hugging Face's config.json keys (`config.to_dict()`); its "model_type"
                       ("gpt2", "llama", "mistral", "qwen2") chooses the model (`language.model.config_from_dict`)
    bridge             None (the prompt alone conditions the LM), or the PrefixMapper fields {"prefix_length",
                       "lm_dim", "hidden", "feature_source"}: the CNN features become a visual prefix
    class_names        the CNN's classes, in logit order (unique strings)
    template           the default caption prompt template (`imgllm.pipeline.prompts`: {label}, {labelN}, {prob},
                       {probN}, {topk}); "" with prepend_bos: the prompt is [BOS] alone (a captioner's)
    top_k              the default number of labels per image (and the slots the template may use)
    image_size         the CNN's input resolution S; images of other sizes are resized to S x S inside jit
    mean, std          per-channel normalisation of pixels in [0, 1] (`imgllm.data.augment.normalize`); both None:
                       CIFAR-10's
    eos_id, pad_id     the tokenizer's end-of-text and padding ids (captions stop at EOS, pad after it)
    bos_id             the beginning-of-text id (GPT-2: the same <|endoftext|> as eos_id), or None
    prepend_bos        start every prompt with bos_id (the visual-prefix convention [prefix][BOS][text])
    max_new_tokens     the default caption length in tokens
    class_prompt_templates
                       None, or the templates ("a photo of a {label}." ...) whose likelihood after the visual
                       prefix classifies an image by the LM (`imgllm.language.scoring`); a captioner's export
                       stores the templates it was trained with. `PipelineCheckpoint.spec(lm_classify=True)`
                       scores these (scoring.DEFAULT_TEMPLATES when None or absent, as in older checkpoints)
    cnn_temperature    the CNN head's temperature, fitted on the classifier run's validation split
                       (`imgllm.calibration`): records' label probabilities and the prompt's {prob} slots are
                       softmax(logits / T) (1 when absent)
    lm_temperature     the temperature of the LM's class scores, fitted on the captioner's validation split (1 when
                       absent): records' "lm_probs" are softmax(scores / T)
    fusion_weight, fusion_temperature
                       the fused classifier softmax((log p_cnn + w * log p_lm) / T_fused), fitted on the same split
                       (`imgllm.pipeline.caption.class_log_probs`; 0 and 1 when absent)
    classify           the default source of the labels: "cnn", "lm" or "fused" ("cnn" when absent; "lm" and
                       "fused" need a bridge)
    train_flip         how the CNN's training mirrored images: "random", "alternating", "none", or None (not
                       recorded: older checkpoints). With "none" (labels may depend on left and right, as the demo's
                       do) flip test-time augmentation is refused (`PipelineCheckpoint.spec(flip_tta=True)`)

Floating-point parameters are stored as float32 whatever dtype the run that made them computed in, so one checkpoint
serves float32 and bfloat16 inference (`PipelineCheckpoint.spec(dtype=)`, `imgllm.precision`).

`imgllm.train.export` writes one from training runs (a classifier and a GPT-2, or a captioner);
`load_pipeline` reads it back as a `PipelineCheckpoint` that makes the `PipelineSpec` for given captioning options.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tokenizers

from imgllm.bridge import PrefixMapper
from imgllm.language.decoding import GenerationConfig
from imgllm.language.model import abstract_params, config_from_dict
from imgllm.language.scoring import DEFAULT_TEMPLATES, ClassPromptTable, build_prompt_table, fill_templates
from imgllm.pipeline import caption, prompts
from imgllm.pipeline.options import CaptionOptions
from imgllm.precision import compute_dtype, resolve_dtype
from imgllm.vision.cnn import cnn_from_config

FORMAT = "imgllm-pipeline/2"
# Formats this version reads: /1 (GPT-2 only; its "lm" is a GPT-2 config.json) and /2.
READABLE_FORMATS = ("imgllm-pipeline/1", FORMAT)
PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_FAMILY = "imgllm-pipeline/"  # every version of the format starts so: what `is_pipeline_checkpoint` recognises
# What a pipeline checkpoint folder holds: its items and orbax's bookkeeping files.
CARD_FILE = "README.md"  # the model card (imgllm.train.model_card): what made the checkpoint, its scores
CHECKPOINT_ENTRIES = frozenset(
    {PARAMS_ITEM, CONFIG_ITEM, TOKENIZER_DIR, CARD_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"}
)
# The most class-prompt templates scored: every image scores every class under every template at once, so 2,000
# templates would ask for tens of GB. A mixture of a few dozen gains nothing more (CLIP's ImageNet set has 80).
MAX_CLASS_PROMPT_TEMPLATES = 64
TRAIN_FLIPS = ("random", "alternating", "none")  # the classifier's augment.flip settings


# ----------------------------------------------------------------------------------------------- config


def make_pipeline_config(
    *,
    cnn: Mapping[str, Any],
    lm: Mapping[str, Any],
    class_names: Sequence[str],
    eos_id: int,
    pad_id: int,
    bos_id: int | None = None,
    bridge: Mapping[str, Any] | None = None,
    template: str = prompts.DEFAULT_TEMPLATE,
    top_k: int = 1,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    prepend_bos: bool = False,
    max_new_tokens: int = 20,
    class_prompt_templates: Sequence[str] | None = None,
    cnn_temperature: float = 1.0,
    lm_temperature: float = 1.0,
    fusion_weight: float = 0.0,
    fusion_temperature: float = 1.0,
    classify: str = "cnn",
    train_flip: str | None = None,
) -> dict[str, Any]:
    """The JSON config of a pipeline checkpoint, checked (a wrong value is named here, not at inference).

    It takes the config's keys as keywords, one each and described in the module docstring: grouping them would only
    move them, and callers pass them by name (or a saved config's keys back). A "dtype" in `cnn` (the compute dtype
    of the run it comes from) is dropped: inference chooses its own. train_flip None: not known.
    """
    fields = _checked_arguments(
        dict(
            cnn=cnn,
            lm=lm,
            class_names=class_names,
            eos_id=eos_id,
            pad_id=pad_id,
            bos_id=bos_id,
            bridge=bridge,
            template=template,
            top_k=top_k,
            image_size=image_size,
            mean=mean,
            std=std,
            prepend_bos=prepend_bos,
            max_new_tokens=max_new_tokens,
            class_prompt_templates=class_prompt_templates,
            cnn_temperature=cnn_temperature,
            lm_temperature=lm_temperature,
            fusion_weight=fusion_weight,
            fusion_temperature=fusion_temperature,
            classify=classify,
            train_flip=train_flip,
        )
    )
    config = {"format": FORMAT, **{key: store(fields[key]) for key, store in _STORED_AS.items()}}
    if class_prompt_templates is not None:
        check_template_count(class_prompt_templates, "class_prompt_templates")
        prompts.check_label_templates(class_prompt_templates)
        fill_templates(config["class_names"], class_prompt_templates)  # a template without {label} is named now
    if template:
        prompts.parse_template(template, config["top_k"])  # a bad slot is named now, not at inference
    check_config_numbers(config, "the pipeline config")
    return json.loads(json.dumps(config))


def _checked_arguments(fields: dict[str, Any]) -> dict[str, Any]:
    """`make_pipeline_config`'s arguments, their values checked as given (before `_STORED_AS` converts them, which
    would hide some mistakes), with the class names as strings."""
    train_flip, classify = fields["train_flip"], fields["classify"]
    if train_flip is not None and train_flip not in TRAIN_FLIPS:
        raise ValueError(f"train_flip must be one of {TRAIN_FLIPS} or None, got {train_flip!r}")
    for name in ("cnn_temperature", "lm_temperature", "fusion_temperature"):
        if not 0 < fields[name] < float("inf"):
            raise ValueError(f"{name} must be a positive number, got {fields[name]!r}")
    if not 0 <= fields["fusion_weight"] < float("inf"):
        raise ValueError(f"fusion_weight must be a number >= 0, got {fields['fusion_weight']!r}")
    if classify not in caption.CLASSIFIERS:
        raise ValueError(f"classify must be one of {caption.CLASSIFIERS}, got {classify!r}")
    if classify != "cnn" and fields["bridge"] is None:
        raise ValueError(f"classify={classify!r} needs a bridge (the LM classifies after the visual prefix)")
    class_names = [str(name) for name in fields["class_names"]]
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {class_names[:20]}")
    if "preset" not in fields["cnn"]:
        raise ValueError(f"the CNN config needs a 'preset' key, got keys {sorted(fields['cnn'])}")
    if (fields["mean"] is None) != (fields["std"] is None):
        raise ValueError("give both mean and std, or neither (CIFAR-10's are the default)")
    if fields["prepend_bos"] and fields["bos_id"] is None:
        raise ValueError("prepend_bos=True needs bos_id")
    return {**fields, "class_names": class_names}


def _optional(store):
    """`store`, with None kept (the value of an optional key)."""
    return lambda value: None if value is None else store(value)


def _as_is(value: Any) -> Any:
    return value


# How `make_pipeline_config` stores each key (after "format"), in the config's order.
_STORED_AS = {
    "cnn": lambda cnn: {key: value for key, value in cnn.items() if key != "dtype"},  # dtype: a runtime choice
    "lm": dict,
    "bridge": _optional(dict),
    "class_names": list,
    "template": _as_is,
    "top_k": int,
    "image_size": int,
    "mean": _optional(lambda values: [float(value) for value in values]),
    "std": _optional(lambda values: [float(value) for value in values]),
    "eos_id": int,
    "pad_id": int,
    "bos_id": _optional(int),
    "prepend_bos": bool,
    "max_new_tokens": int,
    "class_prompt_templates": _optional(list),
    "cnn_temperature": float,
    "lm_temperature": float,
    "fusion_weight": float,
    "fusion_temperature": float,
    "classify": _as_is,
    "train_flip": _as_is,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def config_number_problems(config: Mapping[str, Any]) -> list[str]:
    """ "KEY=VALUE must be ..." for each number of a pipeline config that inference cannot use (NaN, infinite, zero or
    negative where it divides or counts, a token id outside the LM's vocabulary); keys absent from older
    checkpoints are not required."""
    problems = []
    for key in ("cnn_temperature", "lm_temperature", "fusion_temperature"):
        if key in config and not (_is_number(config[key]) and config[key] > 0):
            problems.append(f"{key}={config[key]!r} must be a finite number > 0")
    if "fusion_weight" in config and not (_is_number(config["fusion_weight"]) and config["fusion_weight"] >= 0):
        problems.append(f"fusion_weight={config['fusion_weight']!r} must be a finite number >= 0")
    for key, least in (("image_size", 1), ("top_k", 1), ("max_new_tokens", 1)):
        if key in config and not _is_count(config[key], least):
            problems.append(f"{key}={config[key]!r} must be an integer >= {least}")
    for key, positive in (("mean", False), ("std", True)):
        values = config.get(key)
        if values is not None and not (
            isinstance(values, list) and values and all(_is_number(v) and (v > 0 or not positive) for v in values)
        ):
            problems.append(f"{key}={values!r} must be a list of finite numbers" + (" > 0" if positive else ""))
    vocab_size = (config.get("lm") or {}).get("vocab_size")
    for key in ("eos_id", "pad_id", "bos_id"):
        value = config.get(key)
        if value is None and key == "bos_id":
            continue
        if not _is_count(value, 0) or (_is_count(vocab_size, 1) and value >= vocab_size):
            problems.append(f"{key}={value!r} must be a token id of the LM (0 <= id < vocab_size={vocab_size})")
    return problems


def check_template_count(templates: Any, key: str, source: str = "") -> None:
    """Raises ValueError naming `source`, `key` and the count unless `templates` is a list of at most
    MAX_CLASS_PROMPT_TEMPLATES strings."""
    prefix = f"{source}: " if source else ""
    if not isinstance(templates, (list, tuple)) or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{prefix}{key} must be a list of template strings, got {str(templates)[:80]!r}")
    if len(templates) > MAX_CLASS_PROMPT_TEMPLATES:
        raise ValueError(
            f"{prefix}{key} holds {len(templates)} templates; at most {MAX_CLASS_PROMPT_TEMPLATES} are "
            "scored (every image scores every class under each, all at once): keep the best few"
        )


def stripped(texts: Sequence[str] | None) -> list[str] | None:
    """Labels or templates without surrounding whitespace (None stays None): a trailing space would be scored as a
    token of every prompt, and the command line strips each item it splits."""
    return None if texts is None else [str(text).strip() for text in texts]


def check_flip_tta(config: Mapping[str, Any], source: Any) -> None:
    """Raises ValueError naming `source` when the checkpoint's CNN was trained without flips (train_flip "none"):
    averaging over mirrored images would answer for views it never learnt (the demo's labels depend on left/right)."""
    if config.get("train_flip") == "none":
        raise ValueError(
            f"{source}: flip test-time augmentation (--tta, flip_tta=True) is refused: this CNN was "
            'trained without flips (train_flip="none"), so a mirrored image can change its label'
        )


def check_config_numbers(config: Mapping[str, Any], source: str) -> None:
    """Raises ValueError naming `source` and every number of `config` that inference cannot use
    (`config_number_problems`), before anything is compiled."""
    problems = config_number_problems(config)
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------------- save / load


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _reader():
    """A checkpointer to read with. In a multi-process job each process reads on its own, with no barrier with the
    others (orbax's default): inference processes load at their own pace, and one that failed before loading
    must not hold the others."""
    if jax.process_count() == 1:
        return _checkpointer()
    local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(composite_options=ocp.CompositeOptions(multiprocessing_options=local)),
        multiprocessing_options=local,
    )


def save_pipeline_checkpoint(
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    tokenizer: Any,
    *,
    overwrite: bool = False,
    card: str | None = None,
) -> str:
    """Writes params, config and tokenizer files to `out_dir` (one directory); returns its absolute path.
    card: the model card's Markdown, written as README.md (`imgllm.train.model_card`).

    tokenizer: a transformers tokenizer (saved with save_pretrained) or a directory holding tokenizer.json.
    The checkpoint is written beside `out_dir` (a hidden `.NAME.partial-*` folder) and then swapped in, so a kill at
    any moment leaves the old checkpoint or the new one at `out_dir`. overwrite=True replaces only what
    `check_replaceable` accepts (an empty folder, or a pipeline checkpoint and nothing else): never a user's folder.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass overwrite=True")
    check_replaceable(out_dir)
    missing = {"cnn", "lm"} - set(params)
    if missing:
        raise ValueError(f"pipeline params need keys 'cnn' and 'lm' (missing {sorted(missing)})")
    if ("bridge" in params) != (config.get("bridge") is not None):
        raise ValueError("params hold a 'bridge' exactly when the config describes one")
    params = float32_params(params)
    staging = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    try:
        _checkpointer().save(
            staging,
            args=ocp.args.Composite(
                **{PARAMS_ITEM: ocp.args.StandardSave(params), CONFIG_ITEM: ocp.args.JsonSave(dict(config))}
            ),
        )
        _write_tokenizer(tokenizer, os.path.join(staging, TOKENIZER_DIR))
        if card is not None:
            with open(os.path.join(staging, CARD_FILE), "w", encoding="utf-8") as f:
                f.write(card)
        replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what a failed save left, or the old checkpoint after the swap
    return out_dir


def _write_tokenizer(tokenizer: Any, tokenizer_dir: str) -> None:
    """The tokenizer's files in `tokenizer_dir` (see `save_pipeline_checkpoint`); tokenizer.json is required."""
    if isinstance(tokenizer, (str, os.PathLike)):
        source = os.fspath(tokenizer)
        if not os.path.isfile(os.path.join(source, TOKENIZER_FILE)):
            raise FileNotFoundError(f"{source} has no {TOKENIZER_FILE} (a fast tokenizer's file)")
        shutil.copytree(
            source,
            tokenizer_dir,
            ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.msgpack", "*.h5", "config.json"),
        )
    else:
        tokenizer.save_pretrained(tokenizer_dir)
    if not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
        raise ValueError(f"the tokenizer did not write {TOKENIZER_FILE} (only fast tokenizers are supported)")


def is_pipeline_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a pipeline checkpoint and nothing else: its config names an imgllm
    pipeline format, and every entry is one a pipeline checkpoint has (`CHECKPOINT_ENTRIES`)."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, CONFIG_ITEM, "metadata"), encoding="utf-8") as f:
            config = json.load(f)
        entries = set(os.listdir(path))
    except (OSError, ValueError):
        return False
    return (
        not os.path.islink(path)
        and isinstance(config, dict)
        and entries <= CHECKPOINT_ENTRIES
        and str(config.get("format", "")).startswith(FORMAT_FAMILY)
    )


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Raises FileExistsError naming `out_dir` unless it may be replaced by a pipeline checkpoint: absent, an empty
    folder, or a pipeline checkpoint with nothing else inside (`is_pipeline_checkpoint`). A user's folder (the runs,
    a work directory) is never deleted."""
    out_dir = os.fspath(out_dir)
    if not os.path.lexists(out_dir) or (
        os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir)
    ):
        return
    if not is_pipeline_checkpoint(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not a pipeline checkpoint (or holds other files too); "
            "imgllm replaces only its own: choose another --out"
        )


def replace_directory(new: str, target: str) -> None:
    """Moves the folder `new` to `target`. An existing `target` is exchanged with `new` in one step where the
    system can (Linux renameat2), else moved aside first: `target` names the old folder or the new one at every
    moment. The old folder ends at `new` (the caller deletes it)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        return
    aside = f"{new}.old"
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths atomically with renameat2(RENAME_EXCHANGE); False where the system has no such call."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without the exchange
        return False
    raise OSError(error, os.strerror(error), b)


def float32_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter tree with every floating-point leaf as float32, where it lies (others as they are): what a
    pipeline checkpoint stores, even from parameters cast to bfloat16 (the cast back is exact)."""

    def to_float32(leaf):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        return leaf.astype(np.float32) if jnp.issubdtype(dtype, jnp.floating) and dtype != np.float32 else leaf

    return jax.tree.map(to_float32, dict(params))


def read_pipeline_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The config of a pipeline checkpoint, with a clear error when the directory is not one."""
    path = os.path.join(os.fspath(checkpoint_dir), CONFIG_ITEM)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a pipeline checkpoint (no {CONFIG_ITEM}/ inside); make one "
            "with `python infer.py assemble --classifier WORKDIR --lm LM --out DIR`"
        )
    restored = _reader().restore(
        os.path.abspath(os.fspath(checkpoint_dir)), args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
    )
    config = dict(restored[CONFIG_ITEM])
    if config.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{checkpoint_dir}: format {config.get('format')!r}, expected one of {READABLE_FORMATS}")
    check_config_numbers(config, f"{checkpoint_dir}: config")
    if config.get("class_prompt_templates") is not None:
        check_template_count(config["class_prompt_templates"], "class_prompt_templates", f"{checkpoint_dir}: config")
    return config


def read_pipeline_params(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The parameter tree of a pipeline checkpoint, as arrays on the default device."""
    restored = _reader().restore(
        os.path.abspath(os.fspath(checkpoint_dir)), args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore()})
    )
    return dict(restored[PARAMS_ITEM])


def saved_array_shapes(item_dir: str | os.PathLike, sharding: Any = None) -> dict[str, Any]:
    """The tree of an orbax StandardSave item directory as jax.ShapeDtypeStruct leaves (with `sharding`, if given),
    from its metadata only: a restore target that does not depend on the devices it was saved from."""
    metadata = ocp.StandardCheckpointer().metadata(os.path.abspath(os.fspath(item_dir)))
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if tree is None:  # orbax reads no metadata from a damaged item (truncated files)
        raise ValueError(f"{item_dir}: orbax reads no array metadata there")
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), dict(tree))


def read_params_shapes(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), from metadata only (fast)."""
    return saved_array_shapes(os.path.join(os.fspath(checkpoint_dir), PARAMS_ITEM))


def config_params_shapes(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The "cnn" and "lm" parameter trees (jax.ShapeDtypeStruct leaves) of the models a pipeline config describes,
    traced with jax.eval_shape: nothing is computed."""
    cnn = cnn_from_config(config["cnn"])
    size = config["image_size"]
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    cnn_variables = jax.eval_shape(lambda x: cnn.init(jax.random.PRNGKey(0), x, train=False), images)
    return {"cnn": dict(cnn_variables), "lm": abstract_params(config_from_dict(config["lm"], source=f"{source} lm"))}


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"cnn/params/head/kernel": shape, ...}: each leaf's shape by its slash-joined path, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape) for path, leaf in leaves}


def first_shape_difference(saved: Any, expected: Any) -> str | None:
    """ "PATH: checkpoint SHAPE, config SHAPE" for the first parameter whose stored shape is not the one the config's
    model has (or that only one of them holds), or None when they agree."""
    saved, expected = leaf_shapes(saved), leaf_shapes(expected)
    for path in [*expected, *(path for path in saved if path not in expected)]:
        if saved.get(path) != expected.get(path):
            return f"{path}: checkpoint {saved.get(path, 'absent')}, config {expected.get(path, 'absent')}"
    return None


def check_params_match_config(checkpoint_dir: str, config: Mapping[str, Any]) -> None:
    """Raises ValueError naming the checkpoint and the first parameter whose stored shape (orbax metadata: no array
    is read) differs from the model its config describes (its lm vocab_size or n_embd, its cnn num_classes...): the
    mistake is named before anything compiles."""
    saved = read_params_shapes(checkpoint_dir)
    expected = config_params_shapes(config, f"{checkpoint_dir}: config")
    difference = first_shape_difference({key: saved.get(key, {}) for key in expected}, expected)
    if difference is not None:
        raise ValueError(f"{checkpoint_dir}: the config disagrees with the stored parameters at {difference}")


# ----------------------------------------------------------------------------------------------- runtime


class FastTokenizer:
    """The checkpoint's tokenizer through the `tokenizers` library: encode without special tokens, decode."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.backend = tokenizers.Tokenizer.from_file(path)
        except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{path}: not a tokenizer file the tokenizers library reads ({error})") from None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass
class PipelineCheckpoint:
    """A loaded pipeline checkpoint: parameters (None when not read yet), config, tokenizer; makes the static
    `PipelineSpec` for given captioning options (`spec_for`, or `spec` with keywords)."""

    params: dict[str, Any]
    config: dict[str, Any]
    tokenizer: Any
    directory: str | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config["class_names"])

    def lm_config(self, dtype: str = "float32"):
        """The LM's config (`imgllm.language.model`: GPT-2 or a Llama-family model, by the stored model_type),
        computing in `dtype` ("auto", "float32" or "bfloat16"; `compute_dtype`)."""
        return config_from_dict(self.config["lm"], source=f"{self.directory}: config lm", dtype=compute_dtype(dtype))

    def cnn(self, dtype: str = "float32"):
        """The CNN module (`cnn_from_config` of the config's "cnn"), computing in `dtype` (as `lm_config`)."""
        return cnn_from_config({**self.config["cnn"], "dtype": resolve_dtype(dtype)})

    @property
    def class_prompt_templates(self) -> tuple[str, ...]:
        """The templates LM classification scores: the checkpoint's, else `imgllm.language.scoring`'s defaults."""
        templates = self.config.get("class_prompt_templates")
        return DEFAULT_TEMPLATES if templates is None else tuple(templates)

    def tokenized_template(self, template: str | None = None, top_k: int | None = None) -> prompts.TokenizedTemplate:
        """The caption prompt template (the checkpoint's, or the given one) and top_k, tokenised."""
        config = self.config
        return prompts.tokenize_template(
            self.tokenizer.encode,
            config["template"] if template is None else template,
            config["class_names"],
            config["top_k"] if top_k is None else top_k,
            config["pad_id"],
            bos_id=config["bos_id"] if config.get("prepend_bos") else None,
        )

    @property
    def default_classify(self) -> str:
        """The classifier the checkpoint's labels come from by default ("cnn", "lm" or "fused")."""
        return self.config.get("classify", "cnn")

    def label_prompts(
        self, labels: Sequence[str], templates: Sequence[str] | None = None, *, score_end: bool | None = None
    ) -> ClassPromptTable:
        """The prompt table that classifies images by the LM among any `labels` (`scoring.build_prompt_table`).

        templates: the prompts ("a small {label}", ...; several are combined as a mixture); None: the checkpoint's
        class_prompt_templates, scored as the whole captions they were trained as. score_end: see
        `build_prompt_table` (None: per template, its EOS scored when text follows {label})."""
        key = "lm_templates (--lm-templates)"
        if templates is None:
            templates, score_end, key = self.class_prompt_templates, True, "class_prompt_templates"
        check_template_count(list(templates), key)  # scored all at once: a cap, before they are tokenised
        prompts.check_label_templates(templates)  # before str.format sees them
        return build_prompt_table(
            self.tokenizer.encode, self.config["eos_id"], list(labels), list(templates), score_end=score_end
        )

    def spec(
        self,
        generation: Any = None,
        *,
        template: str | None = None,
        top_k: int | None = None,
        flip_tta: bool = False,
        lm_classify: bool = False,
        dtype: str = "auto",
        classify: str | None = None,
        lm_labels: Sequence[str] | None = None,
        lm_templates: Sequence[str] | None = None,
        lm_scoring: str = "likelihood",
        lm_score_end: bool | None = None,
    ) -> caption.PipelineSpec:
        """The static `PipelineSpec`; generation: a `GenerationConfig` (default: greedy, the config's length).

        Its keywords are the captioning options one by one (those of `CaptionOptions` that shape the spec, and
        lm_score_end), so that research code asks for a spec without building an options object (`spec_for` takes
        one): grouping them would only move them.
        lm_classify: also classify by LM likelihood after the visual prefix ("lm_label" in records), scoring the
        checkpoint's class_prompt_templates (`class_prompt_templates`); lm_labels: classify by the LM among these
        labels instead of the CNN's classes, with lm_templates (None: the checkpoint's templates; see
        `label_prompts`, with lm_score_end as its score_end); lm_scoring: "likelihood" or "information_gain"
        (`PipelineSpec`). classify: the labels' source, "cnn", "lm" or "fused" (None: the checkpoint's default,
        `default_classify`). All but "cnn" need a checkpoint with a bridge. The checkpoint's calibration
        (temperatures, fusion weight) is applied. dtype: the CNN's and the LM's compute dtype, "auto" (bfloat16 on
        GPU/TPU, float32 on CPU), "float32" or "bfloat16" (`imgllm.precision`); the float32 parameters are cast
        inside the jitted function."""
        dtype = resolve_dtype(dtype)
        config = self.config
        if flip_tta:
            check_flip_tta(config, self.directory)
        classify = self.default_classify if classify is None else classify
        if classify not in caption.CLASSIFIERS:
            raise ValueError(f"classify must be one of {caption.CLASSIFIERS}, got {classify!r}")
        if generation is None:
            generation = GenerationConfig(
                max_new_tokens=config["max_new_tokens"], eos_token_id=config["eos_id"], pad_token_id=config["pad_id"]
            )
        bridge = None if config.get("bridge") is None else PrefixMapper(**config["bridge"])
        lm_labels, class_prompts, label_prompts = self._lm_prompt_tables(
            lm_classify, classify, lm_labels, lm_templates, lm_score_end
        )
        mean, std = config.get("mean"), config.get("std")
        return caption.PipelineSpec(
            cnn=self.cnn(dtype),
            lm_config=self.lm_config(dtype),
            prompts=self.tokenized_template(template, top_k),
            generation=generation,
            pad_id=config["pad_id"],
            image_size=config["image_size"],
            mean=None if mean is None else tuple(mean),
            std=None if std is None else tuple(std),
            bridge=bridge,
            flip_tta=flip_tta,
            lm_class_prompts=class_prompts,
            lm_label_prompts=label_prompts,
            lm_label_names=None if lm_labels is None else tuple(lm_labels),
            lm_scoring=lm_scoring,
            classify=classify,
            cnn_temperature=float(config.get("cnn_temperature", 1.0)),
            lm_temperature=float(config.get("lm_temperature", 1.0)),
            fusion_weight=float(config.get("fusion_weight", 0.0)),
            fusion_temperature=float(config.get("fusion_temperature", 1.0)),
        )

    def _lm_prompt_tables(
        self,
        lm_classify: bool,
        classify: str,
        lm_labels: Sequence[str] | None,
        lm_templates: Sequence[str] | None,
        lm_score_end: bool | None,
    ) -> tuple[list[str] | None, ClassPromptTable | None, ClassPromptTable | None]:
        """`spec`'s LM classification: (the labels stripped, the class prompt table, the label prompt table), the
        tables None when not asked for; raises ValueError when the LM is asked to classify without a bridge."""
        uses_lm = lm_classify or lm_labels is not None or classify != "cnn"
        if uses_lm and self.config.get("bridge") is None:
            raise ValueError(
                f"{self.directory}: classification by the LM needs a visual prefix, and this pipeline "
                "checkpoint has no bridge"
            )
        if lm_templates is not None and lm_labels is None:
            raise ValueError("lm_templates are the prompts of lm_labels: give the labels too")
        lm_labels, lm_templates = stripped(lm_labels), stripped(lm_templates)  # as the command line splits them
        class_prompts = (
            self.label_prompts(self.config["class_names"])
            if (lm_classify and lm_labels is None) or classify != "cnn"
            else None
        )
        label_prompts = (
            None if lm_labels is None else self.label_prompts(lm_labels, lm_templates, score_end=lm_score_end)
        )
        return lm_labels, class_prompts, label_prompts

    def spec_for(self, options: CaptionOptions) -> caption.PipelineSpec:
        """The `PipelineSpec` that captions with `options` (`imgllm.pipeline.options.CaptionOptions`): `spec` with
        its decoding resolved against this checkpoint (`CaptionOptions.generation_config`) and its other fields."""
        return self.spec(
            options.generation_config(self.config),
            template=options.template,
            top_k=options.top_labels,
            flip_tta=options.tta,
            lm_classify=options.lm_classify,
            dtype=options.dtype,
            classify=options.classify,
            lm_labels=options.lm_labels,
            lm_templates=options.lm_templates,
            lm_scoring=options.lm_scoring,
        )

    def decode_captions(self, caption_ids: np.ndarray) -> list[list[str]]:
        return caption.decode_captions(self.tokenizer.decode, caption_ids, self.config["eos_id"], self.config["pad_id"])


def load_pipeline(checkpoint_dir: str | os.PathLike, *, read_params: bool = True) -> PipelineCheckpoint:
    """Reads a pipeline checkpoint (config first, so a wrong directory fails before the big read; then the stored
    parameters' shapes against the config's models, `check_params_match_config`).

    read_params=False leaves `params` None, for callers that read them separately (`read_pipeline_params`),
    e.g. in a thread while they compile against `read_params_shapes`."""
    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    config = read_pipeline_config(checkpoint_dir)
    tokenizer_path = os.path.join(checkpoint_dir, TOKENIZER_DIR, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{checkpoint_dir}: missing {TOKENIZER_DIR}/{TOKENIZER_FILE}")
    tokenizer = FastTokenizer(tokenizer_path)
    check_params_match_config(checkpoint_dir, config)
    params = read_pipeline_params(checkpoint_dir) if read_params else None
    return PipelineCheckpoint(params=params, config=config, tokenizer=tokenizer, directory=checkpoint_dir)


__all__ = [
    "FORMAT",
    "MAX_CLASS_PROMPT_TEMPLATES",
    "FastTokenizer",
    "PipelineCheckpoint",
    "check_config_numbers",
    "check_params_match_config",
    "check_replaceable",
    "check_template_count",
    "config_number_problems",
    "config_params_shapes",
    "float32_params",
    "is_pipeline_checkpoint",
    "load_pipeline",
    "make_pipeline_config",
    "read_params_shapes",
    "read_pipeline_config",
    "read_pipeline_params",
    "replace_directory",
    "save_pipeline_checkpoint",
]
