"""Captions: image–caption data sources and caption metrics (BLEU-4, CIDEr-D, exact match)."""

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
    corpus_bleu,
    exact_match,
    normalize_caption,
    ptb_tokenize,
    ptb_tokens,
    tokenize_caption,
)

__all__ = [
    "CaptionFileError", "bleu4", "caption_metrics", "cider_d", "cider_d_scores", "cider_note",
    "coco_example_to_record", "corpus_bleu", "exact_match", "group_captions", "load_caption_dataset",
    "load_caption_folder", "load_coco_captions", "normalize_caption", "ptb_tokenize", "ptb_tokens",
    "read_captions_file", "tokenize_caption",
]
