"""infer.py in a two-process JAX job (slow): each process captions its shard on its own two simulated CPU devices,
process 0 merges the parts, and the merged output is byte for byte what one process writes with the same batch
size; a job whose part could not be written says which part, and the same command then completes it; a job one of
whose processes is killed mid-run (SIGKILL) is completed by the same command, each record written once."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from imgllm.pipeline.outputs import OutputLock, part_path

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 40
# The kill test's input: 60 batches of 4, 30 per process, so that the kill lands mid-part (a batch takes 10 ms or more).
KILL_IMAGES = 240
# Sampling, so that the records depend on each batch's random key: a wrong batch plan would show.
CAPTION_FLAGS = ["--batch-size", "4", "--decoding", "sample", "--seed", "3", "--num-captions", "2", "--quiet"]


def cache_flags() -> list[str]:
    """The session's compilation cache (conftest), shared by the subprocesses: each program compiles once."""
    return ["--compilation-cache", os.environ.get("JAX_COMPILATION_CACHE_DIR", "")]


def make_workspace(folder, checkpoint, infer, count: int):
    """Fills `folder` with images/ (`count` small PNGs) and baseline.jsonl, what one process writes for them (run
    here); returns it."""
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (8 + index % 5, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{index:03d}.png")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        status = infer.main(["--checkpoint", str(checkpoint), "images", "--output", "baseline.jsonl", *CAPTION_FLAGS])
    finally:
        os.chdir(previous)
    assert status == 0
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, checkpoint, infer):
    """A folder with images/ (NUM_IMAGES small PNGs) and baseline.jsonl, what one process writes for them."""
    return make_workspace(tmp_path_factory.mktemp("multiprocess"), checkpoint, infer, NUM_IMAGES)


@pytest.fixture(scope="module")
def kill_workspace(tmp_path_factory, checkpoint, infer):
    """The same with KILL_IMAGES images: enough batches that a process can be killed in the middle of its part."""
    return make_workspace(tmp_path_factory.mktemp("multiprocess-kill"), checkpoint, infer, KILL_IMAGES)


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


def assert_same_as_baseline(folder, output, count: int = NUM_IMAGES):
    assert (folder / output).read_bytes() == (folder / "baseline.jsonl").read_bytes()
    merged = json.loads((folder / f"{output}.run.json").read_text())
    assert merged == json.loads((folder / "baseline.jsonl.run.json").read_text())
    assert len((folder / output).read_text().splitlines()) == count


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


def complete_lines(path) -> int:
    """The number of whole (newline-ended) lines of a file; -1 when it does not exist yet."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return -1


def shard_keys(folder, index: int, count: int = 2) -> list[str]:
    """The images of shard `index` of `count`, in the order it captions them: the batches b of the one-process run
    (baseline.jsonl, in input order) with b % count == index."""
    batch = int(CAPTION_FLAGS[CAPTION_FLAGS.index("--batch-size") + 1])  # a multiple of each process's 2 devices
    paths = [json.loads(line)["path"] for line in (folder / "baseline.jsonl").read_text().splitlines()]
    return [path for start in range(index * batch, len(paths), count * batch) for path in paths[start : start + batch]]


def last_message(out: str) -> str:
    """The last line of a process's output that is not part of a native stack trace ("@ 0x...", "*** Check ...")."""
    lines = [line.strip() for line in out.splitlines()]
    lines = [line for line in lines if line and not re.match(r"@\s+0x|\*\*\* Check failure", line)]
    return lines[-1][:500] if lines else ""


# How long the test waits for the survivor of a kill: after its own part is complete (or the kill, when that is
# later) it is given SURVIVOR_GRACE_S to exit by itself, then killed; SURVIVOR_LIMIT_S bounds the whole wait.
SURVIVOR_GRACE_S = 3.0
SURVIVOR_LIMIT_S = 120.0


def kill_mid_part(procs, parts, victim: int, total: int) -> int:
    """SIGKILLs process `victim` once its part has a whole record (polling every few ms); returns the whole lines of
    its part after its death. A part complete before the kill fails the test: KILL_IMAGES is then too small."""
    deadline = time.monotonic() + 240
    while complete_lines(parts[victim]) < 1:
        for index, proc in enumerate(procs):
            assert proc.poll() is None, f"process {index} ended before the kill: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"process {victim} wrote no record within 240 s"
        time.sleep(0.003)
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait(timeout=30)
    written = complete_lines(parts[victim])
    assert 0 < written < total, f"the kill landed after process {victim}'s part was complete: raise KILL_IMAGES"
    return written


def handle_survivor(proc, part, total: int) -> tuple[str, int, str]:
    """Waits, within a bounded time, for the survivor of a kill to exit by itself, and kills it when it does not
    (process 0 waits at the barrier until the coordination service declares the dead peer, after JAX's heartbeat
    timeout: 100 s); returns (what happened, exit status, its last message line)."""
    started = time.monotonic()
    ready = None  # when its part became complete (or the kill, when later)
    while proc.poll() is None and time.monotonic() - started < SURVIVOR_LIMIT_S:
        if ready is None and complete_lines(part) == total:
            ready = time.monotonic()
        if ready is not None and time.monotonic() - ready > SURVIVOR_GRACE_S:
            break
        time.sleep(0.05)
    waited = time.monotonic() - started
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        what = f"still running {waited:.1f} s after the kill (its part complete: blocked at the barrier); killed"
    else:
        what = f"exited by itself {waited:.1f} s after the kill"
    out, _ = proc.communicate(timeout=30)
    return what, proc.returncode, last_message(out)


@pytest.mark.parametrize("victim", [1, 0], ids=["process-1-killed", "coordinator-killed"])
def test_killed_process_is_resumed_by_the_same_command(kill_workspace, checkpoint, victim, record_property):
    """SIGKILL one process of the job mid-part; the survivor is waited for (bounded) and killed if it blocks; the
    same command then completes both parts, each record once (a partly written last line is dropped), and merges
    them into what one process writes. The killed run's lock files (flock: the kernel drops a dead holder's lock)
    do not stand in the way."""
    folder = kill_workspace
    output = f"killed{victim}.jsonl"
    parts = [str(folder / part_path(output, (index, 2))) for index in range(2)]
    survivor = 1 - victim
    keys = [shard_keys(folder, index) for index in range(2)]
    started = time.monotonic()
    procs = start_job(folder, checkpoint, output)
    try:
        written = kill_mid_part(procs, parts, victim, len(keys[victim]))
        what, status, message = handle_survivor(procs[survivor], parts[survivor], len(keys[survivor]))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    report = (
        f"process {victim} killed after {written} of {len(keys[victim])} records, {time.monotonic() - started:.1f} s "
        f"after the start; process {survivor} {what}: status {status}, {message!r}"
    )
    print(report)
    record_property("survivor", report)
    assert status != 0, report  # nothing merged: the survivor never reports success
    assert not (folder / output).exists()
    # The killed process's lock file is still there, with its pid, but no lock: the kernel dropped it.
    with open(parts[victim] + ".lock", encoding="ascii") as f:
        assert f.read().strip() == str(procs[victim].pid)
    # A write cut short by the kill leaves a partial last line: here, the first half of the next record.
    baseline = {json.loads(line)["path"]: line for line in (folder / "baseline.jsonl").read_text().splitlines(True)}
    with open(parts[victim], "rb") as f:
        before = f.read()
    if before.endswith(b"\n"):
        line = baseline[keys[victim][written]].encode()
        with open(parts[victim], "ab") as f:
            f.write(line[: len(line) // 2])
    kept = before[: before.rfind(b"\n") + 1]

    started = time.monotonic()
    results = finish(start_job(folder, checkpoint, output))
    print(f"the rerun took {time.monotonic() - started:.1f} s")
    for status, out in results:
        assert status == 0, out[-3000:]
    assert f"merged the parts of the 2 processes into {output}" in results[0][1]
    assert_same_as_baseline(folder, output, KILL_IMAGES)
    for index, part in enumerate(parts):  # each image's record once in its part, in the shard's order
        with open(part, encoding="utf-8") as f:
            assert [json.loads(line)["path"] for line in f.read().splitlines()] == keys[index]
        assert not os.path.exists(part + ".lock")
    with open(parts[victim], "rb") as f:  # the records written before the kill kept as they were
        assert f.read().startswith(kept)
