"""Captioning as a Task for the generic trainer: a visual prefix (PrefixMapper) from a frozen CNN into GPT-2.

    images ─ frozen CNN (a trained classifier's checkpoint) ─ features ─ PrefixMapper ─ prefix [K, D]
    [prefix][BOS] caption [EOS] ─ GPT-2 (frozen or fine-tuned: config.lm.train) ─ next-token loss

The CNN is frozen and training uses no image augmentation, so `train_arrays` runs it once over the training
images and the train step only maps features to prefixes and runs the LM. Evaluation runs the whole chain from
uint8 images (so `train.py --mode=eval --data=...` works on any data source) and reports
  loss / token_accuracy  next-token cross-entropy and argmax agreement on the reference caption,
  caption_exact          greedy decoding reproduces the reference exactly (all of its tokens and its EOS are
                         the argmax under teacher forcing: equivalent to running greedy decoding),
  accuracy               the CNN head's top-1 accuracy,
  lm_accuracy            classification by the LM: argmax over classes of the prompt-ensemble likelihood
                         (`imgllm.language.scoring.score_class_prompts`).

Caption rows: every (image, reference caption) pair of the dataset, plus class-template captions
("a photo of a {label}.", the same templates the LM classification scores) making up
config.captions.template_fraction of the rows; a dataset without captions (CIFAR-10) trains on templates only.
Greedy captions stay descriptive as long as that fraction is below one half.

`imgllm.train.export.export_pipeline_checkpoint(workdir, out_dir)` writes its pipeline checkpoint (CNN, LM, bridge,
tokenizer).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imgllm import calibration
from imgllm.bridge import PrefixMapper, check_mapper_fits
from imgllm.captions.data import load_caption_dataset
from imgllm.data.batching import padded_batch_outputs
from imgllm.data.text import next_token_targets, pad_prompt_completions
from imgllm.language import scoring
from imgllm.language.decoding import GenerationConfig, generate_tokens
from imgllm.language.label_sets import read_class_captions
from imgllm.language.load import load_lm_tokenizer, load_lm_weights
from imgllm.language.model import initial_params
from imgllm.language.scoring import prefixed_token_stats
from imgllm.language.tokenizer import check_vocabulary, train_bpe_tokenizer
from imgllm.pipeline.caption import caption_token_lists
from imgllm.train.checkpoint import load_classifier, read_run_config
from imgllm.train.classifier import cnn_for_run, remap_labels
from imgllm.train.lm_task import lm_config_from, tokenizer_from_metadata
from imgllm.train.task_protocol import Metrics, Task, metric
from imgllm.vision.features import image_logits_and_features

FROZEN = "frozen"  # model_state collection holding the frozen CNN variables (and the LM when not trained)
SAMPLE_CAPTIONS = 8  # greedy captions of evaluation images written to TensorBoard at the end of training


# ----------------------------------------------------------------------------------------------- host helpers


def caption_rows(
    captions: Sequence[Sequence[str]] | None,
    labels: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str],
    template_fraction: float,
    seed: int,
    class_captions: Mapping[str, Sequence[str]] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(image index per row, caption text per row) of the training captions; deterministic from `seed`.

    Every (image, reference) pair is a row; template rows (a random template filled with the image's class name,
    on random images) are added so that they make up `template_fraction` of all rows. Without captions, or with
    template_fraction >= 1, each image gets exactly one template row, unless `class_captions` ({class name: its
    captions}, e.g. CIFAR-10's written ones) is given: then each image gets one row, a random caption of its class,
    or with probability template_fraction a random template.
    """
    if not 0.0 <= template_fraction <= 1.0:
        raise ValueError(f"config.captions.template_fraction={template_fraction} must be in [0, 1]")
    filled = scoring.fill_templates(class_names, templates)
    rng = np.random.default_rng(seed)
    if captions is None and class_captions is not None:
        per_class = [list(class_captions[name]) for name in class_names]
        is_template = rng.random(len(labels)) < template_fraction
        picks = rng.random(len(labels))  # one uniform draw per image picks its caption or template
        pick = lambda options, u: options[min(int(u * len(options)), len(options) - 1)]
        texts = [
            pick(filled[label] if template else per_class[label], u)
            for label, template, u in zip(labels, is_template, picks)
        ]
        return np.arange(len(labels)), texts
    if captions is None or template_fraction >= 1.0:
        choice = rng.integers(len(templates), size=len(labels))
        return np.arange(len(labels)), [filled[label][t] for label, t in zip(labels, choice)]
    images = [i for i, refs in enumerate(captions) for _ in refs]
    texts = [text for refs in captions for text in refs]
    num_templates = int(round(len(texts) * template_fraction / (1.0 - template_fraction)))
    extra_images = rng.integers(len(labels), size=num_templates)
    extra_choice = rng.integers(len(templates), size=num_templates)
    images += extra_images.tolist()
    texts += [filled[labels[i]][t] for i, t in zip(extra_images, extra_choice)]
    return np.asarray(images, np.int64), texts


def encode_captions(encode, eos_id: int, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [N, T], target_mask float32 [N, T-1]) of [BOS] text [EOS] rows, right-padded with EOS.

    T = max_tokens + 2 (BOS and EOS); target_mask marks the text tokens and the EOS. Raises naming the first
    caption that is longer than max_tokens. The rows are `imgllm.data.text.pad_prompt_completions`' with the BOS
    (= EOS) as a masked prompt, and target_mask is their loss mask as `next_token_targets` pairs it with the logits.
    """
    ids = [list(encode(text)) for text in texts]
    for text, tokens in zip(texts, ids):
        if len(tokens) > max_tokens:
            raise ValueError(
                f"caption {text!r} has {len(tokens)} tokens, more than config.captions.max_tokens={max_tokens}"
            )
    rows = pad_prompt_completions(
        [[eos_id]] * len(ids), ids, seq_len=max_tokens + 2, eos_id=eos_id, pad_id=eos_id, mask_prompt=True
    )
    _, target_mask = next_token_targets(rows.input_ids, rows.loss_mask)
    return rows.input_ids, target_mask.astype(np.float32)


def reference_captions(dataset, class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """One reference per image for teacher-forced evaluation: its first caption, or its first class template."""
    if dataset.captions is not None:
        return [refs[0] for refs in dataset.captions]
    return [scoring.fill_templates([class_names[label]], templates[:1])[0][0] for label in dataset.labels]


@functools.lru_cache(maxsize=4)
def _classifier_config(workdir: str) -> tuple[dict, dict]:
    """(run config, meta) of a classifier work directory's latest checkpoint, read once per directory."""
    try:
        return read_run_config(workdir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.classifier_workdir: {error}") from None


# ----------------------------------------------------------------------------------------------- the task


class CaptionerTask(Task):
    """Trains a PrefixMapper (and optionally the LM) on image–caption pairs with a frozen, trained CNN.

    Config fields: dataset, data_dir, train_split, eval_split, num_train_examples, num_eval_examples, seed, dtype,
    classifier_workdir, bridge.{prefix_length, hidden, feature_source}, lm.{pretrained, vocab_size, n_positions,
    n_embd, n_layer, n_head, dropout, train}, tokenizer.{path, vocab_size}, captions.{templates,
    template_fraction, max_tokens, class_captions}, feature_batch_size.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        run_config, meta = _classifier_config(os.path.abspath(config.classifier_workdir or ""))
        self.classifier_step = meta["step"]  # the variables are read from this same checkpoint
        self.cnn_temperature = calibration.stored_head_temperature(meta.get("calibration"))  # its fitted head T
        self.classifier_config = run_config
        self.classifier_meta = meta  # the classifier checkpoint's meta (its data identity, calibration, step)
        self.class_names = tuple(meta.get("task", {}).get("class_names") or ())
        if not self.class_names:
            raise ValueError(f"{config.classifier_workdir}: the classifier checkpoint's meta has no class names")
        self.cnn = cnn_for_run(run_config["model"], config)  # the classifier's CNN in this run's dtype
        self.image_size = int(run_config.get("image_size") or 32)
        self.normalization = run_config.get("normalization") or {}
        self.lm_config = lm_config_from(config, eos_token_id=0)  # the captioner's tokenizers: eos = id 0
        self.templates = tuple(config.captions.templates)
        self.mapper = PrefixMapper(
            prefix_length=config.bridge.prefix_length,
            lm_dim=self.lm_config.n_embd,
            hidden=config.bridge.hidden,
            feature_source=config.bridge.feature_source,
        )
        check_mapper_fits(self.mapper, self.lm_config)
        if config.bridge.prefix_length + config.captions.max_tokens + 2 > self.lm_config.n_positions:
            raise ValueError(
                f"prefix_length + captions.max_tokens + 2 exceeds the LM's n_positions={self.lm_config.n_positions}"
            )
        self.tokenizer = None
        self._cnn_variables = None

    # ---- text ----
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenizer_path(self) -> str | None:
        """Where the tokenizer comes from: config.tokenizer.path, else a pretrained LM's own (its directory or GGUF
        file: a BPE trained here would not be the vocabulary its embeddings were learnt with), else None."""
        return self.config.tokenizer.get("path") or self.config.lm.get("pretrained")

    def _build_tokenizer(self, texts: Sequence[str]):
        """The configured or the pretrained LM's tokenizer (`tokenizer_path`), or a byte-level BPE trained on the
        training texts."""
        cfg = self.config.tokenizer
        if self.tokenizer_path():
            tokenizer = load_lm_tokenizer(self.tokenizer_path())
        else:
            tokenizer = train_bpe_tokenizer(texts, vocab_size=min(cfg.vocab_size, self.lm_config.vocab_size))
        check_vocabulary(tokenizer, self.lm_config.vocab_size, "config.tokenizer")
        return tokenizer

    def prompt_table(self) -> scoring.ClassPromptTable:
        """The class-prompt table the LM classification scores (built once per tokenizer)."""
        return scoring.build_prompt_table(self.encode, self.tokenizer.eos_token_id, self.class_names, self.templates)

    # ---- data (host side) ----
    def _load(self, spec: str, split: str, num: int | None):
        return load_caption_dataset(
            spec,
            split,
            seed=self.config.seed,
            data_dir=self.config.data_dir,
            image_size=self.image_size,
            num_examples=num,
        )

    def _labels_in_classifier_order(self, dataset, where: str) -> np.ndarray:
        if tuple(dataset.class_names) == self.class_names:
            return dataset.labels.astype(np.int32)
        return remap_labels(dataset.labels, tuple(dataset.class_names), self.class_names, where)

    def classifier_variables(self):
        """The frozen CNN's variables, restored from config.classifier_workdir (once)."""
        if self._cnn_variables is None:
            self._cnn_variables, _, _ = load_classifier(
                os.path.abspath(self.config.classifier_workdir), self.classifier_step
            )
        return self._cnn_variables

    def cnn_logits_and_features(self, cnn_variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(CNN logits, bridge input features) of uint8 images: the pipeline's one image → features chain
        (`imgllm.vision.features.image_logits_and_features`) with the classifier run's size and normalisation."""
        return image_logits_and_features(
            self.cnn,
            cnn_variables,
            images,
            image_size=self.image_size,
            mean=self.normalization.get("mean"),
            std=self.normalization.get("std"),
            feature_source=self.mapper.feature_source,
        )

    def image_features(self, cnn_variables, images: np.ndarray) -> np.ndarray:
        """Bridge input features [N, F] of uint8 images, in batches of config.feature_batch_size (one compile)."""
        fn = jax.jit(lambda v, x: {"features": self.cnn_logits_and_features(v, x)[1]})
        features = padded_batch_outputs(lambda batch: fn(cnn_variables, batch), images, self.config.feature_batch_size)[
            "features"
        ]
        return features.astype(np.float32)

    def train_arrays(self) -> dict[str, np.ndarray]:
        cfg = self.config
        dataset = self._load(cfg.dataset, cfg.train_split, cfg.num_train_examples)
        labels = self._labels_in_classifier_order(dataset, f"{cfg.dataset} ({cfg.train_split})")
        class_captions = (
            read_class_captions(cfg.captions.class_captions, self.class_names)
            if cfg.captions.get("class_captions")
            else None
        )
        rows, texts = caption_rows(
            dataset.captions,
            labels,
            self.class_names,
            self.templates,
            cfg.captions.template_fraction,
            cfg.seed,
            class_captions,
        )
        all_prompts = [p for row in scoring.fill_templates(self.class_names, self.templates) for p in row]
        self.tokenizer = self._build_tokenizer(texts + all_prompts)
        input_ids, target_mask = encode_captions(
            self.encode, self.tokenizer.eos_token_id, texts, cfg.captions.max_tokens
        )
        features = self.image_features(self.classifier_variables(), dataset.images)
        return {"features": features[rows], "input_ids": input_ids, "target_mask": target_mask}

    def eval_arrays(
        self, split: str | None = None, source: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray] | None:
        split = split or self.config.eval_split
        if not split:
            return None
        if metadata:
            self.tokenizer = tokenizer_from_metadata(metadata)
        spec = source or self.config.dataset
        dataset = self._load(spec, split, self.config.num_eval_examples if source is None else None)
        labels = self._labels_in_classifier_order(dataset, f"{spec} ({split})")
        texts = reference_captions(dataset, self.class_names, self.templates)
        input_ids, target_mask = encode_captions(
            self.encode, self.tokenizer.eos_token_id, texts, self.config.captions.max_tokens
        )
        return {"images": dataset.images, "labels": labels, "input_ids": input_ids, "target_mask": target_mask}

    # ---- variables ----
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Random bridge (and LM) parameters; the frozen CNN's, and a pretrained LM's, are zeros of the right shapes,
        placeholders that `prepare_variables` replaces with the checkpoints (zeros: no initialiser code to compile)."""
        _, lm_key, bridge_key = jax.random.split(rng, 3)
        dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        cnn_shapes = jax.eval_shape(lambda: self.cnn.init(jax.random.PRNGKey(0), dummy, train=False))
        cnn_variables = dict(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cnn_shapes))
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.uint8)
        features = jax.eval_shape(lambda: self.cnn_logits_and_features(cnn_variables, images)[1])
        bridge = self.mapper.init(bridge_key, jnp.zeros(features.shape, jnp.float32))["params"]
        lm = initial_params(self.lm_config, lm_key, pretrained=bool(self.config.lm.get("pretrained")))
        params, frozen = {"bridge": bridge}, {"cnn": cnn_variables}
        (params if self.config.lm.train else frozen)["lm"] = lm
        return {"params": params, FROZEN: frozen}

    def prepare_variables(self, variables: dict[str, Any], train_arrays) -> dict[str, Any]:
        """Puts the trained classifier's CNN (and config.lm.pretrained's weights, if any) in place."""
        frozen = dict(variables[FROZEN], cnn=self.classifier_variables())
        params = dict(variables["params"])
        if self.config.lm.get("pretrained"):
            _, lm = load_lm_weights(self.config.lm.pretrained)
            (params if "lm" in params else frozen)["lm"] = lm
        _check_same_structure(variables, {"params": params, FROZEN: frozen})
        return {"params": params, FROZEN: frozen}

    # ---- pure, traced ----
    def lm_params(self, params, model_state):
        """The LM's parameters: trained ones in params, or the frozen ones in model_state."""
        return params["lm"] if "lm" in params else model_state[FROZEN]["lm"]

    def _token_metrics(self, lm_params, prefix, batch, weights) -> tuple[jax.Array, Metrics]:
        """(mean token loss, metric sums) of the reference captions after `prefix`; weights [B] per example."""
        log_probs, is_argmax = prefixed_token_stats(lm_params, self.lm_config, prefix, batch["input_ids"])
        mask = batch["target_mask"] * weights[:, None]
        tokens = mask.sum()
        exact = jnp.all(is_argmax | (batch["target_mask"] == 0), axis=-1)
        loss = -(log_probs * mask).sum()
        return loss / jnp.maximum(tokens, 1.0), {
            "loss": metric(loss, tokens),
            "token_accuracy": metric((is_argmax * mask).sum(), tokens),
            "caption_exact": metric((exact * weights).sum(), weights.sum()),
        }

    def loss(self, params, model_state, batch, rng, epoch) -> tuple[jax.Array, tuple[Metrics, dict]]:
        prefix = self.mapper.apply({"params": params["bridge"]}, batch["features"])
        lm_params = self.lm_params(params, model_state)
        deterministic = self.config.lm.dropout == 0
        log_probs, is_argmax = prefixed_token_stats(
            lm_params, self.lm_config, prefix, batch["input_ids"], deterministic=deterministic, dropout_rng=rng
        )
        mask = batch["target_mask"]
        tokens = mask.sum()
        total = -(log_probs * mask).sum()
        metrics = {"loss": metric(total, tokens), "token_accuracy": metric((is_argmax * mask).sum(), tokens)}
        return total / tokens, (metrics, model_state)

    def eval_metrics(self, variables, batch, *, tta: bool) -> Metrics:
        params, frozen = variables["params"], variables[FROZEN]
        logits, features = self.cnn_logits_and_features(frozen["cnn"], batch["images"])
        prefix = self.mapper.apply({"params": params["bridge"]}, features)
        lm_params = self.lm_params(params, variables)
        weights = batch["mask"]
        _, metrics = self._token_metrics(lm_params, prefix, batch, weights)
        lm_scores = scoring.score_class_prompts(lm_params, self.lm_config, self.prompt_table(), prefix)
        labels, count = batch["labels"], weights.sum()
        metrics["accuracy"] = metric(((jnp.argmax(logits, -1) == labels) * weights).sum(), count)
        metrics["lm_accuracy"] = metric(((jnp.argmax(lm_scores, -1) == labels) * weights).sum(), count)
        return metrics

    def class_scores(self, variables, arrays: Mapping[str, np.ndarray], *, batch_size: int) -> dict[str, np.ndarray]:
        """Host arrays over every image of `arrays`: logits [N, C] (the CNN head), lm_scores [N, C] (the class
        prompts' log-likelihood after each image's prefix, as `eval_metrics` scores them) and lm_neutral_scores
        [1, C] (after the neutral prefix, the bridge's output for all-zero features: the LM's prior over classes)."""
        table = self.prompt_table()

        def scores(variables, images):
            params, frozen = variables["params"], variables[FROZEN]
            lm_params = self.lm_params(params, variables)
            logits, features = self.cnn_logits_and_features(frozen["cnn"], images)
            prefixes = self.mapper.apply({"params": params["bridge"]}, jnp.concatenate([features[:1] * 0, features]))
            lm_scores = scoring.score_class_prompts(lm_params, self.lm_config, table, prefixes)
            return {
                "logits": logits,
                "lm_scores": lm_scores[1:],
                "neutral": jnp.broadcast_to(lm_scores[:1], lm_scores[1:].shape),
            }

        fn = jax.jit(scores)
        out = padded_batch_outputs(lambda images: fn(variables, images), arrays["images"], batch_size)
        return {"logits": out["logits"], "lm_scores": out["lm_scores"], "lm_neutral_scores": out["neutral"][:1]}

    def calibrate(
        self, variables, arrays: Mapping[str, np.ndarray], *, batch_size: int, fitted: dict | None = None
    ) -> dict[str, float]:
        """`imgllm.calibration.calibration_report` of the CNN head, the LM's class scores and their fusion on
        `arrays` (fitted there, the validation split, unless a stored fit is given), and lm_ig_accuracy: the LM's
        accuracy when scoring by information gain (its class scores minus those after the neutral prefix)."""
        scores, labels = self.class_scores(variables, arrays, batch_size=batch_size), np.asarray(arrays["labels"])
        report = calibration.calibration_report(scores["logits"], labels, scores["lm_scores"], fitted=fitted)
        information_gain = scores["lm_scores"] - scores["lm_neutral_scores"]
        report["lm_ig_accuracy"] = float((information_gain.argmax(-1) == labels).mean())
        return report

    def sample_captions(
        self, variables, arrays: Mapping[str, np.ndarray], *, count: int = SAMPLE_CAPTIONS, seed: int = 0
    ) -> list[tuple[str, str]]:
        """(class name, greedy caption) of `count` evaluation images spread over the split (a fixed, seeded choice):
        what TensorBoard shows beside the curves, so a captioner that writes one sentence for every image is seen."""
        labels = np.asarray(arrays["labels"])
        picks = np.sort(np.random.default_rng(seed).choice(len(labels), min(count, len(labels)), replace=False))
        eos = self.tokenizer.eos_token_id
        generation = GenerationConfig(
            max_new_tokens=self.config.captions.max_tokens + 1, eos_token_id=eos, pad_token_id=eos
        )

        @jax.jit
        def greedy(variables, images):
            params, frozen = variables["params"], variables[FROZEN]
            _, features = self.cnn_logits_and_features(frozen["cnn"], images)
            prefix = self.mapper.apply({"params": params["bridge"]}, features)
            start = jnp.full((len(images), 1), eos, jnp.int32)
            return generate_tokens(
                self.lm_params(params, variables),
                self.lm_config,
                start,
                jnp.ones_like(start),
                jax.random.PRNGKey(0),
                generation,
                prefix_embeds=prefix,
            )[0]

        tokens = np.asarray(greedy(variables, np.asarray(arrays["images"])[picks]))
        texts = [self.tokenizer.decode(ids[0]).strip() for ids in caption_token_lists(tokens[:, None], eos, eos)]
        return [(self.class_names[labels[i]], text) for i, text in zip(picks, texts)]

    def checkpoint_metadata(self) -> dict[str, Any]:
        tokenizer_path = self.tokenizer_path()
        return {
            "class_names": list(self.class_names),
            "templates": list(self.templates),
            "tokenizer_json": None
            if tokenizer_path or self.tokenizer is None
            else self.tokenizer.backend_tokenizer.to_str(),
            "tokenizer_path": tokenizer_path,
            "lm_config": self.lm_config.to_dict(),
            "bridge": bridge_fields(self.mapper),
            "classifier_workdir": os.path.abspath(self.config.classifier_workdir),
        }


def bridge_fields(mapper: PrefixMapper) -> dict[str, Any]:
    """The PrefixMapper's constructor fields as JSON (a pipeline checkpoint's "bridge" config)."""
    return {
        "prefix_length": mapper.prefix_length,
        "lm_dim": mapper.lm_dim,
        "hidden": mapper.hidden,
        "feature_source": mapper.feature_source,
    }


def _check_same_structure(expected, actual) -> None:
    """Raises ValueError naming the first leaf whose shape differs between two variable trees."""
    shapes = lambda tree: {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want, got = shapes(expected), shapes(actual)
    if want.keys() != got.keys():
        raise ValueError(f"loaded variables differ in keys: {sorted(set(want) ^ set(got))[:5]}")
    for key, shape in want.items():
        if got[key] != shape:
            raise ValueError(f"loaded variable {key} has shape {got[key]}, the model expects {shape}")
