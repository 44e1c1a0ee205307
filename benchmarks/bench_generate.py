"""Greedy decoding speed of GPT-2 small (124M, random weights): imgllm (JAX) next to transformers (PyTorch).

    python benchmarks/bench_generate.py                 # batch 1 and 16, 16-token prompts, 32 new tokens, fp32
    python benchmarks/bench_generate.py --batch-sizes 1 --runs 9 --dtype bfloat16

Both run on 2 CPU threads with the same weights (the torch model's random init, copied into the flax tree).
imgllm decodes from `kernels_out_in` parameters (made once, timed; --layout stored: as loaded).
Prints the compile time of the jitted generate function, and tokens/s (median and best of --runs) for both
libraries. Targets on the 2-core dev machine: batch 1 >= 38 tokens/s; batch 16 >= 1.2x transformers;
compile <= 15 s. The machine is shared, so the load average is printed too: compare medians under the same load.
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

    params = {"wte": {"embedding": state["transformer.wte.weight"]},
              "wpe": {"embedding": state["transformer.wpe.weight"]},
              "ln_f": pair("transformer.ln_f", "scale", "bias")}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        params[f"h_{i}"] = {
            "ln_1": pair(p + "ln_1", "scale", "bias"), "ln_2": pair(p + "ln_2", "scale", "bias"),
            "attn": {"c_attn": pair(p + "attn.c_attn", "kernel", "bias"),
                     "c_proj": pair(p + "attn.c_proj", "kernel", "bias")},
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--layout", choices=("out_in", "stored"), default="out_in",
                        help="imgllm's parameters: kernels_out_in (the fast CPU layout) or as stored ([in, out])")
    args = parser.parse_args()

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
    print(f"GPT-2 small, greedy, prompt {args.prompt_length}, {args.new_tokens} new tokens, {args.dtype}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'library':<22} {'median tok/s':>12} {'best tok/s':>10} {'median s':>9}")
    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        ids = rng.integers(0, config.vocab_size, (batch, args.prompt_length)).astype(np.int32)
        mask = np.ones_like(ids)
        new_tokens = batch * args.new_tokens

        start = time.perf_counter()
        jax_tokens, _ = generate(params, config, ids, mask, gen_config=gen_config)
        first_call = time.perf_counter() - start
        jax_times = timed(lambda: generate(params, config, ids, mask, gen_config=gen_config), args.runs)
        compile_s = first_call - np.median(jax_times)
        print(f"{batch:>5} {'imgllm (jax)':<22} {new_tokens / np.median(jax_times):>12.1f} "
              f"{new_tokens / jax_times.min():>10.1f} {np.median(jax_times):>9.3f}   "
              f"(compile ~{compile_s:.1f} s, jit cache {_generate_jit._cache_size()})")
        if args.skip_torch:
            continue
        torch_ids, torch_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                return torch_model.generate(torch_ids, attention_mask=torch_mask, max_new_tokens=args.new_tokens,
                                            do_sample=False, eos_token_id=None, pad_token_id=config.eos_token_id)

        torch_tokens = run_torch()[:, args.prompt_length:].numpy()
        torch_times = timed(run_torch, args.runs)
        speedup = np.median(torch_times) / np.median(jax_times)
        print(f"{batch:>5} {'transformers (torch)':<22} {new_tokens / np.median(torch_times):>12.1f} "
              f"{new_tokens / torch_times.min():>10.1f} {np.median(torch_times):>9.3f}   "
              f"(imgllm / torch speed: {speedup:.2f}x, identical tokens: {(torch_tokens == jax_tokens).mean():.0%})")


if __name__ == "__main__":
    main()
