"""Caption data sources (demo, captions folders, tfds coco_captions) and the captioner task's rows and training."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from imgllm.captions import data as caption_data
from imgllm.train import captioner

jax.config.update("jax_enable_x64", False)

CLASSES = ("circle", "square")
TEMPLATES = ("a photo of a {label}.", "a picture of a {label}.")


def test_caption_rows_mix_dataset_and_template_captions():
  captions = (("a red circle", "a round red thing"), ("a blue square",), ("a green circle",))
  labels = np.array([0, 1, 0])
  rows, texts = captioner.caption_rows(captions, labels, CLASSES, TEMPLATES, 0.2, seed=0)
  assert texts[:4] == ["a red circle", "a round red thing", "a blue square", "a green circle"]
  assert list(rows[:4]) == [0, 0, 1, 2]
  assert len(texts) == 5                                   # 4 caption rows + 1 template row = 20%
  assert texts[4] == TEMPLATES[0].format(label=CLASSES[labels[rows[4]]]) or \
      texts[4] == TEMPLATES[1].format(label=CLASSES[labels[rows[4]]])
  again = captioner.caption_rows(captions, labels, CLASSES, TEMPLATES, 0.2, seed=0)
  assert again[1] == texts and list(again[0]) == list(rows)
  # No captions (e.g. CIFAR-10): one template caption per image, naming its class.
  rows, texts = captioner.caption_rows(None, labels, CLASSES, TEMPLATES, 0.25, seed=1)
  assert list(rows) == [0, 1, 2] and all(CLASSES[l] in t for l, t in zip(labels, texts))
  with pytest.raises(ValueError, match="template_fraction=1.5"):
    captioner.caption_rows(captions, labels, CLASSES, TEMPLATES, 1.5, seed=0)


def test_encode_captions_layout_and_length_error():
  encode = lambda text: [ord(c) - 96 for c in text]
  ids, mask = captioner.encode_captions(encode, 0, ["ab", "c"], max_tokens=3)
  np.testing.assert_array_equal(ids, [[0, 1, 2, 0, 0], [0, 3, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
  with pytest.raises(ValueError, match="'abcd' has 4 tokens"):
    captioner.encode_captions(encode, 0, ["abcd"], max_tokens=3)


def _write_caption_folder(root, records):
  for i, (path, _, _) in enumerate(records):
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if not os.path.exists(full):
      Image.fromarray(np.full((12, 10, 3), 20 * i, np.uint8)).save(full)
  with open(os.path.join(root, "train.jsonl"), "w") as f:
    for path, caption, label in records:
      f.write(json.dumps({"path": path, "caption": caption, **({"label": label} if label else {})}) + "\n")


def test_caption_folder_groups_references_and_carves_validation(tmp_path):
  records = [(f"{cls}/{i}.png", f"a {cls} number {i}", None) for cls in CLASSES for i in range(3)]
  records.append(("circle/0.png", "another caption of circle 0", None))
  _write_caption_folder(tmp_path, records)
  train = caption_data.load_caption_dataset(f"captions:{tmp_path}", "train", image_size=8)
  validation = caption_data.load_caption_dataset(f"captions:{tmp_path}", "validation", image_size=8)
  assert train.class_names == CLASSES and train.images.shape == (4, 8, 8, 3)
  assert len(validation) == 2 and sorted(validation.labels.tolist()) == [0, 1]   # last file of each class
  first = train.paths.index(os.path.join(str(tmp_path), "circle", "0.png"))
  assert train.captions[first] == ("a circle number 0", "another caption of circle 0")
  assert not set(train.paths) & set(validation.paths)


def test_caption_file_errors_name_file_and_line(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"path": "a.png", "caption": "x"}\n{"path": "b.png"}\n')
  with pytest.raises(caption_data.CaptionFileError, match=r"train.jsonl:2: needs a non-empty string 'caption'"):
    caption_data.read_captions_file(str(tmp_path / "train.jsonl"))
  (tmp_path / "train.jsonl").write_text('{"path": "a.png", "caption": "x", "label": "cat"}\n'
                                        '{"path": "a.png", "caption": "y", "label": "dog"}\n')
  with pytest.raises(caption_data.CaptionFileError, match="two labels"):
    caption_data.group_captions(caption_data.read_captions_file(str(tmp_path / "train.jsonl")))
  with pytest.raises(caption_data.CaptionFileError, match="does not exist"):
    caption_data.load_caption_dataset(f"captions:{tmp_path}/missing", "train")


def test_demo_source_has_one_exact_caption_per_image():
  dataset = caption_data.load_caption_dataset("demo", "validation", num_examples=6)
  assert len(dataset.captions) == 6 and all(len(refs) == 1 for refs in dataset.captions)
  for refs, label in zip(dataset.captions, dataset.labels):
    assert dataset.class_names[label] in refs[0]


def test_coco_example_label_is_largest_object():
  example = {"image": np.zeros((5, 6, 3), np.uint8),
             "captions": {"text": np.array([b"a cat on a mat", b"a mat with a cat"]), "id": np.array([1, 2])},
             "objects": {"label": np.array([3, 7]), "bbox": np.array([[0, 0, .1, .1], [0, 0, .5, .5]])}}
  image, captions, label = caption_data.coco_example_to_record(example)
  assert captions == ("a cat on a mat", "a mat with a cat") and label == 7 and image.shape == (5, 6, 3)
  example["objects"] = {"label": np.zeros(0, np.int64), "bbox": np.zeros((0, 4))}
  assert caption_data.coco_example_to_record(example)[2] == -1


def test_coco_captions_through_tfds_mock_data():
  pytest.importorskip("tensorflow", reason="the coco_captions builder's feature spec needs TensorFlow")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = caption_data.load_caption_dataset("tfds:coco_captions", "validation", image_size=16)
  assert dataset.images.shape[1:] == (16, 16, 3) and len(dataset.class_names) == 80
  assert all(len(refs) >= 1 for refs in dataset.captions)


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory):
  """A tiny demo classifier trained by the real loop (its checkpoint is the captioner's frozen CNN)."""
  from imgllm.configs import cnn_tiny
  from imgllm.train import loop
  workdir = str(tmp_path_factory.mktemp("classifier"))
  config = cnn_tiny.get_config()
  config.num_epochs = 1.0
  config.eval_split = ""
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_short_captioner_training_improves_caption_scores(classifier_workdir, tmp_path):
  from imgllm import parallel
  from imgllm.configs import captioner_tiny
  from imgllm.train import loop
  config = captioner_tiny.get_config()
  config.classifier_workdir = classifier_workdir
  task = captioner.CaptionerTask(config)
  train_arrays = task.train_arrays()
  eval_arrays = task.eval_arrays()
  mesh = parallel.make_mesh()
  initial = task.prepare_variables(jax.device_get(jax.jit(task.init_variables)(jax.random.PRNGKey(0))),
                                   train_arrays)
  before = loop.evaluate_arrays(task, initial, eval_arrays, mesh, batch_size=config.eval_batch_size, tta=False)
  result = loop.train_and_evaluate(config, str(tmp_path / "captioner"), task=task)
  after = result.final_eval
  assert set(after) >= {"loss", "token_accuracy", "caption_exact", "accuracy", "lm_accuracy"}
  assert after["loss"] < before["loss"] - 1.0
  assert after["token_accuracy"] > before["token_accuracy"] + 0.2
  # The CNN is frozen: its accuracy is the same before and after.
  assert after["accuracy"] == pytest.approx(before["accuracy"])
  # The checkpoint exports as a pipeline checkpoint with the bridge and the trained tokenizer.
  out = captioner.export_pipeline_checkpoint(str(tmp_path / "captioner"), str(tmp_path / "pipeline"))
  from imgllm.pipeline_checkpoint import load_pipeline
  pipeline = load_pipeline(out)
  assert set(pipeline.params) == {"cnn", "lm", "bridge"}
  assert pipeline.config["bridge"]["feature_source"] == "spatial"
  assert pipeline.config["class_prompt_templates"] == list(config.captions.templates)
