"""imgllm.data.text: packing, prompt/completion padding and masks, errors by file and line, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CORPUS

from imgllm.data import text

EOS, PAD = 9, 7


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pack_documents_concatenates_with_eos_and_pads_the_last_row():
    # 9 tokens in rows of 4 leave one token, which has nothing to be predicted from: dropped.
    examples = text.pack_documents([[1, 2, 3], [4, 5], [6]], seq_len=4, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(examples.input_ids, [[1, 2, 3, EOS], [4, 5, EOS, 6]])
    examples = text.pack_documents([[1, 2, 3], [4, 5], [6, 8]], seq_len=4, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(examples.input_ids, [[1, 2, 3, EOS], [4, 5, EOS, 6], [8, EOS, PAD, PAD]])
    np.testing.assert_array_equal(examples.attention_mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(examples.loss_mask, [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]])
    assert all(a.dtype == np.int32 for a in examples.arrays().values())


def test_prompt_completion_rows_mask_padding_and_optionally_the_prompt():
    prompts, completions = [[1, 2], [3]], [[4], [5, 6, 8]]
    for mask_prompt, prompt_flag in [(False, 1), (True, 0)]:
        examples = text.pad_prompt_completions(
            prompts, completions, seq_len=6, eos_id=EOS, pad_id=PAD, mask_prompt=mask_prompt
        )
        np.testing.assert_array_equal(examples.input_ids, [[1, 2, 4, EOS, PAD, PAD], [3, 5, 6, 8, EOS, PAD]])
        np.testing.assert_array_equal(examples.attention_mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
        np.testing.assert_array_equal(examples.loss_mask, [[0, prompt_flag, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])


def test_too_long_pair_is_named_unless_truncated():
    message = r"data.jsonl:2: prompt \+ completion \+ eos is 5 tokens, longer than seq_len=4"
    with pytest.raises(ValueError, match=message):
        text.pad_prompt_completions(
            [[1], [1, 2]],
            [[3], [3, 4]],
            seq_len=4,
            eos_id=EOS,
            pad_id=PAD,
            mask_prompt=True,
            sources=["data.jsonl:1", "data.jsonl:2"],
        )
    examples = text.pad_prompt_completions(
        [[1, 2]], [[3, 4]], seq_len=4, eos_id=EOS, pad_id=PAD, mask_prompt=True, truncate=True
    )
    np.testing.assert_array_equal(examples.input_ids, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(examples.loss_mask, [[0, 0, 1, 1]])


def test_next_token_targets_pair_positions_with_the_following_token():
    examples = text.pack_documents([[1, 2, 3]], seq_len=6, eos_id=EOS, pad_id=PAD)
    targets, weights = text.next_token_targets(examples.input_ids, examples.loss_mask)
    np.testing.assert_array_equal(targets, [[2, 3, EOS, PAD, PAD]])
    np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 0]])


def test_plain_text_corpus_is_packed_with_the_tokenizer(tiny_tokenizer, tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text(CORPUS[0])
    files[1].write_text(CORPUS[1])
    examples = text.load_text_corpus(files, tiny_tokenizer, seq_len=8)
    eos = tiny_tokenizer.eos_token_id
    stream = tiny_tokenizer.encode(CORPUS[0]) + [eos] + tiny_tokenizer.encode(CORPUS[1]) + [eos]
    assert examples.input_ids.shape == (-(-len(stream) // 8), 8)
    np.testing.assert_array_equal(examples.input_ids[examples.attention_mask == 1], stream)
    again = text.load_text_corpus(files, tiny_tokenizer, seq_len=8)
    for name, array in examples.arrays().items():
        np.testing.assert_array_equal(array, again.arrays()[name])


def test_jsonl_text_and_prompt_completion_corpora(tiny_tokenizer, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in CORPUS[:3]])
    packed = text.load_text_corpus(docs, tiny_tokenizer, seq_len=16)
    assert packed.attention_mask.sum() == sum(len(tiny_tokenizer.encode(t)) + 1 for t in CORPUS[:3])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "a photo of", "completion": " a cat."}, {"prompt": "caption:", "completion": " the red truck"}],
    )
    examples = text.load_text_corpus(pairs, tiny_tokenizer, seq_len=16, mask_prompt=True)
    assert len(examples) == 2
    prompt_len = len(tiny_tokenizer.encode("a photo of"))
    completion = tiny_tokenizer.encode(" a cat.") + [tiny_tokenizer.eos_token_id]
    targets = examples.input_ids[0][examples.loss_mask[0] == 1]
    np.testing.assert_array_equal(targets, completion)
    assert examples.loss_mask[0, :prompt_len].sum() == 0


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "bad"'], r"c.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', '{"prompt": "p"}'], r"c.jsonl:2: field 'completion' must be a string"),
        (['{"body": "x"}'], r"c.jsonl:1: a record needs either a 'text' field or 'prompt' and 'completion'"),
        (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], r"mixes documents \(.*c.jsonl:1\) and .*c.jsonl:2"),
        (["[1, 2]"], r"c.jsonl:1: expected a JSON object, got list"),
        (["", "  "], r"c.jsonl holds no records"),
    ],
)
def test_bad_jsonl_is_reported_by_file_and_line(tiny_tokenizer, tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        text.load_text_corpus(path, tiny_tokenizer, seq_len=8)


def test_text_examples_reject_mismatched_arrays():
    with pytest.raises(ValueError, match="share one"):
        text.TextExamples(np.zeros((2, 4), np.int32), np.zeros((2, 4), np.int32), np.zeros((2, 3), np.int32))
