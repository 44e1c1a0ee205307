"""`infer.py assemble`: writes a pipeline checkpoint from training runs (`imgllm.train.export` does the work).

    python infer.py assemble --classifier runs/cifar10 --lm path/to/model.gguf|DIR|hub-name --out CKPT [--tokenizer DIR]
    python infer.py assemble --captioner runs/mycaptioner --out CKPT

The flags are `infer_flags.assemble_parser`'s.
"""

from __future__ import annotations

import argparse
import importlib
import os

from imgllm.pipeline.checkpoint import check_replaceable

# The trainer's modules that `assemble` needs, loaded only by that command: they add seconds to a caption run's start.
EXPORT_MODULE = "imgllm.train.export"


def run_assemble(args: argparse.Namespace) -> int:
    """Writes a pipeline checkpoint from a captioner run, or from a classifier run and a language model."""
    if args.captioner and (args.classifier or args.lm or args.tokenizer):
        raise ValueError("assemble: --captioner holds its CNN, LM and tokenizer; drop --classifier/--lm/--tokenizer")
    if not args.captioner and not (args.classifier and args.lm):
        raise ValueError("assemble: give --captioner WORKDIR, or both --classifier and --lm")
    if os.path.exists(args.out) and not args.overwrite:  # the library's own error names overwrite=True
        raise FileExistsError(
            f"assemble: --out {args.out} exists; pass --overwrite to replace it, or choose another --out"
        )
    check_replaceable(args.out)  # before loading anything: --overwrite replaces only a pipeline checkpoint
    export = importlib.import_module(EXPORT_MODULE)
    if args.captioner:
        out = export.export_pipeline_checkpoint(
            args.captioner, args.out, max_new_tokens=args.max_new_tokens or 0, overwrite=args.overwrite
        )
    else:
        out = export.assemble_pipeline_checkpoint(
            args.out,
            classifier=args.classifier,
            lm=args.lm,
            tokenizer=args.tokenizer,
            template=args.template,
            top_k=args.top_labels,
            max_new_tokens=args.max_new_tokens or 20,
            overwrite=args.overwrite,
        )
    print(out)
    return 0
