"""A tiny GPT-2 trained from scratch on a text corpus (next-token loss); seconds to minutes on CPU.

Run:  python train.py --config=lm_tiny --config.corpus=/path/to/text.txt --workdir=/tmp/lm_tiny
Corpus: plain text (one document per file, packed into seq_len rows) or JSON lines with "text" or
"prompt"/"completion" fields (see imgllm/data/text.py). The tokenizer is a byte-level BPE trained on
the corpus unless --config.tokenizer.path is given. Fine-tune a Hugging Face GPT-2 instead with
--config.lm.pretrained=<dir, hub name or .gguf> (GPT-2 or the Llama family, e.g. SmolLM2). Export for transformers:
  python -c "from imgllm.train.export import export_hf; export_hf('/tmp/lm_tiny', '/tmp/lm_tiny_hf')"
Used by tests/test_lm_task.py (a few steps reduce the loss on a corpus the test writes).
"""

import ml_collections
from ml_collections import config_dict

from imgllm.configs.common import base_config


def get_config():
    c = base_config()
    c.task = "lm"  # the next-token LM Task (imgllm.train.registry.TASKS)
    c.corpus = config_dict.placeholder(str)  # training corpus file(s), comma-separated (.txt or .jsonl)
    c.eval_corpus = config_dict.placeholder(str)  # held-out corpus evaluated each epoch (None: no evaluation)
    c.eval_split = ""  # a text corpus has no splits (eval_corpus instead)
    c.seq_len = 64  # tokens per training row (<= lm.n_positions)
    c.mask_prompt = True  # prompt/completion corpora: train on the completion tokens only
    c.truncate = False  # prompt/completion pairs longer than seq_len: cut (True) or error (False)
    c.tta = "none"  # no test-time augmentation for text
    c.lm = ml_collections.ConfigDict(
        dict(
            pretrained=config_dict.placeholder(
                str
            ),  # GPT-2 / Llama-family HF dir, hub name or GGUF file (None: random)
            dropout=0.0,  # embd/attn/resid dropout while training
            vocab_size=512,  # random-init sizes (ignored with pretrained)
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
        )
    )
    c.tokenizer = ml_collections.ConfigDict(
        dict(
            path=config_dict.placeholder(str),  # tokenizer directory or hub name (None: pretrained's, else BPE)
            vocab_size=512,  # trained BPE: at most this many tokens
        )
    )
    c.global_batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 5.0
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_epochs = 0.5
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.groups = ml_collections.ConfigDict()
    c.log_every_steps = 10
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
