"""Caption images with a pipeline checkpoint, or assemble one: `imgllm-infer` (or `python infer.py`).

    python infer.py --checkpoint CKPT photos/ more/*.png tfds:cifar10:test --output captions.jsonl
    python infer.py --checkpoint CKPT photos/ --format csv --output captions.csv --html captions.html \\
        --decoding sample --top-p 0.9 --num-captions 3 --seed 1
    python infer.py assemble --classifier runs/cifar10 --lm path/to/model.gguf|DIR|hub-name --out CKPT [--tokenizer DIR]
    python infer.py assemble --captioner runs/mycaptioner --out CKPT
    python infer.py --checkpoint CKPT photos/ --output captions.jsonl --shard $SLURM_ARRAY_TASK_ID/10   # on 10 machines
    python infer.py merge --output captions.jsonl [--html captions.html] [--remove-parts]            # then once

Inputs are image files, folders (searched recursively; files without an image extension are skipped, with a
warning unless they are sidecar files such as captions.jsonl or notes.txt), glob patterns, or a tfds split written
tfds:NAME:SPLIT. Each image gives one record (a JSON line, or a CSV row): its path, the top-k labels with
probabilities and the caption(s); a file that cannot be read gives an error record and the run goes on.
Records are appended as each batch finishes; rerunning the same command
skips the images already in the output (a partly written last line is dropped), and with the same --seed and
--batch-size gives the same records as an uninterrupted run; --retry-errors also redoes the images whose records
are errors. One run at a time writes an output (OUTPUT.lock), and resuming with options that change the records
(kept in OUTPUT.run.json) is refused: --no-resume starts over. Exit status: 1 when nothing could be captioned;
2 when the command cannot run (no inputs, the output in use, written with other options, a line that is not a
record, an --html page that cannot be written), with one line on stderr saying why; 130 after Ctrl-C (the records
written so far are kept). JAX's persistent compilation
cache (--compilation-cache) makes a second run skip compiling. --dtype picks the compute precision (auto: bfloat16
on GPU/TPU, float32 on CPU; the checkpoint's float32 parameters serve either).

Without JAX coordination (a SLURM array, a batch queue), --shard=i/N (0 <= i < N) captions shard i of N of the
inputs: whole batches of the full run (those whose index b has b % N == i, with its batch size and random keys), so
its records are the full run's. With --output captions.jsonl it writes captions.shard-0000i-of-0000N.jsonl (lock,
run options and resuming as any output; the run options name the shard). `infer.py merge --output captions.jsonl`
then writes captions.jsonl (and its run options) as one unsharded run writes it, in input order, once every part is
complete (else one line names the missing and incomplete parts); the parts are kept unless --remove-parts.
In a multi-process JAX job (train.py's flags: --coordinator_address=host:port --num_processes=N --process_id=i, or
$IMGLLM_COORDINATOR_ADDRESS/$IMGLLM_NUM_PROCESSES/$IMGLLM_PROCESS_ID, or --distributed) both happen in one command:
process i captions shard i/N on its own devices into its part, then process 0 merges the parts into --output (and
--html), or names the incomplete parts (status 2). The batch size is rounded up to a multiple of each process's
device count, and the records are one process's with the same --batch-size when it is a multiple of those counts.

This module only reads flags and prints: the work is `imgllm.pipeline.caption_files` (importable, documented there),
with the flags that shape the records as one `imgllm.pipeline.CaptionOptions`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from collections.abc import Sequence

from absl import logging

from imgllm import cli, parallel
from imgllm.data.images import DEFAULT_MAX_PIXELS
from imgllm.pipeline import CaptionOptions, RunSettings, caption_files
from imgllm.pipeline.batch import STDOUT, merge_parts
from imgllm.pipeline.caption import CLASSIFIERS, LM_SCORINGS
from imgllm.pipeline.checkpoint import check_replaceable
from imgllm.pipeline.inputs import expand_inputs, parse_shard
from imgllm.pipeline.options import DECODING_METHODS, DEFAULT_COMPILATION_CACHE
from imgllm.pipeline.outputs import OutputError
from imgllm.pipeline.records import score_records
from imgllm.precision import DTYPE_CHOICES

ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = (
    parallel.ENV_COORDINATOR,
    parallel.ENV_NUM_PROCESSES,
    parallel.ENV_PROCESS_ID,
)
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
# The trainer's modules that `assemble` needs, loaded only by that command: they add seconds to a caption run's start.
EXPORT_MODULE = "imgllm.train.export"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (ValueError, printed by `cli.user_errors_exit`), not a usage
    block, with the closest flag suggested for a misspelled one; flags are never abbreviated."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ValueError(f"{message} ({self.prog} --help lists the flags)")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        """argparse's parsing, after `check_flags` (an unknown flag is named before a missing required one)."""
        args = sys.argv[1:] if args is None else list(args)
        check_flags(args, [option for action in self._actions for option in action.option_strings], self.prog)
        return super().parse_args(args, namespace)


def check_flags(argv: Sequence[str], options: Sequence[str], prog: str) -> None:
    """Raises ValueError naming the first flag of `argv` that is not among `options`, with the closest one."""
    for arg in argv:
        if arg == "--":
            return
        name = arg.partition("=")[0]
        if arg.startswith("-") and len(arg) > 1 and not is_number(arg) and name not in options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ValueError(f"unrecognized flag {name}{hint} ({prog} --help lists the flags)")


def is_number(text: str) -> bool:
    """Whether `text` is a number (a negative value such as -1 is not a flag)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    items = expand_inputs(args.inputs, data_dir=args.data_dir)
    if not items:
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
        items,
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


def split_list(text: str | None, separator: str, flag: str) -> list[str] | None:
    """A flag's list value split at `separator` (items stripped); None stays None, an empty item is refused."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(separator)]
    if not all(items):
        raise ValueError(f"{flag}={text!r}: an empty item (separate items with {separator!r})")
    return items


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


# ----------------------------------------------------------------------------------------------- flags


def caption_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="infer.py",
        description="Caption images with a pipeline checkpoint.",
        epilog="Other commands: infer.py assemble --help, infer.py merge --help. Flags may "
        "also be written with underscores (--batch_size); --debug shows tracebacks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns, or tfds:NAME:SPLIT")
    parser.add_argument("--checkpoint", required=True, help="pipeline checkpoint directory (infer.py assemble)")
    parser.add_argument("--output", "-o", help="output file (default: stdout, no resuming)")
    parser.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default=None,
        help="output format (default: csv for a .csv output, else jsonl)",
    )
    parser.add_argument("--html", help="also write an HTML page with thumbnails, labels and captions")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (rounded up to the devices)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--decoding", choices=DECODING_METHODS, default="greedy")
    parser.add_argument("--num-beams", type=int, default=4, help="beams for --decoding beam")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --decoding sample")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter for --decoding sample (0: off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--num-captions", type=int, default=1, help="captions per image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length (default: checkpoint's)")
    parser.add_argument("--top-labels", type=int, default=None, help="labels per image (default: checkpoint's)")
    parser.add_argument(
        "--template", default=None, help="prompt template, e.g. 'A photo of a {label}.' or 'This shows {topk}.'"
    )
    parser.add_argument("--tta", action="store_true", help="average the CNN over the image and its mirror")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="compute dtype of the CNN and the LM (auto: bfloat16 on GPU/TPU, float32 on CPU); "
        "parameters stay float32, softmaxes and log-probabilities float32",
    )
    parser.add_argument(
        "--lm-classify",
        action="store_true",
        help="also report the LM's classification by the likelihood of the checkpoint's class "
        "prompt templates (checkpoints with a bridge)",
    )
    parser.add_argument(
        "--lm-labels",
        default=None,
        help="classify by the LM among these comma-separated labels instead of the CNN's classes, "
        "e.g. red,green,blue (records get lm_label and lm_probs; checkpoints with a bridge)",
    )
    parser.add_argument(
        "--lm-templates",
        default=None,
        help="'|'-separated prompts of --lm-labels, e.g. 'a small {label}|a large {label}': a label's "
        "score is the mean of its prompts' likelihoods; a template ending in {label} is a "
        "caption's beginning (its end is not scored), one with text after {label} a whole "
        "caption (default: the checkpoint's class prompt templates)",
    )
    parser.add_argument(
        "--lm-scoring",
        choices=LM_SCORINGS,
        default="likelihood",
        help="score labels by their prompts' likelihood after the image, or by the information gain "
        "over a neutral image (removes the LM's preference among the labels)",
    )
    parser.add_argument(
        "--classify",
        choices=CLASSIFIERS,
        default=None,
        help="where the labels (and the prompt's {label}) come from: the CNN's head, the LM's class "
        "prompt scores, or both fused with the checkpoint's fitted weight (default: the "
        "checkpoint's choice)",
    )
    parser.add_argument(
        "--references",
        default=None,
        help='JSON lines of {"path", "caption"} (several per image allowed; e.g. written by '
        "python -m imgllm.data.demo_images): score the captions against them (exact match, "
        "BLEU-4, CIDEr-D; and label accuracy when lines have a label)",
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="overwrite the output instead of skipping the images already in it",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="when resuming, caption again the images whose records in the output are errors "
        "(their error records are replaced)",
    )
    parser.add_argument("--data-dir", default=None, help="tfds data directory for tfds: inputs")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    parser.add_argument(
        "--compilation-cache",
        default=os.environ.get("IMGLLM_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE),
        help="JAX persistent compilation cache directory ('' to turn off)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="an image with more pixels (read from its header) gets an error record instead of "
        "being decoded: a guard against decompression bombs (0: no limit)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="i/N: caption only shard i (0 <= i < N) of N of the inputs (whole batches of the full "
        "run, same records), into the part OUTPUT-stem.shard-0000i-of-0000N.suffix; join the "
        "parts with infer.py merge (e.g. --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    job = parser.add_argument_group(
        "multi-process JAX job (as train.py): process i captions shard i of the processes on its own devices "
        "into its part, then process 0 merges the parts into --output (and --html)"
    )
    job.add_argument("--coordinator-address", default=None, help=f"coordinator host:port (or ${ENV_COORDINATOR})")
    job.add_argument("--num-processes", type=int, default=None, help=f"number of processes (or ${ENV_PROCESSES})")
    job.add_argument("--process-id", type=int, default=None, help=f"this process's index (or ${ENV_PROCESS_ID})")
    job.add_argument("--distributed", action="store_true", help="let JAX detect the job (TPU pod slice, SLURM, ...)")
    return parser


def merge_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="infer.py merge",
        description="Write the output of a run split with --shard=i/N from its N parts, as one "
        "unsharded run writes it (in input order), once every part is complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", "-o", required=True, help="the --output the shards were given")
    parser.add_argument("--html", default=None, help="also write the HTML page of the records")
    parser.add_argument(
        "--remove-parts", action="store_true", help="delete the parts and their run options once the output is written"
    )
    return parser


def assemble_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="infer.py assemble",
        description="Build a pipeline checkpoint from a captioner run "
        "(--captioner), or from a classifier and a language model "
        "(GPT-2 or the Llama family).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--captioner",
        default=None,
        help="train.py work directory of a captioner (CNN, visual prefix, LM and tokenizer)",
    )
    parser.add_argument("--classifier", default=None, help="train.py work directory of the CNN")
    parser.add_argument(
        "--lm",
        default=None,
        help="the language model: a GGUF file (e.g. SmolLM2's), or a Hugging Face GPT-2 / Llama / "
        "Mistral / Qwen2 directory (config.json + safetensors) or hub name",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: the LM's)")
    parser.add_argument("--out", required=True, help="the pipeline checkpoint directory to write")
    parser.add_argument("--template", default="A photo of a {label}.", help="default prompt template")
    parser.add_argument("--top-labels", type=int, default=1, help="default number of labels per image")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default caption length (20; a captioner's: its longest caption + 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def dashed_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with flags written train.py's way (--batch_size) in this parser's way (--batch-size)."""

    def dashed(arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        name, equals, value = arg.partition("=")
        return name.replace("_", "-") + equals + value

    return [dashed(arg) for arg in argv]


def run(argv: list[str]) -> int:
    """The command `argv` names (caption, the default, or assemble); returns the exit status."""
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
