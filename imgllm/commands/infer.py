"""Caption images with a pipeline checkpoint, or assemble one: `imgllm-infer` (or `python infer.py`).

    python infer.py --checkpoint CKPT photos/ more/*.png tfds:cifar10:test --output captions.jsonl
    python infer.py --checkpoint CKPT photos/ --format csv --output captions.csv --html captions.html \\
        --decoding sample --top-p 0.9 --num-captions 3 --seed 1
    python infer.py assemble --classifier runs/cifar10 --lm path/to/model.gguf|DIR|hub-name --out CKPT [--tokenizer DIR]
    python infer.py assemble --captioner runs/mycaptioner --out CKPT
    python infer.py --checkpoint CKPT photos/ --output captions.jsonl --shard $SLURM_ARRAY_TASK_ID/10   # on 10 machines
    python infer.py merge --output captions.jsonl [--html captions.html] [--remove-parts]            # then once

`python infer.py --help` lists the flags; `imgllm.commands.infer_flags` defines them, and its docstring says what
the records are, how a run resumes, the exit statuses, and how --shard, merge and a multi-process job split a run.
This module only reads flags and prints: the work is `imgllm.pipeline.caption_files` (importable, documented there),
with the flags that shape the records as one `imgllm.pipeline.CaptionOptions`; `assemble` is `commands.assemble`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from absl import logging

from imgllm import cli, parallel
from imgllm.commands.assemble import run_assemble
from imgllm.commands.infer_flags import assemble_parser, caption_parser, dashed_flags, merge_parser, split_list
from imgllm.pipeline import CaptionOptions, RunSettings, caption_files
from imgllm.pipeline.batch import STDOUT, merge_parts
from imgllm.pipeline.inputs import iter_inputs, parse_shard
from imgllm.pipeline.outputs import OutputError
from imgllm.pipeline.records import score_records

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    """The options that shape the records, from the caption flags (`CaptionOptions` checks their values)."""
    return CaptionOptions(
        method=args.decoding,
        num_beams=args.num_beams,
        top_p=args.top_p,
        top_k=args.top_k,
        temperature=args.temperature,
        num_captions=args.num_captions,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        top_labels=args.top_labels,
        tta=args.tta,
        lm_classify=args.lm_classify,
        classify=args.classify,
        lm_labels=split_list(args.lm_labels, ",", "--lm-labels"),
        lm_templates=split_list(args.lm_templates, "|", "--lm-templates"),
        lm_scoring=args.lm_scoring,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def run_captions(args: argparse.Namespace, options: CaptionOptions) -> int:
    """The caption command; returns the exit status (2, with one line on stderr, when the output cannot be used)."""
    if next(iter_inputs(args.inputs, data_dir=args.data_dir), None) is None:  # lists up to the first image only
        print("infer.py: error: no input images found", file=sys.stderr)
        return cli.USAGE_STATUS
    settings = RunSettings(
        workers=args.workers,
        progress=not args.quiet,
        compilation_cache=args.compilation_cache,
        max_pixels=args.max_pixels or None,
    )
    records = caption_files(
        args.checkpoint,
        args.inputs,  # listed again as they are captioned
        options,
        output=args.output or STDOUT,
        fmt=args.format,
        html=args.html,
        resume=args.resume,
        retry_errors=args.retry_errors,
        settings=settings,
        data_dir=args.data_dir,
        references=args.references,
        shard=None if args.job else args.shard,  # a job's process finds its shard itself
    )
    succeeded, failed, scored = 0, 0, []
    try:
        for record in records:
            succeeded += "error" not in record
            failed += "error" in record
            if args.references:
                scored.append(record)
    except OutputError as error:
        print(f"infer.py: error: {error}", file=sys.stderr)
        return cli.USAGE_STATUS
    if args.job and args.job[0] == 0:
        print(f"infer.py: merged the parts of the {args.job[1]} processes into {args.output}", file=sys.stderr)
    if args.references:
        scores = score_records(scored, args.references, lm_label_names=options.lm_labels)
        print(json.dumps({"scores": scores}), file=sys.stderr)
    if args.shard is not None and succeeded + failed == 0:  # more shards than batches: an empty part, not a failure
        print(
            f"infer.py: shard {args.shard[0]}/{args.shard[1]} holds no images (fewer batches than shards)",
            file=sys.stderr,
        )
        return 0
    if succeeded == 0:
        print("infer.py: no image could be captioned (see the error records)", file=sys.stderr)
        return 1
    if failed:
        print(f"infer.py: {failed} of {succeeded + failed} images failed (see their error records)", file=sys.stderr)
    return 0


def join_job(args: argparse.Namespace) -> tuple[int, int] | None:
    """Joins a multi-process JAX job when the flags or the environment ask (`parallel.maybe_initialize_distributed`,
    as train.py); returns (this process's index, the number of processes) when there are several, else None. A
    job's processes each caption their own shard, so --shard is refused, and --output is needed (the parts go
    beside it); `args.shard` becomes this process's shard."""
    joined = parallel.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed
    )
    if not joined:
        return None
    import jax

    if jax.process_count() == 1:
        return None
    job = (jax.process_index(), jax.process_count())
    if args.shard is not None:
        raise ValueError(
            f"--shard with a multi-process job: process i of {job[1]} captions shard i/{job[1]} by itself "
            "(drop --shard, or run the shards without --coordinator-address/--distributed)"
        )
    if not args.output or args.output == STDOUT:
        raise ValueError(
            "a multi-process job needs --output: each process writes its part beside it, then process 0 merges them"
        )
    args.shard = job
    return job


def run_merge(args: argparse.Namespace) -> int:
    """The merge command: the output from its shards' parts (`merge_parts`); 2, with one line, when it cannot."""
    try:
        records = merge_parts(args.output, html=args.html, remove_parts=args.remove_parts)
    except OutputError as error:
        print(f"infer.py: error: merge: {error}", file=sys.stderr)
        return cli.USAGE_STATUS
    failed = sum("error" in record for record in records)
    print(f"infer.py: merged {len(records)} records ({failed} errors) into {args.output}", file=sys.stderr)
    return 0


def run(argv: list[str]) -> int:
    """The command `argv` names (caption, the default; assemble; merge); returns the exit status."""
    if argv and argv[0] == "assemble":
        return run_assemble(assemble_parser().parse_args(argv[1:]))
    if argv and argv[0] == "merge":
        return run_merge(merge_parser().parse_args(argv[1:]))
    if argv and argv[0] == "caption":
        argv = argv[1:]
    args = caption_parser().parse_args(argv)
    args.shard = parse_shard(args.shard)
    if args.shard is not None and args.html:
        raise ValueError(
            "--html with --shard: each shard writes a part of the output; write the page when merging "
            "(infer.py merge --output OUTPUT --html PAGE)"
        )
    args.job = join_job(args)  # before anything asks JAX for its devices (the dtype does)
    options = caption_options(args)  # every value checked before anything is read
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} is not a directory (infer.py assemble makes one)")
    return run_captions(args, options)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli.debug_requested(argv)
    if not debug:
        logging.set_verbosity(logging.ERROR)  # orbax's INFO and WARNING lines are for its developers
    try:
        return cli.user_errors_exit("infer.py", run, dashed_flags(cli.without_debug_flag(argv)), debug=debug)
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            "infer.py: interrupted; the records written so far are kept, and the same command resumes", file=sys.stderr
        )
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
