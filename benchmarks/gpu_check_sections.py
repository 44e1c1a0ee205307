"""The measurements of benchmarks/gpu_check.py, one section per process: `cnn`, `decode` and `captions`.

    python benchmarks/gpu_check_sections.py decode --out rows.jsonl            # GPU sizes
    python benchmarks/gpu_check_sections.py decode --out rows.jsonl --smoke    # the same code at tiny sizes

A section appends one JSON object per table row to --out as soon as the row is measured, so a section stopped at
its time limit still leaves the rows it finished (a row written again later, e.g. once PyTorch's figure is in,
replaces the earlier one with the same key). Row fields: section, key, what, unit, jax, torch (None: not run),
ratio, target, met (None: no target, or a side missing), note, and for a rate (img/s, tok/s) its roofline bound:
bound (imgllm's program's rate at the device's roofline), of_bound (jax / bound) and bound_basis (the device and
whose cost analysis; None and "" until computed). The measuring code is the other benchmarks': bench_cifar10_run
(the airbench-timed recipe and the PyTorch reference), bench_generate (GPT-2 small with the same random weights on
both sides) and bench_captions (the caption pipelines); the bounds are roofline.py's row functions at the rows'
sizes, computed once a section's measurements are done and only while its time (--seconds) lasts (`Bounds`).

Both libraries share the GPU: JAX is told to preallocate at most XLA_PYTHON_CLIENT_MEM_FRACTION of it (gpu_check
sets 0.45), so PyTorch's allocator has the rest. Float32 matrix products are TF32 on both sides, as XLA's default
precision computes them (torch.set_float32_matmul_precision("high")).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import bench_captions
import bench_cifar10_run
import bench_generate
import jax
import jax.numpy as jnp
import numpy as np
import roofline
import transformers

from imgllm.language.decoding import GenerationConfig, generate
from imgllm.language.gpt2 import GPT2Config, init_params
from imgllm.pipeline import checkpoint as pipeline_checkpoint

try:  # PyTorch is a benchmark-only dependency: without it the PyTorch columns are left empty
    import torch
except ImportError:
    torch = None

SECTIONS = ("cnn", "decode", "captions")
START = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs: the GPU check's sizes (`GPU`) or the CPU smoke run's (`SMOKE`)."""

    cnn_argv: tuple[str, ...]  # bench_cifar10_run options (data, length, batch, preset, dtype)
    lm: dict  # GPT2Config fields over GPT-2 small's ({}: GPT-2 small itself)
    decode_batches: tuple[int, ...]
    prompt_length: int
    new_tokens: int
    decode_runs: int
    caption_images: int
    caption_batch: int
    caption_tokens: int
    caption_repeats: int
    caption_cnn: str  # CNN preset of the caption pipelines
    caption_dtype: str  # both pipelines compute in it
    bound_seconds: float  # a roofline bound is started only with at least this many seconds of the section left
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


GPU = Sizes(
    cnn_argv=("--dtype", "bfloat16"),
    lm={},
    decode_batches=(1, 64),
    prompt_length=16,
    new_tokens=128,
    decode_runs=3,
    caption_images=4096,
    caption_batch=512,
    caption_tokens=20,
    caption_repeats=2,
    caption_cnn="airbench94",
    caption_dtype="bfloat16",
    bound_seconds=30,  # compiling a GPU-size program for its cost analysis
)
SMOKE = Sizes(
    cnn_argv=(
        "--fake_data",
        "10",
        "--preset",
        "tiny",
        "--batch_size",
        "32",
        "--eval_batch_size",
        "10",
        "--epochs",
        "2",
        "--dtype",
        "bfloat16",
        "--conv_impl",
        "xla",
    ),  # xla: the GPU's convs
    lm=dict(vocab_size=512, bos_token_id=511, eos_token_id=511, n_layer=2, n_embd=64, n_head=4, n_positions=128),
    decode_batches=(1, 4),
    prompt_length=8,
    new_tokens=8,
    decode_runs=1,
    caption_images=16,
    caption_batch=8,
    caption_tokens=8,
    caption_repeats=1,
    caption_cnn="tiny",
    caption_dtype="bfloat16",
    bound_seconds=5,
)


class Rows:
    """Appends table rows to a JSON-lines file, flushed at once (the parent reads them even after a time-out)."""

    def __init__(self, path: str, section: str):
        self.path, self.section = path, section

    def add(
        self,
        key: str,
        what: str,
        unit: str,
        jax_value,
        torch_value,
        *,
        ratio=None,
        target: str = "",
        met=None,
        note: str = "",
    ) -> dict:
        """Writes a measured row (no bound yet) and returns it."""
        row = dict(
            section=self.section,
            key=key,
            what=what,
            unit=unit,
            jax=jax_value,
            torch=torch_value,
            ratio=ratio,
            target=target,
            met=met,
            note=note,
            bound=None,
            of_bound=None,
            bound_basis="",
        )
        self.write(row)
        log(self.section, f"{what}: imgllm {jax_value}  torch {torch_value}  {note}")
        return row

    def write(self, row: dict) -> None:
        """Appends `row` (it replaces an earlier row with its key in the table)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Bounds:
    """Roofline bounds for measured rate rows, computed at the end of a section (`add`) so that they never take a
    measurement's time, each only if the section has time left for it (`Sizes.bound_seconds`, or twice the slowest
    bound so far): a bound that cannot be computed leaves its row's bound empty, never the section failed."""

    def __init__(self, rows: Rows, sizes: Sizes, seconds: float | None):
        self.rows, self.least = rows, sizes.bound_seconds
        self.deadline = None if seconds is None else START + seconds
        self.pending: list[tuple[dict, Callable[[], roofline.Row], str]] = []

    def later(self, row: dict, program: Callable[[], roofline.Row], dtype: str) -> None:
        """Bound `row` (a measured rate) by `program()`, a roofline.py row of the program it times computing in
        `dtype` ("float32" rows are bounded at the float32 peak)."""
        self.pending.append((row, program, dtype))

    def add(self) -> None:
        device, slowest = bound_device(), 0.0
        basis = (
            f"{device} roofline (roofline.py: bfloat16 {roofline.DEVICES[device][0] / 1e12:.0f} TFLOP/s, float32 "
            f"{roofline.FLOAT32_FLOPS[device] / 1e12:.0f}, {roofline.DEVICES[device][1] / 1e12:.2f} TB/s), FLOPs and "
            f"bytes from XLA:{jax.default_backend()}'s cost analysis"
        )
        for row, program, dtype in self.pending:
            left = None if self.deadline is None else self.deadline - time.perf_counter()
            if left is not None and left < max(self.least, 2 * slowest):
                log(self.rows.section, f"{row['what']}: no bound ({left:.0f} s left)")
                continue
            start = time.perf_counter()
            try:
                with roofline.accelerator_switches("gpu"):  # the GPU's kernel layout (a no-op on the GPU)
                    costed = program()
            except Exception as error:  # a bound is an extra: its failure must not cost the measured rows
                log(self.rows.section, f"{row['what']}: no bound ({type(error).__name__}: {error})")
                continue
            slowest = max(slowest, time.perf_counter() - start)
            bound = roofline.rate_at_bound(costed, device, dtype)
            self.rows.write({**row, "bound": bound, "of_bound": row["jax"] / bound, "bound_basis": basis})
            log(
                self.rows.section,
                f"{row['what']}: bound {bound:,.0f} {row['unit']} ({costed.name}, {dtype}; "
                f"{time.perf_counter() - start:.1f} s), measured {100 * row['jax'] / bound:.2f}% of it",
            )


def bound_device() -> str:
    """The `roofline.DEVICES` entry of this machine's accelerator, else "H200" (the GPU the check is made for)."""
    kind = jax.devices()[0].device_kind
    if "H100" in kind and "PCIe" not in kind:
        return "H100 SXM"
    if "v5 lite" in kind or "v5e" in kind:
        return "TPU v5e"
    return "H200"


def log(section: str, message: str) -> None:
    """A progress line with the seconds since the process started (where a section's time goes)."""
    print(f"[{section} +{time.perf_counter() - START:.1f}s] {message}", flush=True)


def torch_device() -> str:
    """ "cuda" when PyTorch sees a GPU, else "cpu"."""
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def environment() -> str:
    """One line: JAX's version and devices, PyTorch's version and device."""
    line = f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"
    if torch is None:
        return line + "; torch not installed"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return line + f"; torch {torch.__version__} on {name}; transformers {transformers.__version__}"


def hf_gpt2_config(config: GPT2Config):
    """transformers' GPT2Config with the sizes and special tokens of imgllm's `config`."""
    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def speedup(jax_rate, torch_rate):
    """imgllm's rate over PyTorch's (None when either is missing)."""
    return None if jax_rate is None or torch_rate is None else jax_rate / torch_rate


def at_least(ratio, target: float):
    """Whether a ratio meets its target (None when there is no ratio)."""
    return None if ratio is None else bool(ratio >= target)


# ----------------------------------------------------------------------------------------------- (a) the CNN


def cnn_section(sizes: Sizes, rows: Rows, bounds: Bounds, tarball: str) -> None:
    """The cifar10 recipe timed as airbench times it, imgllm then the PyTorch reference on the same arrays; then
    the bound of the training rate: the recipe's train step at the run's batch, dtype and preset."""
    argv = ["--tarball", tarball, "--no_progress", *sizes.cnn_argv]
    args = bench_cifar10_run.parse_args(argv)
    with bench_cifar10_run.data_folder(args) as root:
        config = bench_cifar10_run.run_config(args, root, seed=0)
        start = time.perf_counter()
        task, train_arrays, eval_arrays = bench_cifar10_run.load_arrays(config)
        log(
            "cnn",
            f"loaded {len(train_arrays['labels'])} training and {len(eval_arrays['labels'])} validation "
            f"images in {time.perf_counter() - start:.1f} s",
        )
        ours = bench_cifar10_run.jax_airbench_run(config, task, train_arrays, eval_arrays)
        log("cnn", f"imgllm: {json.dumps(ours)}")
        rate = cnn_rows(rows, ours, None, config.num_epochs)
        if torch is not None:
            theirs = bench_cifar10_run.torch_airbench_run(config, train_arrays, eval_arrays, device=torch_device())
            log("cnn", f"torch: {json.dumps(theirs)}")
            rate = cnn_rows(rows, ours, theirs, config.num_epochs)
        images = len(train_arrays["labels"])
        bounds.later(rate, lambda: roofline.cnn_row(ours["batch_size"], "compiled", config, images), ours["dtype"])
        bounds.add()


def cnn_rows(rows: Rows, ours: dict, theirs: dict | None, epochs: float) -> dict:
    """Three rows: airbench's time, training images/s (target: >= 1.0x at accuracy within 0.3 points), accuracy.
    Returns the rate row."""
    get = lambda result, key: None if result is None else result[key]
    gap = None if theirs is None else 100 * (ours["final_tta_accuracy"] - theirs["final_tta_accuracy"])
    rate = speedup(ours["train_images_per_second"], get(theirs, "train_images_per_second"))
    note = (
        ""
        if theirs is None
        else (
            f"torch {theirs['dtype']}{', compiled' if theirs['compiled'] else ''}; "
            f"imgllm {ours['dtype']}, data on {ours['placement']}"
        )
    )
    rows.add(
        "time",
        f"cifar10 {epochs:g} ep, airbench time",
        "s",
        ours["airbench_seconds"],
        get(theirs, "airbench_seconds"),
        ratio=speedup(get(theirs, "airbench_seconds"), ours["airbench_seconds"]),
        note=f"imgllm warm-up/compile {ours['warmup_seconds']:.0f} s (not counted)",
    )
    rate_row = rows.add(
        "rate",
        f"cifar10 {ours['batch_size']}/step, train",
        "img/s",
        ours["train_images_per_second"],
        get(theirs, "train_images_per_second"),
        ratio=rate,
        target=">=1.0x at ±0.3 pt",
        met=None if rate is None else bool(rate >= 1.0 and abs(gap) <= 0.3),
        note=note,
    )
    rows.add(
        "accuracy",
        "cifar10 TTA val accuracy",
        "%",
        100 * ours["final_tta_accuracy"],
        None if theirs is None else 100 * theirs["final_tta_accuracy"],
        ratio=gap,
        target="±0.3 pt",
        met=None if gap is None else bool(abs(gap) <= 0.3),
        note="ratio column: difference in points",
    )
    return rate_row


# ----------------------------------------------------------------------------------------------- (b) decoding


def jax_tokens_per_second(params, config: GPT2Config, ids: np.ndarray, new_tokens: int, runs: int) -> float:
    """imgllm's greedy `generate` (compiled by a first call), median tokens/s over `runs` calls."""
    gen_config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=config.eos_token_id)
    mask = np.ones_like(ids)
    generate(params, config, ids, mask, gen_config=gen_config)
    times = bench_generate.timed(lambda: generate(params, config, ids, mask, gen_config=gen_config), runs)
    return ids.shape[0] * new_tokens / float(np.median(times))


def torch_tokens_per_second(model, ids: np.ndarray, new_tokens: int, runs: int, device: str, pad_id: int) -> float:
    """transformers' greedy `generate` (after one untimed call), median tokens/s over `runs` calls."""
    torch_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    mask = torch.ones_like(torch_ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                torch_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad_id,
            )
        bench_captions.synchronize(device)
        return out

    run()
    return ids.shape[0] * new_tokens / float(np.median(bench_generate.timed(run, runs)))


def decode_section(sizes: Sizes, rows: Rows, bounds: Bounds) -> None:
    """GPT-2 greedy decoding tokens/s per batch and dtype, imgllm beside transformers on the same random weights;
    then each row's bound: `generate_tokens` at its batch and dtype."""
    config = GPT2Config.small(**sizes.lm)
    model = None
    if torch is not None:
        model = bench_generate.torch_gpt2_small(0, hf_gpt2_config(config))
        params = bench_generate.flax_params_from_torch(model, config.n_layer)
        model.to(torch_device())
    else:
        params = init_params(config, jax.random.PRNGKey(0))
    params = jax.device_put(params)
    rng = np.random.default_rng(0)
    name = "GPT-2 small" if not sizes.lm else f"GPT-2 {config.n_layer}x{config.n_embd}"
    for dtype in sizes.dtypes:
        if model is not None:
            model.to(getattr(torch, dtype))
        for batch in sizes.decode_batches:
            ids = rng.integers(0, config.vocab_size, (batch, sizes.prompt_length)).astype(np.int32)
            ours = jax_tokens_per_second(
                params, dataclasses.replace(config, dtype=jnp.dtype(dtype)), ids, sizes.new_tokens, sizes.decode_runs
            )
            theirs = (
                None
                if model is None
                else torch_tokens_per_second(
                    model, ids, sizes.new_tokens, sizes.decode_runs, torch_device(), config.eos_token_id
                )
            )
            ratio, target = speedup(ours, theirs), 3.0 if batch == 1 else 1.5
            row = rows.add(
                f"b{batch}-{dtype}",
                f"{name} greedy b{batch} {dtype}",
                "tok/s",
                ours,
                theirs,
                ratio=ratio,
                target=f">={target:g}x",
                met=at_least(ratio, target),
                note=f"prompt {sizes.prompt_length}, {sizes.new_tokens} new tokens",
            )
            program = lambda batch=batch, dtype=dtype: roofline.decode_row(
                name, config, batch, sizes.prompt_length, sizes.new_tokens, "compiled", dtype
            )
            bounds.later(row, program, dtype)
    bounds.add()


# ----------------------------------------------------------------------------------------------- (c) captions


def captions_section(sizes: Sizes, rows: Rows, bounds: Bounds) -> None:
    """Images -> caption strings per second, greedy and top-p 0.9: imgllm's pipeline against a PyTorch CNN +
    transformers `generate` pipeline (bench_captions), both at the same batch and dtype; then each row's bound:
    `caption_images` on one batch."""
    tok = bench_captions.tokenizer()
    lm_config = GPT2Config.small(**sizes.lm)
    images = np.random.default_rng(0).integers(0, 256, (sizes.caption_images, 32, 32, 3), dtype=np.uint8)
    widths = bench_cifar10_run.PRESETS[sizes.caption_cnn]["widths"]
    with tempfile.TemporaryDirectory() as workdir:
        params, config = bench_captions.jax_parts(tok, lm_config, sizes.caption_cnn, sizes.caption_tokens)
        checkpoint = pipeline_checkpoint.save_pipeline_checkpoint(os.path.join(workdir, "ckpt"), params, config, tok)
        loaded = pipeline_checkpoint.load_pipeline(checkpoint)
        log("captions", "pipeline checkpoint saved and loaded")
        for mode, sample in (("greedy", False), ("top-p 0.9", True)):
            seconds = bench_captions.time_jax(
                loaded,
                images,
                sizes.caption_batch,
                sample,
                sizes.caption_repeats,
                dtype=sizes.caption_dtype,
                max_new_tokens=sizes.caption_tokens,
            )
            ours = len(images) / statistics.median(seconds)
            log("captions", f"imgllm {mode}: {ours:.1f} images/s")
            theirs = None
            if torch is not None:
                seconds = bench_captions.time_torch(
                    tok,
                    images,
                    sample,
                    sizes.caption_repeats,
                    device=torch_device(),
                    batch=sizes.caption_batch,
                    hf_config=hf_gpt2_config(lm_config),
                    widths=widths,
                    dtype=sizes.caption_dtype,
                    max_new_tokens=sizes.caption_tokens,
                )
                theirs = len(images) / statistics.median(seconds)
            ratio = speedup(ours, theirs)
            row = rows.add(
                mode,
                f"{len(images)} images b{sizes.caption_batch} {mode} {sizes.caption_dtype}",
                "img/s",
                ours,
                theirs,
                ratio=ratio,
                target=">=5x",
                met=at_least(ratio, 5.0),
                note=f"{sizes.caption_cnn} CNN, {sizes.caption_tokens} new tokens",
            )
            program = lambda sample=sample: roofline.caption_row(
                sizes.caption_batch,
                sizes.caption_tokens,
                sample,
                "compiled",
                cnn_preset=sizes.caption_cnn,
                lm_config=lm_config,
                dtype=sizes.caption_dtype,
            )
            bounds.later(row, program, sizes.caption_dtype)
    bounds.add()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--out", required=True, help="JSON-lines file the rows are appended to")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, seconds)")
    parser.add_argument("--tarball", default=bench_cifar10_run.DEFAULT_TARBALL, help="CIFAR-10 JPEG tarball (cnn)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="the section's time limit: bounds are computed only within it"
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    if torch is not None and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on the GPU
    rows = Rows(args.out, args.section)
    bounds = Bounds(rows, sizes, args.seconds)
    log(args.section, environment())
    with open(args.out, "a") as f:
        f.write(json.dumps({"section": args.section, "environment": environment()}) + "\n")
    if args.section == "cnn":
        cnn_section(sizes, rows, bounds, args.tarball)
    elif args.section == "decode":
        decode_section(sizes, rows, bounds)
    else:
        captions_section(sizes, rows, bounds)


if __name__ == "__main__":
    main()
