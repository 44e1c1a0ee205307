"""Text corpora for next-token training, tokenised once into fixed-length numpy examples.

Two kinds of corpus, both read by `load_text_corpus`:

* documents: a plain-text file (the whole file is one document) or JSON lines with a ``"text"``
  field. Each document is followed by the end-of-text token and all of them are concatenated and
  cut into rows of ``seq_len`` tokens (packing: no padding except at the very end), as GPT-2 was
  trained. Tokens after an end-of-text token still attend to the previous document.
* prompt/completion pairs: JSON lines with ``"prompt"`` and ``"completion"`` fields. Each pair is
  one row, ``prompt + completion + end-of-text``, padded on the right to ``seq_len``; padding never
  counts in the loss, and with ``mask_prompt=True`` neither do the prompt tokens (fine-tuning on
  the completion only).

The result is a `TextExamples` of int32 ``input_ids``, ``attention_mask`` and ``loss_mask`` arrays
[N, seq_len]. ``loss_mask[n, t] == 1`` when token t of row n is a training target, i.e. the model's
prediction at position t - 1 is scored against it (`next_token_targets` pairs them up), so column 0 is
always 0. No randomness: the same files and tokenizer always give the same arrays; shuffling is the
training loop's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

JSON_LINES_SUFFIXES = (".jsonl", ".jsonlines", ".json")


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """Fixed-length token rows for next-token training (all int32 [N, seq_len])."""

    input_ids: np.ndarray
    attention_mask: np.ndarray  # 1 = real token, 0 = padding
    loss_mask: np.ndarray  # 1 = this token is a target (predicted from the tokens before it)

    def __post_init__(self):
        shapes = {name: getattr(self, name).shape for name in ("input_ids", "attention_mask", "loss_mask")}
        if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
            raise ValueError(f"TextExamples arrays must share one [N, seq_len] shape, got {shapes}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        """The three arrays by name (a training loop's batch fields)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "loss_mask": self.loss_mask}


@dataclasses.dataclass(frozen=True)
class TextRecord:
    """One corpus entry: a document (``text``) or a prompt/completion pair; ``source`` says where it came from."""

    source: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def is_pair(self) -> bool:
        return self.completion is not None


# ----------------------------------------------------------------------------- reading


def record_from_json(obj: Any, source: str) -> TextRecord:
    """A `TextRecord` from one parsed JSON line; a clear error naming `source` when the fields are wrong."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    has_text, has_pair = "text" in obj, ("prompt" in obj or "completion" in obj)
    if has_text == has_pair:
        raise ValueError(
            f"{source}: a record needs either a 'text' field or 'prompt' and 'completion' fields, "
            f"got fields {sorted(obj)}"
        )
    fields = ("text",) if has_text else ("prompt", "completion")
    for field in fields:
        if not isinstance(obj.get(field), str):
            raise ValueError(f"{source}: field {field!r} must be a string, got {obj.get(field)!r}")
    return TextRecord(source=source, **{field: obj[field] for field in fields})


def iter_json_lines(path: str) -> Iterator[tuple[str, Any]]:
    """(``"path:line"``, parsed object) for each non-blank line of a JSON-lines file; invalid JSON names its line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}: not valid JSON ({error})") from error


def read_text_records(path: str | os.PathLike) -> list[TextRecord]:
    """Records of one file: JSON lines (``.jsonl``/``.jsonlines``/``.json``, blank lines skipped) or plain text."""
    path = os.fspath(path)
    if not path.endswith(JSON_LINES_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            return [TextRecord(source=path, text=f.read())]
    records = [record_from_json(obj, source) for source, obj in iter_json_lines(path)]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


# ----------------------------------------------------------------------------- tokenising


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added), in one batched call."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def _special_ids(tokenizer) -> tuple[int, int]:
    """(end-of-text id, padding id); padding falls back to end-of-text (GPT-2 has no pad token)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token, needed to end every document or completion")
    pad_id = tokenizer.pad_token_id
    return eos_id, eos_id if pad_id is None else pad_id


def _rows_from_sequences(
    sequences: Sequence[Sequence[int]], target_flags: Sequence[Sequence[int]], *, seq_len: int, pad_id: int
) -> TextExamples:
    """Right-pads each token sequence (<= seq_len) into a row; its target flags become the loss mask."""
    count = len(sequences)
    input_ids = np.full((count, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((count, seq_len), np.int32)
    loss_mask = np.zeros((count, seq_len), np.int32)
    for row, (tokens, targets) in enumerate(zip(sequences, target_flags)):
        input_ids[row, : len(tokens)] = tokens
        attention_mask[row, : len(tokens)] = 1
        loss_mask[row, : len(tokens)] = targets
    loss_mask[:, 0] = 0  # the first token of a row has no context to be predicted from
    return TextExamples(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


def pack_documents(documents: Iterable[Sequence[int]], *, seq_len: int, eos_id: int, pad_id: int) -> TextExamples:
    """Concatenate documents (each followed by `eos_id`) and cut the stream into rows of `seq_len`.

    The last row is padded (and masked) when the stream does not fill it; a final piece of a single
    token is dropped, since it has nothing to be predicted from.
    """
    stream = [token for document in documents for token in (*document, eos_id)]
    pieces = [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]
    pieces = [piece for piece in pieces if len(piece) > 1]
    if not pieces:
        raise ValueError(f"the corpus has {len(stream)} token(s); at least 2 are needed to train on")
    return _rows_from_sequences(pieces, [[1] * len(piece) for piece in pieces], seq_len=seq_len, pad_id=pad_id)


def pad_prompt_completions(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    seq_len: int,
    eos_id: int,
    pad_id: int,
    mask_prompt: bool,
    truncate: bool = False,
    sources: Sequence[str] | None = None,
) -> TextExamples:
    """One row per pair: ``prompt + completion + eos``, right-padded to `seq_len`.

    The completion and its end-of-text token are targets; the prompt tokens are too unless
    `mask_prompt`. A pair longer than `seq_len` is an error naming its source, unless `truncate`
    (then its end is cut off).
    """
    sequences, targets = [], []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = [*prompt, *completion, eos_id]
        if len(tokens) > seq_len and not truncate:
            where = sources[index] if sources else f"pair {index}"
            raise ValueError(
                f"{where}: prompt + completion + eos is {len(tokens)} tokens, longer than "
                f"seq_len={seq_len} (raise seq_len or pass truncate=True)"
            )
        flags = [0 if mask_prompt else 1] * len(prompt) + [1] * (len(completion) + 1)
        sequences.append(tokens[:seq_len])
        targets.append(flags[:seq_len])
    return _rows_from_sequences(sequences, targets, seq_len=seq_len, pad_id=pad_id)


def tokenize_records(
    records: Sequence[TextRecord], tokenizer, *, seq_len: int, mask_prompt: bool = False, truncate: bool = False
) -> TextExamples:
    """Tokenise records into examples: documents are packed, prompt/completion pairs padded (see module doc).

    A corpus must be all documents or all pairs: mixing the two is an error naming the first record
    of each kind. `tokenizer` is a Hugging Face tokenizer (e.g. `imgllm.language.hf.load_tokenizer`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (an input and a target), got {seq_len}")
    if not records:
        raise ValueError("no records to tokenise")
    pairs = [record for record in records if record.is_pair]
    documents = [record for record in records if not record.is_pair]
    if pairs and documents:
        raise ValueError(
            f"the corpus mixes documents ({documents[0].source}) and prompt/completion pairs "
            f"({pairs[0].source}); use one kind per corpus"
        )
    eos_id, pad_id = _special_ids(tokenizer)
    if documents:
        return pack_documents(
            _tokenize(tokenizer, [r.text for r in documents]), seq_len=seq_len, eos_id=eos_id, pad_id=pad_id
        )
    return pad_prompt_completions(
        _tokenize(tokenizer, [r.prompt for r in pairs]),
        _tokenize(tokenizer, [r.completion for r in pairs]),
        seq_len=seq_len,
        eos_id=eos_id,
        pad_id=pad_id,
        mask_prompt=mask_prompt,
        truncate=truncate,
        sources=[r.source for r in pairs],
    )


def load_text_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    seq_len: int,
    mask_prompt: bool = False,
    truncate: bool = False,
) -> TextExamples:
    """Read one or more corpus files (in the given order) and tokenise them with `tokenize_records`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = [record for path in paths for record in read_text_records(path)]
    return tokenize_records(records, tokenizer, seq_len=seq_len, mask_prompt=mask_prompt, truncate=truncate)


def next_token_targets(input_ids, loss_mask):
    """(targets [N, T-1], weights [N, T-1]) for logits [N, T-1] computed at positions 0..T-2.

    Works on numpy and jax arrays alike: ``loss = sum(weights * CE(logits[:, :-1], targets)) / sum(weights)``.
    """
    return input_ids[:, 1:], loss_mask[:, 1:]


__all__ = [
    "TextExamples",
    "TextRecord",
    "iter_json_lines",
    "load_text_corpus",
    "next_token_targets",
    "pack_documents",
    "pad_prompt_completions",
    "read_text_records",
    "record_from_json",
    "tokenize_records",
]
