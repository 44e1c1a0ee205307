"""Caption inference: image → CNN → labels / visual prefix → LM → captions, and batch captioning of files.

prompts.py     caption prompt templates tokenised once (TokenizedTemplate) for jitted code to gather from
caption.py     caption_images: uint8 images → labels, prompts, caption ids (pure, jit/pmap-able; PipelineSpec)
checkpoint.py  the pipeline checkpoint format: save, read, load_pipeline → PipelineCheckpoint (makes the spec)
inputs.py      files, folders, globs, tfds splits → items → batches read ahead in a thread
records.py     records, the JSON-lines/CSV output (resumable), scores against references
gallery.py     the HTML gallery of records (infer.py --html)
batch.py       caption_files: inputs → records, what infer.py runs
classify.py    classify_images: the LM's label among any labels (colours, sizes, ...), from Python
api.py         ImageToText: a checkpoint called on paths, PIL images or arrays, one record per image
"""

from imgllm.pipeline.api import ImageToText
from imgllm.pipeline.batch import (
    DEFAULT_COMPILATION_CACHE,
    DecodingOptions,
    caption_files,
    enable_compilation_cache,
    generation_config,
)
from imgllm.pipeline.caption import (
    PipelineSpec,
    caption_images,
    caption_token_lists,
    class_log_probs,
    cnn_logits_and_features,
    compile_captioner,
    decode_captions,
    inference_params,
    lm_classify_images,
    make_captioner,
    place_images,
    place_params,
    preprocess,
    prompts_are_per_class,
    visual_prefix,
)
from imgllm.pipeline.checkpoint import PipelineCheckpoint, load_pipeline
from imgllm.pipeline.classify import LabelPredictions, classify_images
from imgllm.pipeline.gallery import GalleryHeader, write_gallery
from imgllm.pipeline.inputs import Item, expand_inputs
from imgllm.pipeline.prompts import (
    DEFAULT_TEMPLATE,
    PromptPiece,
    SlotTable,
    TokenizedTemplate,
    assemble_prompts,
    expand_template,
    fill_template,
    parse_template,
    probability_percents,
    slot_table,
    tokenize_template,
)
from imgllm.pipeline.records import RecordFile, make_records, score_records

__all__ = [
    "DEFAULT_COMPILATION_CACHE",
    "DEFAULT_TEMPLATE",
    "DecodingOptions",
    "GalleryHeader",
    "ImageToText",
    "Item",
    "LabelPredictions",
    "PipelineCheckpoint",
    "PipelineSpec",
    "PromptPiece",
    "RecordFile",
    "SlotTable",
    "TokenizedTemplate",
    "assemble_prompts",
    "caption_files",
    "caption_images",
    "caption_token_lists",
    "class_log_probs",
    "classify_images",
    "cnn_logits_and_features",
    "compile_captioner",
    "decode_captions",
    "enable_compilation_cache",
    "expand_inputs",
    "expand_template",
    "fill_template",
    "generation_config",
    "inference_params",
    "lm_classify_images",
    "load_pipeline",
    "make_captioner",
    "make_records",
    "parse_template",
    "place_images",
    "place_params",
    "preprocess",
    "probability_percents",
    "prompts_are_per_class",
    "score_records",
    "slot_table",
    "tokenize_template",
    "visual_prefix",
    "write_gallery",
]
