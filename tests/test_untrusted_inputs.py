"""Issue #14, denial of service: files, folders, images and checkpoints read from disk are not trusted to be finite
or small. Symlink loops under folders and `**` globs end with one item per real image; decompression bombs are
refused from their header; an absurd config.json, an index naming files outside the model directory, and corrupt
safetensors fail at once, naming the file."""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import inspect
import json
import os
import re
import shutil
import signal
import struct
import warnings
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image, ImageFile
from safetensors.numpy import load_file, save_file

from imgllm.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, list_image_files
from imgllm.language import hf
from imgllm.pipeline.inputs import Item, expand_inputs, glob_once, load_batch, prefetch_batches

TIME_LIMIT_S = 30  # healthy code needs well under a second; the old code ran until killed


class TimeLimitExceeded(Exception):
    """Not an OSError: glob swallows those (TimeoutError is one), and the old code ran inside glob."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeLimitExceeded in the test when its body runs longer than `seconds`, and again every second until
    it escapes (SIGALRM: main thread, POSIX)."""

    def expire(signum, frame):
        raise TimeLimitExceeded(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_png(path, size=(4, 4), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def keys(items):
    return [item.key for item in items]


# ----------------------------------------------------------------------------- symlink loops and repeated files


@pytest.fixture
def looping_tree(tmp_path):
    """L/a.png, L/sub/b.png, two folder links back to L (L/loop -> L, L/sub/up -> L), and L/ext -> E/c.png."""
    root, outside = tmp_path / "L", tmp_path / "E"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    write_png(root / "a.png")
    write_png(root / "sub" / "b.png")
    write_png(outside / "c.png")
    os.symlink(root, root / "loop")
    os.symlink(root, root / "sub" / "up")
    os.symlink(outside, root / "ext")
    return root


def test_symlink_loops_under_globs_and_folders_give_one_item_per_real_image(looping_tree):
    root = str(looping_tree)
    want = [f"{root}/a.png", f"{root}/ext/c.png", f"{root}/sub/b.png"]
    for spec in (f"{root}/**/*.png", f"{root}/**", f"{root}/*", root):
        with time_limit(TIME_LIMIT_S):
            items = expand_inputs([spec])
        assert sorted(keys(items)) == want, spec
    with time_limit(TIME_LIMIT_S):  # a.png is below a folder only through a link: named by the first such path
        items = expand_inputs([f"{root}/*/**/*.png"])
    assert sorted(keys(items)) == [f"{root}/ext/c.png", f"{root}/loop/a.png", f"{root}/sub/b.png"]
    with time_limit(TIME_LIMIT_S):
        assert list_image_files(root, recursive=True) == want  # the symlinked folder E is read, once


def test_glob_once_matches_glob_on_trees_without_repeats(tmp_path, monkeypatch):
    """Same paths as glob.glob(recursive=True) where no folder is reached twice: hidden names, trailing
    separators, literal and wildcard components, a symlinked folder, a missing folder, relative patterns."""
    tree, outside = tmp_path / "T", tmp_path / "O"
    for folder in ("x/y", "x/.hidden", "z", ".dot"):
        (tree / folder).mkdir(parents=True)
    outside.mkdir()
    for name in (
        "a1.png",
        "a2.jpg",
        "x/b.png",
        "x/y/c.png",
        "x/y/notes.txt",
        "x/.hidden/d.png",
        "z/.e.png",
        ".dot/f.png",
    ):
        (tree / name).write_bytes(b"")
    (outside / "g.png").write_bytes(b"")
    os.symlink(outside, tree / "linked")
    os.symlink(tree / "missing.png", tree / "broken.png")
    patterns = [
        "**",
        "**/*.png",
        "**/",
        "*/",
        "*",
        "a?.*",
        "**/y/*",
        "x/**",
        "x/**/*.txt",
        ".dot/**",
        "**/.e*",
        "x/.*/*",
        "nowhere/**",
        "nowhere/**/*.png",
        "[az]*",
        "linked/**",
        "**/linked",
    ]
    for pattern in patterns:
        absolute = os.path.join(tree, pattern)
        assert glob_once(absolute) == sorted(glob.glob(absolute, recursive=True)), pattern
    monkeypatch.chdir(tree)
    for pattern in patterns:
        assert glob_once(pattern) == sorted(glob.glob(pattern, recursive=True)), pattern


def test_two_paths_to_one_file_give_one_item_the_first(tmp_path, monkeypatch):
    """Decision: one item per real image. A symlink, a hard link, or "./" spelling of a file already listed adds
    nothing; the path through the fewest symlinks (the first of those) names it. Missing files stay, one each."""
    real = write_png(tmp_path / "real.png")
    os.symlink(real, tmp_path / "alias.png")
    os.link(real, tmp_path / "hard.png")
    other = write_png(tmp_path / "other.png", colour=(0, 0, 255))
    monkeypatch.chdir(tmp_path)
    items = expand_inputs(
        ["real.png", "./real.png", str(tmp_path / "alias.png"), "hard.png", "other.png", "gone.png", "gone.png"]
    )
    assert keys(items) == ["real.png", "other.png", "gone.png"]
    assert keys(expand_inputs([str(tmp_path / "alias.png"), "real.png"])) == ["real.png"]
    assert keys(expand_inputs([str(tmp_path)])) == [str(tmp_path / "hard.png"), other]


def test_folders_skip_sidecar_files_silently_and_warn_about_other_files(tmp_path):
    """The README's demo writes captions.jsonl into the folder it then captions: expanding that folder gives its
    images and says nothing about the captions, notes or the output's own .lock/.run.json/.tmp files. Another file
    without an image extension is still skipped with a warning; a broken file with an image extension, and a
    sidecar file named explicitly, stay items (error records)."""
    folder = tmp_path / "demo_images"
    (folder / "circle").mkdir(parents=True)
    images = [write_png(folder / "circle" / "0.png"), write_png(folder / "square.png", colour=(0, 0, 255))]
    for name in (
        "captions.jsonl",
        "notes.txt",
        "captions.jsonl.lock",
        "captions.jsonl.run.json",
        "index.HTML",
        "captions.jsonl.x1y2.tmp",
        "circle/labels.csv",
    ):
        (folder / name).write_text("{}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = expand_inputs([str(folder)])
    assert sorted(keys(items)) == sorted(images)
    assert [str(warning.message) for warning in caught] == []

    (folder / "photo.heic").write_bytes(b"not decodable here")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="photo.heic") as caught:
        items = expand_inputs([str(folder), str(folder / "captions.jsonl")])
    assert len(caught) == 1, [str(warning.message) for warning in caught]
    assert sorted(keys(items)) == sorted([*images, str(folder / "broken.png"), str(folder / "captions.jsonl")])


# ----------------------------------------------------------------------------- decompression bombs


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bilevel_png_bomb(path, width: int, height: int) -> str:
    """A valid 1-bit black PNG of width x height: a few KB on disk, width*height bytes once Pillow decodes it."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))
    return str(path)


def test_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    bomb = write_bilevel_png_bomb(tmp_path / "bomb.png", 8000, 8000)  # 64 MP: under Pillow's 89 MP warning
    assert os.path.getsize(bomb) < 200_000
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert inspect.signature(decode_image).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for size in (32, None):
        with pytest.raises(ImageDecodeError) as error:
            decode_image(bomb, size)
        message = str(error.value)
        assert bomb in message and "8000x8000" in message and "40,000,000" in message, message


def test_max_pixels_is_a_keyword_from_decode_image_to_prefetch_batches(tmp_path):
    path = write_png(tmp_path / "photo.png", size=(40, 30))  # 1,200 pixels
    with pytest.raises(
        ImageDecodeError, match=re.escape(f"{path!r} is 40x30 = 1,200 pixels, more than the limit of 1,000")
    ):
        decode_image(path, 8, max_pixels=1000)
    assert decode_image(path, 8, max_pixels=1200).shape == (8, 8, 3)
    assert decode_image(path, None, max_pixels=None).shape == (30, 40, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(path, 8, max_pixels=0)
    item = Item(path)
    with pytest.raises(ImageDecodeError, match="1,000"):
        item.load(8, max_pixels=1000)
    np.testing.assert_array_equal(item.load(8), decode_image(path, 8))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = load_batch(0, [item], 2, 8, pool, max_pixels=1000)
    assert batch.errors[0].startswith("ImageDecodeError: ") and "1,000" in batch.errors[0]
    assert not batch.images.any()
    refused = list(prefetch_batches([(0, [item])], 2, 8, max_pixels=1000))
    allowed = list(prefetch_batches([(0, [item])], 2, 8, max_pixels=None))
    assert "1,000" in refused[0].errors[0] and allowed[0].errors == {}
    np.testing.assert_array_equal(allowed[0].images[0], decode_image(path, 8))


def test_big_jpegs_count_at_their_draft_scale_and_small_jpegs_decode_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (800, 800, 3), np.uint8)).save(big, quality=90)
    # At size 32 libjpeg decodes at 1/8 scale: 100x100 pixels, under a 100,000 limit the full 800x800 exceeds.
    assert decode_image(big, 32, max_pixels=100_000).shape == (32, 32, 3)
    with pytest.raises(ImageDecodeError, match="800x800"):
        decode_image(big, None, max_pixels=100_000)
    for side in (32, 48):  # CIFAR-sized JPEGs are not drafted: the same pixels as a plain Pillow decode
        small = tmp_path / f"small{side}.jpg"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(small, quality=75)
        with Image.open(small) as image:
            plain = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decode_image(small, None), plain)
        if side == 32:
            np.testing.assert_array_equal(decode_image(small, 32), plain)


# ----------------------------------------------------------------------------- Hugging Face checkpoints


def edited_copy(src, dst, config_edit=None):
    shutil.copytree(src, dst)
    if config_edit is not None:
        path = dst / hf.CONFIG_FILE
        path.write_text(json.dumps(config_edit(json.loads(path.read_text()))))
    return dst


def test_config_claiming_more_layers_than_the_checkpoint_fails_at_once(tiny_hf_dir, tmp_path):
    bad = edited_copy(tiny_hf_dir, tmp_path / "layers", lambda c: {**c, "n_layer": 100_000})
    with time_limit(TIME_LIMIT_S), pytest.raises(hf.CheckpointMismatchError) as error:
        hf.load_gpt2(bad)
    message = str(error.value)
    assert str(bad / hf.CONFIG_FILE) in message and "n_layer=100000, but the checkpoint holds 2 h.{i} blocks" in message
    vocab = edited_copy(tiny_hf_dir, tmp_path / "vocab", lambda c: {**c, "vocab_size": 50257})
    with pytest.raises(
        hf.CheckpointMismatchError,
        match=r"vocab_size=50257, but the checkpoint holds \d+ rows of "
        r"wte.weight",
    ):
        hf.load_gpt2(vocab)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: {**c, "n_layer": 0}, "n_layer"),
        (lambda c: {**c, "n_layer": True}, "n_layer"),
        (lambda c: {**c, "n_head": "4"}, "n_head"),
        (lambda c: {**c, "n_embd": 32.0}, "n_embd"),
        (lambda c: {**c, "n_embd": 30}, "n_embd"),
        (lambda c: {**c, "layer_norm_epsilon": float("nan")}, "layer_norm_epsilon"),
        (lambda c: {**c, "layer_norm_epsilon": -1e-5}, "layer_norm_epsilon"),
        (lambda c: [c], "JSON object"),
    ],
)
def test_invalid_config_values_are_named_with_the_file(tiny_hf_dir, tmp_path, edit, key):
    bad = edited_copy(tiny_hf_dir, tmp_path / "c", edit)
    with pytest.raises(ValueError, match=re.escape(str(bad / hf.CONFIG_FILE)) + ".*" + key):
        hf.load_gpt2(bad)


def shard(
    tiny_hf_dir,
    model_dir,
    shard_dir=None,
    names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
):
    """Split the tiny checkpoint into two shards written in `shard_dir` and an index naming them by `names`."""
    shutil.copytree(tiny_hf_dir, model_dir)
    tensors = load_file(str(model_dir / hf.SAFETENSORS_FILE))
    os.remove(model_dir / hf.SAFETENSORS_FILE)
    keys_sorted = sorted(tensors)
    weight_map = {}
    for number, (name, part) in enumerate(zip(names, (keys_sorted[::2], keys_sorted[1::2]))):
        file = (shard_dir or model_dir) / f"shard{number}.safetensors"
        save_file({k: tensors[k] for k in part}, str(file), metadata={"format": "pt"})
        weight_map.update({k: name if name is not None else str(file) for k in part})
    (model_dir / hf.SAFETENSORS_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir


def test_shards_outside_the_model_directory_are_refused(tiny_hf_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cases = {
        "parent": ("../elsewhere/shard0.safetensors", "shard1.safetensors"),
        "absolute": (None, "shard1.safetensors"),  # None: the shard's absolute path
    }
    for case, names in cases.items():
        model_dir = shard(tiny_hf_dir, tmp_path / case, outside if case == "parent" else None, names)
        if case == "parent":
            shutil.move(str(outside / "shard1.safetensors"), str(model_dir / "shard1.safetensors"))
        with pytest.raises(ValueError) as error:
            hf.load_gpt2(model_dir)
        message = str(error.value)
        assert str(model_dir / hf.SAFETENSORS_INDEX_FILE) in message and "shard" in message, message
    # A link inside the directory that resolves outside it is refused too.
    linked = shard(tiny_hf_dir, tmp_path / "linked", names=("a.safetensors", "shard1.safetensors"))
    shutil.move(str(linked / "shard0.safetensors"), str(outside / "real0.safetensors"))
    os.symlink(outside / "real0.safetensors", linked / "a.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"names shard 'a.safetensors', which resolves to {outside}")):
        hf.load_gpt2(linked)


def test_hub_cache_shards_linked_to_blobs_still_load(tiny_hf_dir, tmp_path):
    """huggingface_hub snapshots link every file to ../../blobs/<hash>: those links stay inside the repo cache."""
    repo = tmp_path / "models--someone--tiny"
    snapshot = shard(tiny_hf_dir, repo / "snapshots" / "0123abcd", names=("shard0.safetensors", "shard1.safetensors"))
    (repo / "blobs").mkdir()
    for name in ("shard0.safetensors", "shard1.safetensors"):
        shutil.move(str(snapshot / name), str(repo / "blobs" / f"blob-{name}"))
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    _, params = hf.load_gpt2(snapshot)
    _, expected = hf.load_gpt2(tiny_hf_dir)
    np.testing.assert_array_equal(params["wte"]["embedding"], expected["wte"]["embedding"])


def test_corrupt_and_truncated_safetensors_are_named(tiny_hf_dir, tmp_path):
    for case, damage in {"truncated": lambda data: data[:-100], "header": lambda data: b"\xff" * 8 + data[8:]}.items():
        model_dir = edited_copy(tiny_hf_dir, tmp_path / case)
        weights = model_dir / hf.SAFETENSORS_FILE
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(hf.CorruptCheckpointError, match=re.escape(str(weights))):
            hf.load_gpt2(model_dir)


def test_the_tokenizer_class_is_never_read_from_the_directory(tiny_hf_dir, tmp_path):
    """tokenizer_config.json may name any class (AutoTokenizer would build it): load_tokenizer builds its own."""
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="BertTokenizer", auto_map={"AutoTokenizer": ["evil.Tokenizer", None]})
    config_path.write_text(json.dumps(config))
    text = "a photo of a cat"
    assert hf.load_tokenizer(model_dir)(text)["input_ids"] == hf.load_tokenizer(tiny_hf_dir)(text)["input_ids"]
    assert isinstance(hf.load_tokenizer(model_dir), transformers.PreTrainedTokenizerFast)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer"):
        hf.load_tokenizer(model_dir)
