"""infer.py's flags: the parsers of its three commands (caption, assemble, merge), with one-line errors.

What the caption flags do, beyond their --help lines:

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
--html), or names the incomplete parts (status 2). A process that dies takes the job with it (JAX aborts the others
within its heartbeat timeout, status 134); the same command then resumes every part. The batch size is rounded up
to a multiple of each process's device count, and the records are one process's with the same --batch-size when it
is a multiple of those counts.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence

from imgllm import parallel
from imgllm.data.images import DEFAULT_MAX_PIXELS
from imgllm.pipeline.caption import CLASSIFIERS, LM_SCORINGS
from imgllm.pipeline.options import DECODING_METHODS, DEFAULT_COMPILATION_CACHE
from imgllm.precision import DTYPE_CHOICES


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


def dashed_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with flags written train.py's way (--batch_size) in this parser's way (--batch-size)."""

    def dashed(arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        name, equals, value = arg.partition("=")
        return name.replace("_", "-") + equals + value

    return [dashed(arg) for arg in argv]


def split_list(text: str | None, separator: str, flag: str) -> list[str] | None:
    """A flag's list value split at `separator` (items stripped); None stays None, an empty item is refused."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(separator)]
    if not all(items):
        raise ValueError(f"{flag}={text!r}: an empty item (separate items with {separator!r})")
    return items


# ----------------------------------------------------------------------------------------------- caption


def caption_parser() -> argparse.ArgumentParser:
    """The caption command's parser (the default command): its flags in five groups, listed by --help in order."""
    parser = OneLineParser(
        prog="infer.py",
        description="Caption images with a pipeline checkpoint.",
        epilog="Other commands: infer.py assemble --help, infer.py merge --help. Flags may "
        "also be written with underscores (--batch_size); --debug shows tracebacks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_input_output_flags(parser)
    add_decoding_flags(parser)
    add_label_flags(parser)
    add_run_flags(parser)
    add_job_flags(parser)
    return parser


def add_input_output_flags(parser: argparse.ArgumentParser) -> None:
    """The images, the checkpoint, and where the records (and their HTML page) go."""
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


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """How the captions are made: batches and random keys, the decoding method, the prompt, TTA, the precision."""
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


def add_label_flags(parser: argparse.ArgumentParser) -> None:
    """Classification by the LM, where the labels come from, and scoring against reference captions."""
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


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """How the run goes without changing the records: resuming, reading, compiling, one shard of N, progress."""
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


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """A multi-process JAX job, joined as train.py joins one (`parallel.maybe_initialize_distributed`)."""
    job = parser.add_argument_group(
        "multi-process JAX job (as train.py): process i captions shard i of the processes on its own devices "
        "into its part, then process 0 merges the parts into --output (and --html)"
    )
    job.add_argument(
        "--coordinator-address", default=None, help=f"coordinator host:port (or ${parallel.ENV_COORDINATOR})"
    )
    job.add_argument(
        "--num-processes", type=int, default=None, help=f"number of processes (or ${parallel.ENV_NUM_PROCESSES})"
    )
    job.add_argument(
        "--process-id", type=int, default=None, help=f"this process's index (or ${parallel.ENV_PROCESS_ID})"
    )
    job.add_argument("--distributed", action="store_true", help="let JAX detect the job (TPU pod slice, SLURM, ...)")


# ----------------------------------------------------------------------------------------------- merge, assemble


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
