"""benchmarks/gpu_check.py, the one-command GPU check: its smoke mode runs every section's code path at tiny sizes on
the CPU and prints the table, with each rate's roofline bound; a section past its time is stopped and named; the
table keeps the last row of each measurement and leaves PyTorch's and the bound's cells empty where they were not
measured."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# The rows the smoke run prints: (section, start of the measurement's name).
SMOKE_ROWS = [
    ("cnn", "cifar10 2 ep, airbench time"),
    ("cnn", "cifar10 32/step, train"),
    ("cnn", "cifar10 TTA val accuracy"),
    ("decode", "GPT-2 2x64 greedy b1 float32"),
    ("decode", "GPT-2 2x64 greedy b4 float32"),
    ("decode", "GPT-2 2x64 greedy b1 bfloat16"),
    ("decode", "GPT-2 2x64 greedy b4 bfloat16"),
    ("captions", "16 images b8 greedy bfloat16"),
    ("captions", "16 images b8 top-p 0.9 bfloat16"),
]


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def _bound_cells(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(section, measurement) -> [bound, of bound] of each table line (the two columns before the note)."""
    lines = stdout.splitlines()
    note = next(line for line in lines if line.startswith("section ")).index(" note")
    cells = {}
    for line in lines:
        for section, name in SMOKE_ROWS:
            if re.match(rf"{section}\s+{re.escape(name)}\s", line):
                cells[(section, name)] = line[note - 19 : note].split()
    return cells


def _table_cells(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(section, measurement) -> the cells after it (unit, imgllm, PyTorch, ratio, ...) of each table line."""
    cells = {}
    for line in stdout.splitlines():
        for section, name in SMOKE_ROWS:
            if re.match(rf"{section}\s+{re.escape(name)}\s", line):
                cells[(section, name)] = line[line.index(name) + len(name) :].split()
    return cells


@pytest.mark.slow
def test_smoke_mode_measures_every_section_and_prints_one_table():
    # A generous budget: CI runs two test files at once on two cores (the smoke run itself targets 2 minutes).
    result = _run("--smoke", "--budget", "900", timeout=1000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sections: cnn ok, decode ok, captions ok" in result.stdout
    cells = _table_cells(result.stdout)
    assert sorted(cells) == sorted(SMOKE_ROWS), result.stdout[-3000:]
    bounds = _bound_cells(result.stdout)
    for (section, name), (unit, ours, theirs, *_rest) in cells.items():
        assert float(ours.replace(",", "")) > 0, (section, name)
        if _torch_installed():
            assert float(theirs.replace(",", "")) > 0, (section, name)
        else:
            assert theirs == "—", (section, name)
        bound, fraction = bounds[(section, name)]
        if unit in ("img/s", "tok/s"):  # a rate: its program's rate at the roofline, and the fraction reached
            assert float(bound.replace(",", "")) > float(ours.replace(",", "")), (section, name, bound)
            assert fraction.endswith("%") and 0 < float(fraction[:-1]) < 100, (section, name, fraction)
        else:
            assert bound == fraction == "—", (section, name)
    # The bound is the H200's (the device the check is for), counted by this machine's XLA:CPU.
    assert re.search(r"^bound: .*H200 roofline.*XLA:cpu's cost analysis", result.stdout, re.M), result.stdout[-3000:]


def test_a_section_past_its_time_is_stopped_and_named():
    result = _run("--smoke", "--sections", "decode", "--budget", "4", timeout=120)
    assert result.returncode == 1
    assert re.search(r"sections: decode timed out after \d+ s", result.stdout), result.stdout[-2000:]


def test_the_table_keeps_the_last_row_per_measurement_and_marks_missing_figures(tmp_path):
    row = dict(
        section="decode",
        key="b1-float32",
        what="GPT-2 small greedy b1 float32",
        unit="tok/s",
        jax=900.0,
        torch=None,
        ratio=None,
        target=">=3x",
        met=None,
        note="",
    )
    basis = "H200 roofline (roofline.py), FLOPs and bytes from XLA:gpu's cost analysis"
    lines = [
        {"section": "decode", "environment": "jax on gpu"},
        row,
        {**row, "torch": 250.0, "ratio": 3.6, "met": True},
        {**row, "torch": 250.0, "ratio": 3.6, "met": True, "bound": 12000.0, "of_bound": 0.075, "bound_basis": basis},
    ]
    (tmp_path / "decode.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    accuracy = dict(
        section="cnn",
        key="accuracy",
        what="cifar10 TTA val accuracy",
        unit="%",
        jax=93.9,
        torch=None,
        ratio=None,
        target="±0.3 pt",
        met=None,
        note="",
    )
    (tmp_path / "cnn.jsonl").write_text(json.dumps(accuracy) + "\n")

    rows, environments = gpu_check.read_rows(str(tmp_path), ["cnn", "decode", "captions"])
    table = gpu_check.format_table(rows, {"cnn": "ok", "decode": "ok", "captions": "timed out after 130 s"})

    assert environments == ["jax on gpu"]
    assert [r["key"] for r in rows] == ["accuracy", "b1-float32"]
    decode_line = next(line for line in table.splitlines() if line.startswith("decode"))
    assert re.search(r"900\s+250\s+3\.60x\s+>=3x\s+yes\s+12,000\s+7\.5%", decode_line)
    cnn_line = next(line for line in table.splitlines() if line.startswith("cnn"))  # no bound fields: empty cells
    assert re.search(r"93\.90\s+—\s+—\s+±0\.3 pt\s+—\s+—\s+—", cnn_line)
    assert table.splitlines()[-2] == f"bound: the rate of imgllm's program at the {basis}; of bound: imgllm / bound"
    assert table.splitlines()[-1] == "sections: cnn ok, decode ok, captions timed out after 130 s"


def test_a_section_is_owed_its_allotment_by_the_sections_before_it():
    deadline = gpu_check.time.perf_counter() + 480
    allotments = {"cnn": 210, "decode": 100, "captions": 130}
    first = gpu_check.section_timeout("cnn", ["cnn", "decode", "captions"], allotments, deadline)
    last = gpu_check.section_timeout("captions", ["captions"], allotments, deadline)
    assert 480 - 230 - gpu_check.RESERVE - 1 < first <= 480 - 230 - gpu_check.RESERVE
    assert 480 - gpu_check.RESERVE - 1 < last <= 480 - gpu_check.RESERVE
