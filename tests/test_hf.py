"""imgllm.language.hf: key mapping, every load/save error by name, round trips, tokenizer, hub cache path (offline)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from imgllm.language import hf
from imgllm.language.gpt2 import GPT2Config

jax.config.update("jax_enable_x64", False)


def copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    """Copy a checkpoint directory, rewriting its tensors ({key: np.ndarray}) and/or config dict."""
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        path = os.path.join(dst, hf.SAFETENSORS_FILE)
        save_file(edit_tensors(load_file(path)), path, metadata={"format": "pt"})
    if edit_config is not None:
        path = os.path.join(dst, hf.CONFIG_FILE)
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(edit_config(config), f)
    return dst


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- key mapping (no checkpoint)


@pytest.mark.parametrize(
    "path, key",
    [
        (("wte", "embedding"), "wte.weight"),
        (("wpe", "embedding"), "wpe.weight"),
        (("h_0", "ln_1", "scale"), "h.0.ln_1.weight"),
        (("h_11", "attn", "c_attn", "kernel"), "h.11.attn.c_attn.weight"),
        (("h_3", "mlp", "c_proj", "bias"), "h.3.mlp.c_proj.bias"),
        (("ln_f", "bias"), "ln_f.bias"),
    ],
)
def test_hf_key_for_path(path, key):
    assert hf.hf_key_for_path(path) == key


def test_expected_keys_cover_every_parameter_once():
    config = GPT2Config.tiny(n_layer=3)
    expected = hf.expected_hf_shapes(config)
    assert len(expected) == 2 + 12 * 3 + 2
    assert expected["h.2.attn.c_attn.weight"][1].shape == (config.n_embd, 3 * config.n_embd)
    assert expected["wte.weight"][1].shape == (config.vocab_size, config.n_embd)


def test_check_shapes_names_every_problem():
    with pytest.raises(hf.CheckpointMismatchError) as error:
        hf.check_shapes({"a": (2, 3), "b": (4,), "extra": (1,)}, {"a": (2, 3), "b": (5,), "gone": (7, 7)}, "ckpt")
    message = str(error.value)
    assert "missing key 'gone' (expected shape (7, 7))" in message
    assert "unexpected key 'extra' (shape (1,))" in message
    assert "shape mismatch for 'b': found (4,), expected (5,)" in message
    assert "'a'" not in message
    hf.check_shapes({"a": (2, 3)}, {"a": (2, 3)}, "ckpt")  # no error when they agree


# ----------------------------------------------------------------------------- files and errors


def test_pickle_only_directory_is_refused_with_conversion_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2Config.tiny().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError) as error:
        hf.load_gpt2(tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message
    assert f"from_pretrained('{tmp_path}').save_pretrained(" in message


def test_missing_directory_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        hf.load_gpt2(str(tmp_path / "nowhere"))
    save_file({"wte.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load_gpt2(tmp_path)


def test_unsupported_config_is_named(tiny_hf_dir, tmp_path):
    bad = copy_checkpoint(tiny_hf_dir, tmp_path / "c", edit_config=lambda c: {**c, "activation_function": "relu"})
    with pytest.raises(ValueError, match=r"config.json: activation_function='relu'"):
        hf.load_gpt2(bad)


def test_wrong_keys_and_shapes_are_reported_by_name(tiny_hf_dir, tmp_path):
    def damage(tensors):
        tensors["transformer.h.1.mlp.c_fc.bias"] = np.zeros(3, np.float32)  # shape mismatch (expected 128)
        del tensors["transformer.ln_f.weight"]  # missing
        tensors["transformer.h.2.ln_1.weight"] = np.ones(32, np.float32)  # unexpected (only 2 layers)
        return tensors

    with pytest.raises(hf.CheckpointMismatchError) as error:
        hf.load_gpt2(copy_checkpoint(tiny_hf_dir, tmp_path / "c", edit_tensors=damage))
    message = str(error.value)
    assert "shape mismatch for 'h.1.mlp.c_fc.bias': found (3,), expected (128,)" in message
    assert "missing key 'ln_f.weight' (expected shape (32,))" in message
    assert "unexpected key 'h.2.ln_1.weight' (shape (32,))" in message
    assert "3 problem(s)" in message


def test_untied_lm_head_is_refused(tiny_hf_dir, tmp_path):
    def untie(tensors):
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
        return tensors

    with pytest.raises(hf.CheckpointMismatchError, match="'lm_head.weight' differs from 'wte.weight'"):
        hf.load_gpt2(copy_checkpoint(tiny_hf_dir, tmp_path / "c", edit_tensors=untie))


# ----------------------------------------------------------------------------- loading


def test_load_matches_the_torch_state_dict(tiny_hf_dir):
    config, params = hf.load_gpt2(tiny_hf_dir)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (2, 32, 4, 64)
    tensors = load_file(os.path.join(tiny_hf_dir, hf.SAFETENSORS_FILE))
    np.testing.assert_array_equal(
        params["h_1"]["attn"]["c_attn"]["kernel"], tensors["transformer.h.1.attn.c_attn.weight"]
    )
    np.testing.assert_array_equal(params["h_0"]["ln_2"]["scale"], tensors["transformer.h.0.ln_2.weight"])
    np.testing.assert_array_equal(params["wte"]["embedding"], tensors["transformer.wte.weight"])
    abstract = hf.abstract_params(config)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(
        p.shape == a.shape and p.dtype == a.dtype for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract))
    )


def test_unprefixed_keys_buffers_and_tied_head_load_the_same(tiny_hf_dir, tmp_path):
    """The original hub layout: no 'transformer.' prefix, saved attention buffers, lm_head equal to wte."""

    def to_hub_layout(tensors):
        tensors = {key.removeprefix("transformer."): value for key, value in tensors.items()}
        for layer in range(2):
            tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
            tensors[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
        tensors["lm_head.weight"] = tensors["wte.weight"].copy()
        return tensors

    _, expected = hf.load_gpt2(tiny_hf_dir)
    _, params = hf.load_gpt2(copy_checkpoint(tiny_hf_dir, tmp_path / "c", edit_tensors=to_hub_layout))
    assert_trees_equal(params, expected)


def test_half_precision_checkpoint_is_cast_to_float32(tiny_hf_dir, tmp_path):
    half = copy_checkpoint(
        tiny_hf_dir, tmp_path / "c", edit_tensors=lambda t: {k: v.astype(np.float16) for k, v in t.items()}
    )
    _, expected = hf.load_gpt2(tiny_hf_dir)
    _, params = hf.load_gpt2(half)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, np.asarray(want).astype(np.float16).astype(np.float32))


def test_sharded_checkpoint_with_index_loads(tiny_hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_hf_dir, sharded)
    tensors = load_file(str(sharded / hf.SAFETENSORS_FILE))
    os.remove(sharded / hf.SAFETENSORS_FILE)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, str(sharded / name), metadata={"format": "pt"})
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (sharded / hf.SAFETENSORS_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_trees_equal(hf.load_gpt2(sharded)[1], hf.load_gpt2(tiny_hf_dir)[1])


# ----------------------------------------------------------------------------- saving


def test_import_export_import_is_identical(tiny_hf_dir, tmp_path, tiny_tokenizer):
    config, params = hf.load_gpt2(tiny_hf_dir)
    out = hf.save_gpt2(tmp_path / "export", config, params, tokenizer=tiny_tokenizer)
    config_again, params_again = hf.load_gpt2(out)
    assert config_again == config
    assert_trees_equal(params_again, params)
    exported = load_file(os.path.join(out, hf.SAFETENSORS_FILE))
    original = load_file(os.path.join(tiny_hf_dir, hf.SAFETENSORS_FILE))
    assert sorted(exported) == sorted(original)  # the keys save_pretrained writes, head tied (not stored)
    assert hf.load_tokenizer(out).encode("the cat") == tiny_tokenizer.encode("the cat")


def test_save_accepts_flax_variables_and_names_a_wrong_tree(tiny_hf_dir, tmp_path):
    config, params = hf.load_gpt2(tiny_hf_dir)
    hf.save_gpt2(tmp_path / "ok", config, {"params": params})
    assert_trees_equal(hf.load_gpt2(tmp_path / "ok")[1], params)
    broken = jax.tree.map(lambda x: x, params)
    broken["h_1"]["mlp"]["c_fc"]["kernel"] = jnp.zeros((3, 3))
    del broken["ln_f"]["bias"]
    with pytest.raises(hf.CheckpointMismatchError) as error:
        hf.save_gpt2(tmp_path / "bad", config, broken)
    assert "shape mismatch for 'h_1/mlp/c_fc/kernel': found (3, 3), expected (32, 128)" in str(error.value)
    assert "missing key 'ln_f/bias'" in str(error.value)
    assert not os.path.exists(tmp_path / "bad" / hf.SAFETENSORS_FILE)


# ----------------------------------------------------------------------------- tokenizer and hub


def test_tokenizer_loads_from_the_checkpoint_directory(tiny_hf_dir, tiny_tokenizer):
    tokenizer = hf.load_tokenizer(tiny_hf_dir)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == hf.load_gpt2(tiny_hf_dir)[0].eos_token_id
    batch = tokenizer(["the cat sat on the mat.", "a dog"], padding=True)
    assert batch["attention_mask"][1][0] == 0 and batch["attention_mask"][1][-1] == 1  # padded on the left
    assert tokenizer.decode(tokenizer.encode("the red frog")) == "the red frog"


def fake_hub_cache(cache_dir, repo_id, files_from, revision="main"):
    """Lay out a huggingface_hub cache entry for `repo_id` (as snapshot_download leaves it) from a local dir."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files_from, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


def test_hub_name_resolves_through_snapshot_download_offline(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "someone/tiny-gpt2", tiny_hf_dir)
    assert hf.resolve_model_dir("someone/tiny-gpt2", cache_dir=cache, local_files_only=True) == str(snapshot)
    config, params = hf.load_gpt2("someone/tiny-gpt2", cache_dir=cache, local_files_only=True)
    assert_trees_equal(params, hf.load_gpt2(tiny_hf_dir)[1])
    assert hf.load_tokenizer("someone/tiny-gpt2", cache_dir=cache, local_files_only=True).padding_side == "left"
    with pytest.raises(
        FileNotFoundError,
        match="'someone/not-cached' is not a local directory, and the Hugging Face hub could not provide it",
    ):
        hf.load_gpt2("someone/not-cached", cache_dir=cache, local_files_only=True)


def test_an_eos_token_the_vocabulary_lacks_is_refused(tiny_hf_dir, tmp_path):
    """tokenizer_config.json naming an end-of-text token that the vocabulary does not define would get a new id that
    the LM never emits (captions would run on to the length limit): refused, naming the directory and the token."""
    import shutil

    forged = tmp_path / "forged"
    shutil.copytree(tiny_hf_dir, forged)
    config = json.loads((forged / "tokenizer_config.json").read_text())
    (forged / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|the_end|>"}))
    with pytest.raises(ValueError, match=r"forged: the eos token '<\|the_end\|>' .* not in the vocabulary"):
        hf.load_tokenizer(forged)
    assert hf.load_tokenizer(tiny_hf_dir).eos_token_id == 0
