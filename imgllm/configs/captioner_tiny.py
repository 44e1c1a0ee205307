"""Test config: a tiny captioner on a few hundred demo images (seconds on CPU). Used by tests/test_captions.py.

Run:  python train.py --config=captioner_tiny --config.classifier_workdir=/tmp/tiny --workdir=/tmp/tiny_captioner
(after `python train.py --config=cnn_tiny --workdir=/tmp/tiny`).
"""

from imgllm.configs.captioner_common import captioner_config


def get_config():
    c = captioner_config()
    c.dataset = "demo"
    c.num_train_examples = 256
    c.num_eval_examples = 64
    c.bridge.prefix_length = 2
    c.bridge.feature_source = "spatial"
    c.lm.n_embd = 32
    c.lm.n_layer = 1
    c.lm.n_head = 2
    c.lm.n_positions = 24
    c.lm.vocab_size = 384
    c.tokenizer.vocab_size = 384
    c.captions.max_tokens = 16
    c.global_batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 4.0
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps = 8
    c.checkpoint_every_steps = 1000
    c.progress_bar = False
    return c
