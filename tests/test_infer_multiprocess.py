"""infer.py in a two-process JAX job (slow): each process captions its shard on its own two simulated CPU devices,
process 0 merges the parts, and the merged output is byte for byte what one process writes with the same batch
size; a job whose part could not be written says which part, and the same command then completes it."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgllm.pipeline.outputs import OutputLock, part_path

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 40
# Sampling, so that the records depend on each batch's random key: a wrong batch plan would show.
CAPTION_FLAGS = ["--batch-size", "4", "--decoding", "sample", "--seed", "3", "--num-captions", "2", "--quiet"]


def cache_flags() -> list[str]:
    """The session's compilation cache (conftest), shared by the subprocesses: each program compiles once."""
    return ["--compilation-cache", os.environ.get("JAX_COMPILATION_CACHE_DIR", "")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, checkpoint, infer):
    """A folder with images/ (small PNGs) and baseline.jsonl, what one process writes for them (run here)."""
    folder = tmp_path_factory.mktemp("multiprocess")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        pixels = rng.integers(0, 256, (8 + index % 5, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{index:02d}.png")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        status = infer.main(["--checkpoint", str(checkpoint), "images", "--output", "baseline.jsonl", *CAPTION_FLAGS])
    finally:
        os.chdir(previous)
    assert status == 0
    return folder


def start_job(folder, checkpoint, output, *, extra=()):
    """Starts the two processes of one infer.py job (localhost coordinator), each with two CPU devices."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "infer.py"),
                "--checkpoint",
                str(checkpoint),
                "images",
                "--output",
                output,
                *CAPTION_FLAGS,
                *cache_flags(),
                f"--coordinator_address=localhost:{port}",  # train.py's spelling works too
                "--num-processes=2",
                f"--process-id={index}",
                *extra,
            ],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]


def finish(procs) -> list[tuple[int, str]]:
    """(exit status, output) of each process; kills them all when one hangs."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return results


def assert_same_as_baseline(folder, output):
    assert (folder / output).read_bytes() == (folder / "baseline.jsonl").read_bytes()
    merged = json.loads((folder / f"{output}.run.json").read_text())
    assert merged == json.loads((folder / "baseline.jsonl.run.json").read_text())
    assert len((folder / output).read_text().splitlines()) == NUM_IMAGES


def test_two_processes_write_what_one_writes(workspace, checkpoint):
    results = finish(start_job(workspace, checkpoint, "merged.jsonl", extra=["--html", "merged.html"]))
    for status, out in results:
        assert status == 0, out[-3000:]
    assert "merged the parts of the 2 processes into merged.jsonl" in results[0][1]
    assert_same_as_baseline(workspace, "merged.jsonl")
    assert (workspace / "merged.html").exists()
    for index in range(2):  # each process's part, kept beside the output as with --shard
        assert os.path.exists(workspace / part_path("merged.jsonl", (index, 2)))


def test_failed_part_is_named_and_the_same_command_completes_it(workspace, checkpoint):
    part = str(workspace / part_path("resumed.jsonl", (1, 2)))
    with OutputLock(part):  # process 1 cannot write its part: it fails, process 0 still ends and merges nothing
        results = finish(start_job(workspace, checkpoint, "resumed.jsonl"))
    (status0, out0), (status1, out1) = results
    assert status1 == 2 and "is in use by another run" in out1, out1[-3000:]
    assert status0 == 2, out0[-3000:]
    assert "cannot merge resumed.jsonl: 1 of 2 parts missing or incomplete" in out0
    assert f"{part_path('resumed.jsonl', (1, 2))} (absent)" in out0
    assert not (workspace / "resumed.jsonl").exists()
    # The same command again: process 0's part is complete (nothing to caption), process 1 writes its part.
    results = finish(start_job(workspace, checkpoint, "resumed.jsonl"))
    for status, out in results:
        assert status == 0, out[-3000:]
    assert_same_as_baseline(workspace, "resumed.jsonl")
