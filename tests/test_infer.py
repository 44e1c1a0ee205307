"""Batch captioning (`imgllm.pipeline.caption_files`, what infer.py runs) end to end on a tiny pipeline checkpoint:
bad files, resuming, determinism, CSV/HTML, tfds inputs, LM classification with the checkpoint's templates; and
infer.py itself in subprocesses: exit status and stdout, 8 simulated devices giving the same captions as one, the
compilation cache, a SIGKILL and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_pipeline import tiny_pipeline_parts, tiny_tokenizer

from imgllm.data.tfds_source import TfdsPrepareError
from imgllm.pipeline import CaptionOptions, RunSettings, caption_files, inputs, score_records
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline.inputs import expand_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    params, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    return pc.save_pipeline_checkpoint(tmp_path_factory.mktemp("pipeline") / "ckpt", params, config, tiny_tokenizer())


def write_images(folder, count: int, seed: int = 0) -> list[str]:
    """`count` good RGB PNGs of assorted sizes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        size = (32, 32) if i % 3 else (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        path = os.path.join(folder, f"img_{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> dict[str, str]:
    """Good images plus greyscale, RGBA, 16-bit, corrupt, truncated and non-image files (one in a subfolder)."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(1)
    files = {"good": write_images(root, 3)[0]}
    files["grey"] = str(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L").save(files["grey"])
    files["rgba"] = str(root / "sub" / "rgba.png")
    os.makedirs(root / "sub")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(files["rgba"])
    files["jpeg"] = str(root / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(files["jpeg"], quality=80)
    files["corrupt"] = str(root / "corrupt.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(rng.integers(0, 256, 100)))
    files["truncated"] = str(root / "truncated.png")
    data = (root / "img_001.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    files["text_as_png"] = str(root / "notes.png")
    (root / "notes.png").write_text("hello, I am text")
    (root / "README.txt").write_text("not an image, and not named like one")
    return {key: str(value) for key, value in files.items()} | {"root": str(root)}


# Tests share these options where they can, so that one compiled program serves several tests.
BATCH = dict(batch_size=4)
SAMPLING = dict(method="sample", temperature=2.0, num_captions=2)


CAPTION_FIELDS = {field.name for field in dataclasses.fields(CaptionOptions)}
SETTINGS_FIELDS = {field.name for field in dataclasses.fields(RunSettings)}


def caption(checkpoint, *inputs, **options) -> list[dict]:
    """Every record `caption_files` yields (it writes `output` when given); `options` are `CaptionOptions`' and
    `RunSettings`' fields and caption_files' other keywords."""
    output = options.pop("output", None)
    caption_options = CaptionOptions(**{name: options.pop(name) for name in CAPTION_FIELDS & set(options)})
    settings = RunSettings(**{name: options.pop(name) for name in SETTINGS_FIELDS & set(options)})
    return list(
        caption_files(
            checkpoint,
            [str(path) for path in inputs],
            caption_options,
            output=None if output is None else str(output),
            settings=settings,
            **options,
        )
    )


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_messy_folder_gives_one_record_per_image_and_errors_for_bad_files(checkpoint, messy_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    yielded = caption(checkpoint, messy_folder["root"], output=out, **BATCH)
    assert yielded == read_jsonl(out)  # what is yielded is what is written
    records = {r["path"]: r for r in read_jsonl(out)}
    images = [messy_folder[k] for k in ("good", "grey", "rgba", "jpeg")]
    bad = [messy_folder[k] for k in ("corrupt", "truncated", "text_as_png")]
    assert len(read_jsonl(out)) == len(records) == 3 + len(images) - 1 + len(bad)  # 3 img_*.png, good is one
    for path in images:
        assert "error" not in records[path]
        assert len(records[path]["labels"]) == 2 and len(records[path]["captions"]) == 1
        probs = [entry["prob"] for entry in records[path]["labels"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert {entry["label"] for entry in records[path]["labels"]} <= set(
            json.loads(json.dumps(pc.read_pipeline_config(checkpoint)["class_names"]))
        )
    for path in bad:
        assert path in records[path]["error"] and "captions" not in records[path]
    assert not any(path.endswith("README.txt") for path in records)


def test_nothing_captionable_gives_only_error_records(checkpoint, messy_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    caption(
        checkpoint, messy_folder["corrupt"], messy_folder["truncated"], tmp_path / "missing.png", output=out, **BATCH
    )
    assert all("error" in r for r in read_jsonl(out)) and len(read_jsonl(out)) == 3


def test_cli_prints_records_and_exits_non_zero_when_nothing_is_captioned(checkpoint, messy_folder, tmp_path):
    """infer.py without --output writes the records to stdout; its exit status is 1 when no image was captioned."""
    command = [
        sys.executable,
        os.path.join(REPO, "infer.py"),
        messy_folder["corrupt"],
        str(tmp_path / "missing.png"),
        "--checkpoint",
        checkpoint,
        "--batch-size",
        "4",
        "--quiet",
        "--compilation-cache",
        "",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_subprocess_env())
    assert run.returncode == 1, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["path"] for r in records] == [messy_folder["corrupt"], str(tmp_path / "missing.png")]
    assert all("error" in r for r in records) and "no image could be captioned" in run.stderr


def test_interrupted_run_resumes_with_each_record_once(checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 11)
    options = dict(**BATCH, **SAMPLING, seed=7)
    full = tmp_path / "full.jsonl"
    caption(checkpoint, tmp_path / "imgs", output=full, **options)
    full_records = read_jsonl(full)
    assert [r["path"] for r in full_records] == paths

    # An interrupted run: six records on disk (the second batch half done) and half of the seventh line.
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    yielded = caption(checkpoint, tmp_path / "imgs", output=partial, **options)
    resumed = read_jsonl(partial)
    assert yielded == resumed  # the records already there, then the new ones
    assert sorted(r["path"] for r in resumed) == paths  # every image exactly once
    assert {r["path"]: r for r in resumed} == {r["path"]: r for r in full_records}  # same captions as unbroken


def test_same_seed_same_captions_other_seed_others(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 4)
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        caption(checkpoint, tmp_path / "imgs", output=outputs[name], **BATCH, **SAMPLING, seed=seed)
    a, b, c = (read_jsonl(outputs[name]) for name in "abc")
    assert a == b
    assert [r["captions"] for r in a] != [r["captions"] for r in c]
    assert all(len(r["captions"]) == 2 for r in a)


def test_csv_and_html_outputs(checkpoint, messy_folder, tmp_path):
    out, page = tmp_path / "out.csv", tmp_path / "page.html"
    caption(checkpoint, messy_folder["good"], messy_folder["corrupt"], output=out, html=page, **BATCH)
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [messy_folder["good"], messy_folder["corrupt"]]
    assert rows[0]["label_1"] and float(rows[0]["prob_1"]) >= float(rows[0]["prob_2"]) and not rows[0]["error"]
    assert rows[1]["error"] and not rows[1]["label_1"]
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1 and rows[0]["label_1"] in text and "corrupt.jpg" in text
    # A rerun finds everything done: nothing is added, and the page still lists both.
    assert len(caption(checkpoint, messy_folder["good"], messy_folder["corrupt"], output=out, **BATCH)) == 2
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_html_gallery_shows_references_scores_and_mismatches(checkpoint, tmp_path):
    """caption_files(html=, references=) (infer.py --html --references): the gallery's header names the checkpoint
    and the scores, each card its reference, and a CNN label that is not the reference's is marked."""
    from imgllm.data.demo import write_demo_images

    references = write_demo_images(str(tmp_path / "imgs"), num_examples=3, seed=2)  # captions.jsonl among them
    page = tmp_path / "page.html"
    records = caption(checkpoint, tmp_path / "imgs", html=page, references=references, **BATCH)
    assert len(records) == 3 and all("caption_scores" in record for record in records)
    text = page.read_text()
    assert os.path.abspath(checkpoint) in text and "exact_match" in text
    for line in map(json.loads, open(references)):
        assert line["caption"] in text  # every reference caption is shown
    assert text.count('class="card has-mismatch"') == 3  # the tiny pipeline names CIFAR classes, not shapes


def test_tfds_split_input(checkpoint, tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "out.jsonl"
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        caption(checkpoint, "tfds:cifar10:test", output=out, **BATCH)
    records = read_jsonl(out)
    assert [r["path"] for r in records] == [f"tfds:cifar10:test:{i}" for i in range(5)]
    assert all("captions" in r for r in records)


def test_lm_classify_scores_the_checkpoints_class_prompt_templates(tmp_path):
    """caption_files(lm_classify=True) (infer.py --lm-classify) labels each image by the likelihood of the
    class_prompt_templates stored in the checkpoint, not by scoring's default templates."""
    import jax

    from imgllm.language.scoring import DEFAULT_TEMPLATES, build_prompt_table, score_class_prompts
    from imgllm.pipeline.caption import cnn_logits_and_features, visual_prefix
    from imgllm.pipeline.inputs import Item

    templates = ("{label}!", "look, a {label} here")
    params, config = tiny_pipeline_parts(bridge=True, template="", class_prompt_templates=templates)
    checkpoint = pc.save_pipeline_checkpoint(tmp_path / "ckpt", params, config, tiny_tokenizer())
    paths = write_images(tmp_path / "imgs", 8, seed=3)
    records = caption(checkpoint, tmp_path / "imgs", lm_classify=True, batch_size=8)

    loaded = pc.load_pipeline(checkpoint)
    spec = loaded.spec()
    images = np.stack([Item(path).load(spec.image_size) for path in paths])
    features = jax.jit(lambda p, x: cnn_logits_and_features(p["cnn"], x, spec)[1])(loaded.params, images)
    prefix = visual_prefix(loaded.params, features, spec)

    def lm_labels(templates) -> list[str]:
        table = build_prompt_table(loaded.tokenizer.encode, config["eos_id"], config["class_names"], templates)
        scores = np.asarray(score_class_prompts(loaded.params["lm"], spec.lm_config, table, prefix))
        return [config["class_names"][c] for c in scores.argmax(-1)]

    assert [r["path"] for r in records] == paths
    assert [r["lm_label"] for r in records] == lm_labels(templates)
    assert lm_labels(templates) != lm_labels(DEFAULT_TEMPLATES)  # so scoring the defaults would fail this test


def _subprocess_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **extra}
    return env


@pytest.mark.slow
def test_eight_devices_give_the_same_captions_as_one(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 12)
    args = [
        str(tmp_path / "imgs"),
        "--checkpoint",
        checkpoint,
        "--batch-size",
        "8",
        "--decoding",
        "sample",
        "--seed",
        "5",
        "--quiet",
        "--compilation-cache",
        "",
    ]
    one = tmp_path / "one.jsonl"
    caption(checkpoint, tmp_path / "imgs", output=one, batch_size=8, method="sample", seed=5)
    eight = tmp_path / "eight.jsonl"
    script = (
        "import sys, jax; assert jax.device_count() == 8, jax.devices(); import infer; "
        "sys.exit(infer.main(sys.argv[1:]))"
    )
    subprocess.run(
        [sys.executable, "-c", script, *args, "--output", str(eight)],
        check=True,
        cwd=REPO,
        timeout=300,
        env=_subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    assert read_jsonl(eight) == read_jsonl(one)


@pytest.mark.slow
def test_second_process_uses_the_compilation_cache(checkpoint, tmp_path):
    write_images(tmp_path / "imgs", 2)
    cache = tmp_path / "cache"
    command = [
        sys.executable,
        os.path.join(REPO, "infer.py"),
        str(tmp_path / "imgs"),
        "--checkpoint",
        checkpoint,
        "--quiet",
        "--compilation-cache",
        str(cache),
        "--no-resume",
        "--output",
    ]
    subprocess.run([*command, str(tmp_path / "a.jsonl")], check=True, timeout=300, env=_subprocess_env())
    entries = sorted(os.listdir(cache))
    assert entries, "the first run wrote nothing to the compilation cache"
    logged = subprocess.run(
        [*command, str(tmp_path / "b.jsonl")],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
        env=_subprocess_env(JAX_DEBUG_LOG_MODULES="jax._src.compiler"),
    )
    assert sorted(os.listdir(cache)) == entries  # nothing new compiled and written
    assert "Persistent compilation cache hit" in logged.stderr
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


@pytest.mark.slow
def test_killed_process_resumes_with_each_record_once(checkpoint, tmp_path):
    """A real interruption: SIGKILL once the first batch is on disk, then the same command again."""
    import signal
    import time

    paths = write_images(tmp_path / "imgs", 60)
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
    process = subprocess.Popen(command, env=_subprocess_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1) and process.poll() is None:
            assert time.monotonic() < deadline, "infer.py wrote nothing in 300 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < len(paths), f"the kill came too late to test anything ({written} records)"
    subprocess.run(command, check=True, timeout=300, env=_subprocess_env(), stderr=subprocess.DEVNULL)
    assert [r["path"] for r in read_jsonl(out)] == paths  # each exactly once, in order


def test_references_score_captions_and_labels(tmp_path):
    from imgllm.data.demo import write_demo_images

    references = write_demo_images(str(tmp_path), num_examples=3, seed=5)
    lines = [json.loads(line) for line in open(references)]
    assert [os.path.isfile(tmp_path / line["path"]) for line in lines] == [True] * 3
    records = [
        {
            "path": str(tmp_path / lines[0]["path"]),
            "captions": [lines[0]["caption"]],
            "labels": [{"label": lines[0]["label"], "prob": 0.9}],
            "lm_label": lines[0]["label"],
        },
        {
            "path": str(tmp_path / lines[1]["path"]),
            "captions": ["something else entirely"],
            "labels": [{"label": "not-a-shape", "prob": 0.9}],
            "lm_label": lines[1]["label"],
        },
        {"path": str(tmp_path / lines[2]["path"]), "error": "cannot read"},  # errors are not scored
        {"path": str(tmp_path / "unlisted.png"), "captions": ["x"], "labels": [{"label": "x", "prob": 1.0}]},
    ]
    scores = score_records(records, references)
    assert scores["images"] == 2
    assert scores["exact_match"] == 0.5
    assert scores["cnn_accuracy"] == 0.5 and scores["lm_accuracy"] == 1.0
    assert 0.0 < scores["bleu4"] < 1.0


def run_infer_main(*argv):
    """(exit status, stderr) of infer.main(argv) in this process (its one-line errors exit through SystemExit)."""
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(REPO, "infer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = module.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue().strip().splitlines()


def test_cli_errors_are_one_line_with_status_two(tmp_path):
    image = write_images(tmp_path / "imgs", 1)[0]
    status, lines = run_infer_main(image, "--checkpoint", str(tmp_path / "nothing"))
    assert status == 2 and lines == [
        f"infer.py: error: --checkpoint {str(tmp_path / 'nothing')!r} is not a directory (infer.py assemble makes one)"
    ]
    not_a_pipeline = tmp_path / "classifier_workdir"
    (not_a_pipeline / "checkpoints").mkdir(parents=True)
    status, lines = run_infer_main(image, "--checkpoint", str(not_a_pipeline), "--quiet")
    assert status == 2 and len(lines) == 1 and lines[0].startswith("infer.py: error: "), lines
    assert str(not_a_pipeline) in lines[0]
    status, lines = run_infer_main("assemble", "--out", str(tmp_path / "p"))
    assert status == 2 and lines == [
        "infer.py: error: assemble: give --captioner WORKDIR, or both --classifier and --lm"
    ]


def test_assemble_over_an_existing_out_names_the_overwrite_flag(tmp_path):
    """The command line says --overwrite (its flag), not the library's overwrite=True; checked before loading."""
    (tmp_path / "ckpt").mkdir()
    status, lines = run_infer_main("assemble", "--captioner", str(tmp_path / "no_run"), "--out", str(tmp_path / "ckpt"))
    assert status == 2 and lines == [
        f"infer.py: error: assemble: --out {tmp_path / 'ckpt'} exists; pass --overwrite "
        "to replace it, or choose another --out"
    ], lines
    status, lines = run_infer_main(
        "assemble", "--captioner", str(tmp_path / "no_run"), "--out", str(tmp_path / "ckpt"), "--overwrite"
    )  # past the check: the missing run is the error now
    assert status == 2 and len(lines) == 1 and "--overwrite" not in lines[0] and "no_run" in lines[0], lines


def test_flags_take_underscores_too(checkpoint, tmp_path):
    """--batch_size and --batch-size are one flag (train.py's style works here); --max_pixels guards decoding."""
    paths = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    status, lines = run_infer_main(
        *paths,
        "--checkpoint",
        checkpoint,
        "--batch_size",
        "4",
        "--output",
        str(out),
        "--max_pixels",
        "100",
        "--compilation_cache",
        "",
        "--quiet",
    )
    assert status == 1, lines  # 32x32 images over a 100-pixel cap: error records
    assert all("more than the limit of 100" in record["error"] for record in read_jsonl(out))


def test_a_misspelled_flag_is_one_line_with_a_suggestion_and_never_an_abbreviation(checkpoint, tmp_path):
    """Issue #25: argparse answered a misspelled flag with its usage block and took --num-caption for --num-captions."""
    image = write_images(tmp_path / "imgs", 1)[0]
    status, lines = run_infer_main(image, "--checkpoint", checkpoint, "--num-caption", "2", "--quiet")
    assert status == 2 and len(lines) == 1, lines
    assert lines == [
        'infer.py: error: unrecognized flag --num-caption; did you mean "--num-captions"? '
        "(infer.py --help lists the flags)"
    ], lines
    status, lines = run_infer_main(image, "--chekpoint", checkpoint)
    assert status == 2 and len(lines) == 1 and 'did you mean "--checkpoint"?' in lines[0], lines


def test_a_run_with_failed_images_ends_with_a_count_of_them(checkpoint, messy_folder, tmp_path):
    """Issue #25: some images failing (error records) said nothing on stderr when others were captioned."""
    out = tmp_path / "out.jsonl"
    status, lines = run_infer_main(
        messy_folder["good"],
        messy_folder["corrupt"],
        "--checkpoint",
        checkpoint,
        "--batch-size",
        "4",
        "--output",
        str(out),
        "--quiet",
    )
    assert status == 0 and lines[-1] == "infer.py: 1 of 2 images failed (see their error records)", lines


def test_a_folder_without_images_beside_other_inputs_is_warned_about(tmp_path):
    """Issue #25: an empty folder (or a pattern matching only empty folders) among other inputs vanished silently."""
    image = write_images(tmp_path / "imgs", 1)[0]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.warns(UserWarning, match="'.*empty' is a folder with no image files"):
        items = expand_inputs([str(tmp_path / "empty"), image])
    with pytest.warns(UserWarning, match="is a pattern with no image files"):
        items += expand_inputs([str(tmp_path / "emp*"), image])
    assert [item.key for item in items] == [image, image]


def test_a_tfds_input_offline_names_the_extra_and_keeps_stdout_for_records(monkeypatch, capsys):
    """Issue #25: tfds's download message went to stdout (where records go), and a missing TensorFlow got the generic
    install hint instead of the tfds-prepare extra."""

    class OfflineBuilder:
        name, data_dir = "cifar10", "/nowhere"

        def is_prepared(self):
            return False

        def download_and_prepare(self):
            print("Downloading and preparing dataset cifar10")
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(inputs, "tfds_builder", lambda name, data_dir: OfflineBuilder())
    with pytest.raises(TfdsPrepareError, match=r"tfds-prepare"):
        expand_inputs(["tfds:cifar10:test"])
    captured = capsys.readouterr()
    assert captured.out == "" and "Downloading and preparing" in captured.err
