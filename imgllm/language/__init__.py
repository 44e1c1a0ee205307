"""The language models: GPT-2 and the Llama family in flax.linen, one interface, decoding, sampling, scoring, and
weights and tokenizers from Hugging Face directories and GGUF files.

    model.py         the one interface every LM-side function uses (config_from_dict, model_and_params, ...)
    gpt2.py          GPT-2 (parameter tree mirrors Hugging Face)
    llama.py         Llama, SmolLM2, Mistral, Qwen2: RMSNorm, rotary positions, SwiGLU, grouped-query attention
    cache.py         the explicit KV cache and attention mask both models share
    decoding.py      GenerationConfig, prefill + cached decode in one while_loop, generate_tokens, generate
    sampling.py      logit processing and token selection: the plain sort + cumsum path and the sampler switch
    sampling_cpu.py  XLA:CPU fast path: rejection rounds over a block CDF, no sort
    beam.py          beam search
    matmul_cpu.py    the [out, in] kernel layout XLA:CPU multiplies faster (kernels_out_in)
    scoring.py       prefix-conditioned token log-likelihoods; classification by class-prompt likelihood
    load.py          any LM from a GGUF file, a Hugging Face directory or a hub name (load_lm, save_lm)
    hf.py            GPT-2 weights from and to Hugging Face directories (safetensors), tokenizers
    llama_weights.py Llama-family weights from and to Hugging Face directories, and from GGUF files
    gguf_file.py     GGUF files: header checks, dequantisation, llama.cpp's Q/K order undone, the file's tokenizer
    tokenizer.py     byte-level BPE training and transformers wrappers
"""
