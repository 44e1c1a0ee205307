"""Time loading the 50,000 CIFAR-10 training JPEGs (../shared/data tarball) with imgllm.data.

Prints medians of --runs runs: extraction, decoding with 1 process and with N processes, and a
cache hit. Reference: the same decode loop as plain Pillow, one process (the floor of per-file cost).
Usage: python benchmarks/bench_data_load.py [--tarball PATH] [--runs 3]
"""

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

from imgllm.data import load_dataset
from imgllm.data.images import default_num_workers, list_image_files


def cpu_seconds():
    """CPU time of this process and its finished children (decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, runs):
    """Median wall seconds and median CPU seconds (all processes) of `runs` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(runs):
        cpu, start = cpu_seconds(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu)
    return (statistics.median(walls), statistics.median(cpus)), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tarball", default=os.path.join(os.path.dirname(__file__), "../../shared/data/cifar10-train-jpeg.tar.gz")
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("load average:", os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        extract, _ = timed(lambda: subprocess.run(["tar", "-xzf", args.tarball, "-C", tmp], check=True), 1)
        spec = f"folder:{tmp}"
        class_dirs = [os.path.join(tmp, "train", c) for c in sorted(os.listdir(os.path.join(tmp, "train")))]
        files = [f for class_dir in class_dirs for f in list_image_files(class_dir)]
        plain, _ = timed(lambda: [np.asarray(Image.open(f).convert("RGB")) for f in files], args.runs)
        one, data = timed(lambda: load_dataset(spec, "train_full", num_workers=1), args.runs)
        workers = default_num_workers()
        many, _ = timed(lambda: load_dataset(spec, "train_full", num_workers=workers), args.runs)
        cache = os.path.join(tmp, "cache")
        load_dataset(spec, "train_full", cache_dir=cache)
        cached, _ = timed(lambda: load_dataset(spec, "train_full", cache_dir=cache), args.runs)
        print(f"images {data.images.shape}, pixel mean {np.round(data.images.mean((0, 1, 2)) / 255, 4)}")
        print(f"{'step':38s} {'wall s':>8s} {'images/s':>9s} {'CPU s':>7s}")
        for name, (wall, cpu) in [
            ("extract tarball (tar -xzf)", extract),
            ("reference: plain Pillow loop, 1 proc", plain),
            ("load_dataset, 1 process", one),
            (f"load_dataset, {workers} processes", many),
            ("load_dataset, cache hit", cached),
        ]:
            print(f"{name:38s} {wall:8.2f} {len(files) / wall:9.0f} {cpu:7.2f}")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    warnings.simplefilter("error")  # the shared data has no bad files: any warning is a bug
    main()
