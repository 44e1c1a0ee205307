"""The language model: GPT-2 in flax.linen, decoding, sampling, scoring, and Hugging Face weights and tokenizers.

    gpt2.py          the model (parameter tree mirrors Hugging Face), explicit KV cache
    decoding.py      GenerationConfig, prefill + cached decode in one while_loop, generate_tokens, generate
    sampling.py      logit processing and token selection: the plain sort + cumsum path and the sampler switch
    sampling_cpu.py  XLA:CPU fast path: rejection rounds over a block CDF, no sort
    beam.py          beam search
    matmul_cpu.py    the [out, in] kernel layout XLA:CPU multiplies faster (kernels_out_in)
    scoring.py       prefix-conditioned token log-likelihoods; classification by class-prompt likelihood
    hf.py            GPT-2 weights from and to Hugging Face directories (safetensors)
    tokenizer.py     byte-level BPE training and transformers wrappers
"""
