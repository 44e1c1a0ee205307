"""Every answer right and said plainly (issue #25): scores compare like with like, extremes are said, not hidden;
and the package is what a Python user expects (console scripts, a version, a license)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from test_pipeline import tiny_pipeline, tiny_pipeline_parts, tokenizer_dir

import imgllm
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline import classify_images
from imgllm.pipeline.gallery import card_html, mismatch_counts, mismatches
from imgllm.pipeline.prompts import parse_template
from imgllm.pipeline.records import read_references, score_records
from imgllm.train import checkpoint as train_checkpoint
from imgllm.train import export

COLOURS = ["red", "green", "blue"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_references(folder, lines) -> str:
    """A captions file of {"path", "caption", "label"} lines in `folder`; returns its path."""
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_lm_labels_from_another_label_set_are_not_scored_against_the_class_reference(tmp_path):
    references = write_references(
        tmp_path,
        [
            {"path": "a.png", "caption": "a red cross", "label": "cross"},
            {"path": "b.png", "caption": "a blue disc", "label": "disc"},
        ],
    )
    records = [
        {
            "path": str(tmp_path / name),
            "labels": [{"label": label, "prob": 0.9}],
            "captions": [caption],
            "lm_label": colour,
            "lm_probs": {"red": 0.5, "green": 0.2, "blue": 0.3},
        }
        for name, label, caption, colour in (
            ("a.png", "cross", "a red cross", "red"),
            ("b.png", "disc", "a blue disc", "blue"),
        )
    ]
    colour_scores = score_records(records, references, lm_label_names=COLOURS)
    assert colour_scores["cnn_accuracy"] == 1.0 and "lm_accuracy" not in colour_scores
    by_path = read_references(references)
    reference = by_path[str(tmp_path / "a.png")]
    assert mismatches(records[0], reference, COLOURS) == ()
    assert "has-mismatch" not in card_html(records[0], None, reference, COLOURS)
    assert mismatch_counts(records, by_path, COLOURS)["with_lm"] == 0
    # The checkpoint's own classes (None), or a set that holds the reference's label, are still compared.
    assert score_records(records, references)["lm_accuracy"] == 0.0
    assert mismatches(records[0], reference) == ("lm",)
    assert score_records(records, references, lm_label_names=["red", "cross"])["lm_accuracy"] == 0.0


def test_flip_tta_is_refused_for_a_cnn_trained_without_flips(tmp_path):
    params, config = tiny_pipeline_parts()
    tokenizer = pc.FastTokenizer(os.path.join(tokenizer_dir(tmp_path), pc.TOKENIZER_FILE))
    unflipped = pc.make_pipeline_config(**{**pipeline_config_arguments(config), "train_flip": "none"})
    loaded = pc.PipelineCheckpoint(params=params, config=unflipped, tokenizer=tokenizer)
    with pytest.raises(ValueError, match='trained without flips \\(train_flip="none"\\)'):
        loaded.spec(flip_tta=True)
    assert loaded.spec().flip_tta is False  # without --tta nothing changes
    # Flipped training, or a checkpoint that does not say (older ones), keeps flip TTA.
    for train_flip in ("alternating", None):
        flipped = pc.make_pipeline_config(**{**pipeline_config_arguments(config), "train_flip": train_flip})
        assert pc.PipelineCheckpoint(params=params, config=flipped, tokenizer=tokenizer).spec(flip_tta=True).flip_tta
    assert export.train_flip({"augment": {"flip": "none"}}) == "none" and export.train_flip({}) is None
    with pytest.raises(ValueError, match="train_flip must be one of"):
        pc.make_pipeline_config(**{**pipeline_config_arguments(config), "train_flip": "sideways"})


def pipeline_config_arguments(config: dict) -> dict:
    """`make_pipeline_config`'s arguments that give `config` back."""
    return {key: value for key, value in config.items() if key != "format"}


def test_python_labels_and_templates_read_as_the_command_line_reads_them(tmp_path):
    loaded = tiny_pipeline(tmp_path, bridge=True, template="")
    padded = loaded.spec(lm_labels=["red ", " blue"], lm_templates=["a small {label} "])
    plain = loaded.spec(lm_labels=["red", "blue"], lm_templates=["a small {label}"])
    assert padded.lm_label_names == ("red", "blue") and padded.lm_label_prompts == plain.lm_label_prompts
    with pytest.raises(ValueError, match="'pickup_truck' and 'pickup truck' give the same prompts"):
        loaded.spec(lm_labels=["pickup_truck", "pickup truck"])
    none = classify_images(loaded, np.zeros((0, 32, 32, 3), np.uint8), ["red ", "blue"])
    assert none.names == ("red", "blue") and none.labels == [] and none.probs.shape == (0, 2)


@pytest.mark.parametrize("template", ["a photo of {label}s.", "a{label}", "{label}{prob}%", "cat{label2} or so"])
def test_a_caption_slot_glued_to_a_word_is_refused(template):
    with pytest.raises(ValueError, match="glued to text or another slot"):
        parse_template(template, 2)
    parse_template(template.replace("{", " {").replace("}", "} "), 2)  # with spaces it reads


def pyproject() -> dict:
    """pyproject.toml, read (tomllib: Python 3.11 and later)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_the_package_has_a_version_and_the_license_pyproject_names():
    project = pyproject()
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "imgllm.__version__"}
    assert imgllm.__version__ == importlib.metadata.version("imgllm")
    assert project["project"]["license"] == {"text": "Apache-2.0"}
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert "Apache License" in text[:200] and "Version 2.0, January 2004" in text[:200]
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize("script, fragment", [("imgllm-train", "--workdir"), ("imgllm-infer", "--checkpoint")])
def test_console_scripts_run_from_the_package(script, fragment):
    """pyproject's console scripts name functions of the package (not the repository's train.py / infer.py), and
    each runs: `SCRIPT --help` exits 0 listing its flags. Run as pip's wrapper runs it, from outside the checkout."""
    module, function = pyproject()["project"]["scripts"][script].split(":")
    assert module.startswith("imgllm.")
    wrapper = f"import sys; from {module} import {function}; sys.argv[0] = {script!r}; sys.exit({function}())"
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(ROOT),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert fragment in proc.stdout


def test_the_readme_says_how_to_get_a_cpu_only_torch_for_the_tests():
    """PyPI's default Linux torch wheel pulls the CUDA packages: the README names PyTorch's CPU index."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def test_reading_a_work_directory_from_python_logs_no_orbax_warnings(tmp_path, caplog):
    """Issue #25: export_hf (any read-only Checkpointer) printed three orbax WARNINGs in Python that the CLIs hid."""
    (tmp_path / "checkpoints").mkdir()
    caplog.set_level(logging.WARNING, logger="absl")
    train_checkpoint.Checkpointer(str(tmp_path), read_only=True, asynchronous=False).close()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
