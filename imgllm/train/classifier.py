"""Image classification as a Task: the CNN, its data, augmentation, loss and test-time augmentation.

Everything classifier-specific lives here; the loop, state, steps and checkpoints are shared with the
language-model and captioning tasks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imgllm import calibration
from imgllm import data as data_lib
from imgllm.data import augment
from imgllm.data.batching import padded_batch_outputs
from imgllm.data.folder import SPLIT_FOLDER_NAMES
from imgllm.precision import run_dtype
from imgllm.train.task_protocol import Metrics, Task, metric
from imgllm.vision import cnn as cnn_lib
from imgllm.vision.features import image_logits


def remap_labels(labels: np.ndarray, names: tuple[str, ...], target_names: tuple[str, ...], where: str) -> np.ndarray:
    """Labels indexed by `names` re-indexed by `target_names` (a checkpoint's classes); unknown classes fail."""
    unknown = sorted(set(names) - set(target_names))
    if unknown:
        raise ValueError(f"{where}: classes {unknown} are not among the checkpoint's classes {list(target_names)}")
    lookup = np.array([target_names.index(n) for n in names], np.int32)
    return lookup[np.asarray(labels)]


def folder_split(spec: str, split: str, data_dir: str | None = None) -> str:
    """The split to read so that "folder:<root>" may also name a folder of class folders to evaluate whole.

    An image folder without split sub-folders is its own "train" split (minus a carved validation part);
    when such a folder is given for evaluation, all of its images are wanted: split "train_full". A relative root
    is under data_dir, as the folder source reads it.
    """
    kind, _, root = spec.partition(":")
    root = os.path.join(data_dir, root) if data_dir and not os.path.isabs(root) else root
    if kind != "folder" or split != "test" or not os.path.isdir(root):
        return split
    has_split_folders = any(
        os.path.isdir(os.path.join(root, name)) for names in SPLIT_FOLDER_NAMES.values() for name in names
    )
    return split if has_split_folders else "train_full"


def cnn_for_run(model_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> cnn_lib.CNN:
    """The CNN of `model_config` (a run's config.model) computing in the run's dtype (`run_dtype(run_config)`):
    config.dtype, not a model.dtype that `model_config` may hold from before config.dtype existed."""
    fields = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    return cnn_lib.cnn_from_config({**fields, "dtype": run_dtype(run_config)})


class ClassifierTask(Task):
    """Trains `cnn_from_config(config.model)` on `load_dataset(config.dataset, ...)` with label smoothing.

    Config fields used: dataset, data_dir, train_split, eval_split, num_train_examples, num_eval_examples,
    image_size, normalization.{mean,std}, augment.{translate,flip}, label_smoothing, whiten_init_examples,
    tta, seed, dtype, model.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = cnn_for_run(config.model, config)
        self.class_names: tuple[str, ...] | None = None

    # ---- data (host side) ----
    def _load(self, spec: str, split: str, num: int | None):
        return data_lib.load_dataset(
            spec,
            split,
            seed=self.config.seed,
            data_dir=self.config.data_dir,
            image_size=self.config.image_size,
            num_examples=num,
            cache_dir=self.config.get("data_cache_dir"),
        )

    def train_arrays(self) -> dict[str, np.ndarray]:
        ds = self._load(self.config.dataset, self.config.train_split, self.config.num_train_examples)
        if len(ds.class_names) != self.model.num_classes:
            raise ValueError(
                f"{self.config.dataset} ({self.config.train_split}) has {len(ds.class_names)} classes but "
                f"config.model.num_classes={self.model.num_classes}: set --config.model.num_classes="
                f"{len(ds.class_names)} (or remove the extra class folders)"
            )
        self.class_names = tuple(ds.class_names)
        return {
            "images": ds.images,
            "labels": ds.labels.astype(np.int32),
            "index": np.arange(len(ds.labels), dtype=np.int32),
        }

    def eval_arrays(
        self, split: str | None = None, source: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray] | None:
        split = split or self.config.eval_split
        if not split:
            return None
        spec = source or self.config.dataset
        ds = self._load(
            spec,
            folder_split(spec, split, self.config.data_dir),
            self.config.num_eval_examples if source is None else None,
        )
        labels = ds.labels.astype(np.int32)
        known = tuple(metadata["class_names"]) if metadata else self.class_names
        if known is not None and tuple(ds.class_names) != known:
            labels = remap_labels(labels, tuple(ds.class_names), known, f"{spec} ({split})")
        return {"images": ds.images, "labels": labels}

    # ---- variables ----
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        size = self.config.image_size
        return dict(self.model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False))

    def prepare_variables(self, variables: dict[str, Any], train_arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Initialises the whitening stem from the first `whiten_init_examples` training images, if any."""
        n = self.config.get("whiten_init_examples", 0)
        if not n:
            return variables
        images = np.asarray(self.normalize(jnp.asarray(train_arrays["images"][:n])))
        kernel = cnn_lib.whitening_kernel(images, patch_size=self.model.whiten_kernel)
        return {**variables, "params": cnn_lib.set_whitening(variables["params"], kernel)}

    # ---- pure, traced ----
    def normalize(self, images: jax.Array) -> jax.Array:
        return augment.normalize(
            images, mean=tuple(self.config.normalization.mean), std=tuple(self.config.normalization.std)
        )

    def augment(self, images: jax.Array, indices: jax.Array, rng: jax.Array, epoch: jax.Array) -> jax.Array:
        """Random translate (reflect pad) and flip ("random", "alternating" or "none")."""
        cfg = self.config.augment
        images = augment.random_crop_flip(rng, images, pad=cfg.translate, flip=cfg.flip == "random")
        if cfg.flip == "alternating":
            images = augment.alternating_flip(images, indices, epoch, self.config.seed)
        return images

    def loss(self, params, model_state, batch, rng, epoch) -> tuple[jax.Array, tuple[Metrics, dict]]:
        x = self.normalize(self.augment(batch["images"], batch["index"], rng, epoch))
        variables = {"params": params, **model_state}
        mutable = list(model_state)
        if mutable:
            (logits, _), new_state = self.model.apply(variables, x, train=True, mutable=mutable)
        else:
            (logits, _), new_state = self.model.apply(variables, x, train=True), {}
        labels = batch["labels"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.config.label_smoothing)
        losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
        n = labels.shape[0]
        metrics = {"loss": metric(losses.sum(), n), "accuracy": metric((jnp.argmax(logits, -1) == labels).sum(), n)}
        return losses.mean(), (metrics, dict(new_state))

    def tta_views(self, tta: bool) -> str:
        """The test-time views (`imgllm.vision.features.TTA_VIEWS`) of an evaluation: config.tta's when `tta`
        ("flip_translate", else "flip"), none without it or with config.tta "none"."""
        if not tta or self.config.get("tta") == "none":
            return "none"
        return "flip_translate" if self.config.get("tta") == "flip_translate" else "flip"

    def logits(self, variables, images: jax.Array, *, tta: bool) -> jax.Array:
        """Eval logits float32 [B, classes] of uint8 images, as inference computes them
        (`imgllm.vision.features.image_logits`); with tta, averaged over the views of config.tta."""
        return image_logits(
            self.model,
            variables,
            images,
            image_size=self.config.image_size,
            mean=tuple(self.config.normalization.mean),
            std=tuple(self.config.normalization.std),
            tta=self.tta_views(tta),
        )

    def eval_metrics(self, variables, batch, *, tta: bool) -> Metrics:
        logits = self.logits(variables, batch["images"], tta=tta)
        labels, mask = batch["labels"], batch["mask"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        count = mask.sum()
        return {
            "loss": metric((losses * mask).sum(), count),
            "accuracy": metric(((jnp.argmax(logits, -1) == labels) * mask).sum(), count),
        }

    def eval_logits(self, variables, arrays: Mapping[str, np.ndarray], *, batch_size: int, tta: bool) -> np.ndarray:
        """float32 [N, classes] logits of every image of `arrays` (jitted, whole batches: `padded_batch_outputs`)."""
        predict = jax.jit(lambda v, x: {"logits": self.logits(v, x, tta=tta)})
        return padded_batch_outputs(lambda images: predict(variables, images), arrays["images"], batch_size)["logits"]

    def confusion(self, variables, arrays: Mapping[str, np.ndarray], *, batch_size: int, tta: bool) -> np.ndarray:
        """int64 [classes, classes] counts of (true label, predicted class) over `arrays`."""
        predictions = self.eval_logits(variables, arrays, batch_size=batch_size, tta=tta).argmax(-1)
        matrix = np.zeros((self.model.num_classes,) * 2, np.int64)
        np.add.at(matrix, (np.asarray(arrays["labels"]), predictions), 1)
        return matrix

    def calibrate(
        self, variables, arrays: Mapping[str, np.ndarray], *, batch_size: int, fitted: dict | None = None
    ) -> dict[str, float]:
        """`imgllm.calibration.calibration_report` of the head's logits as inference computes them (no TTA) on
        `arrays`: fitted there (the held-out split: never training images) unless a stored fit is given."""
        logits = self.eval_logits(variables, arrays, batch_size=batch_size, tta=False)
        return calibration.calibration_report(logits, np.asarray(arrays["labels"]), fitted=fitted)

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names or ())}
