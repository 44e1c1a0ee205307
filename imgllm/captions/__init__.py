"""Captions: image–caption data sources, caption metrics (BLEU-4, CIDEr-D, ROUGE-L, exact match, distinct-n) and
coco-caption's PTB tokenisation they read words with."""

from imgllm.captions.data import (
    CaptionFileError,
    coco_example_to_record,
    group_captions,
    load_caption_dataset,
    load_caption_folder,
    load_coco_captions,
    read_captions_file,
)
from imgllm.captions.metrics import (
    bleu4,
    caption_metrics,
    cider_d,
    cider_d_scores,
    cider_note,
    classes_named,
    corpus_bleu,
    distinct_n,
    exact_match,
    lcs_length,
    normalize_caption,
    read_back,
    rouge_l,
    rouge_l_scores,
)
from imgllm.captions.ptb import ptb_tokenize, ptb_tokens, tokenize_caption

__all__ = [
    "CaptionFileError",
    "bleu4",
    "caption_metrics",
    "cider_d",
    "cider_d_scores",
    "cider_note",
    "classes_named",
    "coco_example_to_record",
    "corpus_bleu",
    "distinct_n",
    "exact_match",
    "group_captions",
    "lcs_length",
    "load_caption_dataset",
    "load_caption_folder",
    "load_coco_captions",
    "normalize_caption",
    "ptb_tokenize",
    "ptb_tokens",
    "read_back",
    "read_captions_file",
    "rouge_l",
    "rouge_l_scores",
    "tokenize_caption",
]
