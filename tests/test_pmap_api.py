"""The public pure functions run under a user's own `jax.pmap` and give what the jit path gives.

imgllm's trainer and `make_captioner` use jit + Mesh + NamedSharding; researchers may still `pmap` the pure
functions. The check runs in a subprocess with 8 simulated CPU devices (XLA's device count is fixed when jax
starts): the CNN's apply, `generate_tokens` (greedy) and `caption_images` (with and without a visual
prefix), each on a batch split 8 ways under pmap, against the same batch under jit on one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from imgllm.bridge import PrefixMapper
    from imgllm.language.decoding import GenerationConfig, generate_tokens
    from imgllm.language.gpt2 import GPT2Config, init_params
    from imgllm.pipeline import PipelineSpec, caption_images
    from imgllm.pipeline.prompts import tokenize_template
    from imgllm.vision.cnn import cnn_preset

    assert jax.device_count() == 8, jax.devices()
    DEVICES, PER_DEVICE = 8, 2
    BATCH = DEVICES * PER_DEVICE
    CLASSES = ("circle", "square", "triangle")

    def split(x):
        return x.reshape(DEVICES, PER_DEVICE, *x.shape[1:])

    def merged(x):
        return np.asarray(x).reshape(BATCH, *x.shape[2:])

    def noisy(tree, seed):
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(x.dtype), tree)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    cnn = cnn_preset("tiny", num_classes=len(CLASSES))
    cnn_variables = jax.device_get(cnn.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    cnn_variables = {**cnn_variables, "params": noisy(cnn_variables["params"], 1)}
    lm_config = GPT2Config.tiny(vocab_size=64, bos_token_id=0, eos_token_id=0, initializer_range=0.5)
    lm_params = jax.device_get(init_params(lm_config, jax.random.PRNGKey(1)))
    mapper = PrefixMapper(prefix_length=2, lm_dim=lm_config.n_embd, hidden=16)
    bridge_params = jax.device_get(mapper.init(jax.random.PRNGKey(2), jnp.zeros((1, 16)))["params"])

    # 1. The CNN's apply.
    x = (images.astype(np.float32) - 128.0) / 64.0
    apply = lambda v, x: cnn.apply(v, x, train=False)
    jit_logits, jit_features = jax.jit(apply)(cnn_variables, x)
    pmap_logits, pmap_features = jax.pmap(apply, in_axes=(None, 0))(cnn_variables, split(x))
    np.testing.assert_allclose(merged(pmap_logits), jit_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged(pmap_features), jit_features, rtol=1e-5, atol=1e-5)

    # 2. generate_tokens: greedy decoding of left-padded prompts (beam search runs the same loop).
    prompts = rng.integers(1, 64, (BATCH, 5)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[::3, :2] = 0
    prompts = np.where(mask == 1, prompts, 0)
    key = jax.random.PRNGKey(3)
    generation = GenerationConfig(max_new_tokens=6, eos_token_id=0, pad_token_id=0)
    run = functools.partial(generate_tokens, model_config=lm_config, gen_config=generation)
    decode = lambda p, i, m, k: run(p, input_ids=i, attention_mask=m, rng=k)
    jit_tokens, jit_scores = jax.jit(decode)(lm_params, prompts, mask, key)
    pmap_tokens, pmap_scores = jax.pmap(decode, in_axes=(None, 0, 0, None))(lm_params, split(prompts), split(mask),
                                                                            key)
    np.testing.assert_array_equal(merged(pmap_tokens), jit_tokens)
    np.testing.assert_allclose(merged(pmap_scores), jit_scores, rtol=1e-4, atol=1e-4)

    # 3. caption_images: label prompts, and a visual prefix with BOS-only prompts.
    encode = lambda text: [1 + (ord(c) % 60) for c in text]
    generation = GenerationConfig(max_new_tokens=5, eos_token_id=0, pad_token_id=0)
    cases = [
        (tokenize_template(encode, "a {label} ({prob}%)", CLASSES, 2, 0), None,
         {"cnn": cnn_variables, "lm": lm_params}),
        (tokenize_template(encode, "", CLASSES, 1, 0, bos_id=0), mapper,
         {"cnn": cnn_variables, "lm": lm_params, "bridge": bridge_params}),
    ]
    for prompt_tables, bridge, params in cases:
        spec = PipelineSpec(cnn=cnn, lm_config=lm_config, prompts=prompt_tables, generation=generation, pad_id=0,
                            bridge=bridge)
        caption = functools.partial(caption_images, spec=spec)
        expected = jax.jit(caption)(params, images, key)
        got = jax.pmap(caption, in_axes=(None, 0, None))(params, split(images), key)
        assert set(got) == set(expected), (sorted(got), sorted(expected))
        for name in ("label_ids", "prompt_ids", "prompt_mask", "caption_ids"):
            np.testing.assert_array_equal(merged(got[name]), expected[name], err_msg=name)
        for name in ("logits", "label_probs", "caption_scores"):
            np.testing.assert_allclose(merged(got[name]), expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    print("PMAP_MATCHES_JIT")
""")


@pytest.mark.slow
def test_public_functions_under_pmap_match_jit():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PMAP_MATCHES_JIT" in result.stdout
