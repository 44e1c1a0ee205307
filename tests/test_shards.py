"""Sharded captioning without JAX coordination (issue #27): `caption_files(..., shard=(i, N))` / infer.py --shard=i/N
writes part i of the output, `merge_parts` / infer.py merge joins the parts into the file one unsharded run writes
(records, sampled captions and run options alike), an interrupted part resumes, and merge refuses missing or
incomplete parts naming them."""

from __future__ import annotations

import contextlib
import io
import os
import shutil

import pytest
from test_infer import read_jsonl, write_images

from imgllm.pipeline import CaptionOptions, caption_files
from imgllm.pipeline.batch import merge_parts
from imgllm.pipeline.inputs import Item, shard_item_index, shard_items
from imgllm.pipeline.outputs import RUN_OPTIONS_SUFFIX, OutputError, find_parts, part_path

SAMPLING = dict(batch_size=4, method="sample", temperature=2.0, num_captions=2, seed=7)
SAMPLING_FLAGS = [
    "--batch-size",
    "4",
    "--decoding",
    "sample",
    "--temperature",
    "2",
    "--num-captions",
    "2",
    "--seed",
    "7",
]
IMAGES = 13  # batches of 4, 4, 4 and 1


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return write_images(tmp_path_factory.mktemp("shard_images"), IMAGES)


@pytest.fixture(scope="module")
def unsharded(checkpoint, images, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one unsharded sampling run's output and run options, JSON lines and CSV."""
    folder = tmp_path_factory.mktemp("unsharded")
    written = {}
    for suffix in ("jsonl", "csv"):
        out = folder / f"captions.{suffix}"
        list(caption_files(checkpoint, images, CaptionOptions(**SAMPLING), output=str(out)))
        written[suffix], written[suffix + RUN_OPTIONS_SUFFIX] = out.read_bytes(), read_options_bytes(out)
    return written


def read_options_bytes(output) -> bytes:
    with open(str(output) + RUN_OPTIONS_SUFFIX, "rb") as f:
        return f.read()


def cli(infer, *argv) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of infer.py's main in this process; one-line errors exit through SystemExit."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = infer.main([str(arg) for arg in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, [line for line in stderr.getvalue().splitlines() if line.strip()]


def caption_shard(infer, checkpoint, images, out, shard: str, *flags) -> None:
    status, lines = cli(
        infer,
        *images,
        "--checkpoint",
        checkpoint,
        "--output",
        out,
        f"--shard={shard}",
        "--quiet",
        "--compilation-cache",
        "",
        *SAMPLING_FLAGS,
        *flags,
    )
    assert status == 0, lines


def test_shard_items_map_back_to_their_input_positions():
    items = [Item(str(n)) for n in range(IMAGES)]
    for count in (1, 2, 3, 5):
        keys = sorted(int(item.key) for i in range(count) for item in shard_items(items, 4, (i, count)))
        assert keys == list(range(IMAGES))
        for index in range(count):
            for position, item in enumerate(shard_items(items, 4, (index, count))):
                assert shard_item_index(position, (index, count), 4) == int(item.key)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_shards_merged_are_byte_for_byte_one_unsharded_run(checkpoint, infer, images, unsharded, tmp_path, count):
    """Sampled captions too: shard i runs the full run's batches b % N == i with their keys; 5 shards of 4 batches
    leave one part empty."""
    out = tmp_path / "captions.jsonl"
    for index in range(count):
        caption_shard(infer, checkpoint, images, out, f"{index}/{count}")
    parts = [part_path(out, (index, count)) for index in range(count)]
    assert find_parts(out) == {(index, count): path for index, path in enumerate(parts)}
    assert os.path.basename(parts[0]) == f"captions.shard-00000-of-{count:05d}.jsonl"
    assert sum(len(read_jsonl(path)) for path in parts) == IMAGES
    status, lines = cli(infer, "merge", "--output", out, "--html", tmp_path / "page.html")
    assert status == 0 and lines == [f"infer.py: merged {IMAGES} records (0 errors) into {out}"], lines
    assert out.read_bytes() == unsharded["jsonl"]
    assert read_options_bytes(out) == unsharded["jsonl" + RUN_OPTIONS_SUFFIX]
    assert (tmp_path / "page.html").read_text().count("data:image/png;base64,") == IMAGES
    assert all(os.path.exists(path) for path in parts)  # kept without --remove-parts
    # Merging again gives the same file; --remove-parts then deletes the parts and their run options.
    assert cli(infer, "merge", "--output", out, "--remove-parts")[0] == 0
    assert out.read_bytes() == unsharded["jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["captions.jsonl", "captions.jsonl" + RUN_OPTIONS_SUFFIX, "page.html"]


def test_csv_shards_merge_to_the_unsharded_csv(checkpoint, unsharded, images, tmp_path):
    out = tmp_path / "captions.csv"
    for index in range(2):
        list(caption_files(checkpoint, images, CaptionOptions(**SAMPLING), output=str(out), shard=(index, 2)))
    assert os.path.exists(tmp_path / "captions.shard-00001-of-00002.csv")
    assert len(merge_parts(out)) == IMAGES
    assert out.read_bytes() == unsharded["csv"]
    assert read_options_bytes(out) == unsharded["csv" + RUN_OPTIONS_SUFFIX]


def test_an_interrupted_part_resumes_and_merge_waits_for_it(checkpoint, infer, images, unsharded, tmp_path):
    """A part cut mid-line (a killed shard) with an error record: merge names it and the absent part with their
    counts; resumed with --retry-errors (its re-captioned record lands at the end of the part), the merged output is
    still the unsharded run's, in input order."""
    out = tmp_path / "captions.jsonl"
    hidden = tmp_path / "hidden.png"
    shutil.move(images[1], hidden)  # batch 0, shard 0: an error record at first
    try:
        caption_shard(infer, checkpoint, images, out, "0/2")
    finally:
        shutil.move(hidden, images[1])
    part = part_path(out, (0, 2))
    lines = open(part).read().splitlines(keepends=True)
    assert len(lines) == 8 and "error" in lines[1]
    with open(part, "w") as f:
        f.write("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])

    status, errors = cli(infer, "merge", "--output", out)
    assert status == 2 and errors == [
        f"infer.py: error: merge: cannot merge {out}: 2 of 2 parts missing or incomplete: {part} (3 of 8 images); "
        f"{part_path(out, (1, 2))} (absent); run (or resume) those shards, then merge again"
    ], errors
    assert not out.exists()

    caption_shard(infer, checkpoint, images, out, "0/2", "--retry-errors")
    assert [record["path"] for record in read_jsonl(part)][:4] == [images[0], images[2], images[1], images[3]]
    caption_shard(infer, checkpoint, images, out, "1/2")
    assert len(merge_parts(out)) == IMAGES
    assert out.read_bytes() == unsharded["jsonl"]


def test_merge_refuses_parts_of_another_run(checkpoint, images, tmp_path):
    """Parts of two shard counts, or a part made with other options, are named in one line; nothing is written."""
    out = tmp_path / "captions.jsonl"
    with pytest.raises(OutputError, match="no parts of .*captions.jsonl to merge .*captions.shard-00000-of-00002"):
        merge_parts(out)
    list(caption_files(checkpoint, images, CaptionOptions(**SAMPLING), output=str(out), shard=(0, 2)))
    list(caption_files(checkpoint, images, CaptionOptions(**{**SAMPLING, "seed": 8}), output=str(out), shard=(1, 2)))
    with pytest.raises(
        OutputError,
        match=r"captions.shard-00001-of-00002.jsonl was written with other options or "
        r"inputs than .*captions.shard-00000-of-00002.jsonl \(seed was 7, now 8\)",
    ):
        merge_parts(out)
    list(caption_files(checkpoint, images[:4], CaptionOptions(**SAMPLING), output=str(out), shard=(2, 3)))
    with pytest.raises(
        OutputError,
        match=r"different shard counts .*2 of 2 .*shard-00000-of-00002.jsonl, \.\.\.\); "
        r"1 of 3 .*shard-00002-of-00003.jsonl\)",
    ):
        merge_parts(out)
    assert not out.exists()
    # Resuming a part with another batch size (so other batches) is refused naming the shard.
    with pytest.raises(
        OutputError,
        match=r"shard-00000-of-00002.jsonl was written with other options .*"
        r'"batch_size": 4.*"batch_size": 8',
    ):
        options = CaptionOptions(**{**SAMPLING, "batch_size": 8})
        list(caption_files(checkpoint, images, options, output=str(out), shard=(0, 2)))


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--shard=3/2", "--shard=3/2: the shard index must be below the count (0/2 to 1/2)"),
        ("--shard=2/2", "--shard=2/2: the shard index must be below the count (0/2 to 1/2)"),
        ("--shard=0/0", "--shard=0/0: the count N must be >= 1"),
        ("--shard=a/b", "--shard=a/b: write the shard as i/N, 0 <= i < N (e.g. --shard=0/4 ... --shard=3/4)"),
        ("--shard=-1/2", "--shard=-1/2: write the shard as i/N"),
        ("--shard=1", "--shard=1: write the shard as i/N"),
    ],
)
def test_bad_shard_flags_are_one_line(checkpoint, infer, images, tmp_path, flag, message):
    status, lines = cli(infer, images[0], "--checkpoint", checkpoint, "--output", tmp_path / "out.jsonl", flag)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"infer.py: error: {message}"), lines
    assert os.listdir(tmp_path) == []


def test_shard_refuses_html_and_bad_values_from_python(checkpoint, infer, images, tmp_path):
    status, lines = cli(infer, images[0], "--checkpoint", checkpoint, "--shard=0/2", "--html", tmp_path / "p.html")
    assert status == 2 and lines == [
        "infer.py: error: --html with --shard: each shard writes a part of the output; "
        "write the page when merging (infer.py merge --output OUTPUT --html PAGE)"
    ]
    for shard in ((2, 2), (-1, 2), (0, 0), "0/2", (0.0, 2)):
        with pytest.raises(ValueError, match="shard must be"):
            caption_files(checkpoint, images, shard=shard)
