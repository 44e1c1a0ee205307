"""Behaviour kept across refactorings: a short demo run's metrics, checkpoint arrays and infer.py's records, compared
with what the code before issue #26's refactoring produced.

tests/data/refactor_golden.json was written by this file run on commit c6dbc24 (the last commit before #26's
refactoring; the file's code ran there unchanged) with IMGLLM_WRITE_GOLDEN=1:

    git worktree add /tmp/before c6dbc24 && cp tests/test_refactor_golden.py /tmp/before/tests/
    cd /tmp/before && IMGLLM_WRITE_GOLDEN=$PWD/../refactor_golden.json PYTHONPATH=$PWD \\
        python -m pytest -q -p no:cacheprovider tests/test_refactor_golden.py

Texts (captions, labels, the steps logged) must be equal; numbers agree to a relative 1e-4, which allows for float
summation order on another CPU but not for a changed computation (records' numbers, rounded to 4 decimals, to one
unit of the last decimal). A deliberate change of behaviour rewrites the
file in the same commit, saying why.
"""

import json
import os

import jax
import numpy as np
import pytest

from imgllm.commands import infer
from imgllm.configs import captioner_tiny, cnn_tiny
from imgllm.data.demo import write_demo_images
from imgllm.pipeline import load_pipeline
from imgllm.train import demo_recipe

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "refactor_golden.json")
RELATIVE = 1e-4
TIMING = ("second", "time", "compile")  # metric keys that measure the machine, not the computation
CAPTION_RUNS = {  # infer.py's flags beyond --checkpoint, inputs and --output: greedy, and sampling with labels
    "greedy": [],
    "sampled": ["--decoding", "sample", "--top-p", "0.9", "--num-captions", "2", "--seed", "3", "--batch-size", "4"],
    "labels": ["--tta", "--lm-classify", "--top-labels", "2", "--lm-labels", "red,green,blue"],
}


def timing_free(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(word in k for word in TIMING)}


def metrics_of(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [timing_free(json.loads(line)) for line in f]


def array_summary(params) -> dict[str, list]:
    """Each array's shape, sum, sum of absolute values and squares, keyed by its path: a fingerprint that survives
    float noise and catches any changed value beyond it."""
    summary = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        values = np.asarray(leaf, np.float64)
        summary[jax.tree_util.keystr(path)] = [
            list(values.shape),
            float(values.sum()),
            float(np.abs(values).sum()),
            float((values**2).sum()),
        ]
    return summary


def caption_records(checkpoint: str, images: str, out_dir: str) -> dict[str, list[dict]]:
    runs = {}
    for name, flags in CAPTION_RUNS.items():
        output = os.path.join(out_dir, f"{name}.jsonl")
        assert infer.main(["--checkpoint", checkpoint, images, "--output", output, "--quiet", *flags]) == 0
        with open(output) as f:
            runs[name] = [json.loads(line) for line in f]
    return runs


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> dict:
    """The demo recipe on tiny configs (8 classifier steps, 16 captioner steps), its pipeline checkpoint's arrays
    and three infer.py runs over 12 fresh demo images."""
    workdir = str(tmp_path_factory.mktemp("golden"))
    classifier_config = cnn_tiny.get_config()
    classifier_config.num_epochs = 1.0
    classifier_config.eval_split = ""
    captioner_config = captioner_tiny.get_config()
    captioner_config.captions.templates = ("a drawing of a {label}.", "the shape is a {label}.")
    captioner_config.num_epochs = 2.0
    results = demo_recipe.run_demo(
        workdir,
        classifier_config=classifier_config,
        captioner_config=captioner_config,
        num_eval_examples=8,
        log=lambda _: None,
    )
    pipeline = os.path.join(workdir, "pipeline")
    images = os.path.join(workdir, "images")
    write_demo_images(images, num_examples=12, seed=5)
    return {
        "demo_results": results,
        "classifier_metrics": metrics_of(os.path.join(workdir, "classifier")),
        "captioner_metrics": metrics_of(os.path.join(workdir, "captioner")),
        "pipeline_arrays": array_summary(load_pipeline(pipeline).params),
        "records": {
            name: [dict(record, path=os.path.relpath(record["path"], images)) for record in records]
            for name, records in caption_records(pipeline, images, workdir).items()
        },
    }


def assert_same(actual, expected, where: str, absolute: float = 1e-6) -> None:
    """Equal structure and texts; numbers within RELATIVE or `absolute` (for values near zero or rounded)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}", absolute)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: length {len(actual)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]", absolute)
    elif isinstance(expected, float) or isinstance(actual, float):
        assert actual == pytest.approx(expected, rel=RELATIVE, abs=absolute), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_metrics_arrays_and_records_are_those_before_the_refactoring(golden_run):
    target = os.environ.get("IMGLLM_WRITE_GOLDEN")
    if target:
        with open(target, "w") as f:
            json.dump(golden_run, f, indent=1, sort_keys=True)
        pytest.skip(f"wrote {target}")
    with open(GOLDEN) as f:
        expected = json.load(f)
    assert sorted(golden_run) == sorted(expected)
    for part in sorted(expected):
        assert_same(golden_run[part], expected[part], part, absolute=1.01e-4 if part == "records" else 1e-6)
