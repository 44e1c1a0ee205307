"""Every program a user runs on an accelerator lowers for GPU and TPU, with the switches resolved as they are there.

On this CPU-only machine `jax.export.export(jitted, platforms=[platform])` lowers a program for "cuda" or "tpu"
without compiling it. The platform switches are of two kinds:
  chosen per lowering platform: `conv_impl="auto"` and `sampler="auto"` are `lax.platform_dependent` (the CPU path
  on "cpu", the plain path elsewhere), so the program exported for "cuda" or "tpu" holds the plain path whatever
  host traced it;
  chosen on the host, before tracing: `inference_params`' kernel layout and `dtype="auto"` read
  `jax.default_backend()` (parameters are laid out, and the program's types fixed, for the machine it runs on);
  here it answers "gpu" (for the cuda export) or "tpu": the stored [in, out] kernel layout, bfloat16.
Every CPU-only entry point is a tripwire: those of the per-platform switches (`CPU_ONLY_PER_PLATFORM`) mark their
outputs with a primitive that cannot be lowered, so a program fails to export exactly when a CPU path is in the
program lowered for the platform (the other platforms' branches are traced, never lowered); those chosen on the host
(`CPU_ONLY_ON_HOST`) raise when called. `test_cpu_paths_are_chosen_by_the_platform_lowered_for` and
`test_the_tripwires_catch_the_host_kernel_layout` show that the tripwires fire where they should.

Programs (`PROGRAMS`; tiny sizes, and parameters are `jax.ShapeDtypeStruct`s from `jax.eval_shape`: no weights):
  train steps as the trainer builds them (`steps.jit_train_step`): the classifier (the cifar10 recipe on the tiny
  CNN, fed from the host and from device-resident data), the captioner (GPT-2 trained; a Llama frozen), the LM task
  (GPT-2, Llama); the classifier's (TTA) and the captioner's eval steps;
  `caption_images` as infer.py compiles it (`make_captioner` on `inference_params`): label prompts, a visual prefix
  and LM labels, greedy and top-p, for GPT-2 and Llama; GPT-2 with per-class prompts (no prefix), greedy and top-p;
  `lm_classify_images` as `classify_images` jits it, `generate_tokens` greedy, top-p and beam, and
  `score_class_prompts`, for GPT-2 and Llama.
Lowering only (no compile): 48 exports in about 25 s on two cores, and 12 more for the per-platform tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from imgllm import parallel
from imgllm.configs import captioner_tiny, cifar10, cnn_tiny, lm_tiny
from imgllm.language import matmul_cpu, sampling_cpu
from imgllm.language.decoding import GenerationConfig, generate_tokens
from imgllm.language.gpt2 import GPT2Config
from imgllm.language.llama import LlamaConfig
from imgllm.language.model import abstract_params
from imgllm.language.sampling import select_tokens
from imgllm.language.scoring import build_prompt_table, score_class_prompts
from imgllm.language.tokenizer import train_bpe_tokenizer
from imgllm.pipeline import caption, classify
from imgllm.pipeline import checkpoint as pc
from imgllm.precision import compute_dtype
from imgllm.train import captioner, loop, optim, steps
from imgllm.train.registry import build_task
from imgllm.vision import conv_cpu

PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}  # export platform -> what jax.default_backend() answers there
# The CPU fast paths' entry points (module or class, attribute name): none may be reached on an accelerator.
# Those of conv_impl and sampler "auto", chosen per lowering platform (traced on any host, lowered for CPU only):
CPU_ONLY_PER_PLATFORM = [
    (conv_cpu, "cpu_conv"),
    (conv_cpu, "hybrid_conv"),
    (conv_cpu, "im2col_conv"),
    (sampling_cpu, "argmax_first"),
    (sampling_cpu, "top_p_threshold"),
    (sampling_cpu, "draw_top_p"),
    (sampling_cpu, "draw_categorical"),
]
# Those of the [out, in] kernel layout, which `inference_params` chooses on the host:
CPU_ONLY_ON_HOST = [
    (matmul_cpu, "kernels_out_in"),
    (caption, "kernels_out_in"),
    (matmul_cpu, "times_out_in"),
    (matmul_cpu.OutInDense, "__call__"),
]
CLASS_NAMES = ("circle", "square", "triangle")
LABELS = ("red", "green", "blue")  # an LM label set chosen at inference
TEXTS = [f"a photo of a {name}." for name in CLASS_NAMES + LABELS] + ["a small red circle at the top"]
BATCH = 4  # images, prompts or training examples per program (more than the classes: per-class captions)
IMAGE = (32, 32, 3)
STEPS_PER_EPOCH, TOTAL_STEPS = 4, 8
RNG = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw PRNGKey, as infer.py passes it


# ----------------------------------------------------------------------------------------------- the tripwires


def tripwire(name: str) -> Callable:
    """A stand-in for a CPU-only function chosen on the host: raises AssertionError naming it when called."""

    def reached(*args, **kwargs):
        raise AssertionError(f"CPU-only path reached: {name}")

    return reached


# Passes its operand through, differentiably and under vmap, and raises when lowered: what a lowering tripwire
# marks a CPU-only function's outputs with.
cpu_only_p = Primitive("cpu_only")
cpu_only_p.def_impl(lambda x, *, name: x)
cpu_only_p.def_abstract_eval(lambda aval, *, name: aval)
ad.deflinear2(cpu_only_p, lambda cotangent, x, *, name: [cpu_only_p.bind(cotangent, name=name)])
batching.defvectorized(cpu_only_p)


def _cannot_lower(ctx, x, *, name):
    raise AssertionError(f"CPU-only path reached: {name}")


mlir.register_lowering(cpu_only_p, _cannot_lower)


def lowering_tripwire(name: str, original: Callable) -> Callable:
    """A stand-in for a CPU-only function chosen per lowering platform: computes what `original` does (it may be
    traced, as every `lax.platform_dependent` branch is) and marks each output, so that lowering it for a platform
    raises AssertionError naming it."""

    def traced(*args, **kwargs):
        return jax.tree.map(lambda out: cpu_only_p.bind(out, name=name), original(*args, **kwargs))

    return traced


def arm_tripwires(monkeypatch, backend: str | None) -> None:
    """jax.default_backend() answers `backend` (None: left as it is, "cpu" here); every CPU-only entry point is a
    tripwire: `CPU_ONLY_PER_PLATFORM` when lowered, `CPU_ONLY_ON_HOST` when called."""
    if backend is not None:
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
    for owner, attribute in CPU_ONLY_PER_PLATFORM:
        name = f"{owner.__name__}.{attribute}"
        monkeypatch.setattr(owner, attribute, lowering_tripwire(name, getattr(owner, attribute)))
    for owner, attribute in CPU_ONLY_ON_HOST:
        monkeypatch.setattr(owner, attribute, tripwire(f"{owner.__name__}.{attribute}"))


def export(program: tuple[Callable, tuple], *platforms: str):
    """`jax.export` of a (jitted function, argument shapes) pair for `platforms`: lowering only, no compile."""
    fn, args = program
    exported = jax.export.export(fn, platforms=platforms)(*args)
    assert exported.platforms == platforms
    return exported


def sds(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


# ----------------------------------------------------------------------------------------------- shared pieces


@dataclasses.dataclass(frozen=True)
class Parts:
    """What the programs share: a tokenizer, the tiny LMs' configs and parameter shapes, a Llama directory."""

    tokenizer: Any
    tokenizer_file: str
    lm_configs: dict[str, Any]  # "gpt2" | "llama" -> float32 config (programs set the compute dtype)
    lm_shapes: dict[str, Any]  # the same -> parameter shapes, float32 as stored
    llama_dir: str  # config.json and tokenizer files only: enough to build a task on


def tiny_lm_configs(eos_id: int) -> dict[str, Any]:
    """GPT-2 tiny, and a tiny SmolLM2-shaped Llama (tests/test_llama.py's sizes, grouped-query attention, tied
    embeddings), both over the test BPE's ids."""
    return {
        "gpt2": GPT2Config.tiny(vocab_size=320, bos_token_id=eos_id, eos_token_id=eos_id),
        "llama": LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        ),
    }


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    configs = tiny_lm_configs(tokenizer.eos_token_id)
    llama_dir = tmp_path_factory.mktemp("llama")
    (llama_dir / "config.json").write_text(json.dumps(configs["llama"].to_dict()))
    tokenizer.save_pretrained(str(llama_dir))
    return Parts(
        tokenizer=tokenizer,
        tokenizer_file=str(llama_dir / pc.TOKENIZER_FILE),
        lm_configs=configs,
        lm_shapes={name: abstract_params(config) for name, config in configs.items()},
        llama_dir=str(llama_dir),
    )


def accelerator_lm(parts: Parts, name: str):
    """The LM config computing in dtype "auto", resolved for the (patched) backend: bfloat16 on an accelerator
    (float32 with the backend left as "cpu")."""
    return dataclasses.replace(parts.lm_configs[name], dtype=compute_dtype("auto"))


# ----------------------------------------------------------------------------------------------- train steps


def state_and_step(task, config, batch_placement: str = "host"):
    """(TrainState shapes, the jitted train step) as `loop._train_with` makes them for `task` and `config`."""
    meta = {"total_steps": TOTAL_STEPS, "steps_per_epoch": STEPS_PER_EPOCH}
    state = jax.eval_shape(lambda: loop._abstract_state(task, config, meta))
    tx = optim.make_optimizer(
        config.optimizer,
        state.params,
        total_steps=TOTAL_STEPS,
        steps_per_epoch=STEPS_PER_EPOCH,
        batch_size=config.global_batch_size,
    )
    lookahead = optim.lookahead_fn(config.get("lookahead"), steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL_STEPS)
    step = steps.jit_train_step(
        task, tx, parallel.make_mesh(), steps_per_epoch=STEPS_PER_EPOCH, lookahead=lookahead, placement=batch_placement
    )
    return state, step


def classifier_config():
    """The cifar10 recipe (lookahead, alternating flips, label smoothing, parameter groups) on the tiny CNN."""
    config = cifar10.get_config()
    config.dataset, config.model.preset = "demo", "tiny"
    config.global_batch_size = config.eval_batch_size = BATCH
    return config


def image_batch(rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "images": sds((rows, *IMAGE), jnp.uint8),
        "labels": sds((rows,), jnp.int32),
        "index": sds((rows,), jnp.int32),
    }


def train_classifier(parts: Parts, monkeypatch, placement: str):
    config = classifier_config()
    task = build_task(config)
    state, step = state_and_step(task, config, placement)
    if placement == "host":
        return step, (state, image_batch(BATCH))
    return step, (state, image_batch(4 * BATCH), sds((STEPS_PER_EPOCH, BATCH), jnp.int32))


def eval_classifier(parts: Parts, monkeypatch):
    config = classifier_config()
    task = build_task(config)
    variables = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))
    batch = {**image_batch(BATCH), "mask": sds((BATCH,), jnp.float32)}
    del batch["index"]
    return steps.jit_eval_step(task, parallel.make_mesh(), tta=True), (variables, batch)


def captioner_task(parts: Parts, monkeypatch, lm: str):
    """The captioner task of captioner_tiny on a stand-in trained classifier (cnn_tiny's run config and class names
    instead of a checkpoint: the train step reads only their shapes); lm "llama": a frozen pretrained Llama."""
    classifier = cnn_tiny.get_config().to_dict()
    meta = {"step": 0, "task": {"class_names": list(CLASS_NAMES)}}
    monkeypatch.setattr(captioner, "_classifier_config", lambda workdir: (classifier, meta))
    config = captioner_tiny.get_config()
    config.classifier_workdir = "classifier"
    config.global_batch_size = config.eval_batch_size = BATCH
    if lm == "llama":
        config.lm.pretrained, config.lm.train = parts.llama_dir, False
    task = build_task(config)
    task.tokenizer = parts.tokenizer
    return task, config


def caption_batch(task, config, state) -> dict[str, jax.ShapeDtypeStruct]:
    """The captioner's training batch: the frozen CNN's features, caption ids and target mask."""
    images = sds((BATCH, *IMAGE), jnp.uint8)
    features = jax.eval_shape(task.cnn_logits_and_features, state.model_state[captioner.FROZEN]["cnn"], images)[1]
    length = config.captions.max_tokens + 2
    return {
        "features": sds(features.shape, jnp.float32),
        "input_ids": sds((BATCH, length), jnp.int32),
        "target_mask": sds((BATCH, length - 1), jnp.float32),
    }


def train_captioner(parts: Parts, monkeypatch, lm: str):
    task, config = captioner_task(parts, monkeypatch, lm)
    state, step = state_and_step(task, config)
    return step, (state, caption_batch(task, config, state))


def eval_captioner(parts: Parts, monkeypatch):
    task, config = captioner_task(parts, monkeypatch, "gpt2")
    state, _ = state_and_step(task, config)
    batch = caption_batch(task, config, state)
    del batch["features"]
    batch.update(
        images=sds((BATCH, *IMAGE), jnp.uint8), labels=sds((BATCH,), jnp.int32), mask=sds((BATCH,), jnp.float32)
    )
    variables = {"params": state.params, **state.model_state}
    return steps.jit_eval_step(task, parallel.make_mesh(), tta=False), (variables, batch)


def train_lm(parts: Parts, monkeypatch, lm: str):
    config = lm_tiny.get_config()
    config.seq_len, config.global_batch_size = 16, BATCH
    if lm == "llama":
        config.lm.pretrained = parts.llama_dir
    task = build_task(config)
    state, step = state_and_step(task, config)
    rows = sds((BATCH, config.seq_len), jnp.int32)
    return step, (state, {"input_ids": rows, "attention_mask": rows, "loss_mask": rows})


# ----------------------------------------------------------------------------------------------- inference


def pipeline_checkpoint(parts: Parts, lm: str, *, bridge: bool) -> pc.PipelineCheckpoint:
    """A pipeline checkpoint in memory (no parameters): the tiny CNN, the tiny `lm`, and a visual prefix when
    `bridge`; label-only prompts without one (so that captions are made once per class)."""
    eos = parts.tokenizer.eos_token_id
    prefix = {"prefix_length": 2, "lm_dim": 32, "hidden": 16, "feature_source": "spatial"} if bridge else None
    config = pc.make_pipeline_config(
        cnn={"preset": "tiny", "num_classes": len(CLASS_NAMES)},
        lm=parts.lm_configs[lm].to_dict(),
        bridge=prefix,
        class_names=CLASS_NAMES,
        eos_id=eos,
        pad_id=eos,
        bos_id=eos,
        prepend_bos=bridge,
        max_new_tokens=4,
        template="{label2} or {label}? {prob}%" if bridge else "A photo of a {label}.",
        top_k=2 if bridge else 1,
        class_prompt_templates=["a photo of a {label}."],
    )
    return pc.PipelineCheckpoint(params=None, config=config, tokenizer=pc.FastTokenizer(parts.tokenizer_file))


def pipeline_params(loaded: pc.PipelineCheckpoint, spec: caption.PipelineSpec) -> dict[str, Any]:
    """Parameter shapes as infer.py compiles against them: the config's models, the bridge, `inference_params`."""
    params = pc.config_params_shapes(loaded.config)
    if spec.bridge is not None:
        images = sds((1, *IMAGE), jnp.uint8)
        features = jax.eval_shape(lambda v, x: caption.cnn_logits_and_features(v, x, spec)[1], params["cnn"], images)
        params["bridge"] = jax.eval_shape(spec.bridge.init, jax.random.PRNGKey(0), features)["params"]
    return jax.eval_shape(caption.inference_params, params)


def sampling(max_new_tokens: int, eos: int, **options) -> GenerationConfig:
    """A GenerationConfig with sampler "auto": kept in the config, chosen when the program is lowered."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos, **options)
    assert config.sampler == "auto", f"sampler 'auto' resolved on the host to {config.sampler!r}"
    return config


DECODINGS = {
    "greedy": {},
    "top-p": dict(do_sample=True, top_p=0.9, top_k=20, temperature=0.8),
    "beam": dict(num_beams=3, num_return_sequences=2),
}


def caption_program(parts: Parts, monkeypatch, lm: str, decoding: str, bridge: bool):
    """`caption_images` jitted by `make_captioner` (as infer.py runs it): with a bridge, labels fused from the CNN
    and the LM's class prompts, LM labels (`LABELS`) scored by information gain, and a two-label prompt."""
    loaded = pipeline_checkpoint(parts, lm, bridge=bridge)
    generation = sampling(4, parts.tokenizer.eos_token_id, **DECODINGS[decoding])
    options = dict(classify="fused", lm_labels=LABELS, lm_scoring="information_gain") if bridge else {}
    spec = loaded.spec(generation, dtype="auto", **options)
    images = sds((BATCH, *IMAGE), jnp.uint8)
    return caption.make_captioner(spec, parallel.make_mesh()), (pipeline_params(loaded, spec), images, RNG)


def lm_classify_program(parts: Parts, monkeypatch, lm: str):
    """`classify_images`' jitted `lm_classify_images`: the LM's label among `LABELS` after each image's prefix,
    with label-beginning templates (no EOS scored) and the checkpoint's parameters as stored."""
    loaded = pipeline_checkpoint(parts, lm, bridge=True)
    spec = loaded.spec(lm_labels=LABELS, lm_templates=["a {label}", "a small {label} shape"], dtype="auto")
    return classify._jitted(spec), (pipeline_params(loaded, spec), sds((BATCH, *IMAGE), jnp.uint8))


def generate_program(parts: Parts, monkeypatch, lm: str, decoding: str):
    config = accelerator_lm(parts, lm)
    generation = sampling(6, parts.tokenizer.eos_token_id, **DECODINGS[decoding])
    fn = jax.jit(lambda params, ids, mask, rng: generate_tokens(params, config, ids, mask, rng, generation))
    prompts = sds((BATCH, 5), jnp.int32)
    return fn, (parts.lm_shapes[lm], prompts, prompts, RNG)


def scoring_program(parts: Parts, monkeypatch, lm: str):
    config = accelerator_lm(parts, lm)
    table = build_prompt_table(
        lambda text: parts.tokenizer.encode(text, add_special_tokens=False),
        parts.tokenizer.eos_token_id,
        CLASS_NAMES,
        ["a photo of a {label}.", "a {label}"],
    )
    fn = jax.jit(lambda params, prefix: score_class_prompts(params, config, table, prefix))
    return fn, (parts.lm_shapes[lm], sds((BATCH, 2, config.n_embd), jnp.float32))


# name -> (builder, its options); builder(parts, monkeypatch, *options) -> (jitted function, argument shapes)
PROGRAMS: dict[str, tuple[Callable[..., tuple[Callable, tuple]], tuple]] = {
    "train classifier (host batches)": (train_classifier, ("host",)),
    "train classifier (device data)": (train_classifier, ("device",)),
    "eval classifier (flip TTA)": (eval_classifier, ()),
    "train captioner gpt2": (train_captioner, ("gpt2",)),
    "train captioner llama (frozen)": (train_captioner, ("llama",)),
    "eval captioner gpt2": (eval_captioner, ()),
    "train lm gpt2": (train_lm, ("gpt2",)),
    "train lm llama": (train_lm, ("llama",)),
    **{
        f"caption_images {lm} {decoding}": (caption_program, (lm, decoding, True))
        for lm in ("gpt2", "llama")
        for decoding in ("greedy", "top-p")
    },
    **{
        f"caption_images gpt2 per-class {decoding}": (caption_program, ("gpt2", decoding, False))
        for decoding in ("greedy", "top-p")
    },
    **{f"lm_classify_images {lm}": (lm_classify_program, (lm,)) for lm in ("gpt2", "llama")},
    **{
        f"generate_tokens {lm} {decoding}": (generate_program, (lm, decoding))
        for lm in ("gpt2", "llama")
        for decoding in DECODINGS
    },
    **{f"score_class_prompts {lm}": (scoring_program, (lm,)) for lm in ("gpt2", "llama")},
}


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_lowers_for_the_accelerator(name, platform, parts, monkeypatch):
    """The program, built with the host's switches resolved for `platform` (the per-platform ones need nothing),
    exports for it without reaching a CPU-only path, and computes in bfloat16 (dtype "auto")."""
    arm_tripwires(monkeypatch, PLATFORMS[platform])
    build, options = PROGRAMS[name]
    exported = export(build(parts, monkeypatch, *options), platform)
    assert "bf16" in exported.mlir_module()


# Programs whose CPU paths are all per-platform switches (conv_impl and sampler "auto"), and the CPU entry point
# the "cpu" export reaches first.
PER_PLATFORM = {
    "train classifier (host batches)": "imgllm.vision.conv_cpu.",  # the CNN's convolutions and their gradients
    "eval classifier (flip TTA)": "imgllm.vision.conv_cpu.",
    "generate_tokens gpt2 greedy": "imgllm.language.sampling_cpu.argmax_first",
    "generate_tokens llama top-p": "imgllm.language.sampling_cpu.",
}


@pytest.mark.parametrize("name", list(PER_PLATFORM))
def test_cpu_paths_are_chosen_by_the_platform_lowered_for(name, parts, monkeypatch):
    """With jax.default_backend() left as "cpu", the program exported for ("cuda", "tpu") from this CPU host holds
    no CPU path (conv_impl and sampler "auto" choose per lowering platform), while the same program exported for
    "cpu", alone or beside "cuda", reaches the CPU path: the switch is per platform, and the tripwire fires."""
    arm_tripwires(monkeypatch, None)
    build, options = PROGRAMS[name]
    program = build(parts, monkeypatch, *options)
    export(program, "cuda", "tpu")
    for platforms in (("cpu",), ("cpu", "cuda")):
        with pytest.raises(AssertionError, match=f"CPU-only path reached: {PER_PLATFORM[name]}"):
            export(program, *platforms)


def test_on_this_cpu_auto_runs_the_cpu_sampler():
    """sampler "auto" on this CPU draws what the "cpu" sampler draws from the same key (its own draws, unlike the
    plain sampler's): one jitted program, the CPU path chosen when it is lowered for the CPU."""
    logits = jax.random.normal(jax.random.key(0), (64, 97)) * 2.0
    draws = {
        sampler: np.asarray(
            jax.jit(select_tokens, static_argnums=2)(
                logits,
                jax.random.key(1),
                GenerationConfig(max_new_tokens=1, do_sample=True, top_p=0.8, sampler=sampler, eos_token_id=None),
            )
        )
        for sampler in ("auto", "cpu", "plain")
    }
    np.testing.assert_array_equal(draws["auto"], draws["cpu"])
    assert np.any(draws["auto"] != draws["plain"])


def test_the_tripwires_catch_the_host_kernel_layout(parts, monkeypatch):
    """With the backend left as "cpu", `inference_params` converts the LM's kernels to the [out, in] layout: a
    choice made on the host, for the machine the parameters are prepared for."""
    arm_tripwires(monkeypatch, "cpu")
    with pytest.raises(AssertionError, match="CPU-only path reached: imgllm.pipeline.caption.kernels_out_in"):
        caption.inference_params({"lm": parts.lm_shapes["gpt2"]})
