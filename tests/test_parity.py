"""Parity with transformers' PyTorch GPT-2: logits, exported checkpoints, greedy and beam generation.

The reference is `transformers.GPT2LMHeadModel` loaded from the same tiny directory (written by
transformers itself, every parameter random), so these tests need torch and run offline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.language import decoding as generate
from imgllm.language import hf
from imgllm.language.gpt2 import GPT2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax.config.update("jax_enable_x64", False)

LOGIT_TOLERANCE = 1e-4  # max abs difference, float32
PROMPTS = ["the cat sat on the", "a dog", "birds sing in the morning; deer"]


@pytest.fixture(scope="module")
def torch_model(tiny_hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="module")
def ours(tiny_hf_dir):
    return hf.load_gpt2(tiny_hf_dir)


@pytest.fixture(scope="module")
def prompt_batch(tiny_hf_dir):
    """Left-padded token ids and attention mask of PROMPTS (different lengths), as numpy int32."""
    batch = hf.load_tokenizer(tiny_hf_dir)(PROMPTS, padding=True, return_tensors="np")
    assert len(set(batch["attention_mask"].sum(1))) == len(PROMPTS)  # really different lengths
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def our_logits(config, params, input_ids, attention_mask=None, position_ids=None):
    def forward(params, input_ids, attention_mask, position_ids):
        return GPT2(config).apply(
            {"params": params}, input_ids, attention_mask=attention_mask, position_ids=position_ids
        )[0]

    as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return np.asarray(jax.jit(forward)(params, as_jnp(input_ids), as_jnp(attention_mask), as_jnp(position_ids)))


def torch_logits(model, input_ids, attention_mask=None, position_ids=None):
    as_torch = lambda x: None if x is None else torch.as_tensor(np.asarray(x, np.int64))  # noqa: E731
    with torch.no_grad():
        return model(
            as_torch(input_ids), attention_mask=as_torch(attention_mask), position_ids=as_torch(position_ids)
        ).logits.numpy()


def positions_from_mask(attention_mask):
    """Position ids that start at 0 on each row's first real token (as transformers' generate makes them)."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)


def test_logits_match_without_mask(torch_model, ours):
    config, params = ours
    input_ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, 17))
    diff = np.abs(our_logits(config, params, input_ids) - torch_logits(torch_model, input_ids)).max()
    assert diff <= LOGIT_TOLERANCE


@pytest.mark.parametrize("explicit_positions", [True, False], ids=["positions-from-mask", "default-positions"])
def test_logits_match_with_left_padding(torch_model, ours, prompt_batch, explicit_positions):
    config, params = ours
    input_ids, attention_mask = prompt_batch
    position_ids = positions_from_mask(attention_mask) if explicit_positions else None
    got = our_logits(config, params, input_ids, attention_mask, position_ids)
    want = torch_logits(torch_model, input_ids, attention_mask, position_ids)
    real = attention_mask.astype(bool)  # outputs at padding positions are meaningless in both
    assert np.abs(got[real] - want[real]).max() <= LOGIT_TOLERANCE
    if explicit_positions:  # padding really is masked: the most padded row matches its prompt run alone
        row = int(np.argmin(real.sum(1)))
        alone = our_logits(config, params, input_ids[row : row + 1, real[row]])
        assert np.abs(got[row, real[row]] - alone[0]).max() <= LOGIT_TOLERANCE


def test_exported_model_loads_in_transformers_with_the_same_logits(ours, tmp_path):
    """A model changed here (as training would) and exported gives transformers the same logits."""
    config, params = ours
    rng = np.random.default_rng(3)
    trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    out = hf.save_gpt2(tmp_path / "trained", config, trained)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    input_ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 11))
    diff = np.abs(our_logits(config, trained, input_ids) - torch_logits(model, input_ids)).max()
    assert diff <= LOGIT_TOLERANCE


# ----------------------------------------------------------------------------- generation


def hf_generate(model, input_ids, attention_mask, **settings):
    """transformers' new tokens [B * num_return, max_new_tokens], padded with pad_token_id after an early stop."""
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(input_ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
            do_sample=False,
            **settings,
        ).numpy()
    new = out[:, input_ids.shape[1] :]
    return np.pad(
        new, ((0, 0), (0, settings["max_new_tokens"] - new.shape[1])), constant_values=settings["pad_token_id"]
    )


def our_generate(config, params, input_ids, attention_mask, sampler="auto", **settings):
    gen_config = generate.GenerationConfig(sampler=sampler, **settings)
    run = jax.jit(generate.generate_tokens, static_argnums=(1, 5))
    tokens, _ = run(params, config, jnp.asarray(input_ids), jnp.asarray(attention_mask), jax.random.key(0), gen_config)
    return np.asarray(tokens)


def frequent_generated_token(model, input_ids, attention_mask, **settings):
    """The token transformers generates most often with `settings`: used as EOS so that some rows stop early."""
    values, counts = np.unique(hf_generate(model, input_ids, attention_mask, **settings), return_counts=True)
    return int(values[np.argmax(counts)])


@pytest.mark.parametrize(
    "early_eos, num_beams, num_return_sequences, length_penalty",
    [
        (False, 1, 1, 1.0),
        (False, 3, 2, 1.0),
        (True, 1, 1, 1.0),
        (True, 3, 1, 0.5),  # a length penalty below 1 lets short finished beams win, so EOS really ends some
    ],
    ids=["greedy", "beam3-return2", "greedy-early-eos", "beam3-early-eos"],
)
@pytest.mark.parametrize("sampler", ["plain", "cpu"])
def test_generation_is_token_identical(
    torch_model, ours, prompt_batch, early_eos, num_beams, num_return_sequences, length_penalty, sampler
):
    config, params = ours
    input_ids, attention_mask = prompt_batch
    # A pad id other than 0 and other than EOS: transformers' beam search fills with `pad_token_id or eos`,
    # which would turn a pad id of 0 into EOS; and a distinct pad shows that padding starts after EOS.
    settings = dict(
        max_new_tokens=8,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.vocab_size - 1,
    )
    if early_eos:
        settings["eos_token_id"] = frequent_generated_token(torch_model, input_ids, attention_mask, **settings)
    want = hf_generate(torch_model, input_ids, attention_mask, **settings)
    if early_eos:  # the case under test really happens: some row stops before max_new_tokens
        assert (want[:, :-1] == settings["eos_token_id"]).any() and (want == settings["pad_token_id"]).any()
    got = our_generate(config, params, input_ids, attention_mask, sampler=sampler, **settings)
    np.testing.assert_array_equal(got, want)
