"""The offline BPE tokenizer: exact round trip, GPT-2 special-token conventions, loads with AutoTokenizer."""
import pytest
import transformers

from imgllm.language.tokenizer import END_OF_TEXT, train_bpe_tokenizer

TEXTS = ["a small red circle on the left", "a large blue square at the top",
         "a small green star above a large white ring", "a photo of a triangle."]


def test_round_trip_and_special_tokens():
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=400)
    assert len(tokenizer) <= 400
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    assert tokenizer.eos_token_id == 0 and tokenizer.padding_side == "left"
    for text in TEXTS + ["an unseen Word, with ünïcode!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert END_OF_TEXT not in tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text
    # Frequent caption words become single tokens (the merges were learned from the texts).
    assert len(tokenizer(" circle", add_special_tokens=False)["input_ids"]) == 1


def test_deterministic_and_saved_for_auto_tokenizer(tmp_path):
    first = train_bpe_tokenizer(TEXTS, vocab_size=300)
    second = train_bpe_tokenizer(list(TEXTS), vocab_size=300)
    assert first.get_vocab() == second.get_vocab()
    first.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "a large red star at the bottom"
    assert loaded(text)["input_ids"] == first(text)["input_ids"]
    assert loaded.eos_token_id == first.eos_token_id and loaded.pad_token_id == first.pad_token_id
    batch = loaded(["a cat", "a small red circle"], padding=True)
    assert batch["attention_mask"][0][0] == 0   # left padding


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        train_bpe_tokenizer([])
