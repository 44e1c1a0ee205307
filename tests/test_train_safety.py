"""What training trusts from disk: resuming on changed data, classes against the model, values that cannot run,
metrics after a resume, and stopping on SIGTERM (the train.py end-to-end SIGTERM test is in test_train_cli.py)."""

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from imgllm import data as data_lib
from imgllm.configs import cnn_tiny
from imgllm.data.folder import DataFolderError, load_image_folder
from imgllm.train import evaluation, loop, metrics_log, resume
from imgllm.vision import cnn as cnn_lib

CLASSES = ("circle", "square", "triangle")


def write_image_folder(root, per_class=16, classes=CLASSES):
    """ROOT/<class>/<i>.png from the demo's shapes (the first `len(classes)` demo classes)."""
    ds = data_lib.load_dataset("demo", "train", num_examples=400)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i, image in enumerate(ds.images[ds.labels == label][:per_class]):
            Image.fromarray(image).save(folder / f"{i:02d}.png")
    return root


def folder_config(root, num_classes=3):
    """The tiny CNN on an image folder: 48 images, batch 16, one epoch (3 steps), no evaluation."""
    config = cnn_tiny.get_config()
    config.dataset = f"folder:{root}"
    config.num_train_examples = None
    config.eval_split = ""
    config.global_batch_size = 16
    config.whiten_init_examples = 16
    config.num_epochs = 1.0
    config.model.num_classes = num_classes
    return config


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished run on a 3-class image folder: (config, data root, workdir)."""
    root = write_image_folder(tmp_path_factory.mktemp("data") / "shapes")
    workdir = str(tmp_path_factory.mktemp("run"))
    config = folder_config(root)
    loop.train_and_evaluate(config, workdir)
    return config, root, workdir


def copy_of(folder_run, tmp_path):
    """A private copy of the finished run's data and work directory, to change."""
    config, root, workdir = folder_run
    shutil.copytree(root, tmp_path / "shapes")
    shutil.copytree(workdir, tmp_path / "run")
    return folder_config(tmp_path / "shapes"), tmp_path / "shapes", str(tmp_path / "run")


def test_the_checkpoint_records_its_data(folder_run):
    config, root, workdir = folder_run
    _, meta, _, _ = evaluation.restore_for_eval(workdir)
    data = meta["data"]
    assert data["num_examples"] == 42 and data["class_names"] == list(CLASSES)  # 48 less 6 carved off
    assert len(data["fingerprint"]) == 32


def test_resume_refuses_added_images(folder_run, tmp_path):
    config, root, workdir = copy_of(folder_run, tmp_path)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "square" / "99.png")
    with pytest.raises(resume.DataChangedError, match=r"num_examples: checkpoint 42, now 43"):
        loop.train_and_evaluate(config, workdir)


def test_resume_refuses_a_renamed_class_and_changed_pixels(folder_run, tmp_path):
    config, root, workdir = copy_of(folder_run, tmp_path)
    os.rename(root / "triangle", root / "wedge")
    with pytest.raises(resume.DataChangedError) as error:
        loop.train_and_evaluate(config, workdir)
    assert "class_names: checkpoint 3 classes, now 3 (added ['wedge'], removed ['triangle'])" in str(error.value)
    assert "--allow_data_change" in str(error.value)

    os.rename(root / "wedge", root / "triangle")
    image = np.asarray(Image.open(root / "circle" / "00.png")).copy()
    image[0, 0] ^= 255
    Image.fromarray(image).save(root / "circle" / "00.png")
    with pytest.raises(resume.DataChangedError, match=r"fingerprint: checkpoint [0-9a-f]{32}, now [0-9a-f]{32}"):
        loop.train_and_evaluate(config, workdir)
    loop.train_and_evaluate(config, workdir, allow_data_change=True)  # told to: the finished run stays finished


def test_checkpoints_without_a_data_record_compare_classes_and_steps():
    saved = {"step": 8, "steps_per_epoch": 8, "task": {"class_names": ["a", "b"]}}
    identity = {"num_examples": 300, "fingerprint": "f", "class_names": ["a", "b", "c"]}
    assert resume.data_differences(saved, identity, steps_per_epoch=9) == [
        "class_names: checkpoint 2 classes, now 3 (added ['c'], removed [])",
        "steps_per_epoch: checkpoint 8, now 9",
    ]
    assert resume.data_differences(saved, {**identity, "class_names": ["a", "b"]}, steps_per_epoch=8) == []


def test_more_classes_than_the_model_is_refused_naming_both(tmp_path):
    root = write_image_folder(tmp_path / "shapes", per_class=4)
    with pytest.raises(ValueError, match=r"has 3 classes but config.model.num_classes=2"):
        loop.train_and_evaluate(folder_config(root, num_classes=2), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def test_a_class_that_fails_to_decode_is_refused_even_in_a_subset(tmp_path):
    root = write_image_folder(tmp_path / "shapes", per_class=4)
    for path in (root / "triangle").iterdir():
        path.write_bytes(b"not an image")
    with pytest.warns(UserWarning), pytest.raises(DataFolderError, match=r"class 'triangle' has no decodable images"):
        load_image_folder(root, "train_full", num_examples=9)
    # A subset too small to reach a class is not an error: that class simply has no files in it.
    assert len(load_image_folder(root, "train_full", num_examples=2, image_size=32)) == 2


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_epochs", math.inf, r"config.num_epochs=inf must be a finite number > 0"),
        ("num_epochs", math.nan, r"config.num_epochs=nan must be a finite number > 0"),
        ("model.num_classes", 0, r"num_classes=0 must be a positive integer"),
    ],
)
def test_values_that_cannot_run_fail_up_front(tmp_path, key, value, message):
    config = cnn_tiny.get_config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path))


def test_cnn_presets_refuse_non_positive_sizes():
    with pytest.raises(ValueError, match=r"widths=\(8, 0, 16\)"):
        cnn_lib.cnn_preset("tiny", widths=(8, 0, 16))


def test_metrics_rewind_drops_what_a_resumed_run_writes_again(tmp_path):
    writer = metrics_log.MetricsWriter(str(tmp_path))
    for step in range(1, 9):
        writer.write({"step": step, "split": "train"})
    writer.write({"step": 4, "split": "eval"})
    writer.write({"step": 8, "split": "final_eval"})
    with open(writer.path, "a") as f:
        f.write('{"step": 9, "spl')  # cut short by a kill
    writer.rewind(6)
    with open(writer.path) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(1, 7)] + [(4, "eval")]
    writer.rewind(8)  # a finished run evaluates again: its final_eval goes
    writer.write({"step": 8, "split": "final_eval"})
    writer.rewind(8)
    with open(writer.path) as f:
        assert sum('"final_eval"' in line for line in f) == 0


def test_sigterm_stops_after_the_step_with_its_checkpoint_committed(tmp_path, monkeypatch):
    """In process: the signal arrives as step 3 is dispatched. Resuming from it: test_train_cli.py."""
    config = cnn_tiny.get_config()
    config.eval_split = ""
    config.checkpoint_every_steps = 100
    config.log_every_steps = 1
    config.profile_steps = "0,2"  # a jax.profiler trace of steps 1-2, stopped cleanly by the signal too
    make_feed = loop.feed_lib.make_feed

    def feed_signalling_at_step_3(*args, **kwargs):
        feed, steps = make_feed(*args, **kwargs), []
        step_args = feed.args

        def args(index):  # called once to compile, then once a step
            steps.append(index)
            if len(steps) == 1 + 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_args(index)

        feed.args = args
        return feed

    monkeypatch.setattr(loop.feed_lib, "make_feed", feed_signalling_at_step_3)
    previous_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.TrainingStopped, match=r"stopped by SIGTERM at step 3 of 16") as stopped:
        loop.train_and_evaluate(config, str(tmp_path))
    assert stopped.value.step == 3 and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous_handler
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [3]
    assert evaluation.restore_for_eval(str(tmp_path))[1]["step"] == 3
    with open(tmp_path / metrics_log.METRICS_FILE) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    traces = [name for _, _, names in os.walk(tmp_path / "profile") for name in names]
    assert any(name.endswith(".xplane.pb") for name in traces), traces
