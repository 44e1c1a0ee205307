"""Tests of imgllm.data: tfds (mocked), image folders (generated files), demo shapes, batching."""

import importlib.util
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from imgllm.data import (
    ImageDataset,
    ImageDecodeError,
    carve_validation_indices,
    decode_image,
    decode_image_files,
    demo,
    epoch_batch_indices,
    folder,
    gather_batch,
    list_image_files,
    load_dataset,
)
from imgllm.data import images as images_module
from imgllm.data.folder import DataFolderError

CLASSES = ("apple", "bus", "cat")


def _pixel_pattern(label: int, index: int, size=(8, 8)) -> np.ndarray:
    """A distinct, exactly reproducible RGB image per (label, index)."""
    height, width = size
    base = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3)
    return ((base * 7 + label * 61 + index * 13) % 256).astype(np.uint8)


def _make_folder(root, split="train", per_class=10, classes=CLASSES, size=(8, 8)):
    """ROOT/<split>/<class>/NNNN.png with lossless, distinct pixels; returns {path: pixels}."""
    written = {}
    for label, name in enumerate(classes):
        class_dir = root / split / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = _pixel_pattern(label, index, size)
            path = class_dir / f"{index:04d}.png"
            Image.fromarray(pixels).save(path)
            written[str(path)] = pixels
    return written


# ----------------------------------------------------------------------------------------------- tfds


def test_cifar10_through_tfds_data_source_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        train = load_dataset("cifar10", "train", data_dir=str(tmp_path))
        validation = load_dataset("cifar10", "validation", data_dir=str(tmp_path))
        full = load_dataset("tfds:cifar10", "train_full", data_dir=str(tmp_path))
        test = load_dataset("cifar10", "test", data_dir=str(tmp_path), num_examples=7)
        again = load_dataset("cifar10", "validation", data_dir=str(tmp_path))
    assert "tensorflow" not in sys.modules  # read through data_source: TensorFlow never imported
    assert full.images.shape == (40, 32, 32, 3) and full.images.dtype == np.uint8
    assert full.labels.dtype == np.int32 and len(full.class_names) == 10
    assert len(test) == 7
    # validation is carved from train: disjoint, together the whole train split, class-balanced
    expected_train, expected_validation = carve_validation_indices(full.labels)
    np.testing.assert_array_equal(validation.images, full.images[expected_validation])
    np.testing.assert_array_equal(train.images, full.images[expected_train])
    assert len(train) + len(validation) == len(full)
    np.testing.assert_array_equal(again.images, validation.images)


def test_tfds_preparation_without_its_optional_modules_names_the_install_command(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from imgllm.data.tfds_source import TFDS_PREPARE_INSTALL, TfdsPrepareError, open_split

    if all(importlib.util.find_spec(m) for m in ("tensorflow", "importlib_resources")):
        pytest.skip("the tfds-prepare extra is installed: preparing would succeed")
    builder = tfds.testing.DummyMnist(data_dir=str(tmp_path), file_format="array_record")
    with pytest.raises(TfdsPrepareError, match=re.escape(TFDS_PREPARE_INSTALL)):
        open_split(builder, "train")


# --------------------------------------------------------------------------------------- image folders


def test_folder_reads_pixels_labels_and_class_names(tmp_path):
    written = _make_folder(tmp_path, per_class=4)
    data = load_dataset(f"folder:{tmp_path}", "train_full")
    assert data.class_names == CLASSES
    assert data.images.shape == (12, 8, 8, 3) and data.images.dtype == np.uint8
    for image, label, path in zip(data.images, data.labels, data.paths):
        np.testing.assert_array_equal(image, written[path])
        assert CLASSES[label] == os.path.basename(os.path.dirname(path))


def test_folder_carves_a_deterministic_class_balanced_validation_split(tmp_path):
    _make_folder(tmp_path, per_class=20)
    (tmp_path / "train" / "cat" / "0020.png").write_bytes((tmp_path / "train" / "cat" / "0000.png").read_bytes())
    spec = f"folder:{tmp_path}"
    validation = load_dataset(spec, "validation")
    train = load_dataset(spec, "train")
    full = load_dataset(spec, "train_full")
    assert np.bincount(validation.labels).tolist() == [2, 2, 2]  # round(10% of 20), round(10% of 21)
    # the last files of each class in name order, the same on every call and for every seed
    assert [os.path.basename(p) for p in validation.paths] == ["0018.png", "0019.png"] * 2 + ["0019.png", "0020.png"]
    assert load_dataset(spec, "validation", seed=5).paths == validation.paths
    assert set(train.paths).isdisjoint(validation.paths)
    assert sorted(train.paths + validation.paths) == sorted(full.paths)
    fifth = load_dataset(spec, "validation", validation_fraction=0.25)
    assert np.bincount(fifth.labels).tolist() == [5, 5, 5]


def test_carve_validation_keeps_singleton_classes_in_train():
    train, validation = carve_validation_indices(np.array([0, 0, 0, 1, 2, 2]), 0.1)
    assert validation.tolist() == [2, 5] and train.tolist() == [0, 1, 3, 4]


def test_folder_uses_an_existing_validation_folder_and_subsets_evenly(tmp_path):
    _make_folder(tmp_path, per_class=6)
    _make_folder(tmp_path, split="val", per_class=2, classes=CLASSES[:2])
    spec = f"folder:{tmp_path}"
    validation = load_dataset(spec, "validation")
    assert [p.split(os.sep)[-3] for p in validation.paths] == ["val"] * 4
    assert validation.labels.tolist() == [0, 0, 1, 1]  # labels follow the train split's classes
    assert len(load_dataset(spec, "train")) == 18  # nothing carved when a validation folder exists
    subset = load_dataset(spec, "train", num_examples=5)
    assert np.bincount(subset.labels).tolist() == [2, 2, 1]


def test_folder_without_split_folders_is_the_train_split(tmp_path):
    _make_folder(tmp_path / "plain", split=".", per_class=3)
    data = load_dataset(f"folder:{tmp_path / 'plain'}", "train_full")
    assert data.class_names == CLASSES and len(data) == 9


def test_folder_layout_errors_are_clear_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "decode_image_files", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataFolderError, match="no class folders"):
        load_dataset(f"folder:{tmp_path / 'empty'}", "train")
    _make_folder(tmp_path / "data", per_class=2)
    (tmp_path / "data" / "train" / "dog").mkdir()
    with pytest.raises(DataFolderError, match="class 'dog' has no image files"):
        load_dataset(f"folder:{tmp_path / 'data'}", "train")
    (tmp_path / "data" / "train" / "dog").rmdir()
    with pytest.raises(DataFolderError, match="no 'test' split"):
        load_dataset(f"folder:{tmp_path / 'data'}", "test")
    _make_folder(tmp_path / "data", split="test", per_class=1, classes=("zebra",))
    with pytest.raises(DataFolderError, match="zebra"):
        load_dataset(f"folder:{tmp_path / 'data'}", "test")
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_dataset("imagenet", "train")


def _write_odd_files(class_dir):
    """Files of every awkward kind, with the RGB each should decode to (None: must be skipped)."""
    class_dir.mkdir(parents=True, exist_ok=True)
    expected = {}
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(class_dir / "grey.png")
    expected["grey.png"] = (77, 77, 77)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[...] = (200, 10, 10, 0)  # fully transparent: the hidden red must not show
    Image.fromarray(rgba, "RGBA").save(class_dir / "rgba.png")
    expected["rgba.png"] = (255, 255, 255)
    Image.fromarray(np.full((8, 8, 3), (0, 90, 180), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        class_dir / "palette.png"
    )
    expected["palette.png"] = (0, 90, 180)
    Image.fromarray(np.full((8, 8), 257 * 100, np.uint16)).save(class_dir / "deep.png")
    expected["deep.png"] = (100, 100, 100)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).convert("CMYK").save(class_dir / "cmyk.jpg")
    expected["cmyk.jpg"] = (128, 128, 128)
    good = Image.fromarray(_pixel_pattern(0, 0, (16, 16)))
    good.save(class_dir / "full.png")
    expected["full.png"] = "pattern"
    png_bytes = (class_dir / "full.png").read_bytes()
    (class_dir / "truncated.png").write_bytes(png_bytes[: len(png_bytes) // 2])
    good.save(class_dir / "full.jpg", quality=95)
    (class_dir / "truncated.jpg").write_bytes((class_dir / "full.jpg").read_bytes()[:200])
    (class_dir / "corrupt.jpg").write_bytes(os.urandom(300))
    (class_dir / "text.png").write_text("not an image at all")
    (class_dir / "notes.txt").write_text("a note")
    (class_dir / ".DS_Store").write_bytes(b"\0\1")
    expected.update({"truncated.png": None, "truncated.jpg": None, "corrupt.jpg": None, "text.png": None})
    return expected


def test_folder_converts_odd_modes_and_skips_bad_files_with_warnings(tmp_path):
    expected = _write_odd_files(tmp_path / "train" / "odd")
    with pytest.warns(UserWarning) as caught:
        data = load_dataset(f"folder:{tmp_path}", "train_full", image_size=8)
    messages = "\n".join(str(w.message) for w in caught)
    for name in ("truncated.png", "truncated.jpg", "corrupt.jpg", "text.png", "notes.txt"):
        assert name in messages
    assert ".DS_Store" not in messages
    decoded = {os.path.basename(p): image for p, image in zip(data.paths, data.images)}
    assert sorted(decoded) == sorted([name for name, rgb in expected.items() if rgb is not None] + ["full.jpg"])
    for name, rgb in expected.items():
        if isinstance(rgb, tuple):
            np.testing.assert_allclose(decoded[name].reshape(-1, 3), np.tile(rgb, (64, 1)), atol=3, err_msg=name)


def test_folder_resizes_every_image_to_the_first_or_the_requested_size(tmp_path):
    class_dir = tmp_path / "train" / "a"
    class_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(class_dir / "0.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(class_dir / "1.png")
    assert load_dataset(f"folder:{tmp_path}", "train_full").images.shape == (2, 12, 10, 3)
    assert load_dataset(f"folder:{tmp_path}", "train_full", image_size=6).images.shape == (2, 6, 6, 3)


def test_folder_cache_returns_the_same_arrays_without_decoding(tmp_path, monkeypatch):
    _make_folder(tmp_path / "data", per_class=3)
    spec, cache = f"folder:{tmp_path / 'data'}", str(tmp_path / "cache")
    first = load_dataset(spec, "train_full", cache_dir=cache)
    assert len(os.listdir(cache)) == 1
    with monkeypatch.context() as patch:
        patch.setattr(folder, "decode_image_files", lambda *a, **k: pytest.fail("cache not used"))
        second = load_dataset(spec, "train_full", cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.paths == second.paths
    changed = tmp_path / "data" / "train" / "cat" / "0000.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed)
    third = load_dataset(spec, "train_full", cache_dir=cache)  # a changed file invalidates the cache
    assert not third.images[third.paths.index(str(changed))].any()


def test_parallel_decoding_matches_sequential_and_reports_bad_files(tmp_path, monkeypatch):
    written = _make_folder(tmp_path, per_class=4)
    paths = sorted(written) + [str(tmp_path / "bad.png")]
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="bad.png"):
        sequential, kept_sequential = decode_image_files(paths, 8, num_workers=1)
    monkeypatch.setattr(images_module, "_PARALLEL_MIN_FILES", 2)
    with pytest.warns(UserWarning, match="bad.png"):
        parallel, kept_parallel = decode_image_files(paths, 8, num_workers=3)
    np.testing.assert_array_equal(parallel, sequential)
    np.testing.assert_array_equal(kept_parallel, kept_sequential)
    assert kept_parallel.tolist() == [True] * 12 + [False]


def test_a_failing_decoding_worker_is_a_clear_error(tmp_path, monkeypatch):
    paths = sorted(_make_folder(tmp_path, per_class=2))
    monkeypatch.setattr(images_module, "_PARALLEL_MIN_FILES", 2)
    monkeypatch.setattr(images_module.sys, "executable", "false")  # a "python" that exits with status 1
    with pytest.raises(RuntimeError, match="decoding worker failed"):
        decode_image_files(paths, 8, num_workers=2)


# ------------------------------------------------------------------------------ single-file decoding


def test_decode_image_resizes_by_centre_crop_or_stretch(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)  # red outer quarters are cut by a centre crop
    wide[:, 30:] = (255, 0, 0)
    wide[:, 10:30] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    cropped = decode_image(tmp_path / "wide.png", 10)
    stretched = decode_image(tmp_path / "wide.png", 10, resize="stretch")
    assert cropped.shape == stretched.shape == (10, 10, 3)
    assert cropped[..., 0].max() < 20 and cropped[..., 2].min() > 235
    assert stretched[:, 0, 0].min() > 235  # the red edge survives a stretch
    assert decode_image(tmp_path / "wide.png", (4, 6)).shape == (4, 6, 3)
    assert decode_image(tmp_path / "wide.png").shape == (20, 40, 3)


def test_decode_image_applies_the_exif_orientation(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # white left half
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = decode_image(tmp_path / "phone.jpg")
    assert upright.shape == (20, 10, 3)
    assert upright[:8].min() > 240 and upright[12:].max() < 15  # the white half is now on top


def test_decode_image_errors_name_the_file(tmp_path):
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(ImageDecodeError, match=re.escape(str(tmp_path / "fake.jpg"))):
        decode_image(tmp_path / "fake.jpg", 32)
    with pytest.raises(ImageDecodeError, match="no such file"):
        decode_image(tmp_path / "absent.png")


def test_list_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.webp", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "readme.md").write_text("x")
    with pytest.warns(UserWarning, match="readme.md"):
        assert list_image_files(tmp_path) == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG")]
    with pytest.warns(UserWarning):
        assert list_image_files(tmp_path, recursive=True)[-1] == str(tmp_path / "sub" / "c.webp")
    assert list_image_files(tmp_path / "a.png") == [str(tmp_path / "a.png")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_image_files(tmp_path / "nowhere")


def test_image_dataset_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int32), ("a",))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 3], np.int32), ("a", "b"))


# ------------------------------------------------------------------------------------------- demo


def test_demo_is_deterministic_per_seed_split_and_index():
    first = load_dataset("demo", "train", seed=3, num_examples=24)
    again = load_dataset("demo", "train", seed=3, num_examples=24)
    longer = load_dataset("demo", "train", seed=3, num_examples=30)
    other_seed = load_dataset("demo", "train", seed=4, num_examples=24)
    other_split = load_dataset("demo", "validation", seed=3, num_examples=24)
    assert first.images.tobytes() == again.images.tobytes() and first.captions == again.captions
    np.testing.assert_array_equal(longer.images[:24], first.images)
    assert not np.array_equal(other_seed.images, first.images)
    assert not np.array_equal(other_split.images, first.images)
    assert first.images.shape == (24, 32, 32, 3) and first.class_names == demo.SHAPES
    assert load_dataset("demo", "test", num_examples=2, image_size=48).images.shape == (2, 48, 48, 3)


_CAPTION = re.compile(
    r"^a (small|large) (\w+) (\w+) (?:(on the left|on the right|at the top|at the bottom|in the center)"
    r"|(above|to the left of) a (small|large) (\w+) (\w+))$"
)


def _colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    distance = np.linalg.norm(image.astype(np.float32) - np.array(demo.COLOURS[colour], np.float32), axis=-1)
    return distance < 50


def _best_matching_shape(image: np.ndarray, obj: demo.ShapeObject) -> str:
    """The shape whose anti-aliased rendering, at the object's place and size, best explains the pixels.

    Coverage per pixel is estimated as the pixel's position on the line from the background colour
    (median of pixels far from the object's colour) to the named colour.
    """
    pixels, named = image.astype(np.float32), np.array(demo.COLOURS[obj.colour], np.float32)
    background = np.median(pixels[np.linalg.norm(pixels - named, axis=-1) > 100], axis=0)
    coverage = np.clip((pixels - background) @ (named - background) / np.sum((named - background) ** 2), 0, 1)

    def mismatch(shape):
        candidate = demo.ShapeObject(shape, obj.colour, obj.size, obj.center, obj.rgb)
        return np.abs(demo.shape_mask(candidate, image.shape[0]) - coverage).sum()

    return min(demo.SHAPES, key=mismatch)


def test_demo_captions_describe_what_is_drawn():
    checked_single = checked_pair = 0
    for index in range(120):
        image, scene = demo.generate_example(7, "train", index)
        match = _CAPTION.match(scene.caption)
        assert match, scene.caption
        size, colour, shape, place, relation, size2, colour2, shape2 = match.groups()
        assert scene.label == demo.SHAPES.index(shape) and colour in demo.COLOURS
        mask = _colour_mask(image, colour)
        if place:
            rows, cols = np.nonzero(mask)
            extent = max(np.ptp(rows), np.ptp(cols)) + 1
            assert (extent >= 11) == (size == "large"), (scene.caption, extent)
            dx, dy = cols.mean() - 15.5, rows.mean() - 15.5
            expected = {
                "on the left": dx < -4,
                "on the right": dx > 4,
                "at the top": dy < -4,
                "at the bottom": dy > 4,
                "in the center": abs(dx) < 3 and abs(dy) < 3,
            }
            assert expected[place], (scene.caption, dx, dy)
            assert _best_matching_shape(image, scene.objects[0]) == shape, scene.caption
            checked_single += 1
        elif colour2 != colour:
            rows, cols = np.nonzero(mask)
            rows2, cols2 = np.nonzero(_colour_mask(image, colour2))
            if relation == "above":
                assert rows.max() < rows2.min() + 1, scene.caption
            else:
                assert cols.max() < cols2.min() + 1, scene.caption
            checked_pair += 1
    assert checked_single > 30 and checked_pair > 30


def test_demo_vocabulary_covers_every_caption():
    vocabulary = set(demo.caption_vocabulary())
    captions = load_dataset("demo", "validation", num_examples=200).captions
    assert all(set(c[0].split()) <= vocabulary for c in captions)
    assert len({c[0] for c in captions}) > 150  # varied


# ---------------------------------------------------------------------------------------- batching


def test_epoch_batch_indices_is_deterministic_and_reshuffles_per_epoch():
    a = epoch_batch_indices(100, 8, seed=1, epoch=0)
    assert a.shape == (12, 8)
    np.testing.assert_array_equal(a, epoch_batch_indices(100, 8, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_batch_indices(100, 8, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_batch_indices(100, 8, seed=2, epoch=0))
    assert len(np.unique(a)) == 96  # no example twice in an epoch
    ordered = epoch_batch_indices(10, 4, seed=0, epoch=0, shuffle=False)
    assert ordered.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_host_shards_are_disjoint_and_cover_each_global_batch():
    global_batches = epoch_batch_indices(50, 12, seed=9, epoch=3)
    shards = [epoch_batch_indices(50, 12, seed=9, epoch=3, process_index=p, process_count=4) for p in range(4)]
    assert all(s.shape == (4, 3) for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), global_batches)
    for step in range(4):
        assert sorted(np.concatenate([s[step] for s in shards]).tolist()) == sorted(global_batches[step].tolist())


def test_last_partial_batch_is_padded_and_masked():
    indices = epoch_batch_indices(10, 4, seed=0, epoch=0, drop_remainder=False)
    assert indices.shape == (3, 4) and (indices[-1, 2:] == -1).all()
    assert sorted(indices[indices >= 0].tolist()) == list(range(10))
    data = load_dataset("demo", "test", num_examples=10)
    batch = gather_batch(data, indices[-1])
    assert batch["mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(batch["images"][:2], data.images[indices[-1, :2]])
    assert not batch["images"][2:].any()


def test_batch_size_errors():
    with pytest.raises(ValueError, match="multiple of process_count"):
        epoch_batch_indices(100, 10, seed=0, epoch=0, process_count=4)
    with pytest.raises(ValueError, match="exceeds the 5 examples"):
        epoch_batch_indices(5, 8, seed=0, epoch=0)
    with pytest.raises(ValueError, match="process_index"):
        epoch_batch_indices(100, 8, seed=0, epoch=0, process_index=2, process_count=2)
