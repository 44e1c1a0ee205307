"""What `caption_files` (infer.py) trusts of its output file and the files beside it (issue #14): one run at a
time holds an output (its lock), resuming with options that change the records is refused, --retry-errors redoes
error records without leaving them in the file, a corrupt line is named by file and line, an --html page that
cannot be written fails before anything is compiled; and infer.py reports each as one line and exit status 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import filelock
import pytest
from PIL import Image
from test_infer import REPO, _subprocess_env, caption, read_jsonl, write_images
from test_pipeline import tiny_pipeline_parts, tiny_tokenizer

from imgllm.pipeline import CaptionOptions, caption_files, outputs
from imgllm.pipeline import batch as pipeline_batch
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline.outputs import (
    LOCK_SUFFIX,
    RUN_OPTIONS_SUFFIX,
    OutputError,
    OutputInUseError,
    OutputLock,
    changed_run_options,
)
from imgllm.pipeline.records import record_problem

GREEDY = dict(batch_size=4)  # the options most tests share: one compiled program
SAMPLING = dict(batch_size=4, method="sample", temperature=2.0, seed=7)


def run_cli(infer, capsys, checkpoint, *args) -> tuple[int, str]:
    """(exit status, stderr) of infer.py's main in this process."""
    capsys.readouterr()
    status = infer.main([*map(str, args), "--checkpoint", checkpoint, "--quiet", "--compilation-cache", ""])
    return status, capsys.readouterr().err


def assert_one_line_naming(stderr: str, *parts: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("infer.py: "), stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


# ----------------------------------------------------------------------------------------------- lock


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(checkpoint, infer, capsys, tmp_path):
    paths = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out.jsonl"
    first = caption_files(checkpoint, [str(tmp_path / "imgs")], CaptionOptions(**GREEDY), output=str(out))
    assert next(first)["path"] == paths[0]  # mid-run: the first batch is written, the second is not
    with pytest.raises(OutputInUseError, match=re.escape(str(out)) + " is in use by another run"):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    with pytest.raises(OutputInUseError):  # resume=False would delete what the first run writes
        caption(checkpoint, tmp_path / "imgs", output=out, resume=False, **GREEDY)
    status, stderr = run_cli(infer, capsys, checkpoint, tmp_path / "imgs", "--output", out)
    assert status == 2
    assert_one_line_naming(stderr, str(out), "in use by another run", f"pid {os.getpid()}")
    assert [r["path"] for r in read_jsonl(out)] == paths[:4]  # the refused runs wrote nothing

    first.close()  # ends the first run: its lock is released and its lock file removed
    assert not os.path.exists(str(out) + LOCK_SUFFIX)
    caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    assert [r["path"] for r in read_jsonl(out)] == paths  # each exactly once


def test_the_lock_is_released_when_the_run_fails(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out.jsonl"
    run = caption_files(checkpoint, [str(tmp_path / "imgs")], CaptionOptions(**GREEDY), output=str(out))
    next(run)
    with pytest.raises(RuntimeError, match="boom"):
        run.throw(RuntimeError("boom"))  # an exception inside the run
    with OutputLock(out):  # free again
        pass
    assert len(caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)) == 8


def test_the_lock_is_filelocks_and_its_file_holds_the_holders_pid(tmp_path):
    """Issue #25: the lock goes through the maintained `filelock` (no fcntl import: imgllm.pipeline imports on every
    platform); a second lock in this process is refused naming our pid, and release removes the lock file. (A lock
    file removed between another run's open and its lock is filelock's case: it locks the new file.)"""
    with open(outputs.__file__, encoding="utf-8") as f:
        assert "import fcntl" not in f.read()
    out = str(tmp_path / "out.jsonl")
    with OutputLock(out) as held:
        assert isinstance(held.lock, filelock.FileLock)
        assert open(held.path).read().strip() == str(os.getpid())
        with pytest.raises(OutputInUseError, match=f"pid {os.getpid()} holds {re.escape(held.path)}"):
            OutputLock(out).acquire()
    assert not os.path.exists(held.path)


@pytest.mark.slow
def test_two_concurrent_infer_processes_on_one_output(checkpoint, tmp_path):
    """Two infer.py started together on one --output: one captions, the other exits 2 saying the output is in use;
    the file holds each image exactly once (the first run keeps the lock for seconds of compiling and captioning,
    the second reaches it after its own start-up)."""
    paths = write_images(tmp_path / "imgs", 12)
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        os.path.join(REPO, "infer.py"),
        str(tmp_path / "imgs"),
        "--checkpoint",
        checkpoint,
        "--batch-size",
        "2",
        "--quiet",
        "--compilation-cache",
        "",
        "--output",
        str(out),
    ]
    processes = [
        subprocess.Popen(command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    for process in processes:
        process.stderr.close()
    assert sorted(status for status, _ in results) == [0, 2], results
    refused = next(stderr for status, stderr in results if status == 2)
    assert_one_line_naming(refused, str(out), "in use by another run")
    assert [r["path"] for r in read_jsonl(out)] == paths
    assert not os.path.exists(str(out) + LOCK_SUFFIX)


# ----------------------------------------------------------------------------------------------- run options


def test_resuming_with_other_options_is_refused_naming_them(checkpoint, infer, capsys, tmp_path):
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    first = caption(checkpoint, tmp_path / "imgs", output=out, **SAMPLING)
    recorded = json.loads(open(str(out) + RUN_OPTIONS_SUFFIX).read())
    assert recorded["seed"] == 7 and recorded["decoding"] == "sample" and recorded["checkpoint"] == checkpoint
    assert not {"workers", "html", "compilation_cache", "progress", "quiet"} & set(recorded)

    with pytest.raises(
        OutputError, match=re.escape(f"{out} was written with other options (seed was 7, now 8)") + ".*--no-resume"
    ):
        caption(checkpoint, tmp_path / "imgs", output=out, **{**SAMPLING, "seed": 8})
    with pytest.raises(OutputError, match='decoding was "sample", now "greedy"'):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    with pytest.raises(OutputError, match='template was "A photo of a {label}.", now "A {label}."'):
        caption(checkpoint, tmp_path / "imgs", output=out, template="A {label}.", **SAMPLING)
    with pytest.raises(OutputError, match="top_labels was 2, now 1; tta was false, now true"):
        caption(checkpoint, tmp_path / "imgs", output=out, top_labels=1, tta=True, **SAMPLING)
    status, stderr = run_cli(
        infer,
        capsys,
        checkpoint,
        tmp_path / "imgs",
        "--output",
        out,
        "--batch-size",
        "4",
        "--decoding",
        "sample",
        "--temperature",
        "2",
        "--seed",
        "8",
    )
    assert status == 2
    assert_one_line_naming(stderr, str(out), "seed was 7, now 8", "--no-resume")
    assert read_jsonl(out) == first  # nothing refused touched the file

    # Options that change no record: workers, progress, the page; and the checkpoint's own template spelled out.
    same = caption(
        checkpoint,
        tmp_path / "imgs",
        output=out,
        workers=1,
        html=tmp_path / "page.html",
        template="A photo of a {label}.",
        **SAMPLING,
    )
    assert same == first and (tmp_path / "page.html").exists()
    # --no-resume starts over with the new options, and records them.
    caption(checkpoint, tmp_path / "imgs", output=out, resume=False, **{**SAMPLING, "seed": 8})
    assert json.loads(open(str(out) + RUN_OPTIONS_SUFFIX).read())["seed"] == 8
    assert [r["captions"] for r in read_jsonl(out)] != [r["captions"] for r in first]


def test_greedy_resume_ignores_seed_and_batch_size_but_not_the_checkpoint(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    first = caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    # Greedy records do not depend on the seed or the batch size: resuming with others is fine.
    assert caption(checkpoint, tmp_path / "imgs", output=out, batch_size=2, seed=3) == first
    # A copy of the checkpoint is the same checkpoint; a re-saved (here: other) one is not.
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    assert caption(str(copy), tmp_path / "imgs", output=out, **GREEDY) == first
    params, config = tiny_pipeline_parts(seed=1, top_k=2, max_new_tokens=5)
    other = pc.save_pipeline_checkpoint(tmp_path / "other", params, config, tiny_tokenizer())
    with pytest.raises(
        OutputError, match=r'checkpoint_id was "\w+", now "\w+" ' + re.escape(f"(checkpoint was {copy}, now {other})")
    ):
        caption(other, tmp_path / "imgs", output=out, **GREEDY)


def test_an_output_without_run_options_resumes_and_gets_them(checkpoint, tmp_path):
    """Outputs written before run options were kept resume as before (nothing to compare with)."""
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    first = caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    os.remove(str(out) + RUN_OPTIONS_SUFFIX)
    assert caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY) == first
    assert json.loads(open(str(out) + RUN_OPTIONS_SUFFIX).read())["decoding"] == "greedy"
    open(str(out) + RUN_OPTIONS_SUFFIX, "w").write("{not json")
    with pytest.raises(OutputError, match=re.escape(f"{out}{RUN_OPTIONS_SUFFIX}: not a run options file")):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)


def test_changed_run_options_lists_each_difference():
    recorded = {"checkpoint": "/a", "checkpoint_id": "x", "seed": 1, "top_p": 0.9}
    current = {"checkpoint": "/b", "checkpoint_id": "x", "seed": 2, "top_p": 0.9, "num_beams": 4}
    assert changed_run_options(recorded, current) == ["seed was 1, now 2", "num_beams was unset, now 4"]
    assert changed_run_options({"temperature": 1}, {"temperature": 1.0}) == []


# ----------------------------------------------------------------------------------------------- retry errors


def test_retry_errors_recaptions_error_records_without_leaving_them(checkpoint, infer, capsys, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    late = str(tmp_path / "imgs" / "late.png")  # missing at first: an error record
    out = tmp_path / "out.jsonl"
    caption(checkpoint, *paths, late, output=out, **GREEDY)
    unrelated = {"path": str(tmp_path / "elsewhere.png"), "error": "FileNotFoundError: elsewhere.png"}
    with open(out, "a") as f:  # an error of an image this run is not asked about: kept as it is
        f.write(json.dumps(unrelated) + "\n")
    assert "error" in {r["path"]: r for r in read_jsonl(out)}[late]
    Image.open(paths[0]).save(late)

    caption(checkpoint, *paths, late, output=out, **GREEDY)  # without retrying, an error record stays
    assert "error" in {r["path"]: r for r in read_jsonl(out)}[late]
    status, _ = run_cli(infer, capsys, checkpoint, *paths, late, "--output", out, "--batch-size", "4", "--retry-errors")
    assert status == 0
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted([*paths, late, unrelated["path"]])  # each exactly once
    by_path = {r["path"]: r for r in records}
    assert "error" not in by_path[late] and by_path[unrelated["path"]] == unrelated
    fresh = {r["path"]: r for r in caption(checkpoint, *paths, late, **GREEDY)}
    assert all(by_path[path] == fresh[path] for path in [*paths, late])  # the same as an uninterrupted run's
    assert sorted(os.listdir(tmp_path)) == ["imgs", "out.jsonl", "out.jsonl.run.json"]  # no temporary or lock file


# ----------------------------------------------------------------------------------------------- corrupt lines


def test_a_corrupt_line_is_named_by_file_and_line(checkpoint, infer, capsys, tmp_path):
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    lines = out.read_text().splitlines(keepends=True)
    good = "".join(lines)

    out.write_text(lines[0] + '{"path": "x", "labels": [{"lab\n' + "".join(lines[1:]))
    with pytest.raises(OutputError, match=re.escape(f"{out}, line 2: not JSON (")):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    status, stderr = run_cli(infer, capsys, checkpoint, tmp_path / "imgs", "--output", out, "--batch-size", "4")
    assert status == 2
    assert_one_line_naming(stderr, f"{out}, line 2", "--no-resume")

    out.write_text("".join(lines[:2]) + "\n" + '["a", "list"]\n' + "".join(lines[2:]))  # a blank line is skipped
    with pytest.raises(OutputError, match=re.escape(f"{out}, line 4: not a record")):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    out.write_text(lines[0] + json.dumps({"path": "x", "labels": "cat"}) + "\n" + "".join(lines[1:]))
    with pytest.raises(OutputError, match=re.escape(f'{out}, line 2: not a record ("labels"')):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)

    # A partly written last line (a run killed mid-write) is still dropped, and its image captioned again.
    out.write_text("".join(lines[:3]) + lines[3][:20])
    assert [r["path"] for r in caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)] == [
        json.loads(line)["path"] for line in lines
    ]
    assert out.read_text() == good


def test_a_corrupt_csv_row_is_named_by_file_and_line(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.csv"
    caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    lines = out.read_text().splitlines(keepends=True)  # a header, then one row per image
    out.write_text("".join(lines[:2]) + lines[2].replace(",0.", ",zero.", 1) + "".join(lines[3:]))
    with pytest.raises(OutputError, match=re.escape(f"{out}, line 3: not a record row (ValueError")):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)


def test_record_problem():
    assert record_problem({"path": "a", "error": "E: x"}) is None
    assert record_problem({"path": "a", "labels": [{"label": "cat", "prob": 0.5}], "captions": ["c"]}) is None
    assert "path" in record_problem({"labels": [], "captions": []})
    assert "captions" in record_problem({"path": "a", "labels": [], "captions": [1]})


# ----------------------------------------------------------------------------------------------- html


def test_an_unwritable_html_page_fails_before_anything_is_computed(checkpoint, infer, capsys, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "a_file").write_text("not a directory")
    page, out = tmp_path / "a_file" / "page.html", tmp_path / "out.jsonl"

    def fail(*args, **kwargs):
        raise AssertionError("compiled or read the checkpoint before checking the page")

    monkeypatch.setattr(pipeline_batch, "compile_and_place", fail)
    monkeypatch.setattr(pipeline_batch, "load_pipeline", fail)
    with pytest.raises(OutputError, match=re.escape(f"cannot write the HTML page {page}")):
        caption(checkpoint, tmp_path / "imgs", output=out, html=page, **GREEDY)
    status, stderr = run_cli(infer, capsys, checkpoint, tmp_path / "imgs", "--output", out, "--html", page)
    assert status == 2
    assert_one_line_naming(stderr, str(page))
    assert not out.exists()


def test_html_page_in_a_new_directory(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 2)
    page = tmp_path / "new" / "dir" / "page.html"
    caption(checkpoint, tmp_path / "imgs", html=page, **GREEDY)
    assert page.read_text().count("data:image/png;base64,") == 2
