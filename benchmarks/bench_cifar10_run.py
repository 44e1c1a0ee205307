"""Full CIFAR-10 training run with the airbench94 recipe (imgllm/configs/cifar10.py, or --config=cifar10_muon);
prints validation accuracy per epoch, the final flip+translate-TTA accuracy, wall time and peak memory, next to
the published airbench figures.

Data: ../shared/data/cifar10-train-jpeg.tar.gz (the 50,000 training images as JPEG folders), extracted to a
temporary folder; validation = the last 10% of every class, carved from train (the test split is held back).

    python benchmarks/bench_cifar10_run.py                        # 9.9 epochs, 1 run (GPU: seconds; CPU: ~1.5 h)
    python benchmarks/bench_cifar10_run.py --runs=3               # median of 3 runs
    python benchmarks/bench_cifar10_run.py --epochs=1 --train_examples=5000   # smoke run
    python benchmarks/bench_cifar10_run.py --workdir=runs/cifar10_val  # keep the checkpoint (e.g. for captioning)
    python benchmarks/bench_cifar10_run.py --torch_reference      # + airbench94 in PyTorch on the same data
    python benchmarks/bench_cifar10_run.py --config=cifar10_muon  # airbench94_muon's recipe: Muon, 8 epochs
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import jax

from imgllm.train import loop

DEFAULT_TARBALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                               "cifar10-train-jpeg.tar.gz")
REFERENCE = {"airbench94 (A100, torch)": {"epochs": 9.9, "tta_accuracy": 0.9401, "seconds": 3.83},
             "airbench94_muon (A100)": {"epochs": 8.0, "tta_accuracy": 0.9401, "seconds": 2.59}}


def peak_memory_gib() -> dict[str, float]:
    """Peak host RSS and, on accelerators, peak device memory, in GiB."""
    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def extract(tarball: str, into: str) -> str:
    with tarfile.open(tarball) as archive:
        archive.extractall(into, filter="data")
    return into


def load_config(name: str):
    """get_config() of imgllm/configs/<name>.py."""
    return importlib.import_module(f"imgllm.configs.{name}").get_config()


def one_run(args, data_root: str, seed: int) -> dict:
    config = load_config(args.config)
    config.dataset = f"folder:{data_root}"
    config.data_cache_dir = args.cache_dir
    config.seed = seed
    config.num_epochs = args.epochs
    config.num_train_examples = args.train_examples
    config.progress_bar = not args.no_progress
    if args.batch_size:
        config.global_batch_size = args.batch_size
    with contextlib.ExitStack() as stack:
        workdir = (os.path.join(args.workdir, f"seed{seed}") if args.workdir
                   else stack.enter_context(tempfile.TemporaryDirectory()))
        start = time.perf_counter()
        result = loop.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
        with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
            records = [json.loads(line) for line in f]
    per_epoch = [(r["epoch"], r["accuracy"]) for r in records if r["split"] == "eval"]
    train = [r for r in records if r["split"] == "train"]
    return {"seed": seed, "wall_seconds": wall, "per_epoch_val_accuracy": per_epoch,
            "final_tta_accuracy": result.final_eval["accuracy"],
            "train_images_per_second": statistics.median(r["examples_per_second"] for r in train[1:] or train),
            **peak_memory_gib()}


def torch_reference(args, data_root: str) -> dict:
    """airbench94 in PyTorch on the same training and validation images, in a child process (one seed)."""
    reference_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_airbench94_torch.py")
    command = [sys.executable, reference_script,
               f"--data_root={data_root}", f"--epochs={args.epochs}"]
    command += [f"--cache_dir={args.cache_dir}"] if args.cache_dir else []
    command += [f"--train_examples={args.train_examples}"] if args.train_examples else []
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    print(out.strip())
    result = json.loads(out.strip().splitlines()[-1])
    return {"epochs": args.epochs, "tta_accuracy": result["final_tta_accuracy"], "seconds": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", default=DEFAULT_TARBALL)
    parser.add_argument("--data_root", default=None, help="already extracted folder (holds train/<class>/...)")
    parser.add_argument("--cache_dir", default=None, help="keep decoded images here between runs")
    parser.add_argument("--config", default="cifar10", choices=["cifar10", "cifar10_muon"])
    parser.add_argument("--epochs", type=float, default=None, help="default: the config's (9.9; Muon 8)")
    parser.add_argument("--train_examples", type=int, default=None, help="train on a class-balanced subset")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--runs", type=int, default=1, help="report the median over this many seeds")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--torch_reference", action="store_true",
                        help="also run airbench94 in PyTorch on the same split (reference_airbench94_torch.py)")
    parser.add_argument("--workdir", default=None,
                        help="keep each run's checkpoints in WORKDIR/seed<N> (default: a temporary folder); "
                             "rerunning resumes an unfinished run")
    args = parser.parse_args()
    args.epochs = args.epochs or load_config(args.config).num_epochs

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("devices:", jax.devices())
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or extract(args.tarball, tmp)
        runs = []
        for seed in range(args.runs):
            run = one_run(args, data_root, seed)
            runs.append(run)
            print(f"run {seed}: " + "  ".join(f"ep{e:.1f}={a:.4f}" for e, a in run["per_epoch_val_accuracy"]))
            print(f"run {seed}: final TTA acc {run['final_tta_accuracy']:.4f}  wall {run['wall_seconds']:.1f}s  "
                  f"{run['train_images_per_second']:.0f} img/s  peak RSS {run['host_peak_rss_gib']:.2f} GiB"
                  + (f"  device peak {run['device_peak_gib']:.2f} GiB" if "device_peak_gib" in run else ""))
        references = dict(REFERENCE)
        if args.torch_reference:
            references["airbench94 (torch, this data)"] = torch_reference(args, data_root)
    median = lambda key: statistics.median(r[key] for r in runs)
    print()
    print(f"{'':28s} {'epochs':>7s} {'TTA acc':>8s} {'wall s':>9s}")
    for name, ref in references.items():
        print(f"{name:28s} {ref['epochs']:7.1f} {ref['tta_accuracy']:8.4f} {ref['seconds']:9.2f}")
    print(f"{'imgllm (median of ' + str(len(runs)) + ')':28s} {args.epochs:7.1f} {median('final_tta_accuracy'):8.4f} "
          f"{median('wall_seconds'):9.2f}   (validation carved from train; devices: {jax.device_count()})")
    print(json.dumps({"runs": runs}, default=str))


if __name__ == "__main__":
    main()
