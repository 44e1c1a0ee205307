"""Captioner on CIFAR-10: a visual prefix from the frozen CIFAR-10 CNN into a small GPT-2, trained on template
captions of the training labels ("a photo of a cat.", ...), so that the LM can classify by the likelihood of
each class's prompts (`lm_accuracy`, reported next to the CNN head's `accuracy` on the same images).

Run on a trained CIFAR-10 classifier's work directory (same dataset spec, so the same validation split is carved):
    python train.py --config=cifar10 --config.dataset=folder:/tmp/cifar --workdir=runs/cifar10
    python train.py --config=captioner_cifar10 --config.dataset=folder:/tmp/cifar \
        --config.classifier_workdir=runs/cifar10 --workdir=runs/cifar10_captioner
Evaluate on another folder (e.g. the test split):
    python train.py --mode=eval --workdir=runs/cifar10_captioner --data=folder:/path/test

The bridge reads the CNN's pooled features, the input of its classification head, so the class is linearly
readable from the prefix. CIFAR-10 has no captions: every training row is a template caption (the same templates
the LM classification scores). A 2-layer GPT-2 trained from scratch suffices to name ten classes; to start from a
pretrained GPT-2 set --config.lm.pretrained=DIR --config.tokenizer.path=DIR (and lm.train=False to freeze it).
"""

from imgllm.configs.captioner_common import captioner_config


def get_config():
    c = captioner_config()
    c.dataset = "cifar10"
    c.bridge.prefix_length = 4
    c.bridge.feature_source = "pooled"  # the head's input: the features the CNN classifies from
    c.lm.n_embd = 128
    c.lm.n_layer = 2
    c.lm.n_head = 4
    c.lm.n_positions = 32
    c.lm.vocab_size = 512
    c.lm.train = True  # random init: trained with the mapper
    c.tokenizer.vocab_size = 512
    c.captions.max_tokens = 12
    c.global_batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 4.0
    c.optimizer.learning_rate = 2e-3
    c.log_every_steps = 20
    return c
