"""The image → caption pipeline: prompt assembly inside jit, equality with the stages run one by one, the visual
prefix branch, one compilation per shape, and the pipeline checkpoint round trip."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm import pipeline
from imgllm.pipeline import checkpoint as pc

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TOKENIZER_TEXTS = [f"A photo of a {name}." for name in CLASS_NAMES] + [
    "This image shows a cat (93%), a dog (5%) and a frog (2%).",
    "maybe a horse? 100% sure",
]


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE trained offline on a few sentences (ids fit the tiny LM's vocabulary)."""
    from imgllm.language.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TOKENIZER_TEXTS, vocab_size=300)


def tokenizer_dir(root) -> str:
    path = os.path.join(os.fspath(root), "tokenizer")
    if not os.path.isdir(path):
        tiny_tokenizer().save_pretrained(path)
    return path


@functools.cache
def tiny_params(seed: int = 0, bridge: bool = False) -> dict:
    """Parameters of a tiny pipeline: the test CNN preset, a two-layer GPT-2 over the BPE's ids and, when asked,
    a PrefixMapper. Cached: tests share the (numpy) arrays and only read them."""
    from imgllm.language.gpt2 import init_params
    from imgllm.vision.cnn import cnn_preset

    if bridge:
        from imgllm.bridge import PrefixMapper

        features = jnp.zeros((1, 16))  # the tiny preset's last width
        mapper = jax.jit(PrefixMapper(**tiny_bridge_config()).init)(jax.random.PRNGKey(seed + 2), features)
        return {**tiny_params(seed), "bridge": jax.device_get(mapper["params"])}
    cnn = cnn_preset("tiny", num_classes=len(CLASS_NAMES))
    cnn_variables = jax.jit(lambda key: cnn.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.PRNGKey(seed))
    lm_config = tiny_lm_config()
    lm_params = jax.jit(init_params, static_argnums=0)(lm_config, jax.random.PRNGKey(seed + 1))
    return jax.device_get({"cnn": dict(cnn_variables), "lm": lm_params})


def tiny_lm_config():
    from imgllm.language.gpt2 import GPT2Config

    tok = tiny_tokenizer()
    # A wide init (0.5, not 0.02): a near-zero random GPT-2 only repeats its last token, which would make the
    # caption comparisons below vacuous.
    return GPT2Config.tiny(
        vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5
    )


def tiny_bridge_config() -> dict:
    return {"prefix_length": 2, "lm_dim": tiny_lm_config().n_embd, "hidden": 16}


def tiny_pipeline_parts(
    seed: int = 0,
    *,
    bridge: bool = False,
    template: str = "A photo of a {label}.",
    top_k: int = 2,
    max_new_tokens: int = 6,
    class_prompt_templates=None,
):
    """(params, config) of a tiny pipeline (see `tiny_params`)."""
    tok = tiny_tokenizer()
    config = pc.make_pipeline_config(
        cnn={"preset": "tiny", "num_classes": len(CLASS_NAMES)},
        lm=tiny_lm_config().to_dict(),
        bridge=tiny_bridge_config() if bridge else None,
        class_names=CLASS_NAMES,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        template=template,
        top_k=top_k,
        prepend_bos=bridge,
        max_new_tokens=max_new_tokens,
        class_prompt_templates=class_prompt_templates,
    )
    return tiny_params(seed, bridge), config


def tiny_pipeline(tmp_path, **kwargs) -> pc.PipelineCheckpoint:
    params, config = tiny_pipeline_parts(**kwargs)
    tokenizer = pc.FastTokenizer(os.path.join(tokenizer_dir(tmp_path), pc.TOKENIZER_FILE))
    return pc.PipelineCheckpoint(params=params, config=config, tokenizer=tokenizer)


def random_images(seed: int, batch: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "template",
    [
        "A photo of a {label}.",
        "This image shows {topk}.",
        "{label2}, maybe {label}? {prob}% sure",
        "a {label} ({prob1}%)",
    ],
)
def test_prompt_assembly_equals_tokenizing_the_filled_in_prompt(template):
    tok = tiny_tokenizer()
    encode = lambda text: tok.encode(text, add_special_tokens=False)
    tables = pipeline.prompts.tokenize_template(encode, template, CLASS_NAMES, 3, tok.pad_token_id)
    label_ids = np.array([[3, 5, 1], [9, 0, 2], [7, 8, 6]], np.int32)
    percents = np.array([[93, 5, 0], [100, 0, 7], [40, 35, 25]], np.int32)
    ids, mask = jax.jit(lambda a, b: pipeline.prompts.assemble_prompts(tables, a, b, tok.pad_token_id))(
        label_ids, percents
    )
    ids, mask = np.asarray(ids), np.asarray(mask)
    assert ids.shape == mask.shape == (3, tables.width)
    for row in range(3):
        text = pipeline.prompts.fill_template(template, [CLASS_NAMES[c] for c in label_ids[row]], percents[row])
        expected = encode(text)
        assert ids[row][mask[row] == 1].tolist() == expected, text
        # left padding: the mask is 0...0 1...1 and padded slots hold the pad id
        assert mask[row].tolist() == [0] * (tables.width - len(expected)) + [1] * len(expected)
        assert set(ids[row][mask[row] == 0].tolist()) <= {tok.pad_token_id}


def test_a_class_name_reads_the_same_in_caption_prompts_and_class_prompts():
    """One rule (`spoken_label`): "sports_car" is "sports car" in a caption prompt, as in the LM's class prompts."""
    from imgllm.language.scoring import fill_templates

    encode = lambda text: [ord(c) for c in text]
    names = ("sports_car", "cat")
    tables = pipeline.prompts.tokenize_template(encode, "A photo of a {label}.", names, 1, 0)
    ids, mask = pipeline.prompts.assemble_prompts(tables, jnp.array([[0]], jnp.int32), jnp.array([[90]], jnp.int32), 0)
    text = "".join(chr(i) for i in np.asarray(ids)[0][np.asarray(mask)[0] == 1])
    assert (
        text
        == pipeline.prompts.fill_template("A photo of a {label}.", ["sports_car"], [90])
        == "A photo of a sports car."
    )
    assert fill_templates(names, ["A photo of a {label}."])[0] == [text]


def test_prompt_with_bos_and_empty_template_is_just_bos():
    tables = pipeline.prompts.tokenize_template(lambda text: [ord(c) for c in text], "", CLASS_NAMES, 1, 0, bos_id=7)
    ids, mask = pipeline.prompts.assemble_prompts(tables, jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), 0)
    assert np.asarray(ids).tolist() == [[7], [7]] and np.asarray(mask).tolist() == [[1], [1]]


@pytest.mark.parametrize(
    "template, message",
    [
        ("A {colour} photo", "unknown slot {colour}"),
        ("A photo of a {label3}.", "needs top_k >= 3"),
        ("{label:>10}", "unknown slot"),
    ],
)
def test_bad_template_is_named(template, message):
    with pytest.raises(ValueError, match=message):
        pipeline.prompts.tokenize_template(lambda text: [1], template, CLASS_NAMES, 2, 0)


def test_percentages_round_and_clip():
    probs = jnp.array([0.0, 0.004, 0.005001, 0.5, 0.999, 1.0])
    assert np.asarray(pipeline.prompts.probability_percents(probs)).tolist() == [0, 0, 1, 50, 100, 100]


# ----------------------------------------------------------------------------------------------- the pipeline


def stage_by_stage(loaded: pc.PipelineCheckpoint, spec: pipeline.PipelineSpec, images: np.ndarray, rng) -> dict:
    """The reference: every stage run on its own (CNN, softmax + top-k on the host, prompts from the filled-in
    strings through the tokenizer, then generate_tokens)."""
    from imgllm.data import augment
    from imgllm.language.decoding import generate_tokens

    logits, features = jax.jit(lambda v, x: spec.cnn.apply(v, x, train=False))(
        loaded.params["cnn"], augment.normalize(jnp.asarray(images))
    )
    probs = np.asarray(jax.nn.softmax(logits))
    label_ids = np.argsort(-probs, axis=1, kind="stable")[:, : spec.top_k]
    label_probs = np.take_along_axis(probs, label_ids, axis=1)
    width, pad = spec.prompts.width, loaded.config["pad_id"]
    prompt_ids = np.full((len(images), width), pad, np.int32)
    prompt_mask = np.zeros((len(images), width), np.int32)
    for row in range(len(images)):
        text = pipeline.prompts.fill_template(
            spec.prompts.template,
            [CLASS_NAMES[c] for c in label_ids[row]],
            np.round(label_probs[row] * 100).astype(int),
        )
        ids = ([loaded.config["bos_id"]] if loaded.config["prepend_bos"] else []) + (
            loaded.tokenizer.encode(text) if spec.prompts.template else []
        )
        prompt_ids[row, width - len(ids) :], prompt_mask[row, width - len(ids) :] = ids, 1
    prefix, lm_scores = None, None
    if "bridge" in loaded.params:
        from imgllm.language.scoring import build_prompt_table, score_class_prompts

        prefix = spec.bridge.apply({"params": loaded.params["bridge"]}, features)
        table = build_prompt_table(loaded.tokenizer.encode, loaded.config["eos_id"], CLASS_NAMES)
        lm_scores = np.asarray(score_class_prompts(loaded.params["lm"], spec.lm_config, table, prefix))
    tokens, _ = jax.jit(
        lambda p, i, m, r, x: generate_tokens(p, spec.lm_config, i, m, r, spec.generation, prefix_embeds=x)
    )(loaded.params["lm"], prompt_ids, prompt_mask, rng, prefix)
    return dict(
        logits=np.asarray(logits),
        label_ids=label_ids,
        lm_scores=lm_scores,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        caption_ids=np.asarray(tokens).reshape(len(images), -1, tokens.shape[-1]),
    )


@pytest.mark.parametrize("bridge", [False, True], ids=["prompt", "visual_prefix"])
def test_pipeline_equals_stages_and_compiles_once(tmp_path, bridge):
    loaded = tiny_pipeline(tmp_path, bridge=bridge, template="" if bridge else "A photo of a {label}, not {label2}.")
    spec = loaded.spec(lm_classify=bridge)
    captioner = pipeline.make_captioner(spec)
    rng = jax.random.PRNGKey(3)
    first = jax.device_get(captioner(loaded.params, random_images(0, 4), rng))
    out = jax.device_get(captioner(loaded.params, random_images(1, 4), rng))
    assert captioner._cache_size() == 1  # a second batch of the same shape does not compile again
    assert not np.array_equal(first["logits"], out["logits"])

    reference = stage_by_stage(loaded, spec, random_images(1, 4), rng)
    np.testing.assert_allclose(out["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["label_ids"], reference["label_ids"])
    np.testing.assert_array_equal(out["prompt_ids"], reference["prompt_ids"])
    np.testing.assert_array_equal(out["prompt_mask"], reference["prompt_mask"])
    np.testing.assert_array_equal(out["caption_ids"], reference["caption_ids"])
    assert out["caption_ids"].shape == (4, 1, loaded.config["max_new_tokens"])
    if bridge:  # the LM's classification by prompt likelihood, computed in the same jitted function
        np.testing.assert_allclose(out["lm_scores"], reference["lm_scores"], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(out["lm_label_ids"], reference["lm_scores"].argmax(-1))
    else:
        assert "lm_label_ids" not in out
    assert np.all(np.diff(out["label_probs"], axis=1) <= 0)
    # inference_params (the LM kernels in the [out, in] layout on CPU) change the speed, not the results
    fast = jax.device_get(captioner(pipeline.inference_params(loaded.params), random_images(1, 4), rng))
    np.testing.assert_array_equal(fast["caption_ids"], out["caption_ids"])
    if bridge:
        np.testing.assert_allclose(fast["lm_scores"], out["lm_scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "decoding", [dict(num_beams=1), dict(num_beams=2), dict(do_sample=True, top_p=0.9)], ids=["greedy", "beam", "top_p"]
)
def test_label_only_prompts_share_the_lm_work_per_class_with_the_same_tokens(tmp_path, decoding):
    """Greedy and beam captions are made once per class; sampled ones share the class prompts' prefill."""
    from imgllm.language.decoding import GenerationConfig

    loaded = tiny_pipeline(tmp_path, template="A photo of a {label}.")
    generation = GenerationConfig(
        max_new_tokens=loaded.config["max_new_tokens"],
        **decoding,
        eos_token_id=loaded.config["eos_id"],
        pad_token_id=loaded.config["pad_id"],
    )
    spec = loaded.spec(generation)
    images = random_images(5, 16)  # more images than the 10 classes
    assert pipeline.caption.prompts_are_per_class(spec, False, num_classes=len(CLASS_NAMES), batch=len(images))
    out = jax.device_get(pipeline.make_captioner(spec)(loaded.params, images, jax.random.PRNGKey(0)))
    reference = stage_by_stage(loaded, spec, images, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out["label_ids"], reference["label_ids"])
    assert len(set(reference["label_ids"][:, 0])) >= 3  # several classes, so the gather is really tested
    assert len({tuple(c) for c in reference["caption_ids"][:, 0]}) >= 2
    np.testing.assert_array_equal(out["caption_ids"], reference["caption_ids"])


def test_visual_prefix_changes_the_captions(tmp_path):
    """The bridge branch is really taken: zeroing the mapper's output layer changes what is generated."""
    loaded = tiny_pipeline(tmp_path, bridge=True, template="")
    spec = loaded.spec(lm_classify=True)  # the spec of the test above: its compiled function is reused
    images, rng = random_images(2, 4), jax.random.PRNGKey(0)
    captioner = pipeline.make_captioner(spec)
    with_prefix = jax.device_get(captioner(loaded.params, images, rng))["caption_ids"]
    zeroed = jax.tree.map(np.zeros_like, loaded.params["bridge"])
    without = jax.device_get(captioner({**loaded.params, "bridge": zeroed}, images, rng))["caption_ids"]
    assert not np.array_equal(with_prefix, without)


def test_bridge_params_without_bridge_module_is_an_error(tmp_path):
    loaded = tiny_pipeline(tmp_path)
    params = {**loaded.params, "bridge": {"fc": np.zeros(3)}}
    with pytest.raises(ValueError, match="PipelineSpec.bridge"):
        pipeline.caption_images(params, random_images(0, 2), jax.random.PRNGKey(0), spec=loaded.spec())


def test_other_image_sizes_are_resized_inside_jit(tmp_path):
    loaded = tiny_pipeline(tmp_path)
    spec = loaded.spec()

    def smooth_images(size):  # low-frequency colour waves: resizing changes them little
        y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        waves = [np.sin(2 * np.pi * (a * y + b * x) + c) for a, b, c in ((1, 0.5, 0), (0.5, 1, 1), (1, 1, 2))]
        image = 127.5 + 120 * np.stack(waves, axis=-1)
        return np.stack([image, image[::-1]]).round().astype(np.uint8)

    fn = jax.jit(lambda p, x: pipeline.caption.cnn_logits_and_features(p["cnn"], x, spec)[0])
    small, big = fn(loaded.params, smooth_images(32)), fn(loaded.params, smooth_images(96))
    other = fn(loaded.params, smooth_images(32)[::-1])
    assert np.abs(big - small).max() < 0.2 * np.abs(other - small).max()


def test_decode_captions_cuts_at_eos():
    ids = np.array([[[5, 6, 0, 7], [8, 0, 0, 0]]])
    decoded = pipeline.caption.decode_captions(lambda t: ",".join(map(str, t)), ids, eos_id=0, pad_id=0)
    assert decoded == [["5,6", "8"]]


# ----------------------------------------------------------------------------------------------- checkpoint


def test_pipeline_checkpoint_round_trip(tmp_path):
    params, config = tiny_pipeline_parts(bridge=True, template="")
    out = pc.save_pipeline_checkpoint(tmp_path / "ckpt", params, config, tiny_tokenizer())
    loaded = pc.load_pipeline(out)
    assert loaded.config == config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), params)
    assert loaded.tokenizer.encode("A photo of a cat.") == tiny_tokenizer().encode(
        "A photo of a cat.", add_special_tokens=False
    )
    with pytest.raises(FileExistsError):
        pc.save_pipeline_checkpoint(tmp_path / "ckpt", params, config, tiny_tokenizer())


def test_lm_classification_without_bridge_is_named(tmp_path):
    with pytest.raises(ValueError, match="no bridge"):
        tiny_pipeline(tmp_path).spec(lm_classify=True)


def test_lm_classification_scores_the_checkpoints_class_prompt_templates(tmp_path):
    """spec(lm_classify=True) scores the class_prompt_templates stored in the checkpoint (a captioner's export
    writes the ones it was trained with); scoring's defaults only when the checkpoint has none."""
    from imgllm.language.scoring import DEFAULT_TEMPLATES, build_prompt_table

    templates = ("{label}!", "look, a {label} here")
    loaded = tiny_pipeline(tmp_path, bridge=True, template="", class_prompt_templates=templates)
    assert loaded.config["class_prompt_templates"] == list(templates)
    table = loaded.spec(lm_classify=True).lm_class_prompts

    def prompt_table(templates):
        return build_prompt_table(loaded.tokenizer.encode, loaded.config["eos_id"], CLASS_NAMES, templates)

    assert table == prompt_table(templates) and table != prompt_table(DEFAULT_TEMPLATES)
    assert hash(table) == hash(prompt_table(templates))  # a static spec field: equal tables, one compilation
    without = tiny_pipeline(tmp_path, bridge=True, template="")
    assert without.spec(lm_classify=True).lm_class_prompts == prompt_table(DEFAULT_TEMPLATES)


def test_not_a_pipeline_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pipeline checkpoint"):
        pc.load_pipeline(tmp_path)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unique"):
        pc.make_pipeline_config(cnn={"preset": "tiny"}, lm={}, class_names=["a", "a"], eos_id=0, pad_id=0)
    with pytest.raises(ValueError, match="unknown slot"):
        pc.make_pipeline_config(
            cnn={"preset": "tiny"}, lm={}, class_names=["a", "b"], eos_id=0, pad_id=0, template="{what}"
        )


@pytest.mark.slow
def test_assemble_from_a_train_workdir_and_a_gpt2_directory(tmp_path):
    """assemble (what `infer.py assemble --classifier --lm` runs): a classifier trained by train.py's loop + a Hugging
    Face GPT-2 directory → one checkpoint holding exactly their weights (read without building the training task:
    the same arrays as the run's own evaluation restores), the run's class names and normalisation, the tokenizer.
    The command line itself is run in tests/test_captions.py."""
    from imgllm.configs import cnn_tiny
    from imgllm.language import hf
    from imgllm.train.evaluation import restore_for_eval
    from imgllm.train.export import assemble_pipeline_checkpoint
    from imgllm.train.loop import train_and_evaluate

    config = cnn_tiny.get_config()
    config.num_epochs, config.eval_split = 0.25, ""  # two steps, no evaluation: only the checkpoint matters
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    params, _ = tiny_pipeline_parts()
    lm_dir = hf.save_gpt2(tmp_path / "gpt2", tiny_lm_config(), params["lm"], tokenizer=tiny_tokenizer())

    out = assemble_pipeline_checkpoint(
        tmp_path / "ckpt", classifier=workdir, lm=str(lm_dir), top_k=2, template="This is {topk}."
    )
    loaded = pc.load_pipeline(out)
    _, meta, _, variables = restore_for_eval(workdir)
    assert loaded.class_names == tuple(meta["task"]["class_names"])
    jax.tree.map(np.testing.assert_array_equal, loaded.params["cnn"], jax.device_get(variables))
    jax.tree.map(np.testing.assert_array_equal, loaded.params["lm"], params["lm"])
    assert loaded.config["mean"] == list(config.normalization.mean)
    assert loaded.config["template"] == "This is {topk}." and loaded.config["top_k"] == 2
    spec = loaded.spec()
    assert spec.prompts.top_k == 2 and spec.lm_config == tiny_lm_config()
    assert "bridge" not in loaded.params


def test_label_probabilities_use_the_checkpoints_head_temperature(tmp_path):
    """cnn_temperature (the classifier run's fitted T) makes the probabilities softmax(logits / T); the ranking and
    the raw logits stay as they are."""
    loaded = tiny_pipeline(tmp_path)
    hot = pc.PipelineCheckpoint(
        params=loaded.params, config={**loaded.config, "cnn_temperature": 2.5}, tokenizer=loaded.tokenizer
    )
    images, rng = random_images(3, 2), jax.random.PRNGKey(0)
    plain = jax.device_get(pipeline.caption_images(loaded.params, images, rng, spec=loaded.spec()))
    scaled = jax.device_get(pipeline.caption_images(hot.params, images, rng, spec=hot.spec()))
    np.testing.assert_array_equal(plain["logits"], scaled["logits"])
    np.testing.assert_array_equal(plain["label_ids"], scaled["label_ids"])
    expected = jax.nn.softmax(plain["logits"] / 2.5, axis=-1)
    np.testing.assert_allclose(
        scaled["label_probs"], np.take_along_axis(np.asarray(expected), plain["label_ids"], 1), rtol=1e-5
    )
    with pytest.raises(ValueError, match="cnn_temperature"):
        pc.make_pipeline_config(**{**tiny_config_arguments(), "cnn_temperature": 0.0})


def tiny_config_arguments() -> dict:
    tok = tiny_tokenizer()
    return dict(
        cnn={"preset": "tiny", "num_classes": len(CLASS_NAMES)},
        lm=tiny_lm_config().to_dict(),
        class_names=CLASS_NAMES,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
    )


def test_a_format_1_checkpoint_made_before_the_llama_family_still_loads(tmp_path):
    """Format /2 adds Llama-family LMs (the "lm" config's model_type picks the model); a /1 checkpoint, whose LM is
    always GPT-2, reads as before. Another format is refused by name."""
    params, config = tiny_pipeline_parts()
    path = pc.save_pipeline_checkpoint(tmp_path / "ckpt", params, config, tiny_tokenizer())
    assert pc.read_pipeline_config(path)["format"] == "imgllm-pipeline/2"
    metadata = os.path.join(path, "config", "metadata")
    with open(metadata) as f:
        stored = json.load(f)
    for version, loads in (("imgllm-pipeline/1", True), ("imgllm-pipeline/9", False)):
        with open(metadata, "w") as f:
            json.dump({**stored, "format": version}, f)
        if loads:
            assert pc.load_pipeline(path).lm_config() == tiny_lm_config()
        else:
            with pytest.raises(ValueError, match="imgllm-pipeline/9"):
                pc.load_pipeline(path)
