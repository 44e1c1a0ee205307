"""One command that measures imgllm on a GPU beside PyTorch, and prints one table (issue 15).

On a machine with one H200-class GPU, 16 cores and no network, where JAX (CUDA), flax, optax, orbax, transformers
and PyTorch (CUDA) are installed but ml_collections (and tensorflow-datasets) may not be:

    bash benchmarks/prepare_gpu_wheels.sh         # beforehand, with network: wheels/ and wheels/data/ (ignored)
    python3 benchmarks/gpu_check.py               # on the GPU machine: install offline, measure, print the table
    python3 benchmarks/gpu_check.py --smoke       # the same code paths at tiny sizes on the CPU (under 2 minutes)

It installs the project without downloading (`pip install --no-index --find-links wheels/`: the package itself
with --no-deps and the wheels prepared in wheels/; tensorflow-datasets is not needed: imgllm imports it only for
tfds datasets), then runs three sections, each in its own process with its own time limit (gpu_check_sections.py):
  (a) cnn       the cifar10 recipe on the shared JPEG training images (45,000 train / 5,000 validation), timed as
                airbench times it: imgllm against reference_airbench94_torch.py (torch.compile'd on CUDA);
  (b) decode    GPT-2 small (random weights from the config) greedy tokens/s at batch 1 and 64, float32 and
                bfloat16, imgllm against transformers' `generate`;
  (c) captions  captions/s for 4,096 images at batch 512, greedy and top-p 0.9, imgllm's pipeline against a
                PyTorch CNN + `generate` pipeline.
Everything ends within --budget seconds (480 on the GPU): a section past its share is stopped and the table says
so. Targets on the GPU: CNN training >= 1.0x the PyTorch reference's images/s at equal accuracy (±0.3 points);
decoding >= 3x transformers at batch 1 and >= 1.5x at batch 64; captions/s >= 5x the PyTorch pipeline.
Beside each measured rate the table prints its roofline bound (benchmarks/roofline.py at the row's sizes: the rate
of imgllm's program at the device's peak FLOP/s or bandwidth, whichever binds, from XLA's cost analysis of the
program compiled on this machine) and the fraction of it measured; the line under the table names the device.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WHEELS = os.path.join(REPO, "wheels")
TARBALL = os.path.join(WHEELS, "data", "cifar10-train-jpeg.tar.gz")
# Seconds each section is sure to get (an earlier section may use what a later one leaves; never the reverse).
ALLOTMENTS = {"cnn": 190, "decode": 120, "captions": 130}
SMOKE_ALLOTMENTS = {"cnn": 60, "decode": 25, "captions": 30}
BUDGET, SMOKE_BUDGET = 480, 240
RESERVE = 3  # seconds kept back for printing the table


def pip_install(arguments: list[str], what: str) -> str:
    """Runs `pip install --no-index` (nothing is downloaded) with `arguments`; returns a line saying how it went."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return f"installed {what}"
    return f"could not install {what} (exit {result.returncode}): {result.stderr.strip()[-400:]}"


def install(wheels: str) -> list[str]:
    """Installs the wheels in `wheels` and the project itself, offline; returns what happened, one line each.

    The project goes in editable and --no-deps (its dependencies are on the machine or among the wheels), built by
    the setuptools already there (--no-build-isolation would otherwise download one). A failure is reported, not
    fatal: the sections import the checkout through PYTHONPATH anyway, and a missing dependency fails them by name.
    """
    wheel_files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    lines = (
        [
            pip_install(
                ["--find-links", wheels, *wheel_files],
                f"{len(wheel_files)} wheels from wheels/: " + ", ".join(os.path.basename(w) for w in wheel_files),
            )
        ]
        if wheel_files
        else []
    )
    return lines + [
        pip_install(
            ["--find-links", wheels, "--no-deps", "--no-build-isolation", "-e", REPO], "imgllm (editable, --no-deps)"
        )
    ]


def section_env(smoke: bool) -> dict[str, str]:
    """The environment of a section process: the repository importable even if the install failed, JAX's share
    of GPU memory capped so that PyTorch can allocate beside it, and (smoke) JAX kept on the CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, HERE, env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def start_section(name: str, out: str, *, smoke: bool, tarball: str, seconds: float) -> subprocess.Popen:
    """Starts one section in its own process group (so that its data loaders and compile workers can be stopped
    with it), appending its rows to `out`; it is told its time limit, `seconds`, so that it computes roofline
    bounds only while they fit."""
    command = [
        sys.executable,
        os.path.join(HERE, "gpu_check_sections.py"),
        name,
        "--out",
        out,
        "--tarball",
        tarball,
        "--seconds",
        f"{seconds:.0f}",
    ] + (["--smoke"] if smoke else [])
    return subprocess.Popen(command, env=section_env(smoke), start_new_session=True)


def section_timeout(name: str, order: list[str], allotments: dict[str, int], deadline: float) -> float:
    """Seconds section `name` may run: what is left before the deadline, less what the sections after it in
    `order` are owed (their allotments)."""
    owed = sum(allotments[later] for later in order[order.index(name) + 1 :])
    return deadline - time.perf_counter() - owed - RESERVE


def run_sections(
    order: list[str],
    rows_dir: str,
    *,
    jobs: int,
    deadline: float,
    allotments: dict[str, int],
    smoke: bool,
    tarball: str,
) -> dict[str, str]:
    """Runs the sections, `jobs` at a time (1 on the GPU: they must not share it while timed), each stopped (its
    whole process group killed) when its time is up. Returns name -> "ok", "timed out after N s" or
    "failed (exit N)", in `order`."""
    pending, running, statuses = list(order), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            later = pending if jobs == 1 else []
            limit = section_timeout(name, [name, *later], allotments, deadline)
            path = os.path.join(rows_dir, f"{name}.jsonl")
            process = start_section(name, path, smoke=smoke, tarball=tarball, seconds=limit)
            running[name] = (process, time.perf_counter(), limit)
        time.sleep(0.1)
        for name, (process, started, limit) in list(running.items()):
            code, elapsed = process.poll(), time.perf_counter() - started
            if code is None and elapsed < limit:
                continue
            if code is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                statuses[name] = f"timed out after {elapsed:.0f} s"
            else:
                statuses[name] = "ok" if code == 0 else f"failed (exit {code})"
            del running[name]
    return {name: statuses[name] for name in order}


def read_rows(rows_dir: str, order: list[str]) -> tuple[list[dict], list[str]]:
    """(table rows: the last one per section and key, sections in `order`; environment lines) from the sections'
    rows files (`gpu_check_sections.Rows`)."""
    rows, environments = {}, []
    for name in order:
        path = os.path.join(rows_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if "environment" in record:
                    environments.append(record["environment"])
                else:
                    rows[(record["section"], record["key"])] = record
    return list(rows.values()), environments


def number(value, unit: str) -> str:
    """A figure as the table prints it ("—" when it was not measured)."""
    if value is None:
        return "—"
    return f"{value:.2f}" if unit in ("s", "%") or abs(value) < 100 else f"{value:,.0f}"


def ratio_text(row: dict) -> str:
    """imgllm over PyTorch as "1.23x", or for accuracy the difference in points."""
    if row["ratio"] is None:
        return "—"
    return f"{row['ratio']:+.2f} pt" if row["unit"] == "%" else f"{row['ratio']:.2f}x"


def fraction_text(row: dict) -> str:
    """imgllm's rate over its roofline bound as a percentage ("—" without a bound)."""
    fraction = row.get("of_bound")
    return "—" if fraction is None else f"{100 * fraction:.3g}%"


def format_table(rows: list[dict], statuses: dict[str, str]) -> str:
    """The table: one line per measurement, imgllm beside PyTorch, the ratio, the target and whether it is met,
    the roofline bound of a rate and the fraction of it measured; then what the bounds are, and each section's
    status."""
    header = (
        f"{'section':<9} {'measurement':<46} {'unit':<6} {'imgllm':>10} {'PyTorch':>10} {'ratio':>9} "
        f"{'target':<18} {'met':<4} {'bound':>10} {'of bound':>8} note"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        met = {True: "yes", False: "NO", None: "—"}[row["met"]]
        lines.append(
            f"{row['section']:<9} {row['what']:<46} {row['unit']:<6} {number(row['jax'], row['unit']):>10} "
            f"{number(row['torch'], row['unit']):>10} {ratio_text(row):>9} {row['target']:<18} {met:<4} "
            f"{number(row.get('bound'), row['unit']):>10} {fraction_text(row):>8} {row['note']}"
        )
    bases = sorted({row["bound_basis"] for row in rows if row.get("bound_basis")})
    lines += [f"bound: the rate of imgllm's program at the {basis}; of bound: imgllm / bound" for basis in bases] or [
        "bound: none computed (roofline bounds come after a section's measurements, while its time lasts)"
    ]
    lines.append("sections: " + ", ".join(f"{name} {status}" for name, status in statuses.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on the CPU (made-up JPEGs instead of the tarball); installs nothing",
    )
    parser.add_argument("--sections", default="cnn,decode,captions", help="comma-separated subset to run")
    parser.add_argument(
        "--budget", type=float, default=None, help=f"seconds for everything (default {BUDGET}; --smoke {SMOKE_BUDGET})"
    )
    parser.add_argument("--tarball", default=TARBALL, help="CIFAR-10 JPEG tarball (default: wheels/data/)")
    parser.add_argument("--no-install", action="store_true", help="skip the offline pip install")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="sections run at once (default 1; --smoke 2: its CPU figures are not measurements, "
        "and two processes use both cores while each compiles)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + (args.budget or (SMOKE_BUDGET if args.smoke else BUDGET))
    notes = []
    if not (args.smoke or args.no_install):
        notes += install(WHEELS)
    if not args.smoke and not os.path.exists(args.tarball):
        sys.exit(f"no CIFAR-10 tarball at {args.tarball}: run benchmarks/prepare_gpu_wheels.sh first")
    order = [name for name in args.sections.split(",") if name]
    allotments = SMOKE_ALLOTMENTS if args.smoke else ALLOTMENTS
    jobs = args.jobs or (2 if args.smoke else 1)
    with tempfile.TemporaryDirectory() as rows_dir:
        statuses = run_sections(
            order, rows_dir, jobs=jobs, deadline=deadline, allotments=allotments, smoke=args.smoke, tarball=args.tarball
        )
        rows, environments = read_rows(rows_dir, order)
    elapsed = time.perf_counter() - start
    print(f"\n=== imgllm GPU check{' (smoke: tiny sizes, CPU)' if args.smoke else ''}: {elapsed:.0f} s ===")
    for line in notes + sorted(set(environments)):
        print(line)
    if args.smoke:
        print("smoke: tiny sizes and made-up images, sections two at a time; the targets are for the GPU sizes")
    print(format_table(rows, statuses))
    return 0 if all(status == "ok" for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
