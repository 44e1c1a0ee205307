"""Issue #27: inputs stream. A folder is listed one directory at a time while the first batches are captioned (a
million files start at once), in the order of the sorted paths; a shard drops the other shards' items as they pass;
a part records its input list once it is listed, and merge refuses a part whose run stopped before that."""

from __future__ import annotations

import gc
import os
import shutil

import pytest
from test_infer import read_jsonl, write_images

from imgllm.data.images import list_image_files
from imgllm.pipeline import CaptionOptions, caption_files, inputs
from imgllm.pipeline.batch import merge_parts
from imgllm.pipeline.inputs import InputStream, Item, expand_inputs, in_shard, inputs_fingerprint, shard_items
from imgllm.pipeline.outputs import (
    RUN_OPTIONS_SUFFIX,
    OutputError,
    part_path,
    read_run_options,
    started_shard,
    write_run_options,
)

FOLDERS, PER_FOLDER = 6, 2  # 12 images in batches of 2: batch b is folder b's two images
GREEDY = dict(batch_size=2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """A folder of FOLDERS sub-folders of PER_FOLDER images each (and a loose image at the top: the 13th)."""
    root = tmp_path_factory.mktemp("tree")
    for number in range(FOLDERS):
        write_images(root / f"d{number}", PER_FOLDER, seed=number)
    write_images(root / "top", 1, seed=99)
    os.replace(root / "top" / "img_000.png", root / "z_last.png")
    os.rmdir(root / "top")
    return str(root)


@pytest.fixture
def folders_read(monkeypatch) -> list[str]:
    """The folders the input walk has read so far, in order (`inputs._sorted_entries`)."""
    read: list[str] = []
    listing = inputs._sorted_entries

    def counting(folder):
        read.append(folder)
        return listing(folder)

    monkeypatch.setattr(inputs, "_sorted_entries", counting)
    return read


def test_a_folder_streams_in_the_order_of_its_sorted_paths(tree, folders_read):
    want = list_image_files(tree, recursive=True)
    assert [item.key for item in expand_inputs([tree])] == want
    folders_read.clear()
    stream = InputStream([tree])
    assert next(stream) == (0, Item(want[0]))
    assert len(folders_read) == 2  # the top folder and the first sub-folder, of 1 + FOLDERS
    assert stream.listing is None and stream.count == 1
    assert [item for _, item in stream] == [Item(path) for path in want[1:]]
    assert stream.listing.count == len(want) and stream.listing.fingerprint == inputs_fingerprint(map(Item, want))


def test_a_folder_through_a_symlink_does_not_wait_for_the_end(tree, tmp_path, folders_read):
    """Every path below a linked folder crosses that link: none can be named better later, so nothing waits."""
    os.symlink(tree, tmp_path / "linked")
    stream = InputStream([str(tmp_path / "linked")])
    position, item = next(stream)
    assert (position, item.key) == (0, str(tmp_path / "linked" / "d0" / "img_000.png"))
    assert len(folders_read) == 2


def test_captioning_starts_before_the_listing_ends(checkpoint, tree, tmp_path, folders_read, monkeypatch):
    """Batch 0 is loaded once the second folder is read (its first item closes batch 0), of 1 + FOLDERS."""
    at_first_load: list[int] = []
    load_batch = inputs.load_batch

    def recording(*args, **kwargs):
        at_first_load.append(len(folders_read))
        return load_batch(*args, **kwargs)

    monkeypatch.setattr(inputs, "load_batch", recording)
    out = tmp_path / "captions.jsonl"
    records = list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out)))
    assert at_first_load[0] <= 3 < 1 + FOLDERS, folders_read
    assert [record["path"] for record in records] == list_image_files(tree, recursive=True)
    assert read_jsonl(out) == records


def test_a_shard_keeps_only_its_own_items(checkpoint, tree, tmp_path, folders_read, monkeypatch):
    """Shard 1 of 3 owns batches 1 and 4: those are the only items loaded, and no more than the item being listed
    (and the one that closes a batch) of the other shards' is alive at any time; merged with the other shards its
    part gives the unsharded output."""
    paths = list_image_files(tree, recursive=True)
    own = {item.key for item in shard_items([Item(path) for path in paths], 2, (1, 3))}
    others_alive: list[int] = []
    loaded: list[str] = []
    listing, load_batch = inputs._sorted_entries, inputs.load_batch

    def count_others() -> None:
        others_alive.append(sum(type(o) is Item and o.key in paths and o.key not in own for o in gc.get_objects()))

    def counting(folder):
        count_others()
        return listing(folder)

    def recording(index, items, *args, **kwargs):
        count_others()
        loaded.extend(item.key for item in items)
        return load_batch(index, items, *args, **kwargs)

    monkeypatch.setattr(inputs, "_sorted_entries", counting)
    monkeypatch.setattr(inputs, "load_batch", recording)
    out = tmp_path / "captions.jsonl"
    list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out), shard=(1, 3)))
    assert loaded == [path for path in paths if path in own]
    assert max(others_alive) <= 2 and len(others_alive) > FOLDERS, others_alive
    monkeypatch.undo()
    for index in (0, 2):
        list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out), shard=(index, 3)))
    unsharded = tmp_path / "unsharded.jsonl"
    list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(unsharded)))
    assert len(merge_parts(out)) == len(paths)
    assert out.read_bytes() == unsharded.read_bytes()


def test_a_stream_drops_the_other_shards_items_as_they_pass(tree):
    paths = list_image_files(tree, recursive=True)
    stream = InputStream([tree], keep=lambda position: in_shard(position, (1, 3), 2))
    kept = list(stream)
    assert [position for position, _ in kept] == [2, 3, 8, 9]
    assert [item.key for _, item in kept] == [paths[position] for position, _ in kept]
    assert stream.listing.count == len(paths) and stream.kept == 4


def test_merge_refuses_a_part_that_stopped_before_listing_its_inputs(checkpoint, tree, tmp_path):
    """A part's input list is recorded once it is listed; a part killed before has none: merge names it, and
    resuming it finishes it."""
    out = tmp_path / "captions.jsonl"
    for index in (0, 1):
        list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out), shard=(index, 2)))
    part = part_path(out, (1, 2))
    options = read_run_options(part + RUN_OPTIONS_SUFFIX)
    assert options["shard"]["images"] == len(options["shard_paths"]) == 6
    lines = open(part).read().splitlines(keepends=True)
    with open(part, "w") as f:
        f.write(lines[0])
    write_run_options(part + RUN_OPTIONS_SUFFIX, started_shard(options))
    with pytest.raises(OutputError, match=f"{part} \\(its run stopped before it had listed its inputs\\)"):
        merge_parts(out)
    list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out), shard=(1, 2)))
    assert read_run_options(part + RUN_OPTIONS_SUFFIX) == options
    assert len(merge_parts(out)) == FOLDERS * PER_FOLDER + 1


def test_resuming_a_listed_part_with_other_inputs_is_refused_before_compiling(checkpoint, tree, tmp_path, monkeypatch):
    from imgllm.pipeline import batch

    out = tmp_path / "captions.jsonl"
    list(caption_files(checkpoint, [tree], CaptionOptions(**GREEDY), output=str(out), shard=(0, 2)))

    def fail(*args, **kwargs):
        raise AssertionError("compiled before refusing other inputs")

    monkeypatch.setattr(batch, "compile_and_place", fail)
    extra = write_images(tmp_path / "extra", 1)
    with pytest.raises(OutputError, match=r"was written with other options \(shard was .*\"inputs\""):
        list(caption_files(checkpoint, [tree, *extra], CaptionOptions(**GREEDY), output=str(out), shard=(0, 2)))


def stopped_before_listing(part: str, keep_lines: int) -> None:
    """Makes `part` what a run killed before its inputs were listed leaves: its first lines, no input list."""
    lines = open(part).read().splitlines(keepends=True)
    with open(part, "w") as f:
        f.writelines(lines[:keep_lines])
    write_run_options(part + RUN_OPTIONS_SUFFIX, started_shard(read_run_options(part + RUN_OPTIONS_SUFFIX)))


def test_resuming_an_unlisted_part_on_changed_inputs_is_refused_before_compiling(
    checkpoint, tree, tmp_path, monkeypatch
):
    """Images added before a part's captioned ones move them to other batches (other keys): its records are not
    its shard's first images any more, and resuming is refused before anything is computed; with the inputs it
    began on, it resumes."""
    from imgllm.pipeline import batch

    root = tmp_path / "tree"
    shutil.copytree(tree, root)  # a copy that can change
    out = tmp_path / "captions.jsonl"
    list(caption_files(checkpoint, [str(root)], CaptionOptions(**GREEDY), output=str(out), shard=(1, 2)))
    part = part_path(out, (1, 2))
    stopped_before_listing(part, 3)
    write_images(root / "a_new", 2)  # sorts first: every batch moves by one

    def fail(*args, **kwargs):
        raise AssertionError("compiled before refusing a part begun on other inputs")

    with monkeypatch.context() as patch:
        patch.setattr(batch, "compile_and_place", fail)
        with pytest.raises(OutputError, match=f"{part} was begun on other inputs: .*--no-resume"):
            list(caption_files(checkpoint, [str(root)], CaptionOptions(**GREEDY), output=str(out), shard=(1, 2)))
    assert len(read_jsonl(part)) == 3  # nothing was written
    for image in os.listdir(root / "a_new"):
        os.remove(root / "a_new" / image)
    records = list(caption_files(checkpoint, [str(root)], CaptionOptions(**GREEDY), output=str(out), shard=(1, 2)))
    assert len(records) == 6


def test_the_runs_own_files_in_a_captioned_folder_are_skipped_and_named_ones_refused(checkpoint, tmp_path):
    """An output with an image suffix inside the folder it captions is not an input (the run goes on, and a rerun
    resumes); a pattern matching the run's lock is refused before anything is written."""
    write_images(tmp_path / "photos" / "a", 3)
    write_images(tmp_path / "photos" / "z", 2)
    out = tmp_path / "photos" / "z" / "out.png"
    run = lambda: list(caption_files(checkpoint, [str(tmp_path / "photos")], output=str(out), fmt="jsonl"))  # noqa: E731
    first = run()
    assert len(first) == 5 and all("error" not in record for record in first)
    assert run() == first
    pattern = str(tmp_path / "photos" / "z" / "*")
    other = tmp_path / "photos" / "z" / "other.jsonl"
    with pytest.raises(OutputError, match="other.jsonl.lock is also the input image"):
        list(caption_files(checkpoint, [pattern], output=str(other)))
    assert not other.exists()


def test_a_folder_that_cannot_be_read_is_named(tree, monkeypatch):
    scandir = os.scandir

    def refused(path):
        if os.path.basename(path) == "d1":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(inputs.os, "scandir", refused)
    with pytest.warns(UserWarning, match=r"d1 cannot be read \(Permission denied\): its images are skipped"):
        items = expand_inputs([tree])
    assert len(items) == FOLDERS * PER_FOLDER + 1 - PER_FOLDER


def test_merge_names_the_part_that_differs_from_the_others(checkpoint, tree, tmp_path):
    out = tmp_path / "captions.jsonl"
    extra = write_images(tmp_path / "extra", 1)
    for index in range(3):
        inputs_of_shard = [tree, *extra] if index == 0 else [tree]  # shard 0 listed an image the others did not
        list(caption_files(checkpoint, inputs_of_shard, CaptionOptions(**GREEDY), output=str(out), shard=(index, 3)))
    with pytest.raises(OutputError, match=f"{part_path(out, (0, 3))} was written with other options or inputs than "):
        merge_parts(out)
