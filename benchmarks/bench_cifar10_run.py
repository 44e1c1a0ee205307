"""A CIFAR-10 run of the airbench94 recipe (imgllm/configs/cifar10.py, or --config=cifar10_muon), timed as airbench's
timer times it, beside airbench94 in PyTorch (reference_airbench94_torch.py) on the same images.

airbench's timer counts the whitening init, each epoch's training (shuffles and augmentation included) and the
final TTA eval; it leaves out compiling (a warm-up run compiles first), loading data and the per-epoch evals. Here
the JAX run is made of imgllm.train's own pieces (the task, optimizer, data feed, jitted train step and eval of
`imgllm.train.loop`), built once: a warm-up pass of a few steps compiles them and the timed pass reuses them. The
loop's bookkeeping (metric lines, checkpoints) is not timed, as airbench has none; `--loop` times the whole
`train_and_evaluate` instead (wall time, compilation included) and keeps its checkpoints with --workdir.

Data: ../shared/data/cifar10-train-jpeg.tar.gz (the 50,000 training images as JPEG folders), extracted to a
temporary folder; validation = the last 10% of every class, carved from train (45,000 / 5,000). Prints, side by
side: airbench's time and its parts, training images/s and TTA validation accuracy.

    python benchmarks/bench_cifar10_run.py --torch_reference      # 9.9 epochs, JAX and PyTorch (GPU: seconds)
    python benchmarks/bench_cifar10_run.py --runs=3               # median of 3 seeds
    python benchmarks/bench_cifar10_run.py --fake_data=24 --preset=tiny --batch_size=64 --eval_batch_size=24 \\
        --epochs=4 --torch_reference                              # CPU smoke run: 240 made-up JPEGs
    python benchmarks/bench_cifar10_run.py --epochs=1 --train_examples=5000   # a short run on real images
    python benchmarks/bench_cifar10_run.py --loop --workdir=runs/cifar10_val  # the whole loop; keep the checkpoint
    python benchmarks/bench_cifar10_run.py --config=cifar10_muon  # airbench94_muon's recipe: Muon, 8 epochs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import tarfile
import tempfile
import time

import jax
import numpy as np
import reference_airbench94_torch as torch_reference
from PIL import Image

from imgllm import parallel
from imgllm.train import evaluation, loop, optim, steps
from imgllm.train import feed as feed_lib
from imgllm.train.registry import build_task
from imgllm.train.state import create_train_state
from imgllm.vision.cnn import PRESETS

DEFAULT_TARBALL = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10-train-jpeg.tar.gz"
)
REFERENCE = {
    "airbench94 (A100, torch fp16)": {"epochs": 9.9, "tta_accuracy": 0.9401, "seconds": 3.83},
    "airbench94_muon (A100)": {"epochs": 8.0, "tta_accuracy": 0.9401, "seconds": 2.59},
}
METRICS_FILE = "metrics.jsonl"  # what train_and_evaluate writes in its work directory
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------------------- data


def extract(tarball: str, into: str) -> str:
    """Unpacks the tarball (train/<class>/NNNN.jpg) into `into`; returns `into`."""
    with tarfile.open(tarball) as archive:
        archive.extractall(into, filter="data")
    return into


def write_fake_tarball(path: str, per_class: int, *, seed: int = 0, size: int = 32) -> str:
    """A tarball with the shared copy's layout (train/<class>/NNNN.jpg) of `per_class` made-up JPEGs per class.

    Each class has its own colour under noise, so a few steps already learn something; for runs that must not
    need the real data (CPU smoke runs, tests)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        for label, name in enumerate(CLASS_NAMES):
            os.makedirs(os.path.join(folder, "train", name))
            colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 23 + 160) % 256])
            for i in range(per_class):
                noise = rng.normal(0, 40, (size, size, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, "train", name, f"{i:04d}.jpg"), quality=75)
        with tarfile.open(path, "w:gz") as archive:
            archive.add(os.path.join(folder, "train"), arcname="train")
    return path


def load_config(name: str):
    """get_config() of imgllm/configs/<name>.py."""
    return importlib.import_module(f"imgllm.configs.{name}").get_config()


def set_dtype(config, dtype: str | None) -> None:
    """Sets the compute dtype ("float32", "bfloat16", "auto"; None keeps the config's): the run-wide config.dtype
    where the config has it, and the CNN's model.dtype where that exists (or is the only setting), so that the two
    never disagree."""
    if dtype is None:
        return
    if "dtype" in config:
        config.dtype = dtype
    if "dtype" in config.model or "dtype" not in config:
        config.model.dtype = dtype


def run_config(args, data_root: str, seed: int):
    """The recipe's config with this benchmark's data, length, batch, model and dtype options applied."""
    config = load_config(args.config)
    config.dataset = f"folder:{data_root}"
    config.data_cache_dir = args.cache_dir
    config.seed = seed
    config.num_epochs = args.epochs or config.num_epochs
    config.num_train_examples = args.train_examples
    config.num_eval_examples = args.eval_examples
    config.progress_bar = not args.no_progress
    if args.batch_size:
        config.global_batch_size = args.batch_size
    if args.eval_batch_size:
        config.eval_batch_size = args.eval_batch_size
    if args.preset:
        config.model.preset = args.preset
    if args.conv_impl:
        config.model.conv_impl = args.conv_impl
    set_dtype(config, args.dtype)
    return config


def load_arrays(config):
    """(task, train arrays, validation arrays) for `config`: reading and decoding the images (not timed)."""
    task = build_task(config)
    return task, task.train_arrays(), task.eval_arrays()


def compute_dtype(config) -> str:
    """The name of the dtype the config's CNN computes in ("auto" resolved)."""
    return np.dtype(build_task(config).model.dtype).name


# ----------------------------------------------------------------------------------------------- JAX, timed


class JaxRecipe:
    """The recipe's pieces, built once from `imgllm.train` so that a warm-up pass compiles them and a timed pass
    reuses the compiled programs, as airbench's warm-up run does: the task, mesh, optimizer, state initialiser,
    data feed (the training set on the devices when it fits, `imgllm.train.feed`), train step and TTA eval."""

    def __init__(self, config, task, train_arrays, eval_arrays, mesh=None):
        self.config, self.task, self.train_arrays, self.eval_arrays = config, task, train_arrays, eval_arrays
        self.mesh = mesh or parallel.make_mesh()
        loop.validate_config(config, self.mesh)
        self.steps_per_epoch, self.total_steps = loop.schedule_lengths(evaluation.num_examples(train_arrays), config)
        init_key, self.state_key = jax.random.split(jax.random.PRNGKey(config.seed))
        self.fresh_variables = jax.device_get(jax.jit(task.init_variables)(init_key))
        tx = optim.make_optimizer(
            config.optimizer,
            self.fresh_variables["params"],
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            batch_size=config.global_batch_size,
        )
        use_lookahead = bool(config.get("lookahead") and config.lookahead.get("enabled", False))
        self.init_state = steps.jit_init_state(
            lambda v, key: create_train_state(v, tx, key, use_lookahead=use_lookahead), self.mesh
        )
        self.feed = feed_lib.make_feed(
            config.get("data_placement", "auto"),
            train_arrays,
            self.mesh,
            seed=config.seed,
            global_batch_size=config.global_batch_size,
        )
        self.train_step = steps.jit_train_step(
            task,
            tx,
            self.mesh,
            steps_per_epoch=self.steps_per_epoch,
            placement=self.feed.placement,
            lookahead=optim.lookahead_fn(
                config.get("lookahead"), steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps
            ),
        )
        self.eval_fns = {tta: steps.jit_eval_step(task, self.mesh, tta=tta) for tta in (False, True)}

    def evaluate(self, state, *, tta: bool, rows: int | None = None) -> float:
        """Validation accuracy (all rows, or the first `rows`: the same compiled batch shape)."""
        arrays = self.eval_arrays if rows is None else {k: v[:rows] for k, v in self.eval_arrays.items()}
        return evaluation.evaluate_arrays(
            self.task,
            state.variables,
            arrays,
            self.mesh,
            batch_size=self.config.eval_batch_size,
            tta=tta,
            eval_fn=self.eval_fns[tta],
        )["accuracy"]

    def train_epoch(self, state, epoch: int, num_steps: int):
        """`num_steps` steps of `epoch` (the feed sends the epoch's order first, as the loop does); waits for them."""
        self.feed.epoch(epoch)
        for index in range(num_steps):
            state, _ = self.train_step(state, *self.feed.args(index))
        return jax.block_until_ready(state)

    def run(
        self, *, max_steps: int | None = None, eval_rows: int | None = None, epoch_eval: bool = False, log=print
    ) -> dict:
        """One run from fresh weights, timed with airbench's `Clock`; max_steps and eval_rows shorten a warm-up."""
        clock = torch_reference.Clock()
        with clock.phase("whiten"):
            variables = self.task.prepare_variables(self.fresh_variables, self.train_arrays)
            state = jax.block_until_ready(self.init_state(variables, self.state_key))
        total = min(self.total_steps, max_steps or self.total_steps)
        done, per_epoch = 0, []
        for epoch in range(math.ceil(total / self.steps_per_epoch)):
            num_steps = min(self.steps_per_epoch, total - done)
            with clock.phase("train"):
                state = self.train_epoch(state, epoch, num_steps)
            done += num_steps
            if epoch_eval:
                per_epoch.append(self.evaluate(state, tta=False, rows=eval_rows))
                log(f"epoch {epoch}: step {done}  val acc {per_epoch[-1]:.4f}  {clock.seconds['train']:.1f}s")
        with clock.phase("tta"):
            tta_accuracy = self.evaluate(state, tta=True, rows=eval_rows)
        return {
            "per_epoch_val_accuracy": per_epoch,
            "final_tta_accuracy": tta_accuracy,
            "steps": done,
            "batch_size": self.config.global_batch_size,
            **clock.report(done, self.config.global_batch_size),
        }


def jax_airbench_run(config, task, train_arrays, eval_arrays, *, epoch_eval: bool = False, log=print) -> dict:
    """The recipe timed as airbench times it: a warm-up pass (two steps, one eval batch) compiles, then a full run
    from fresh weights is timed. Returns `JaxRecipe.run`'s dict plus the warm-up's wall time."""
    start = time.perf_counter()
    recipe = JaxRecipe(config, task, train_arrays, eval_arrays)
    recipe.run(max_steps=2, eval_rows=1, epoch_eval=epoch_eval, log=lambda *_: None)
    warmup_seconds = time.perf_counter() - start
    result = recipe.run(epoch_eval=epoch_eval, log=log)
    return {
        **result,
        "warmup_seconds": warmup_seconds,
        "dtype": compute_dtype(config),
        "platform": jax.default_backend(),
        "placement": recipe.feed.placement,
    }


def torch_airbench_run(
    config,
    train_arrays,
    eval_arrays,
    *,
    device: str = "auto",
    compile="auto",
    dtype: str | None = None,
    epoch_eval: bool = False,
    log=print,
) -> dict:
    """airbench94 in PyTorch (reference_airbench94_torch.train) on the very arrays of the JAX run, with its batch,
    length, widths and seed; device "auto" is CUDA when torch sees a GPU; dtype None follows the JAX run's."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch_reference.train(
        train_arrays["images"],
        train_arrays["labels"],
        eval_arrays["images"],
        eval_arrays["labels"],
        epochs=config.num_epochs,
        batch_size=config.global_batch_size,
        seed=config.seed,
        mean=tuple(config.normalization.mean),
        std=tuple(config.normalization.std),
        widths=PRESETS[config.model.preset]["widths"],
        device=device,
        compile=compile,
        dtype=dtype or compute_dtype(config),
        epoch_eval=epoch_eval,
        log=log,
    )


# ----------------------------------------------------------------------------------------------- the whole loop


def peak_memory_gib() -> dict[str, float]:
    """Peak host RSS and, on accelerators, peak device memory, in GiB."""
    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def loop_run(args, config) -> dict:
    """`loop.train_and_evaluate` as a user runs it (compilation, checkpoints and per-epoch evals included)."""
    with contextlib.ExitStack() as stack:
        workdir = (
            os.path.join(args.workdir, f"seed{config.seed}")
            if args.workdir
            else stack.enter_context(tempfile.TemporaryDirectory())
        )
        start = time.perf_counter()
        result = loop.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
        with open(os.path.join(workdir, METRICS_FILE)) as f:
            records = [json.loads(line) for line in f]
    per_epoch = [(r["epoch"], r["accuracy"]) for r in records if r["split"] == "eval"]
    train = [r for r in records if r["split"] == "train"]
    return {
        "seed": config.seed,
        "wall_seconds": wall,
        "per_epoch_val_accuracy": per_epoch,
        "final_tta_accuracy": result.final_eval["accuracy"],
        "train_images_per_second": statistics.median(r["examples_per_second"] for r in train[1:] or train),
        **peak_memory_gib(),
    }


def print_loop_run(run: dict) -> None:
    """Per-epoch accuracies, then TTA accuracy, wall time, images/s and peak memory of one `loop_run`."""
    seed = run["seed"]
    print(f"run {seed}: " + "  ".join(f"ep{e:.1f}={a:.4f}" for e, a in run["per_epoch_val_accuracy"]))
    print(
        f"run {seed}: final TTA acc {run['final_tta_accuracy']:.4f}  wall {run['wall_seconds']:.1f}s  "
        f"{run['train_images_per_second']:.0f} img/s  peak RSS {run['host_peak_rss_gib']:.2f} GiB"
        + (f"  device peak {run['device_peak_gib']:.2f} GiB" if "device_peak_gib" in run else "")
    )
    print(json.dumps(run, default=str))


# ----------------------------------------------------------------------------------------------- report


def summary_row(name: str, runs: list[dict]) -> dict:
    """Medians over runs of the figures the table prints."""
    median = lambda key: statistics.median(r[key] for r in runs)
    keys = (
        "whiten_seconds",
        "train_seconds",
        "tta_seconds",
        "airbench_seconds",
        "train_images_per_second",
        "final_tta_accuracy",
    )
    return {"name": name, "steps": runs[0]["steps"], **{k: median(k) for k in keys}}


def format_table(rows: list[dict], epochs: float) -> str:
    """The side-by-side table: airbench's time and its parts, images/s and TTA accuracy per implementation."""
    names = [row["name"] for row in rows] + [name + " (published)" for name in REFERENCE]
    width = max(map(len, names))
    lines = [
        f"{'':{width}s} {'epochs':>6s} {'steps':>6s} {'whiten s':>8s} {'train s':>8s} {'TTA s':>7s} "
        f"{'airbench s':>10s} {'train img/s':>11s} {'TTA acc':>8s}"
    ]
    for row in rows:
        lines.append(
            f"{row['name']:{width}s} {epochs:6.1f} {row['steps']:6d} {row['whiten_seconds']:8.2f} "
            f"{row['train_seconds']:8.2f} {row['tta_seconds']:7.2f} {row['airbench_seconds']:10.2f} "
            f"{row['train_images_per_second']:11.0f} {row['final_tta_accuracy']:8.4f}"
        )
    for name, ref in REFERENCE.items():
        lines.append(
            f"{name + ' (published)':{width}s} {ref['epochs']:6.1f} {'':6s} {'':8s} {'':8s} {'':7s} "
            f"{ref['seconds']:10.2f} {'':11s} {ref['tta_accuracy']:8.4f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", default=DEFAULT_TARBALL)
    parser.add_argument("--data_root", default=None, help="already extracted folder (holds train/<class>/...)")
    parser.add_argument(
        "--fake_data",
        type=int,
        default=0,
        metavar="N",
        help="instead of the tarball, N made-up JPEGs per class in the same layout (smoke runs)",
    )
    parser.add_argument("--cache_dir", default=None, help="keep decoded images here between runs")
    parser.add_argument("--config", default="cifar10", choices=["cifar10", "cifar10_muon"])
    parser.add_argument("--epochs", type=float, default=None, help="default: the config's (9.9; Muon 8)")
    parser.add_argument("--train_examples", type=int, default=None, help="train on a class-balanced subset")
    parser.add_argument("--eval_examples", type=int, default=None, help="validate on this many images")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--eval_batch_size", type=int, default=None, help="images per eval batch (config: 500)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="CNN preset (tiny: smoke runs)")
    parser.add_argument(
        "--conv_impl",
        default=None,
        choices=["auto", "hybrid", "im2col", "xla"],
        help="the CNN's convolutions (default: the config's auto; xla is what GPUs run)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype (default: the config's); the PyTorch reference autocasts to match",
    )
    parser.add_argument("--runs", type=int, default=1, help="report the median over this many seeds")
    parser.add_argument("--epoch_eval", action="store_true", help="validate after every epoch (not timed)")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument(
        "--torch_reference",
        action="store_true",
        help="also run airbench94 in PyTorch on the same arrays (reference_airbench94_torch.py)",
    )
    parser.add_argument("--torch_device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument(
        "--torch_compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the reference (auto: on CUDA only)",
    )
    parser.add_argument("--torch_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--loop",
        action="store_true",
        help="time the whole train_and_evaluate instead (wall time, compilation included)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="--loop: keep each run's checkpoints in WORKDIR/seed<N> (default: a temporary folder)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def data_folder(args):
    """The extracted image folder: --data_root, or the tarball (--fake_data: a made-up one) unpacked to a temp dir."""
    if args.data_root:
        yield args.data_root
        return
    with tempfile.TemporaryDirectory() as tmp:
        tarball = (
            write_fake_tarball(os.path.join(tmp, "fake.tar.gz"), args.fake_data) if args.fake_data else args.tarball
        )
        yield extract(tarball, os.path.join(tmp, "images"))


def airbench_rows(args, data_root: str) -> list[dict]:
    """The timed JAX runs (one per seed) and, with --torch_reference, the PyTorch ones on the same arrays."""
    jax_runs, torch_runs = [], []
    for seed in range(args.runs):
        config = run_config(args, data_root, seed)
        task, train_arrays, eval_arrays = load_arrays(config)
        jax_runs.append(jax_airbench_run(config, task, train_arrays, eval_arrays, epoch_eval=args.epoch_eval))
        print(f"imgllm seed {seed}: {json.dumps(jax_runs[-1])}", flush=True)
        if args.torch_reference:
            compile = {"auto": "auto", "on": True, "off": False}[args.torch_compile]
            torch_runs.append(
                torch_airbench_run(
                    config,
                    train_arrays,
                    eval_arrays,
                    device=args.torch_device,
                    compile=compile,
                    epoch_eval=args.epoch_eval,
                )
            )
            print(f"torch seed {seed}: {json.dumps(torch_runs[-1])}", flush=True)
    rows = [summary_row(f"imgllm (jax {jax_runs[0]['platform']}, {jax_runs[0]['dtype']})", jax_runs)]
    if torch_runs:
        first = torch_runs[0]
        rows.append(
            summary_row(
                f"airbench94 (torch {first['device']}, {first['dtype']}{', compiled' if first['compiled'] else ''})",
                torch_runs,
            )
        )
    return rows


def main():
    args = parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("devices:", jax.devices())
    with data_folder(args) as data_root:
        if args.loop:
            for seed in range(args.runs):
                print_loop_run(loop_run(args, run_config(args, data_root, seed)))
            return
        rows = airbench_rows(args, data_root)
    epochs = args.epochs or load_config(args.config).num_epochs
    print(
        f"\nairbench's timer (whitening + training + TTA eval; not compiling or loading), medians of {args.runs}; "
        f"validation carved from train"
    )
    print(format_table(rows, epochs))


if __name__ == "__main__":
    main()
