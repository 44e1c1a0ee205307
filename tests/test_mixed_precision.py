"""Mixed precision (`imgllm.precision`): bfloat16 compute with float32 parameters, chosen by one setting.

On CPU, where "auto" means float32, the tests ask for bfloat16 explicitly and hold it to float32 on the same weights:
the CNN trained a few dozen steps on the demo shapes, a small GPT-2 trained here to describe each shape, and a
pipeline checkpoint made from the two, exported from the bfloat16 run and read back in both dtypes; and the bfloat16
graphs are read op by op (which ops take bfloat16, which float32). Every tolerance is stated, with its reason, in the
docstring of the test that checks it.

Kept small for a 2-core CPU (40-50 s for the file): the CNN has two blocks, `conv_impl="xla"` (the
convolutions GPU/TPU run, where "auto" picks bfloat16) and no augmentation (the two runs would draw the same
augmentations anyway); weights are initialised with numpy (compiling JAX's random initialisers costs seconds).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgllm import parallel, precision
from imgllm.configs import cnn_tiny
from imgllm.data import demo
from imgllm.language.decoding import GenerationConfig, generate_tokens
from imgllm.language.gpt2 import GPT2, GPT2Config
from imgllm.language.scoring import prefixed_token_stats
from imgllm.language.tokenizer import train_bpe_tokenizer
from imgllm.pipeline import CaptionOptions, caption_files
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline.records import OutputError
from imgllm.train import optim, steps
from imgllm.train.classifier import ClassifierTask
from imgllm.train.state import create_train_state

EPOCHS = 3  # 256 demo images, batch 32: 24 steps
TEMPLATE = "A photo of a {label}."
COLOURS = tuple(demo.COLOURS)
PLACES = tuple(demo.PLACES)


# ----------------------------------------------------------------------------------------------- the setting


def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert precision.resolve_dtype("auto", backend="cpu") == "float32"
    assert precision.resolve_dtype("auto", backend="gpu") == "bfloat16"
    assert precision.resolve_dtype("auto", backend="tpu") == "bfloat16"
    assert precision.resolve_dtype("bfloat16", backend="cpu") == "bfloat16"
    with pytest.raises(ValueError, match="dtype='float16'"):
        precision.resolve_dtype("float16")


def test_config_dtype_is_the_one_setting_and_old_configs_keep_theirs():
    """config.dtype wins over the legacy model.dtype / lm.dtype (with a warning when they disagree); a config saved
    before config.dtype existed computes in its legacy value; resuming compares the resolved dtype alone."""
    assert cnn_tiny.get_config().dtype == "auto" and "dtype" not in cnn_tiny.get_config().model
    assert precision.run_dtype({"dtype": "bfloat16"}) == "bfloat16"
    with pytest.warns(UserWarning, match=r"config.model.dtype='float32' is ignored"):
        assert precision.run_dtype({"dtype": "bfloat16", "model": {"dtype": "float32"}}) == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an agreeing legacy key is no news
        assert precision.run_dtype({"dtype": "float32", "model": {"dtype": "float32"}}) == "float32"
    assert precision.run_dtype({"model": {"dtype": "bfloat16"}}) == "bfloat16"
    assert precision.run_dtype({"model": {"dtype": "float32"}, "lm": {"dtype": "bfloat16"}}) == "bfloat16"
    assert precision.run_dtype({"model": {}}) == "float32"
    saved = {"seed": 0, "model": {"preset": "tiny", "dtype": "float32"}}  # before config.dtype
    assert (
        precision.comparable_dtype(saved)
        == precision.comparable_dtype({"seed": 0, "dtype": "auto", "model": {"preset": "tiny"}})
        == {"seed": 0, "dtype": "float32", "model": {"preset": "tiny"}}
    )
    assert precision.comparable_dtype(saved) != precision.comparable_dtype({**saved, "dtype": "bfloat16"})
    task = ClassifierTask(_cnn_config("bfloat16"))
    assert task.model.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------- what runs in bfloat16


def primitives(fn, *args) -> set[tuple[str, str]]:
    """{(primitive name, dtype of its first operand)} of every operation in fn's jaxpr, nested ones included (traced
    only: nothing is compiled)."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.invars and hasattr(eqn.invars[0].aval, "dtype"):
                yield eqn.primitive.name, str(eqn.invars[0].aval.dtype)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


FLOAT32_ONLY = {"exp", "log", "log1p", "logistic", "rsqrt", "reduce_sum", "cumsum", "argmax", "sort"}


def test_bfloat16_computes_matmuls_in_bfloat16_and_keeps_softmax_statistics_losses_and_sampling_float32():
    """The bfloat16 graphs, read op by op: the convolutions and matmuls take bfloat16, and every exponential,
    logarithm, normalising reduction, sort and argmax takes float32: softmaxes and log-softmaxes, LayerNorm and
    BatchNorm statistics (means, variances, 1/sqrt), the losses, and nucleus sampling (sort, cumsum, draw). An exact
    check: such an op in bfloat16 hardly moves these tiny models' outputs, but loses precision in large ones."""
    task = ClassifierTask(_cnn_config("bfloat16"))
    variables = jax.eval_shape(task.init_variables, jax.random.key(0))
    batch = {"images": jnp.zeros((4, 32, 32, 3), jnp.uint8), "labels": jnp.zeros(4, jnp.int32), "index": jnp.arange(4)}
    cnn_loss = primitives(
        lambda v: task.loss(v["params"], {"batch_stats": v["batch_stats"]}, batch, jax.random.key(0), 0)[0], variables
    )
    lm = GPT2Config.tiny(dtype=jnp.bfloat16)
    lm_params = jax.eval_shape(lambda: GPT2(lm).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    ids = jnp.zeros((2, 6), jnp.int32)
    lm_loss = primitives(lambda p: prefixed_token_stats(p, lm, None, ids)[0].sum(), lm_params)
    sampling = GenerationConfig(
        max_new_tokens=3, do_sample=True, top_p=0.9, sampler="plain", eos_token_id=127, pad_token_id=127
    )
    sample = primitives(
        lambda p: generate_tokens(p, lm, ids, jnp.ones_like(ids), jax.random.key(0), sampling), lm_params
    )
    for graph in (cnn_loss, lm_loss, sample):
        assert {name for name, dtype in graph if dtype == "bfloat16"} & FLOAT32_ONLY == set()
    assert ("conv_general_dilated", "bfloat16") in cnn_loss and ("dot_general", "bfloat16") in cnn_loss
    assert ("dot_general", "bfloat16") in lm_loss and ("dot_general", "bfloat16") in sample
    assert {("exp", "float32"), ("rsqrt", "float32")} <= cnn_loss & lm_loss
    assert {("sort", "float32"), ("cumsum", "float32")} <= sample


# ----------------------------------------------------------------------------------------------- CNN training


def _cnn_config(dtype: str) -> ml_collections.ConfigDict:
    config = cnn_tiny.get_config()
    config.dtype = dtype
    config.model.widths = (8, 16)
    config.model.conv_impl = "xla"
    config.augment.translate, config.augment.flip = 0, "none"
    config.num_epochs = float(EPOCHS)
    return config


def numpy_init(shapes, seed: int, std: float | None = None):
    """Variables of the given shapes (jax.ShapeDtypeStruct leaves), drawn with numpy: kernels and embeddings as the
    CNN's init (PyTorch's uniform ±1/sqrt(fan_in), conv kernels identity on their first min(in, out) output
    channels) or normal(0, std) when std is given; norm scales and variances ones, biases and means zeros."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['scale']", "['var']")):
            return np.ones(leaf.shape, leaf.dtype)
        if not name.endswith(("['kernel']", "['embedding']")):
            return np.zeros(leaf.shape, leaf.dtype)
        if std is not None:
            return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
        kernel = rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
        if kernel.ndim == 4:  # `imgllm.vision.cnn.dirac_init`
            height, width, inputs, outputs = kernel.shape
            identity = np.arange(min(inputs, outputs))
            kernel[..., identity] = 0
            kernel[height // 2, width // 2, identity, identity] = 1
        return kernel

    return jax.tree_util.tree_map_with_path(fill, shapes)


def train_cnn(dtype: str) -> dict:
    """The classifier task's train step (`imgllm.train.steps`) run for EPOCHS on cnn_tiny's demo images, the same
    batches in the same order for every dtype; returns the per-step losses, the final state and the task."""
    config = _cnn_config(dtype)
    task = ClassifierTask(config)
    arrays = task.train_arrays()
    variables = numpy_init(jax.eval_shape(task.init_variables, jax.random.key(0)), seed=0)
    variables = task.prepare_variables(variables, arrays)  # the whitening stem, from the images
    steps_per_epoch = len(arrays["labels"]) // config.global_batch_size
    tx = optim.make_optimizer(
        config.optimizer,
        variables["params"],
        total_steps=EPOCHS * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.global_batch_size,
    )
    mesh = parallel.make_mesh()
    state = create_train_state(variables, tx, np.array([0, 1], np.uint32), use_lookahead=False)
    state = jax.device_put(state, parallel.replicated_sharding(mesh))  # as the loop places it: one compile
    step = steps.jit_train_step(task, tx, mesh, steps_per_epoch=steps_per_epoch)
    order = np.random.default_rng(0)
    losses = []
    for _ in range(EPOCHS):
        rows = order.permutation(len(arrays["labels"]))[: steps_per_epoch * config.global_batch_size]
        for batch_rows in rows.reshape(steps_per_epoch, -1):
            state, metrics = step(state, {name: array[batch_rows] for name, array in arrays.items()})
            total, count = metrics["loss"]
            losses.append(float(total) / float(count))
    return {"losses": np.array(losses), "state": jax.device_get(state), "task": task}


@pytest.fixture(scope="module")
def cnn_runs() -> dict[str, dict]:
    return {dtype: train_cnn(dtype) for dtype in ("float32", "bfloat16")}


def test_bfloat16_cnn_training_tracks_the_float32_loss(cnn_runs):
    """24 steps of the same batches from the same weights, float32 against bfloat16 compute.

    Tolerances: each step's loss within 0.06 of float32's (measured: 0.023 at most), and the mean of the last 8
    within 0.02 (measured: 0.003). bfloat16 rounds every activation and gradient to 8 significant bits (relative
    rounding up to 2^-9 = 0.2%), the same weights then take slightly different steps and the runs drift apart a
    little more at each one: a few hundredths of a loss near 2 after 24 steps, a per-step wobble that averages out
    over 8 steps. Training must also work, or tracking would say nothing: both losses fall by more than 0.25
    (measured: 0.35).
    """
    f32, bf16 = cnn_runs["float32"]["losses"], cnn_runs["bfloat16"]["losses"]
    print(
        f"CNN losses float32 {np.round(f32, 3)}\n           bfloat16 {np.round(bf16, 3)}\n"
        f"max step difference {np.abs(f32 - bf16).max():.4f}, last 8 {abs(f32[-8:].mean() - bf16[-8:].mean()):.4f}"
    )
    assert np.abs(f32 - bf16).max() < 0.06
    assert abs(f32[-8:].mean() - bf16[-8:].mean()) < 0.02
    assert f32[-8:].mean() < f32[:4].mean() - 0.25 and bf16[-8:].mean() < bf16[:4].mean() - 0.25


def test_bfloat16_training_keeps_parameters_optimizer_state_and_batchnorm_statistics_float32(cnn_runs):
    state = cnn_runs["bfloat16"]["state"]
    floating = [
        leaf
        for leaf in jax.tree.leaves((state.params, state.opt_state, state.model_state))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    assert set(state.model_state["batch_stats"]["block1"]["norm1"]) == {"mean", "var"}


# ----------------------------------------------------------------------------------------------- a demo LM


def continuation(label: int) -> str:
    """What the demo LM learns to say after "A photo of a {shape}.": a demo-style description of that shape."""
    size = ("small", "large")[label % 2]
    return f" a {size} {COLOURS[label % len(COLOURS)]} {demo.SHAPES[label]} {PLACES[label % len(PLACES)]}"


@pytest.fixture(scope="module")
def demo_lm():
    """(GPT2Config, float32 params, tokenizer, token ids [C, T], mask of the trained targets [C, T-1]): a two-layer
    GPT-2 trained here until it says `continuation(c)` after
    each class prompt, confidently (a random LM's greedy tokens are near-ties that any rounding flips)."""
    prompts = [TEMPLATE.format(label=name) for name in demo.SHAPES]
    tokenizer = train_bpe_tokenizer(prompts + [continuation(c) for c in range(len(demo.SHAPES))], vocab_size=320)
    eos = tokenizer.eos_token_id
    rows = [tokenizer.encode(p) + tokenizer.encode(continuation(c)) + [eos] for c, p in enumerate(prompts)]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), eos, np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for row, (prompt, tokens) in enumerate(zip(prompts, rows)):
        ids[row, : len(tokens)] = tokens
        mask[row, len(tokenizer.encode(prompt)) - 1 : len(tokens) - 1] = 1  # the continuation and its EOS
    config = GPT2Config.tiny(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
    params = numpy_init(
        jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), ids[:1, :1])["params"]), seed=1, std=0.1
    )
    tx = optax.adam(1e-2)

    def loss(p):
        log_probs, _ = prefixed_token_stats(p, config, None, ids)
        return -(log_probs * mask).sum() / mask.sum()

    def update(_, carry):
        p, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 150, update, (p, tx.init(p))))(params)
    final_loss = float(jax.jit(loss)(params))
    assert final_loss < 0.01, final_loss
    return config, jax.device_get(params), tokenizer, ids, mask


def test_bfloat16_lm_logits_are_close_to_float32(demo_lm):
    """Full-sequence logits of the demo LM, float32 against bfloat16 compute on the same float32 weights.

    Tolerances: at every position, |logit difference| at most 3% of that position's largest |float32 logit|
    (measured: 1.4%), the log-probability of every trained token within 0.01 (measured: 0.0001), and the same argmax
    everywhere. bfloat16 rounds each matmul input to 8 significant bits (a relative step of 2^-8 = 0.4%), the
    residual stream carries the rounding of both layers, and the final LayerNorm keeps it relative to the
    activations: a few such steps of the largest logit. The trained tokens are confident (log-probability near 0),
    and their log-softmax runs in float32 on float32 logits, so their log-probabilities barely move.
    """
    config, params, _, ids, mask = demo_lm

    def logits(dtype):
        model = GPT2(dataclasses.replace(config, dtype=dtype))
        return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids)[0])(params))

    def target_log_probs(dtype):
        stats = jax.jit(lambda p: prefixed_token_stats(p, dataclasses.replace(config, dtype=dtype), None, ids)[0])
        return np.asarray(stats(params))[mask > 0]

    f32, bf16 = logits(jnp.float32), logits(jnp.bfloat16)
    assert bf16.dtype == np.float32
    relative = (np.abs(bf16 - f32).max(-1) / np.abs(f32).max(-1)).max()
    log_prob_error = np.abs(target_log_probs(jnp.bfloat16) - target_log_probs(jnp.float32)).max()
    print(
        f"LM logits: max |bf16 - f32| {relative:.4f} of the position's largest logit; target log-probabilities "
        f"within {log_prob_error:.4f}"
    )
    assert relative < 0.03
    assert log_prob_error < 0.01
    np.testing.assert_array_equal(bf16.argmax(-1), f32.argmax(-1))


# ----------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline_dir(cnn_runs, demo_lm, tmp_path_factory) -> str:
    """A pipeline checkpoint exported from the bfloat16 run: its CNN (with the run's model config, and a "dtype" key
    as configs before config.dtype held it) and the demo LM with the class-prompt template."""
    run = cnn_runs["bfloat16"]
    config, lm_params, tokenizer, _, _ = demo_lm
    model_config = {**run["task"].config.model.to_dict(), "dtype": "bfloat16"}
    pipeline_config = pc.make_pipeline_config(
        cnn=model_config,
        lm=config.to_dict(),
        class_names=run["task"].class_names,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.eos_token_id,
        template=TEMPLATE,
        top_k=1,
        max_new_tokens=16,
    )
    return pc.save_pipeline_checkpoint(
        tmp_path_factory.mktemp("bf16") / "pipeline",
        {"cnn": run["state"].variables, "lm": lm_params},
        pipeline_config,
        tokenizer,
    )


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("demo_images")
    demo.write_demo_images(str(folder), num_examples=128, seed=1)
    return str(folder / "*" / "*.png")  # the images, not the references file beside them


def test_bfloat16_pipeline_checkpoint_round_trips(pipeline_dir, cnn_runs, demo_lm):
    """The checkpoint holds float32 arrays whatever the run computed in, and no dtype in its config; a bfloat16 leaf
    handed to it is stored as float32 (exactly). Read back, it serves both dtypes; "auto" makes the spec of the dtype
    it resolves to, equal and equally hashed (one compiled program), and float32's LM config is the plain one."""
    shapes = pc.read_params_shapes(pipeline_dir)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {np.dtype(np.float32)}
    loaded = pc.load_pipeline(pipeline_dir)
    assert "dtype" not in loaded.config["cnn"]
    jax.tree.map(np.testing.assert_array_equal, loaded.params["cnn"], cnn_runs["bfloat16"]["state"].variables)
    assert loaded.spec(dtype="bfloat16").cnn.dtype == jnp.bfloat16
    assert loaded.spec(dtype="bfloat16").lm_config.dtype == jnp.bfloat16
    auto, resolved = loaded.spec(dtype="auto"), loaded.spec(dtype=precision.resolve_dtype("auto"))
    assert auto == resolved and hash(auto) == hash(resolved)
    f32 = loaded.spec(dtype="float32")
    assert f32.cnn.dtype == jnp.float32 and f32.lm_config == demo_lm[0] and hash(f32.lm_config) == hash(demo_lm[0])
    half = {"w": jnp.asarray([1.5, -2.25], jnp.bfloat16), "ids": np.arange(3, dtype=np.int32)}
    stored = pc.float32_params(half)
    assert stored["w"].dtype == jnp.float32 and stored["ids"].dtype == np.int32
    np.testing.assert_array_equal(stored["w"], [1.5, -2.25])


def test_bfloat16_greedy_captions_agree_with_float32(pipeline_dir, demo_images, tmp_path):
    """128 fresh demo images captioned greedily by `caption_files` from the bfloat16 run's checkpoint, in float32
    and in bfloat16.

    Tolerance: the same caption for at least 95% of the images (the issue's bar; measured: 97.7%, the 3 images whose
    CNN label flipped). An image's caption changes when bfloat16 rounding flips the CNN's top label (a near-tie of
    two classes: this CNN has trained for 24 steps only) or one of the LM's greedy tokens; the LM here is trained,
    so its choices have margins far above bfloat16's 0.4% rounding (a random LM's do not: on random tiny pipelines
    bfloat16 and float32 agreed on 73-89% of the images, a measure of their chaos, not of the precision).
    The captions are not vacuous: several classes are named, and each caption is the one the LM learnt for its
    label. The bfloat16 output records its dtype, and resuming it in float32 is refused.
    """
    records = {}
    for dtype in ("float32", "bfloat16"):
        output = tmp_path / f"{dtype}.jsonl"
        records[dtype] = list(
            caption_files(pipeline_dir, [demo_images], CaptionOptions(batch_size=64, dtype=dtype), output=str(output))
        )
    assert len(records["float32"]) == len(records["bfloat16"]) == 128
    captions = {dtype: [r["captions"][0] for r in rs] for dtype, rs in records.items()}
    labels = {dtype: [r["labels"][0]["label"] for r in rs] for dtype, rs in records.items()}
    agree = np.mean([a == b for a, b in zip(captions["float32"], captions["bfloat16"])])
    print(
        f"captions agree on {agree:.3f} of {len(captions['float32'])} images; labels on "
        f"{np.mean([a == b for a, b in zip(labels['float32'], labels['bfloat16'])]):.3f}"
    )
    assert agree >= 0.95
    assert len(set(labels["float32"])) >= 3
    learnt = {name: continuation(c).strip() for c, name in enumerate(demo.SHAPES)}
    assert [learnt[label] for label in labels["float32"]] == captions["float32"]
    with pytest.raises(OutputError, match='dtype was "bfloat16", now unset'):
        list(
            caption_files(
                pipeline_dir,
                [demo_images],
                CaptionOptions(batch_size=64, dtype="float32"),
                output=str(tmp_path / "bfloat16.jsonl"),
            )
        )
