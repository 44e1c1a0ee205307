"""The offline BPE tokenizer: exact round trip, GPT-2 special-token conventions, loads with AutoTokenizer."""

import os
import subprocess
import sys

import pytest
import transformers

from imgllm.language.tokenizer import END_OF_TEXT, train_bpe_tokenizer

TEXTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a small green star above a large white ring",
    "a photo of a triangle.",
]


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
    assert batch["attention_mask"][0][0] == 0  # left padding


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        train_bpe_tokenizer([])


TORCH_NOTICE = "Models won't be available and only tokenizers"  # transformers' "PyTorch was not found. ..."


def test_importing_transformers_without_torch_prints_no_pytorch_notice():
    """Without torch, `import transformers` logs "PyTorch was not found. Models won't be available ...": noise for
    imgllm, which runs on JAX. Importing imgllm drops exactly that notice; other transformers messages still show.
    torch is hidden in the subprocesses (sys.modules["torch"] = None: importlib's find_spec then finds nothing)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")
    }
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])

    def stderr_of(code):
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    if TORCH_NOTICE not in stderr_of("import transformers"):
        pytest.skip("this transformers version logs no notice without torch")
    stderr = stderr_of(
        "import imgllm.language.tokenizer, transformers\n"
        "assert not transformers.is_torch_available()\n"
        "transformers.logging.get_logger('transformers').warning('another notice')"
    )
    assert TORCH_NOTICE not in stderr
    assert "another notice" in stderr
