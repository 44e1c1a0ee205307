"""Fault injection (issue #24): what a careless or hostile user, a killed process or a strange file does to infer.py,
train.py and pipeline checkpoints. Nothing the user owns is harmed, bad values are refused in one line naming
them, and a stuck input gives an error record instead of a hang.

To add a fault: write the smallest test that reproduces it against the shared fixtures (conftest.py's `checkpoint`, a
tiny pipeline checkpoint saved once per module, and `infer`, infer.py's main run in this process; `training_run`
below, a finished tiny training run to copy and damage; `write_images`), check that it fails before the fix, and put
it under the heading of its kind, most severe first: files that are not imgllm's, silently wrong results, hangs,
tracebacks. Prefer calling the library or `infer.main` in-process to
subprocesses: the suite has a time budget, and every test here shares one compiled captioner (`GREEDY`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from test_infer import caption, read_jsonl, write_images
from test_infer_outputs import assert_one_line_naming, run_cli
from test_pipeline import tiny_pipeline, tiny_pipeline_parts, tiny_tokenizer
from test_untrusted_inputs import time_limit

from imgllm.configs import cnn_tiny
from imgllm.pipeline import CaptionOptions, prompts
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline.inputs import Batch, Item
from imgllm.pipeline.outputs import LOCK_SUFFIX, OutputError
from imgllm.pipeline.records import make_records
from imgllm.train import checkpoint as ckpt_lib
from imgllm.train import demo_recipe, evaluation, loop

GREEDY = dict(batch_size=4)  # the options most tests share: one compiled program


def save_tiny_checkpoint(path, **overrides) -> str:
    """A tiny pipeline checkpoint at `path`, its config keys replaced by `overrides` after they were checked."""
    params, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    return pc.save_pipeline_checkpoint(path, params, {**config, **overrides}, tiny_tokenizer(), overwrite=True)


def truncate_arrays(step_dir) -> None:
    """Halves every array chunk file of a training checkpoint's step folder (a disk that filled, a copy cut short)."""
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in names:
                os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """(config, workdir) of a finished tiny training run with checkpoints at steps 4 and 8."""
    config = cnn_tiny.get_config()
    config.eval_split = ""
    config.num_train_examples = 128
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    return config, workdir


def run_infer(infer, capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of infer.py's main on `argv` in this process; a user error's SystemExit is caught."""
    capsys.readouterr()
    try:
        status = infer.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def tree(path) -> dict[str, bytes]:
    """Every file below `path` by relative path, with its bytes: what must stay as it was."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path)] = f.read()
    return files


# ----------------------------------------------------------------------------------------------- files not imgllm's


def test_overwrite_refuses_a_folder_that_is_not_a_pipeline_checkpoint(infer, capsys, tmp_path):
    runs = tmp_path / "runs"
    (runs / "cifar10" / "checkpoints").mkdir(parents=True)
    (runs / "notes.txt").write_text("a week of work")
    before = tree(runs)
    params, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    with pytest.raises(FileExistsError, match=re.escape(f"{runs} exists and is not a pipeline checkpoint")):
        pc.save_pipeline_checkpoint(runs, params, config, tiny_tokenizer(), overwrite=True)
    assert tree(runs) == before
    # The command line refuses it before loading anything (the captioner run does not exist).
    status, stderr = run_infer(
        infer, capsys, "assemble", "--captioner", tmp_path / "no_run", "--out", runs, "--overwrite"
    )
    assert status == 2
    assert_one_line_naming(stderr, f"{runs} exists and is not a pipeline checkpoint")
    assert tree(runs) == before


def test_a_pipeline_checkpoint_with_a_users_file_inside_is_not_replaced(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt)
    (ckpt / "my_notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files too"):
        save_tiny_checkpoint(ckpt)
    assert (ckpt / "my_notes.md").read_text() == "mine"


def test_overwrite_killed_while_writing_leaves_the_old_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint(ckpt, template="Old {label}.")

    class KilledTokenizer:  # the save is killed once the new arrays are on disk, before the tokenizer is
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    params, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    with pytest.raises(KeyboardInterrupt):
        pc.save_pipeline_checkpoint(ckpt, params, config, KilledTokenizer(), overwrite=True)
    assert pc.load_pipeline(ckpt, read_params=False).config["template"] == "Old {label}."
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing half-written left beside it
    save_tiny_checkpoint(ckpt, template="New {label}.")  # and an overwrite that completes replaces it whole
    assert pc.load_pipeline(ckpt, read_params=False).config["template"] == "New {label}."
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_the_demo_exports_again_over_a_half_written_pipeline(tmp_path, monkeypatch):
    pipeline_dir = tmp_path / "pipeline"
    save_tiny_checkpoint(pipeline_dir)
    for name in os.listdir(pipeline_dir / pc.TOKENIZER_DIR):  # what an older imgllm's killed export left
        os.remove(pipeline_dir / pc.TOKENIZER_DIR / name)
    exported = []
    monkeypatch.setattr(demo_recipe, "_run_stage", lambda *args: False)  # both stages finished earlier
    monkeypatch.setattr(demo_recipe, "export_pipeline_checkpoint", lambda *args, **kw: exported.append(args))
    monkeypatch.setattr(demo_recipe, "evaluate_pipeline", lambda *args, **kw: {})
    demo_recipe.run_demo(str(tmp_path), log=lambda message: None)
    assert exported, "the half-written pipeline checkpoint was kept"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("resume", [True, False])
def test_an_output_that_is_not_a_records_file_is_left_alone(checkpoint, infer, capsys, tmp_path, fmt, resume):
    write_images(tmp_path / "imgs", 2)
    photo = tmp_path / f"photo.{fmt}"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not records\n\x00\x01 and a last line without newline")
    before = photo.read_bytes()
    with pytest.raises(OutputError, match=re.escape(f"{photo} exists and is not a {fmt} records file")):
        caption(checkpoint, tmp_path / "imgs", output=photo, resume=resume, **GREEDY)
    assert photo.read_bytes() == before
    args = [tmp_path / "imgs", "--output", photo] + ([] if resume else ["--no-resume"])
    status, stderr = run_cli(infer, capsys, checkpoint, *args)
    assert status == 2
    assert_one_line_naming(stderr, str(photo))
    assert photo.read_bytes() == before


def test_html_equal_to_the_output_or_an_input_is_refused(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    records = out.read_bytes()
    with pytest.raises(OutputError, match=re.escape(f"the HTML page {out} is the same file as the output {out}")):
        caption(checkpoint, tmp_path / "imgs", output=out, html=out, **GREEDY)
    link = tmp_path / "link.html"
    link.symlink_to(out)  # another name for the same file
    with pytest.raises(OutputError, match="is the same file as the output"):
        caption(checkpoint, tmp_path / "imgs", output=out, html=link, **GREEDY)
    assert out.read_bytes() == records
    image, second = open(paths[0], "rb").read(), open(paths[1], "rb").read()
    with pytest.raises(OutputError, match=re.escape(f"the HTML page {paths[0]} is also the input image {paths[0]}")):
        caption(checkpoint, tmp_path / "imgs", html=paths[0], **GREEDY)
    # an output met in a folder being captioned is skipped as an input (the run's own records); an image there is
    # not records, and is refused as the output
    with pytest.raises(OutputError, match="img_001.png exists and is not a jsonl records file"):
        caption(checkpoint, tmp_path / "imgs", output=os.path.join(tmp_path, "imgs", ".", "img_001.png"), **GREEDY)
    assert open(paths[0], "rb").read() == image
    assert open(paths[1], "rb").read() == second


def test_a_symlink_planted_at_the_lock_is_not_followed(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 2)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "out.jsonl"
    os.symlink(precious, str(out) + LOCK_SUFFIX)
    with pytest.raises(OutputError, match=re.escape(f"{out}{LOCK_SUFFIX} is a symbolic link")):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    assert precious.read_text() == "keep me"
    os.remove(str(out) + LOCK_SUFFIX)
    os.link(precious, str(out) + LOCK_SUFFIX)  # a hard link: the same file under the lock's name
    with pytest.raises(OutputError, match="not a lock file of imgllm's"):
        caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    assert precious.read_text() == "keep me"


def test_retry_errors_keeps_an_output_symlink_a_link(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    target, link = tmp_path / "store" / "out.jsonl", tmp_path / "out.jsonl"
    target.parent.mkdir()
    link.symlink_to(target)
    caption(checkpoint, tmp_path / "imgs", output=link, **GREEDY)
    (tmp_path / "imgs" / "bad.png").write_bytes(open(paths[0], "rb").read())  # fixed: retry it
    caption(checkpoint, tmp_path / "imgs", output=link, retry_errors=True, **GREEDY)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert not any("error" in record for record in read_jsonl(target)) and len(read_jsonl(target)) == 3


def test_a_second_training_run_in_one_work_directory_is_refused(tmp_path, monkeypatch):
    def build_task(config):
        raise AssertionError("started training while another run held the work directory")

    monkeypatch.setattr(loop, "build_task", build_task)
    with open(tmp_path / "train.lock", "w") as held:  # another train.py, mid-run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(loop.WorkdirInUseError, match=re.escape(f"{tmp_path} is in use by another run")):
            loop.train_and_evaluate(cnn_tiny.get_config(), str(tmp_path))
    assert isinstance(loop.WorkdirInUseError("x"), OSError)  # train.py prints it as one line, status 2


@pytest.mark.parametrize(
    "key, value", [("max_checkpoints_to_keep", 0), ("log_every_steps", 0), ("max_checkpoints_to_keep", -1)]
)
def test_training_values_that_lose_checkpoints_or_crash_later_are_refused(tmp_path, monkeypatch, key, value):
    def build_task(config):
        raise AssertionError("started training with a value it cannot use")

    monkeypatch.setattr(loop, "build_task", build_task)
    config = cnn_tiny.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=re.escape(f"config.{key}={value} must be an integer >= 1")):
        loop.train_and_evaluate(config, str(tmp_path))


def test_the_records_file_keeps_every_record_it_had(checkpoint, tmp_path):
    """Control for the tests above: a real records file still resumes, a partial last line dropped."""
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    first = caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    text = out.read_text()
    out.write_text(text + '{"path": "half')
    assert caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY) == first
    assert out.read_text() == text
    assert json.loads(text.splitlines()[0])["path"] == first[0]["path"]


# ----------------------------------------------------------------------------------------------- silently wrong


def test_resume_matches_records_by_file_however_the_inputs_are_written(checkpoint, tmp_path, monkeypatch):
    write_images(tmp_path / "dimg", 8)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    first = caption(checkpoint, "dimg", output=out, **GREEDY)
    for cwd, spec in [(tmp_path, "./dimg/"), (tmp_path, tmp_path / "dimg"), (tmp_path / "elsewhere", "../dimg")]:
        monkeypatch.chdir(cwd)
        assert caption(checkpoint, spec, output=out, **GREEDY) == first  # all 8 were done: nothing captioned
    assert len(read_jsonl(out)) == 8


def test_the_same_relative_path_from_another_folder_is_another_image(checkpoint, tmp_path, monkeypatch):
    for folder in ("a", "b"):
        write_images(tmp_path / folder / "imgs", 2)
    (tmp_path / "b" / "imgs" / "img_002.png").write_bytes((tmp_path / "a" / "imgs" / "img_000.png").read_bytes())
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path / "a")
    caption(checkpoint, "imgs", output=out, **GREEDY)
    monkeypatch.chdir(tmp_path / "b")  # "imgs/img_000.png" here is not the image captioned above
    records = caption(checkpoint, "imgs", output=out, **GREEDY)
    assert len(records) == 5 and len(read_jsonl(out)) == 5


def test_an_existing_file_whose_name_holds_glob_characters_is_taken_literally(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    literal = tmp_path / "imgs" / "photo[1].png"
    shutil.copy(paths[0], literal)
    shutil.copy(paths[1], tmp_path / "imgs" / "photo1.png")  # what the pattern "photo[1].png" matches
    assert [r["path"] for r in caption(checkpoint, literal, **GREEDY)] == [str(literal)]


def test_a_pattern_that_matches_nothing_gets_an_error_record(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 1)
    pattern = str(tmp_path / "imgs" / "*.jpeg")
    records = caption(checkpoint, paths[0], pattern, **GREEDY)
    assert [r["path"] for r in records] == [paths[0], pattern]
    assert "error" in records[1] and pattern in records[1]["error"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("fusion_weight", math.nan),
        ("fusion_weight", math.inf),
        ("fusion_weight", -1.0),
        ("cnn_temperature", math.nan),
        ("lm_temperature", 0.0),
        ("std", [0.0, 0.2, 0.2]),
        ("mean", [math.nan, 0.5, 0.5]),
        ("eos_id", 10**6),
        ("max_new_tokens", 0),
    ],
)
def test_a_checkpoint_number_inference_cannot_use_is_refused_at_load(infer, capsys, tmp_path, key, value):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", **{key: value})
    with pytest.raises(ValueError, match=re.escape(f"{ckpt}: config: {key}=")):
        pc.load_pipeline(ckpt, read_params=False)
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(infer, capsys, image, "--checkpoint", ckpt, "--quiet", "--compilation-cache", "")
    assert status == 2
    assert_one_line_naming(stderr, f"{key}=")


def test_non_finite_outputs_give_an_error_record_never_a_nan_in_json():
    batch = Batch(0, [Item("a.png"), Item("b.png")], np.zeros((2, 4, 4, 3), np.uint8), {})
    outputs = {
        "label_ids": np.array([[0], [1]]),
        "label_probs": np.array([[np.nan], [0.5]]),
        "caption_scores": np.array([[-1.0], [-np.inf]]),
    }
    records = make_records(batch, outputs, ["cat", "dog"], [["a cat"], ["a dog"]])
    assert [sorted(record) for record in records] == [["error", "path"], ["error", "path"]]
    assert "NaN or infinite" in records[0]["error"]
    good = {"label_ids": np.array([[0]]), "label_probs": np.array([[0.25]]), "caption_scores": np.array([[-1.0]])}
    assert "error" not in make_records(Batch(0, [Item("a.png")], batch.images[:1], {}), good, ["cat"], [["c"]])[0]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "nan", "temperature must be a finite number"),
        ("--temperature", "inf", "temperature must be a finite number"),
        ("--top-p", "nan", "top_p must be in (0, 1]"),
        ("--max-new-tokens", "0", "max_new_tokens must be >= 1"),
    ],
)
def test_decoding_values_that_give_garbage_captions_are_refused(
    checkpoint, infer, capsys, tmp_path, flag, value, message
):
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(
        infer,
        capsys,
        image,
        "--checkpoint",
        checkpoint,
        "--decoding",
        "sample",
        flag,
        value,
        "--quiet",
        "--compilation-cache",
        "",
    )
    assert status == 2
    assert_one_line_naming(stderr, message)
    with pytest.raises(ValueError, match=re.escape(message)):
        CaptionOptions(method="sample", **{flag[2:].replace("-", "_"): float(value)})


@pytest.mark.parametrize("template", ["a {label.__class__.__init__}", "a {label[0]}", "a {label!r}", "a {label:>30}"])
def test_lm_templates_are_parsed_not_evaluated(tmp_path, template):
    pipe = tiny_pipeline(tmp_path, bridge=True)
    with pytest.raises(ValueError, match=re.escape(f"prompt template {template!r}: unknown slot")):
        pipe.label_prompts(["red", "blue"], [template])
    with pytest.raises(ValueError, match="unknown slot"):
        tiny_pipeline_parts(bridge=True, class_prompt_templates=[template])
    pipe.label_prompts(["red", "blue"], ["a {label} {{braces}}"])  # literal braces stay allowed


def test_escaped_topk_is_literal_text():
    parts = prompts.parse_template("{{topk}}: {topk}", 2)
    shown = "".join(value if kind == "text" else f"<{kind}{value + 1}>" for kind, value in parts)
    assert shown == "{topk}: <label1> (<prob1>%), <label2> (<prob2>%)"


# ----------------------------------------------------------------------------------------------- hangs


@contextlib.contextmanager
def planted_fifo(path):
    """A FIFO at `path` that nobody writes; on exit its write end is opened and closed, so a reader stuck on it
    (the old code, in a worker thread) sees the end of the file instead of waiting for ever."""
    os.mkfifo(path)
    try:
        yield str(path)
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_among_the_inputs_gets_an_error_record_and_the_rest_go_on(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    with planted_fifo(tmp_path / "imgs" / "img_001b.png") as fifo, time_limit(30):
        records = caption(checkpoint, tmp_path / "imgs", output=tmp_path / "out.jsonl", **GREEDY)
    by_path = {record["path"]: record for record in records}
    assert sorted(by_path) == sorted([*paths, fifo])
    assert "not a regular file" in by_path[fifo]["error"]
    assert all("captions" in by_path[path] for path in paths)


def test_a_file_name_that_is_not_utf8_is_recorded_and_resumes(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    odd = os.fsdecode(os.path.join(os.fsencode(str(tmp_path / "imgs")), b"\xff\xfe photo.png"))
    shutil.copy(paths[0], odd)
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"out.{fmt}"
        first = caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
        assert odd in [record["path"] for record in first] and not any("error" in record for record in first)
        assert caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY) == first  # resumes, nothing redone
    assert odd in [record["path"] for record in read_jsonl(tmp_path / "out.jsonl")]


# ----------------------------------------------------------------------------------------------- tracebacks


@pytest.mark.parametrize("flag, value, message", [("--seed", str(2**64), "seed must fit in 64 bits")])
def test_values_that_crashed_are_one_line(checkpoint, infer, capsys, tmp_path, flag, value, message):
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(
        infer, capsys, image, "--checkpoint", checkpoint, flag, value, "--quiet", "--compilation-cache", ""
    )
    assert status == 2
    assert_one_line_naming(stderr, message)


def test_a_batch_size_in_the_millions_is_clamped_to_the_images(checkpoint, tmp_path, monkeypatch):
    from imgllm.pipeline import batch as pipeline_batch

    compiled, compile_and_place = [], pipeline_batch.compile_and_place

    def compile_for(loaded, spec, mesh, batch_size):
        compiled.append(batch_size)
        return compile_and_place(loaded, spec, mesh, batch_size)

    monkeypatch.setattr(pipeline_batch, "compile_and_place", compile_for)
    write_images(tmp_path / "imgs", 3)
    records = caption(checkpoint, tmp_path / "imgs", batch_size=4_000_000)
    assert len(records) == 3 and compiled == [3]


def test_ctrl_c_in_infer_is_one_line_and_keeps_the_output(checkpoint, infer, capsys, tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"

    def interrupted(*args, **kwargs):
        yield {"path": "x", "error": "E: x"}
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "caption_files", interrupted)
    try:
        status, stderr = run_infer(infer, capsys, tmp_path / "imgs", "--checkpoint", checkpoint, "--output", out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped infer.py's main as a traceback")
    assert status == 130
    assert_one_line_naming(stderr, "interrupted", "the same command resumes")


@pytest.mark.parametrize("content", ['["a", "list"]', '"a string"', "42"])
def test_a_tokenizer_json_that_is_not_an_object_is_named(checkpoint, infer, capsys, tmp_path, content):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / pc.TOKENIZER_DIR / pc.TOKENIZER_FILE).write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{ckpt / pc.TOKENIZER_DIR / pc.TOKENIZER_FILE}: not a tokenizer")):
        pc.load_pipeline(ckpt, read_params=False)
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(infer, capsys, image, "--checkpoint", ckpt, "--quiet", "--compilation-cache", "")
    assert status == 2
    assert_one_line_naming(stderr, pc.TOKENIZER_FILE)


def test_a_read_only_compilation_cache_folder_is_skipped(tmp_path, monkeypatch):
    from imgllm.pipeline import batch as pipeline_batch

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only home says (even to root)
    with pytest.warns(UserWarning, match="cannot be written; running without it"):
        pipeline_batch.enable_compilation_cache(str(tmp_path / "cache"))


def test_csv_cells_that_spreadsheets_would_run_are_quoted_and_read_back(checkpoint, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", 1)
    shutil.copy(paths[0], tmp_path / "imgs" / "=HYPERLINK(1).png")
    (tmp_path / "imgs" / "@bad.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path / "imgs")
    out = tmp_path / "out.csv"
    names = ["=HYPERLINK(1).png", "@bad.png", "img_000.png"]
    first = caption(checkpoint, *names, output=out, **GREEDY)
    cells = [cell for line in out.read_text().splitlines()[1:] for cell in line.split(",")]
    assert not any(cell.lstrip('"').startswith(("=", "+", "@")) for cell in cells), cells
    assert [record["path"] for record in first] == names
    assert caption(checkpoint, *names, output=out, **GREEDY) == first  # resumes: the paths read back as written


def test_no_resume_keeps_the_old_output_until_the_run_has_compiled(checkpoint, infer, capsys, tmp_path, monkeypatch):
    from imgllm.pipeline import batch as pipeline_batch

    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    caption(checkpoint, tmp_path / "imgs", output=out, **GREEDY)
    before = {name: (tmp_path / name).read_bytes() for name in ("out.jsonl", "out.jsonl.run.json")}

    def fail(*args, **kwargs):
        raise ValueError("the options cannot compile")

    monkeypatch.setattr(pipeline_batch, "compile_and_place", fail)
    with pytest.raises(ValueError, match="cannot compile"):
        caption(checkpoint, tmp_path / "imgs", output=out, resume=False, template="Another {label}.", **GREEDY)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    records = caption(checkpoint, tmp_path / "imgs", output=out, resume=False, **GREEDY)  # then it starts over
    assert read_jsonl(out) == records and len(records) == 2


def test_truncated_arrays_fall_back_to_the_previous_step_and_are_kept(training_run, tmp_path):
    config, finished = training_run
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    damaged = os.path.join(workdir, "checkpoints", "8")
    truncate_arrays(damaged)
    before = tree(damaged)
    with pytest.warns(UserWarning, match=re.escape(f"{damaged} cannot be read: ") + ".*; using step 4 instead"):
        _, meta, _, _ = evaluation.restore_for_eval(workdir)
    assert meta["step"] == 4 and tree(damaged) == before
    with pytest.raises(ckpt_lib.UnreadableCheckpointError, match=re.escape(f"{damaged} cannot be read")):
        evaluation.restore_for_eval(workdir, step=8)  # the step asked for is not replaced by another
    with pytest.warns(UserWarning) as warned:
        loop.train_and_evaluate(config, workdir)  # resumes from step 4 and saves step 8 anew
    aside = os.path.join(workdir, ckpt_lib.UNREADABLE_DIR, "8")
    messages = [str(w.message) for w in warned]
    expected = [f"{damaged} cannot be read", f"moved the unreadable {damaged} to {aside} (kept"]
    assert [m.split(":")[0] for m in messages] == expected
    assert messages[0].endswith("; using step 4 instead") and tree(aside) == before
    assert evaluation.restore_for_eval(workdir)[1]["step"] == 8


def test_a_run_with_no_readable_step_is_one_line(training_run, tmp_path):
    _, finished = training_run
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    for step in ("4", "8"):
        truncate_arrays(workdir / "checkpoints" / step)
    with pytest.raises(ValueError, match="no checkpoint in .* can be read") as raised:  # train.py: one line
        evaluation.restore_for_eval(str(workdir))
    assert "\n" not in str(raised.value) and str(workdir / "checkpoints" / "4") in str(raised.value)


def test_an_empty_step_folder_is_skipped_and_kept(training_run, tmp_path):
    config, finished = training_run
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    (workdir / "checkpoints" / "70").mkdir()
    with pytest.warns(UserWarning, match=re.escape(f"skipping {workdir / 'checkpoints' / '70'}: not a checkpoint")):
        assert evaluation.restore_for_eval(str(workdir))[1]["step"] == 8
    with pytest.warns(UserWarning, match="not a checkpoint"):
        loop.train_and_evaluate(config, str(workdir))  # the finished run stays finished
    assert (workdir / "checkpoints" / "70").is_dir()


@pytest.mark.parametrize(
    "part, change, where",
    [
        ("lm", dict(vocab_size=307), "lm/wte/embedding: checkpoint (300, 32), config (307, 32)"),
        ("lm", dict(n_embd=64), "lm/h_0/attn/c_attn/bias: checkpoint (96,), config (192,)"),
        ("cnn", dict(num_classes=11), "cnn/params/head/kernel: checkpoint (16, 10), config (16, 11)"),
    ],
)
def test_a_config_that_disagrees_with_its_weights_is_named_before_compiling(
    infer, capsys, tmp_path, monkeypatch, part, change, where
):
    from imgllm.pipeline import batch as pipeline_batch

    _, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", **{part: {**config[part], **change}})
    message = f"{ckpt}: the config disagrees with the stored parameters at {where}"
    with pytest.raises(ValueError, match=re.escape(message)):
        pc.load_pipeline(ckpt, read_params=False)

    def compile_and_place(*args):
        raise AssertionError("compiled a captioner for weights its config does not describe")

    monkeypatch.setattr(pipeline_batch, "compile_and_place", compile_and_place)
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(infer, capsys, image, "--checkpoint", ckpt, "--quiet", "--compilation-cache", "")
    assert status == 2
    assert_one_line_naming(stderr, message)


def test_thousands_of_class_prompt_templates_are_refused_at_load(checkpoint, infer, capsys, tmp_path):
    templates = [f"photo {i} of a {{label}}." for i in range(2000)]
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", class_prompt_templates=templates)
    message = f"{ckpt}: config: class_prompt_templates holds 2000 templates; at most 64"
    with pytest.raises(ValueError, match=re.escape(message)):
        pc.load_pipeline(ckpt, read_params=False)
    image = write_images(tmp_path / "imgs", 1)[0]
    status, stderr = run_infer(
        infer, capsys, image, "--checkpoint", ckpt, "--lm-classify", "--quiet", "--compilation-cache", ""
    )
    assert status == 2
    assert_one_line_naming(stderr, message)
    _, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="class_prompt_templates holds 65 templates"):  # nor written
        pc.make_pipeline_config(
            cnn=config["cnn"],
            lm=config["lm"],
            class_names=config["class_names"],
            eos_id=config["eos_id"],
            pad_id=config["pad_id"],
            class_prompt_templates=templates[:65],
        )
    loaded = pc.load_pipeline(checkpoint, read_params=False)
    with pytest.raises(ValueError, match=re.escape("lm_templates (--lm-templates) holds 65 templates")):  # nor asked
        loaded.label_prompts(["red", "blue"], templates[:65])
    assert loaded.label_prompts(["red", "blue"], templates[:64]).input_ids.shape[:2] == (2, 64)
