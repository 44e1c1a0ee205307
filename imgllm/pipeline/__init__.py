"""Caption inference: image → CNN → labels / visual prefix → LM → captions, and batch captioning of files.

prompts.py     caption prompt templates tokenised once (TokenizedTemplate) for jitted code to gather from
caption.py     caption_images: uint8 images → labels, prompts, caption ids (pure, jit/pmap-able; PipelineSpec)
checkpoint.py  the pipeline checkpoint format: save, read, load_pipeline → PipelineCheckpoint (makes the spec)
options.py     CaptionOptions (what shapes a record: decoding, labels, dtype, seed, ...) and RunSettings (what does not)
inputs.py      files, folders, globs, tfds splits → items → batches read ahead in a thread
records.py     records, the JSON-lines/CSV record file (read back to resume), scores against references
outputs.py     what is kept beside an output: its lock, its run options, shards' parts; atomic rewrites
gallery.py     the HTML gallery of records (infer.py --html)
batch.py       caption_files: inputs → records, what infer.py runs
classify.py    classify_images: the LM's label among any labels (colours, sizes, ...), from Python
api.py         ImageToText: a checkpoint called on paths, PIL images or arrays, one record per image
"""

from imgllm.pipeline.api import ImageToText
from imgllm.pipeline.batch import caption_files, merge_parts
from imgllm.pipeline.caption import PipelineSpec, caption_images, inference_params, make_captioner
from imgllm.pipeline.checkpoint import PipelineCheckpoint, load_pipeline
from imgllm.pipeline.classify import LabelPredictions, classify_images
from imgllm.pipeline.options import CaptionOptions, RunSettings
from imgllm.pipeline.records import score_records

# The front door: what a user needs. Everything else is imported from its module (imgllm.pipeline.prompts,
# .caption, .inputs, .records, .outputs, .gallery, .checkpoint, .batch), named in the docstring above.
__all__ = [
    "CaptionOptions",
    "ImageToText",
    "LabelPredictions",
    "PipelineCheckpoint",
    "PipelineSpec",
    "RunSettings",
    "caption_files",
    "caption_images",
    "classify_images",
    "inference_params",
    "load_pipeline",
    "make_captioner",
    "merge_parts",
    "score_records",
]
