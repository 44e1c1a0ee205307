"""Parity of the Llama family (imgllm/language/llama.py) with transformers' PyTorch models: logits with left padding
and grouped-query attention, greedy and beam tokens, tied and untied heads, rotary scaling on and off, q/k/v biases
(Qwen2), Hugging Face directories in and out, and the XLA:CPU kernel layout.

Each reference is a tiny model that transformers builds and saves itself (every parameter random), so these tests
need torch and run offline.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_torch_gpt2
from test_parity import hf_generate, our_generate, positions_from_mask, torch_logits

from imgllm.language import decoding as generate
from imgllm.language import hf, llama_weights
from imgllm.language.llama import LlamaConfig, rope_frequencies
from imgllm.language.matmul_cpu import kernels_out_in
from imgllm.language.model import config_from_dict, model_and_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGIT_TOLERANCE = 1e-4
SIZES = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# name -> (transformers config class, its arguments): every variant the issue names.
VARIANTS = {
    "llama-gqa-untied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied-llama3rope-bias": (
        "LlamaConfig",
        dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE, attention_bias=True),
    ),
    "llama-linear-rope-mlpbias": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4, rope_theta=500.0, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
        ),
    ),
    "qwen2-qkv-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False)),
}
PROMPTS = ["the cat sat on the", "a dog", "birds sing in the morning; deer"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory, tiny_tokenizer):
    """(name, transformers model, its saved directory, our (config, params) loaded from that directory)."""
    class_name, settings = VARIANTS[request.param]
    torch.manual_seed(0)
    hf_config = getattr(transformers, class_name)(
        vocab_size=len(tiny_tokenizer), bos_token_id=0, eos_token_id=0, **SIZES, **settings
    )
    model_class = {
        "LlamaConfig": transformers.LlamaForCausalLM,
        "Qwen2Config": transformers.Qwen2ForCausalLM,
        "MistralConfig": transformers.MistralForCausalLM,
    }[class_name]
    model = randomize_torch_gpt2(model_class(hf_config))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return request.param, model, path, llama_weights.load_llama(path)


@pytest.fixture(scope="module")
def prompt_batch(tiny_tokenizer):
    batch = tiny_tokenizer(PROMPTS, padding=True, return_tensors="np")
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def our_logits(config, params, input_ids, attention_mask=None, position_ids=None):
    def forward(params, input_ids, attention_mask, position_ids):
        model, params = model_and_params(params, config)
        return model.apply({"params": params}, input_ids, attention_mask=attention_mask, position_ids=position_ids)[0]

    as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return np.asarray(jax.jit(forward)(params, as_jnp(input_ids), as_jnp(attention_mask), as_jnp(position_ids)))


def test_config_reads_the_variant(variant):
    name, model, _, (config, params) = variant
    assert config.num_cache_heads == model.config.num_key_value_heads
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in params) != config.tie_word_embeddings
    assert config.qkv_bias == (name.startswith("qwen2") or "bias" in name and "mlpbias" not in name)
    if name == "mistral":
        assert config.n_positions == SIZES["max_position_embeddings"]  # the window is longer: no effect


def test_logits_match_with_left_padding(variant, prompt_batch):
    _, model, _, (config, params) = variant
    input_ids, attention_mask = prompt_batch
    positions = positions_from_mask(attention_mask)
    got = our_logits(config, params, input_ids, attention_mask, positions)
    want = torch_logits(model, input_ids, attention_mask, positions)
    real = attention_mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= LOGIT_TOLERANCE
    row = int(np.argmin(real.sum(1)))  # padding is really masked: the shortest prompt alone gives the same
    alone = our_logits(config, params, input_ids[row : row + 1, real[row]])
    assert np.abs(got[row, real[row]] - alone[0]).max() <= LOGIT_TOLERANCE


def test_long_positions_match(variant):
    """Positions past the llama3 scaling's original context and up to the model's limit."""
    _, model, _, (config, params) = variant
    input_ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 60))
    diff = np.abs(our_logits(config, params, input_ids) - torch_logits(model, input_ids)).max()
    assert diff <= LOGIT_TOLERANCE


@pytest.mark.parametrize("num_beams, num_return_sequences", [(1, 1), (3, 2)], ids=["greedy", "beam3"])
def test_generation_is_token_identical(variant, prompt_batch, num_beams, num_return_sequences):
    _, model, _, (config, params) = variant
    input_ids, attention_mask = prompt_batch
    settings = dict(
        max_new_tokens=8,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.vocab_size - 1,
    )
    want = hf_generate(model, input_ids, attention_mask, **settings)
    got = our_generate(config, params, input_ids, attention_mask, **settings)
    np.testing.assert_array_equal(got, want)


def test_cpu_kernel_layout_gives_the_same_logits_and_tokens(variant, prompt_batch):
    _, _, _, (config, params) = variant
    input_ids, attention_mask = prompt_batch
    fast = kernels_out_in(params)
    np.testing.assert_allclose(our_logits(config, fast, input_ids), our_logits(config, params, input_ids), atol=1e-5)
    settings = dict(max_new_tokens=6, eos_token_id=config.eos_token_id, pad_token_id=config.vocab_size - 1)
    np.testing.assert_array_equal(
        our_generate(config, fast, input_ids, attention_mask, **settings),
        our_generate(config, params, input_ids, attention_mask, **settings),
    )


def test_saved_directory_loads_in_transformers_with_the_same_logits(variant, tmp_path):
    """Parameters changed here (as training would) and saved give transformers the same logits."""
    _, model, _, (config, params) = variant
    rng = np.random.default_rng(3)
    trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    out = llama_weights.save_llama(tmp_path / "saved", config, trained)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    input_ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 11))
    assert np.abs(our_logits(config, trained, input_ids) - torch_logits(reloaded, input_ids)).max() <= LOGIT_TOLERANCE
    again_config, again = llama_weights.load_llama(out)
    assert again_config == config
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, trained))


def test_config_round_trips_through_a_config_dict(variant):
    _, _, _, (config, _) = variant
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}):
        hf_config = transformers.LlamaConfig(**SIZES, rope_scaling=scaling, rope_theta=500000.0)
        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
        config = LlamaConfig.from_dict(hf_config.to_dict())
        np.testing.assert_allclose(rope_frequencies(config), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "needs 'low_freq_factor'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"model_type": "gemma"}, "model_type='gemma'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}, "rope_theta": 2.0}, "disagrees"),
        ({"use_sliding_window": True, "model_type": "qwen2"}, "use_sliding_window"),
    ],
)
def test_config_values_that_would_compute_differently_are_refused(change, message):
    base = transformers.LlamaConfig(**SIZES).to_dict()
    base.pop("rope_parameters")  # the older spelling of the rotary settings (rope_theta, rope_scaling)
    base["rope_theta"] = 10000.0
    with pytest.raises(ValueError, match=f"^cfg.json: .*{message}"):
        config_from_dict({**base, **change}, source="cfg.json")


def test_a_config_claiming_more_layers_than_the_weights_fails_before_building_the_model(variant, tmp_path):
    _, _, path, _ = variant
    import shutil

    target = tmp_path / "forged"
    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))
    with pytest.raises(hf.CheckpointMismatchError, match="num_hidden_layers=100000, but the tensors show 2"):
        llama_weights.load_llama(target)


def test_visual_prefix_scores_and_greedy_captions_match_transformers_inputs_embeds(variant):
    """The visual-prefix paths (scoring and captioning) on a Llama: [prefix][tokens] as inputs_embeds in both."""
    from imgllm.language.scoring import prefixed_token_log_probs

    _, model, _, (config, params) = variant
    rng = np.random.default_rng(4)
    prefix = rng.normal(0, 0.5, (2, 3, config.n_embd)).astype(np.float32)
    ids = rng.integers(1, config.vocab_size, (2, 6)).astype(np.int32)
    got = np.asarray(
        jax.jit(prefixed_token_log_probs, static_argnums=1)(params, config, jnp.asarray(prefix), jnp.asarray(ids))
    )
    with torch.no_grad():
        embeds = torch.cat([torch.as_tensor(prefix), model.get_input_embeddings()(torch.as_tensor(ids).long())], 1)
        log_probs = torch.log_softmax(model(inputs_embeds=embeds).logits, -1)[:, prefix.shape[1] : -1].numpy()
    want = np.take_along_axis(log_probs, ids[:, 1:, None], -1)[..., 0]
    assert np.abs(got - want).max() <= LOGIT_TOLERANCE

    settings = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=config.vocab_size - 1)
    gen_config = generate.GenerationConfig(**settings)
    tokens, _ = jax.jit(generate.generate_tokens, static_argnums=(1, 5))(
        params,
        config,
        jnp.asarray(ids),
        jnp.ones_like(jnp.asarray(ids)),
        jax.random.key(0),
        gen_config,
        prefix_embeds=jnp.asarray(prefix),
    )
    with torch.no_grad():
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        want_tokens = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **settings).numpy()
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens[:, -settings["max_new_tokens"] :])


def test_bfloat16_compute_stays_close_to_float32(variant, prompt_batch):
    """Mixed precision reaches every layer of the Llama (RMSNorm, rotary, grouped attention, SwiGLU): bfloat16
    logits follow float32's, and the float32 parts (softmax, norms' statistics, logits) keep them finite."""
    import dataclasses

    _, _, _, (config, params) = variant
    input_ids, _ = prompt_batch
    low = our_logits(dataclasses.replace(config, dtype=jnp.bfloat16), params, input_ids)
    full = our_logits(config, params, input_ids)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    error = np.abs(low - full).max()
    assert 0 < error < 0.15 * full.std()  # really computed in bfloat16 (measured: 0.02-0.04 of a 0.55-0.59 std)
