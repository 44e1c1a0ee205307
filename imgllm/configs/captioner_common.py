"""Fields shared by the captioner configs (imgllm.train.captioner.CaptionerTask), on top of the base config."""

import ml_collections
from ml_collections import config_dict

from imgllm.configs.common import base_config
from imgllm.language.scoring import DEFAULT_TEMPLATES


def captioner_config() -> ml_collections.ConfigDict:
    """Base training fields plus the captioner's: frozen classifier, bridge, LM, tokenizer, caption rows."""
    c = base_config()
    c.task = "captioner"  # the captioning Task (imgllm.train.registry.TASKS)
    c.classifier_workdir = config_dict.placeholder(str)  # train.py workdir of the trained classifier (frozen CNN)
    c.feature_batch_size = 500  # images per batch when the frozen CNN's features are precomputed
    c.tta = "none"  # no test-time augmentation for captions
    c.bridge = ml_collections.ConfigDict(
        dict(
            prefix_length=4,  # K visual prefix embeddings before [BOS] caption
            hidden=0,  # mapper hidden width (0: ClipCap's K * n_embd // 2)
            feature_source="pooled",  # "pooled" (CNN features) | "spatial" (last block map) |
            # "pyramid" (whitening stem + every block, pooled to the last block's grid)
        )
    )
    c.lm = ml_collections.ConfigDict(
        dict(
            pretrained=config_dict.placeholder(
                str
            ),  # GPT-2 / Llama-family HF dir, hub name or GGUF file (None: random)
            train=True,  # fine-tune the LM (False: frozen, only the mapper learns)
            dropout=0.0,  # embd/attn/resid dropout while training
            vocab_size=512,  # random-init LM sizes (ignored with pretrained)
            n_positions=64,
            n_embd=128,
            n_layer=2,
            n_head=4,
        )
    )
    c.tokenizer = ml_collections.ConfigDict(
        dict(
            path=config_dict.placeholder(str),  # tokenizer directory or hub name (None: train a BPE on the captions)
            vocab_size=512,  # trained BPE: at most this many tokens
        )
    )
    c.captions = ml_collections.ConfigDict(
        dict(
            templates=DEFAULT_TEMPLATES,  # class prompts: template captions and the LM-classification ensemble
            template_fraction=0.25,  # share of training rows that are class-template captions
            max_tokens=24,  # longest caption in tokens (without BOS/EOS); longer ones are an error
            class_captions=config_dict.placeholder(str),  # datasets without captions: {class: [captions]} JSON file,
            # or "cifar10" (imgllm/language/cifar10_captions.json); None: templates only
        )
    )
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_epochs = 0.5
    c.optimizer.groups = ml_collections.ConfigDict()
    c.eval_every_epochs = 0
    c.checkpoint_every_steps = 1000
    return c
