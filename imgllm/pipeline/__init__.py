"""Caption inference: prompt tables, the jitted image → caption function and the pipeline checkpoint format.

    prompts.py     templates tokenised once into tables that jitted code gathers from
    caption.py     caption_images: uint8 images → labels, prompts, caption ids (pure, jit/pmap-able)
    checkpoint.py  the pipeline checkpoint: save, read, Pipeline (makes the static PipelineSpec)
"""

from imgllm.pipeline.caption import (PipelineSpec, caption_images, caption_token_lists, cnn_logits_and_features, compile_captioner,
                                     decode_captions, inference_params, make_captioner, place_images, place_params,
                                     preprocess, visual_prefix)
from imgllm.pipeline.checkpoint import Pipeline, load_pipeline
from imgllm.pipeline.prompts import (DEFAULT_TEMPLATE, LMClassPrompts, PromptPiece, PromptTables, TokenTable,
                                     assemble_prompts, build_prompt_tables, expand_template, fill_template,
                                     parse_template, probability_percents, token_table)

__all__ = [
    "DEFAULT_TEMPLATE", "LMClassPrompts", "Pipeline", "PipelineSpec", "PromptPiece", "PromptTables", "TokenTable",
    "assemble_prompts", "build_prompt_tables", "caption_images", "caption_token_lists", "cnn_logits_and_features",
    "compile_captioner", "decode_captions", "expand_template", "fill_template", "inference_params", "load_pipeline",
    "make_captioner", "parse_template", "place_images", "place_params", "preprocess", "probability_percents",
    "token_table", "visual_prefix",
]
