"""Llama-family GGUF files (llama.cpp's format) in: a Hugging Face config, HF-named float32 tensors, a tokenizer.

`read_gguf(path)` gives a `GGUFModel`: ``hf_config`` (a config.json dict), ``tensors`` ({HF key: float32 array} in
PyTorch's [out, in] layout, as ``LlamaForCausalLM.state_dict()`` names and shapes them) and a
`transformers.PreTrainedTokenizerFast` built from the vocabulary stored in the file. Architectures ``llama``,
``mistral`` and ``qwen2`` are read; torch is not needed.

The format (v2 and v3, little-endian), front to back:

    "GGUF"  uint32 version  uint64 tensor_count  uint64 kv_count
    kv_count x   key (string)  uint32 value type  value
    tensor_count x   name (string)  uint32 n_dims  n_dims x uint64 dim  uint32 ggml type  uint64 offset
    padding to general.alignment (default 32), then the data section; each tensor's offset counts from its start

A string is a uint64 byte count and UTF-8 bytes. Value types 0..12 are u8 i8 u16 i16 u32 i32 f32 bool string
array u64 i64 f64; an array is a uint32 item type, a uint64 count and the items. GGML lists dims fastest-moving
first, so the PyTorch shape is the dims reversed. A tensor of a quantised type is stored as blocks
(`gguf.GGML_QUANT_SIZES`: elements and bytes per block) along its first GGML dim.

Nothing in a file is trusted: `check_gguf_header` walks the header with bounded reads before anything large is
allocated or mapped, so a header claiming 2**60 tensors or a string running past the end fails in microseconds
with a one-line ValueError naming the file; then the metadata is checked as a config and every tensor's name and
shape against it, all before any tensor is dequantised. The tensors are then read at the offsets that scan checked
(one `np.memmap`) and dequantised by `gguf.quants.dequantize`; `gguf.GGUFReader` is not used: it would parse the
header a second time, spending ~2 s on SmolLM2's 98,000 vocabulary strings, which are read here once, for the
tokenizer.

The rotary permutation. Hugging Face's Llama rotates the two halves of each head (``rotate_half``: dims i and
i + head_dim/2 form a pair); llama.cpp rotates adjacent dims (2i, 2i + 1). Its converter therefore reorders the
rows of Q and K per head for llama (and mistral): ``w.reshape(n_head, 2, rows // n_head // 2, ...)``, swap axes 1
and 2, reshape back (n_head = head_count for Q, head_count_kv for K). `unpermute_rotary_rows` applies the inverse
(the same reshape with the 2 last, then the swap), to weights and to q/k biases. Its qwen2 converter does not
permute (llama.cpp runs qwen2 with the NEOX rotary layout, which is HF's), so qwen2 tensors are taken as they are.

Biases: ``attention_bias`` means q/k/v/o biases for llama and mistral (HF Llama's meaning) and q/k/v biases for qwen2
(whose o_proj has none). A tied file has no ``output.weight``, so ``tensors`` then has no ``lm_head.weight``.

The tokenizer comes from transformers' GGUF tokenizer converter, fed with metadata read here: transformers' own
GGUF metadata reader imports torch, its converter does not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
from typing import Any, BinaryIO

import gguf
import numpy as np
import transformers

try:  # transformers >= 5.2x keeps its GGUF integration in a package
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
except ImportError:  # older releases: one module
    from transformers.integrations.ggml import convert_gguf_tokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 counted in uint32 and has not been written since 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 65535  # the spec's limit on a key's length
MAX_ARRAY_DEPTH = 2  # an array of arrays at most; no llama.cpp file nests deeper
MAX_ELEMENTS = 2**63 - 1  # ggml counts elements in int64

# Metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes a header entry can take: a KV pair (empty key, type, one-byte value) and a tensor info
# (empty name, n_dims, one dim, type, offset). A count beyond what the file can hold is refused before reading.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_ARRAY_ITEM_BYTES = {_STRING: 8, _ARRAY: 4 + 8}

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Architectures whose llama.cpp converter permutes the rows of Q and K (see the module docstring).
ROTARY_PERMUTED_ARCHITECTURES = ("llama", "mistral")
ROPE_SCALING_TYPES = ("none", "linear")
# Qwen2 has q/k/v biases and none on o_proj; in HF Llama and Mistral attention_bias means all four.
QKV_BIAS_ONLY_ARCHITECTURES = ("qwen2",)

# llama.cpp tensor name -> HF key. Every other name is refused, e.g. ``rope_freqs.weight`` (Llama 3.1's rotary
# frequency factors, which a plain RoPE would silently ignore) or MoE experts.
GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")
_TENSORS_PER_LAYER = 9  # without biases

# llama.cpp tokenizer keys -> the names transformers' GGUF tokenizer converter reads them under.
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, in Hugging Face terms."""

    hf_config: dict  # a config.json dict: model_type, sizes, rope, tie_word_embeddings, special token ids
    tensors: dict  # {HF key: float32 np.ndarray}, PyTorch layout ([out, in]), Q/K unpermuted; tied: no lm_head
    tokenizer: Any  # transformers.PreTrainedTokenizerFast from the file's own vocabulary, left padding
    add_bos_token: bool  # tokenizer.ggml.add_bos_token (False when absent)
    path: str


@dataclasses.dataclass(frozen=True)
class GGUFArray:
    """An array value of the header: its item type, length and where its items start (they stay in the file)."""

    item_type: int
    count: int
    offset: int  # in the file


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    ggml_dims: tuple[int, ...]  # GGML order, fastest-moving first
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch (row-major) shape: the GGML dims reversed."""
        return tuple(reversed(self.ggml_dims))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """A checked header: scalar metadata values (arrays as `GGUFArray`), the tensor table, the data section."""

    path: str
    version: int
    metadata: dict
    tensors: tuple[GGUFTensorInfo, ...]
    data_start: int
    file_size: int


# ----------------------------------------------------------------------------- header pre-scan


def _refusal(path, message: str) -> ValueError:
    """The one-line ValueError every check raises: the file, then what is wrong."""
    return ValueError(f"{os.fspath(path)}: {message}")


class _BoundedReader:
    """Reads a file front to back, refusing any read that would go past its end."""

    def __init__(self, file: BinaryIO, path, size: int):
        self.file, self.path, self.size, self.pos = file, path, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def require(self, nbytes: int, what: str) -> None:
        """Raises when `nbytes` more bytes (for `what`) are not in the file."""
        if nbytes > self.remaining():
            raise _refusal(
                self.path, f"{what} needs {nbytes} bytes at offset {self.pos}, but the file has only {self.size} bytes"
            )

    def take(self, nbytes: int, what: str) -> bytes:
        self.require(nbytes, what)
        data = self.file.read(nbytes)
        self.pos += nbytes
        return data

    def skip(self, nbytes: int, what: str) -> None:
        self.require(nbytes, what)
        self.file.seek(nbytes, os.SEEK_CUR)
        self.pos += nbytes

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string_length(self, what: str, max_bytes: int | None = None) -> int:
        (length,) = self.unpack("<Q", f"{what} length")
        if max_bytes is not None and length > max_bytes:
            raise _refusal(self.path, f"{what} is {length} bytes long (at most {max_bytes} allowed)")
        self.require(length, what)
        return length

    def string(self, what: str, max_bytes: int | None = None) -> str:
        data = self.take(self.string_length(what, max_bytes), what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _refusal(self.path, f"{what} is not valid UTF-8") from None


def _read_value(reader: _BoundedReader, value_type: int, what: str):
    """One metadata value: a Python scalar, a str, or a `GGUFArray` (whose items are walked, not kept)."""
    if value_type in _SCALAR_FORMATS:
        (value,) = reader.unpack(_SCALAR_FORMATS[value_type], what)
        return value
    if value_type == _STRING:
        return reader.string(what)
    if value_type == _ARRAY:
        return _skip_array(reader, what, depth=1)
    raise _refusal(reader.path, f"{what} has unknown value type {value_type}")


def _skip_array(reader: _BoundedReader, what: str, depth: int) -> GGUFArray:
    """Walks an array value (its type and count already bounded by the file) and returns its type and length."""
    if depth > MAX_ARRAY_DEPTH:
        raise _refusal(reader.path, f"{what} nests arrays {depth} deep (at most {MAX_ARRAY_DEPTH})")
    item_type, count = reader.unpack("<IQ", f"{what} array header")
    offset = reader.pos
    if item_type in _SCALAR_FORMATS:
        item_bytes = struct.calcsize(_SCALAR_FORMATS[item_type])
    elif item_type in _MIN_ARRAY_ITEM_BYTES:
        item_bytes = _MIN_ARRAY_ITEM_BYTES[item_type]
    else:
        raise _refusal(reader.path, f"{what} is an array of unknown item type {item_type}")
    if count * item_bytes > reader.remaining():
        raise _refusal(
            reader.path,
            f"{what} declares {count} items of at least {item_bytes} bytes, but only "
            f"{reader.remaining()} bytes of the file remain",
        )
    if item_type in _SCALAR_FORMATS:
        reader.skip(count * item_bytes, what)
    elif item_type == _STRING:
        for index in range(count):
            reader.skip(reader.string_length(f"{what}[{index}]"), f"{what}[{index}]")
    else:
        for index in range(count):
            _skip_array(reader, f"{what}[{index}]", depth + 1)
    return GGUFArray(item_type, count, offset)


def _read_metadata(reader: _BoundedReader, kv_count: int) -> dict:
    """{key: value} of the KV section; duplicate keys are refused."""
    metadata = {}
    for index in range(kv_count):
        key = reader.string(f"metadata key #{index}", MAX_KEY_BYTES)
        if key in metadata:
            raise _refusal(reader.path, f"metadata key {key!r} appears twice")
        (value_type,) = reader.unpack("<I", f"value type of {key!r}")
        metadata[key] = _read_value(reader, value_type, f"metadata {key!r}")
    return metadata


def _alignment(path, metadata: dict) -> int:
    """general.alignment (default 32): a positive power of two."""
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise _refusal(path, f"general.alignment is {alignment!r}, not a positive power of two")
    return alignment


def _ggml_type_sizes(path, name: str, ggml_type: int) -> tuple[int, int]:
    """(elements, bytes) per block of a known GGML type."""
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _refusal(path, f"tensor {name!r} has unknown ggml type {ggml_type}") from None


def _read_tensor_info(reader: _BoundedReader, index: int, alignment: int) -> GGUFTensorInfo:
    """One tensor-table entry, with its dims, type and byte size checked (its data range is checked later)."""
    name = reader.string(f"name of tensor #{index}", MAX_KEY_BYTES)
    (n_dims,) = reader.unpack("<I", f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _refusal(reader.path, f"tensor {name!r} has {n_dims} dims (1 to {MAX_DIMS} allowed)")
    dims = reader.unpack(f"<{n_dims}Q", f"dims of tensor {name!r}")
    if 0 in dims:
        raise _refusal(reader.path, f"tensor {name!r} has a dim of 0 (dims {list(dims)})")
    elements = math.prod(dims)
    if elements > MAX_ELEMENTS:
        raise _refusal(reader.path, f"tensor {name!r}: dims {list(dims)} overflow int64")
    ggml_type, offset = reader.unpack("<IQ", f"type and offset of tensor {name!r}")
    block_elements, block_bytes = _ggml_type_sizes(reader.path, name, ggml_type)
    if dims[0] % block_elements:
        raise _refusal(
            reader.path,
            f"tensor {name!r}: rows of {dims[0]} are not whole blocks of {block_elements} "
            f"({gguf.GGMLQuantizationType(ggml_type).name})",
        )
    if offset % alignment:
        raise _refusal(reader.path, f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
    return GGUFTensorInfo(name, dims, ggml_type, offset, elements // block_elements * block_bytes)


def _check_data_ranges(path, tensors: tuple[GGUFTensorInfo, ...], data_bytes: int) -> None:
    """Every tensor's bytes lie inside the data section."""
    for info in tensors:
        if info.offset + info.nbytes > data_bytes:
            raise _refusal(
                path,
                f"tensor {info.name!r}: {info.nbytes} bytes at offset {info.offset} lie outside "
                f"the data section ({max(data_bytes, 0)} bytes)",
            )


def scan_gguf_header(path) -> GGUFHeader:
    """Reads and checks a GGUF header with bounded reads; every problem is a ValueError naming the file."""
    if not os.path.isfile(path):  # a directory or a FIFO would fail later, or block
        raise _refusal(path, "not a regular file")
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        reader = _BoundedReader(file, path, size)
        magic = reader.take(4, "magic") if size >= 4 else b""
        if magic != GGUF_MAGIC:
            raise _refusal(path, f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
        version, tensor_count, kv_count = reader.unpack("<IQQ", "version and counts")
        if version not in SUPPORTED_VERSIONS:
            endian = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise _refusal(path, f"GGUF version {version}{endian} is not supported (only {SUPPORTED_VERSIONS})")
        needed = kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
        if needed > reader.remaining():
            raise _refusal(
                path,
                f"header declares {tensor_count} tensors and {kv_count} metadata keys, which "
                f"need at least {needed} bytes, but the file has only {size} bytes",
            )
        metadata = _read_metadata(reader, kv_count)
        alignment = _alignment(path, metadata)
        tensors, names = [], set()
        for index in range(tensor_count):
            info = _read_tensor_info(reader, index, alignment)
            if info.name in names:
                raise _refusal(path, f"tensor {info.name!r} appears twice")
            names.add(info.name)
            tensors.append(info)
    data_start = -(-reader.pos // alignment) * alignment
    _check_data_ranges(path, tuple(tensors), size - data_start)
    return GGUFHeader(os.fspath(path), version, metadata, tuple(tensors), data_start, size)


def check_gguf_header(path) -> None:
    """Raises a one-line ValueError naming the file when its GGUF header is malformed or inconsistent."""
    scan_gguf_header(path)


def is_gguf_file(path) -> bool:
    """Whether `path` is a regular file starting with the GGUF magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as file:
            return file.read(4) == GGUF_MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------- metadata -> hf_config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metadata_value(header: GGUFHeader, key: str, default):
    """The metadata value under `key`; absent: `default`, or a ValueError when `default` is _REQUIRED."""
    if key in header.metadata:
        return header.metadata[key]
    if default is _REQUIRED:
        raise _refusal(header.path, f"metadata {key!r} is missing")
    return default


def _metadata_int(header: GGUFHeader, key: str, default=_REQUIRED, minimum: int = 1):
    """An integer metadata value of at least `minimum` (`default` when absent)."""
    if key not in header.metadata:
        return _metadata_value(header, key, default)
    value = header.metadata[key]
    if not (_is_int(value) and value >= minimum):
        raise _refusal(header.path, f"metadata {key!r} is {value!r}, not an integer >= {minimum}")
    return value


def _metadata_float(header: GGUFHeader, key: str, default=_REQUIRED) -> float:
    """A finite positive number from the metadata (`default` when absent)."""
    if key not in header.metadata:
        return _metadata_value(header, key, default)
    value = header.metadata[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise _refusal(header.path, f"metadata {key!r} is {value!r}, not a finite positive number")
    return float(value)


def _tensor_shapes(header: GGUFHeader) -> dict[str, tuple[int, ...]]:
    return {info.name: info.shape for info in header.tensors}


def _vocab_size(header: GGUFHeader, arch: str) -> int:
    """{arch}.vocab_size, else the length of the token list, else the rows of token_embd.weight."""
    if f"{arch}.vocab_size" in header.metadata:
        return _metadata_int(header, f"{arch}.vocab_size")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GGUFArray) and tokens.count > 0:
        return tokens.count
    embedding = _tensor_shapes(header).get("token_embd.weight")
    if embedding is None:
        raise _refusal(header.path, f"no {arch}.vocab_size, token list or token_embd.weight to size the vocabulary")
    return embedding[0]


def _head_sizes(header: GGUFHeader, arch: str, hidden_size: int) -> dict:
    """num_attention_heads, num_key_value_heads and head_dim, checked against each other and the rotary size."""
    heads = _metadata_int(header, f"{arch}.attention.head_count")
    kv_heads = _metadata_int(header, f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise _refusal(
            header.path, f"metadata {arch}.attention.head_count_kv: {kv_heads} does not divide head_count {heads}"
        )
    if f"{arch}.attention.key_length" in header.metadata:
        head_dim = _metadata_int(header, f"{arch}.attention.key_length")
    elif hidden_size % heads:
        raise _refusal(
            header.path, f"metadata {arch}.attention.head_count: {heads} does not divide embedding_length {hidden_size}"
        )
    else:
        head_dim = hidden_size // heads
    if head_dim % 2:
        raise _refusal(header.path, f"head_dim {head_dim} is odd; rotary embeddings need pairs of dims")
    value_length = _metadata_int(header, f"{arch}.attention.value_length", head_dim)
    if value_length != head_dim:
        raise _refusal(
            header.path,
            f"metadata {arch}.attention.value_length {value_length} differs from head_dim {head_dim}: not supported",
        )
    rotary_dims = _metadata_int(header, f"{arch}.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise _refusal(
            header.path,
            f"metadata {arch}.rope.dimension_count {rotary_dims} differs from head_dim "
            f"{head_dim}: partial rotary is not supported",
        )
    return dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def _rope_scaling(header: GGUFHeader, arch: str) -> dict | None:
    """None, or HF's {"rope_type": "linear", "factor": f} from {arch}.rope.scaling.* (or the older scale_linear)."""
    type_key, factor_key, legacy_key = (
        f"{arch}.rope.scaling.type",
        f"{arch}.rope.scaling.factor",
        f"{arch}.rope.scale_linear",
    )
    scaling_type = header.metadata.get(type_key)
    if scaling_type is None and legacy_key in header.metadata:
        factor = _metadata_float(header, legacy_key)
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    if scaling_type is None or scaling_type == "none":
        return None
    if scaling_type not in ROPE_SCALING_TYPES:
        raise _refusal(header.path, f"metadata {type_key} is {scaling_type!r}; only {ROPE_SCALING_TYPES} are supported")
    return {"rope_type": "linear", "factor": _metadata_float(header, factor_key)}


def _token_id(header: GGUFHeader, key: str, vocab_size: int) -> int | None:
    """A special token id from the metadata (None when absent), inside the vocabulary."""
    token_id = _metadata_int(header, key, None, minimum=0)
    if token_id is not None and token_id >= vocab_size:
        raise _refusal(header.path, f"metadata {key!r} is {token_id}, outside the vocabulary of {vocab_size}")
    return token_id


def _architecture(header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _refusal(header.path, f"architecture {arch!r} is not supported (only {SUPPORTED_ARCHITECTURES})")
    return arch


def hf_config_from_header(header: GGUFHeader) -> dict:
    """The Hugging Face config.json dict the metadata describes; every value checked (not yet the tensors)."""
    arch = _architecture(header)
    hidden_size = _metadata_int(header, f"{arch}.embedding_length")
    names = {info.name for info in header.tensors}
    vocab_size = _vocab_size(header, arch)
    return dict(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=_metadata_int(header, f"{arch}.feed_forward_length"),
        num_hidden_layers=_metadata_int(header, f"{arch}.block_count"),
        **_head_sizes(header, arch, hidden_size),
        max_position_embeddings=_metadata_int(header, f"{arch}.context_length"),
        rms_norm_eps=_metadata_float(header, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_metadata_float(header, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(header, arch),
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
        tie_word_embeddings="output.weight" not in names,
        attention_bias=any(_LAYER_TENSOR.fullmatch(name) and name.endswith(".attn_q.bias") for name in names),
        bos_token_id=_token_id(header, "tokenizer.ggml.bos_token_id", vocab_size),
        eos_token_id=_token_id(header, "tokenizer.ggml.eos_token_id", vocab_size),
        pad_token_id=_token_id(header, "tokenizer.ggml.padding_token_id", vocab_size),
    )


# ----------------------------------------------------------------------------- tensors


def hf_key_for_gguf_name(name: str) -> str | None:
    """The HF key of a llama.cpp tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``),
    or None for a name this reader does not know."""
    if name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[name]
    layer = _LAYER_TENSOR.fullmatch(name)
    if layer and layer.group(2) in LAYER_TENSOR_NAMES:
        return f"model.layers.{layer.group(1)}.{LAYER_TENSOR_NAMES[layer.group(2)]}"
    return None


def expected_gguf_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """{llama.cpp tensor name: PyTorch shape} of every tensor a file with this config must hold."""
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    q_rows = hf_config["num_attention_heads"] * hf_config["head_dim"]
    kv_rows = hf_config["num_key_value_heads"] * hf_config["head_dim"]
    shapes = {"token_embd.weight": (hf_config["vocab_size"], hidden), "output_norm.weight": (hidden,)}
    if not hf_config["tie_word_embeddings"]:
        shapes["output.weight"] = (hf_config["vocab_size"], hidden)
    layer = {
        "attn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden),
        "attn_k.weight": (kv_rows, hidden),
        "attn_v.weight": (kv_rows, hidden),
        "attn_output.weight": (hidden, q_rows),
        "ffn_norm.weight": (hidden,),
        "ffn_gate.weight": (inter, hidden),
        "ffn_up.weight": (inter, hidden),
        "ffn_down.weight": (hidden, inter),
    }
    if hf_config["attention_bias"]:
        layer.update({"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,)})
        if hf_config["model_type"] not in QKV_BIAS_ONLY_ARCHITECTURES:
            layer["attn_output.bias"] = (hidden,)  # HF Llama's attention_bias covers o_proj too
    for i in range(hf_config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{suffix}": shape for suffix, shape in layer.items()})
    return shapes


def _listed(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(map(repr, names[:limit])) + more


def check_tensor_table(header: GGUFHeader, hf_config: dict) -> None:
    """Raises a ValueError naming the first unknown, missing or misshapen tensor the config does not account for."""
    found = _tensor_shapes(header)
    unknown = [name for name in found if hf_key_for_gguf_name(name) is None]
    if unknown:
        raise _refusal(
            header.path,
            f"unknown tensors {_listed(unknown)} (not a plain {hf_config['model_type']} model this reader supports)",
        )
    layers = hf_config["num_hidden_layers"]
    if layers * _TENSORS_PER_LAYER > len(found):
        raise _refusal(
            header.path,
            f"metadata {hf_config['model_type']}.block_count is {layers}, but the file has only {len(found)} tensors",
        )
    expected = expected_gguf_shapes(hf_config)
    extra = found.keys() - expected.keys()
    if extra:
        raise _refusal(
            header.path,
            f"tensors {_listed(extra)} do not fit the metadata ({layers} layers, "
            f"attention_bias={hf_config['attention_bias']})",
        )
    missing = expected.keys() - found.keys()
    if missing:
        raise _refusal(header.path, f"missing tensors {_listed(missing)}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise _refusal(header.path, f"tensor {name!r} has shape {found[name]}, but the metadata implies {shape}")


@functools.cache
def can_dequantize(ggml_type: int) -> bool:
    """Whether `gguf.quants.dequantize` handles this GGML type (tried on one block of zeros)."""
    qtype = gguf.GGMLQuantizationType(ggml_type)
    try:
        gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_dequantizable(header: GGUFHeader) -> None:
    """Raises, naming the first such tensor, when the gguf package cannot dequantise a tensor's type."""
    for info in header.tensors:
        if not can_dequantize(info.ggml_type):
            type_name = gguf.GGMLQuantizationType(info.ggml_type).name
            raise _refusal(
                header.path,
                f"tensor {info.name!r} is of ggml type {type_name}, which the gguf package cannot dequantise",
            )


def unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's per-head interleaving of Q/K rows: back to Hugging Face's rotate_half order."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rotary_heads(name: str, hf_config: dict) -> int | None:
    """The head count llama.cpp permuted this tensor's rows with, or None when it did not permute it."""
    if hf_config["model_type"] not in ROTARY_PERMUTED_ARCHITECTURES:
        return None
    layer = _LAYER_TENSOR.fullmatch(name)
    suffix = layer.group(2) if layer else ""
    if suffix in ("attn_q.weight", "attn_q.bias"):
        return hf_config["num_attention_heads"]
    if suffix in ("attn_k.weight", "attn_k.bias"):
        return hf_config["num_key_value_heads"]
    return None


def dequantized_tensor(blob: np.ndarray, header: GGUFHeader, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor of the file (`blob`, the file's bytes) as float32 in its PyTorch shape; a copy, not a view."""
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    start = header.data_start + info.offset
    # Rows of whole blocks along the fastest dim: the layout gguf.quants.dequantize takes (F32 and F16 included).
    rows = blob[start : start + info.nbytes].reshape(-1, info.ggml_dims[0] // block_elements * block_bytes)
    return np.array(gguf.quants.dequantize(rows, qtype), dtype=np.float32).reshape(info.shape)


def hf_tensors(header: GGUFHeader, hf_config: dict) -> dict[str, np.ndarray]:
    """{HF key: float32 array} of every tensor, dequantised, with the rotary permutation undone where applied."""
    blob = np.memmap(header.path, dtype=np.uint8, mode="r")  # pages are read as each tensor is dequantised
    tensors = {}
    for info in header.tensors:
        values = dequantized_tensor(blob, header, info)
        n_head = _rotary_heads(info.name, hf_config)
        if n_head is not None:
            values = unpermute_rotary_rows(values, n_head)
        tensors[hf_key_for_gguf_name(info.name)] = values
    return tensors


# ----------------------------------------------------------------------------- tokenizer


def _metadata_flag(header: GGUFHeader, key: str) -> bool:
    """A boolean metadata value (False when absent)."""
    return bool(header.metadata.get(key, False))


def read_array_items(header: GGUFHeader, array: GGUFArray, what: str) -> list:
    """The items of a metadata array of numbers or strings (the scan has checked that they lie in the file)."""
    with open(header.path, "rb") as file:
        file.seek(array.offset)
        if array.item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[array.item_type]
            return list(struct.unpack(f"<{array.count}{fmt[1]}", file.read(array.count * struct.calcsize(fmt))))
        if array.item_type != _STRING:
            raise _refusal(header.path, f"{what} is an array of arrays, not of numbers or strings")
        items = []
        for _ in range(array.count):
            (length,) = struct.unpack("<Q", file.read(8))
            try:
                items.append(file.read(length).decode("utf-8"))
            except UnicodeDecodeError:
                raise _refusal(header.path, f"{what}[{len(items)}] is not valid UTF-8") from None
        return items


def tokenizer_dict(header: GGUFHeader) -> dict:
    """The file's ``tokenizer.ggml.*`` values under the names transformers' GGUF converter reads (arrays as lists)."""
    values = {}
    for key, name in TOKENIZER_KEYS.items():
        value = header.metadata.get(key)
        if isinstance(value, GGUFArray):
            values[name] = read_array_items(header, value, f"metadata {key!r}")
        elif value is not None:
            values[name] = value
    return values


def _special_tokens(header: GGUFHeader, tokens: list) -> dict[str, str]:
    """{"bos_token": "<s>", ...} for the special token ids the metadata states; pad falls back to eos."""
    special = {}
    for name, key in SPECIAL_TOKEN_IDS.items():
        token_id = _metadata_int(header, key, None, minimum=0)
        if token_id is None:
            continue
        if token_id >= len(tokens):
            raise _refusal(header.path, f"metadata {key!r} is {token_id}, outside the token list of {len(tokens)}")
        special[name] = tokens[token_id]
    if "pad_token" not in special and "eos_token" in special:
        special["pad_token"] = special["eos_token"]
    return special


def tokenizer_from_gguf(header: GGUFHeader, hf_config: dict) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer the file's metadata describes, built by transformers' GGUF converter (no torch needed)."""
    values = tokenizer_dict(header)
    tokens = values.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise _refusal(header.path, "tokenizer.ggml.tokens is missing or not a list of strings")
    if len(tokens) > hf_config["vocab_size"]:
        raise _refusal(
            header.path, f"the token list has {len(tokens)} tokens, more than vocab_size {hf_config['vocab_size']}"
        )
    special = _special_tokens(header, tokens)
    # Mistral files carry Llama's tokenizer kinds; older transformers pick the converter by this name and have
    # no "mistral" entry, newer ones only single out gemma and phi3.
    architecture = "llama" if hf_config["model_type"] == "mistral" else hf_config["model_type"]
    try:
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, values)
    except Exception as error:  # whatever the converter (or the tokenizers library under it) makes of bad values
        raise _refusal(
            header.path,
            f"transformers cannot build the tokenizer: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}",
        ) from None
    # add_bos_token / add_eos_token as transformers' own GGUF loading passes them, so encode() gives the same ids.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=hf_config["max_position_embeddings"],
        add_bos_token=_metadata_flag(header, "tokenizer.ggml.add_bos_token"),
        add_eos_token=_metadata_flag(header, "tokenizer.ggml.add_eos_token"),
        **special,
        **extra_kwargs,
    )


# ----------------------------------------------------------------------------- entry points


def _checked_header_and_config(path) -> tuple[GGUFHeader, dict]:
    """The scanned header and its hf_config, with every tensor's name and shape checked against that config."""
    header = scan_gguf_header(path)
    hf_config = hf_config_from_header(header)
    check_tensor_table(header, hf_config)
    return header, hf_config


def read_gguf_config(path) -> dict:
    """The Hugging Face config dict of a GGUF file, from its checked header alone (nothing is dequantised)."""
    return _checked_header_and_config(path)[1]


def read_gguf_tokenizer(path) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer of a GGUF file, from its checked header alone (nothing is dequantised)."""
    return tokenizer_from_gguf(*_checked_header_and_config(path))


def read_gguf(path) -> GGUFModel:
    """A Llama-family GGUF file as HF config, float32 HF-named tensors and tokenizer; ValueError names any problem."""
    header, hf_config = _checked_header_and_config(path)
    _check_dequantizable(header)
    tokenizer = tokenizer_from_gguf(header, hf_config)  # first: it is the cheaper one to fail
    tensors = hf_tensors(header, hf_config)
    return GGUFModel(
        hf_config=hf_config,
        tensors=tensors,
        tokenizer=tokenizer,
        add_bos_token=_metadata_flag(header, "tokenizer.ggml.add_bos_token"),
        path=os.fspath(path),
    )
