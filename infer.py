#!/usr/bin/env python3
"""Caption images with a pipeline checkpoint, or assemble one.

    python infer.py --checkpoint CKPT photos/ more/*.png tfds:cifar10:test --output captions.jsonl
    python infer.py --checkpoint CKPT photos/ --format csv --output captions.csv --html captions.html \\
        --decoding sample --top-p 0.9 --num-captions 3 --seed 1
    python infer.py assemble --classifier runs/cifar10 --lm path/to/gpt2 --out CKPT [--tokenizer DIR]
    python infer.py assemble --captioner runs/mycaptioner --out CKPT

Inputs are image files, folders (searched recursively; files without an image extension are skipped with a
warning), glob patterns, or a tfds split written tfds:NAME:SPLIT. Each image gives one record (a JSON line, or a
CSV row): its path, the top-k labels with probabilities and the caption(s); a file that cannot be read gives an
error record and the run goes on. Records are appended as each batch finishes; rerunning the same command
skips the images already in the output (a partly written last line is dropped), and with the same --seed and
--batch-size gives the same records as an uninterrupted run. The exit status is non-zero only when nothing
could be captioned. JAX's persistent compilation cache (--compilation-cache) makes a second run skip compiling.

Heavy modules (jax, orbax, tensorflow-datasets) are imported only when needed; torch and TensorFlow never.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import glob
import html
import io
import json
import os
import queue
import sys
import threading
from typing import Any, Iterable, Iterator, Sequence

DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imgllm", "jax")
TFDS_PREFIX = "tfds:"
THUMBNAIL_SIZE = 128


# ----------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to caption: `key` is its record's "path"; it is read from a file or a tfds split."""

    key: str
    tfds_source: Any = None
    tfds_index: int = -1

    def load(self, size: int | None):
        """uint8 [size, size, 3] pixels (native size when None); raises ImageDecodeError naming the input."""
        from imgllm.data.images import array_to_rgb, as_size, decode_image

        if self.tfds_source is None:
            return decode_image(self.key, size)
        return array_to_rgb(self.tfds_source[self.tfds_index]["image"], as_size(size), resize="stretch")


def tfds_items(spec: str, data_dir: str | None) -> list[Item]:
    """Items of a tfds split, spec "tfds:NAME:SPLIT" (read lazily through tfds.data_source)."""
    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.partition(":")
    if not name or not split:
        raise ValueError(f"tfds input {spec!r}: write it as tfds:NAME:SPLIT, e.g. tfds:cifar10:test")
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split, data_dir=data_dir)
    return [Item(key=f"{TFDS_PREFIX}{name}:{split}:{index}", tfds_source=source, tfds_index=index)
            for index in range(len(source))]


def expand_inputs(inputs: Sequence[str], *, data_dir: str | None = None) -> list[Item]:
    """Files, folders (recursive), glob patterns and tfds splits → items, in the given order, without repeats.

    A path that matches nothing stays as an item, so it gets an error record naming it.
    """
    from imgllm.data.images import list_image_files

    items: list[Item] = []
    for spec in inputs:
        if spec.startswith(TFDS_PREFIX):
            items.extend(tfds_items(spec, data_dir))
        elif os.path.isdir(spec):
            items.extend(Item(path) for path in list_image_files(spec, recursive=True))
        elif glob.has_magic(spec):
            for path in sorted(glob.glob(spec, recursive=True)):
                items.extend(Item(p) for p in (list_image_files(path, recursive=True) if os.path.isdir(path)
                                               else [path]))
        else:
            items.append(Item(spec))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.key not in seen:
            seen.add(item.key)
            unique.append(item)
    return unique


@dataclasses.dataclass
class Batch:
    """Batch `index` (its position in the full input list, which fixes its random key) and its pixels."""

    index: int
    items: list[Item]
    images: Any          # uint8 [batch_size, S, S, 3], zero rows for failed and padding slots
    errors: dict[int, str]


def load_batch(index: int, items: list[Item], batch_size: int, size: int, pool) -> Batch:
    """Decodes a batch's files (in a thread pool); failures become error strings, their rows stay zero."""
    import numpy as np

    images = np.zeros((batch_size, size, size, 3), np.uint8)
    errors: dict[int, str] = {}

    def load(item):
        try:
            return item.load(size)
        except Exception as error:  # noqa: BLE001 - any failure of one file is that file's error record
            return error

    for row, result in enumerate(pool.map(load, items)):
        if isinstance(result, Exception):
            errors[row] = f"{type(result).__name__}: {result}"
        else:
            images[row] = result
    return Batch(index, items, images, errors)


def prefetch_batches(pending: list[tuple[int, list[Item]]], batch_size: int, size: int, *, depth: int = 2,
                     workers: int = 4) -> Iterator[Batch]:
    """Loads batches in a background thread, at most `depth` ahead: memory stays flat however many images."""
    import concurrent.futures

    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for index, items in pending:
                    batch = load_batch(index, items, batch_size, size, pool)
                    while not stop.is_set():
                        try:
                            slots.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
            slots.put(error)
            return
        slots.put(done)

    thread = threading.Thread(target=produce, name="infer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch = slots.get()
            if batch is done:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------- records


class RecordFile:
    """The output: JSON lines or CSV, appended per batch, read back for resuming (stdout when path is None)."""

    def __init__(self, path: str | None, fmt: str, top_labels: int, num_captions: int):
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"--format must be jsonl or csv, got {fmt!r}")
        self.path, self.format = path, fmt
        self.columns = (["path"] + [f"{kind}_{n}" for n in range(1, top_labels + 1) for kind in ("label", "prob")]
                        + [f"caption_{n}" for n in range(1, num_captions + 1)] + ["lm_label", "error"])
        self.stream = None

    def existing_records(self) -> list[dict]:
        """Records already in the output file (after dropping a partly written last line)."""
        if self.path is None or not os.path.exists(self.path):
            return []
        truncate_partial_line(self.path)
        with open(self.path, newline="", encoding="utf-8") as f:
            if self.format == "jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return [self._from_row(row) for row in csv.DictReader(f)]

    def open(self) -> None:
        if self.path is None:
            self.stream = sys.stdout
            new = True
        else:
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self.stream = open(self.path, "a", newline="", encoding="utf-8")
        if self.format == "csv" and new:
            csv.writer(self.stream, lineterminator="\n").writerow(self.columns)

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            if self.format == "jsonl":
                self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                csv.writer(self.stream, lineterminator="\n").writerow(self._to_row(record))
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            self.stream.close()
        self.stream = None

    def _to_row(self, record: dict) -> list[str]:
        row = {"path": record["path"], "error": record.get("error", ""), "lm_label": record.get("lm_label", "")}
        for n, entry in enumerate(record.get("labels", ()), 1):
            row[f"label_{n}"], row[f"prob_{n}"] = entry["label"], f"{entry['prob']:.4f}"
        for n, caption in enumerate(record.get("captions", ()), 1):
            row[f"caption_{n}"] = " ".join(caption.split())  # one record per line, always
        return [row.get(column, "") for column in self.columns]

    @staticmethod
    def _from_row(row: dict) -> dict:
        if row.get("error"):
            return {"path": row["path"], "error": row["error"]}
        labels = [{"label": row[f"label_{n}"], "prob": float(row[f"prob_{n}"])}
                  for n in range(1, len(row)) if row.get(f"label_{n}")]
        captions = [row[f"caption_{n}"] for n in range(1, len(row)) if f"caption_{n}" in row]
        record = {"path": row["path"], "labels": labels, "captions": captions}
        if row.get("lm_label"):
            record["lm_label"] = row["lm_label"]
        return record


def truncate_partial_line(path: str) -> None:
    """Cuts a file after its last newline: an interrupted write leaves at most one partial last line."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        position = size
        while position > 0:
            step = min(65536, position)
            f.seek(position - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(position - step + newline + 1)
                return
            position -= step
        f.truncate(0)


def make_records(batch: Batch, outputs: dict, class_names: Sequence[str], captions: list[list[str]]) -> list[dict]:
    """One record per real item of the batch (padding rows dropped), errors as {"path", "error"}."""
    records = []
    for row, item in enumerate(batch.items):
        if row in batch.errors:
            records.append({"path": item.key, "error": batch.errors[row]})
            continue
        labels = [{"label": class_names[int(c)], "prob": round(float(p), 4)}
                  for c, p in zip(outputs["label_ids"][row], outputs["label_probs"][row])]
        record = {"path": item.key, "labels": labels, "captions": captions[row]}
        if "lm_label_ids" in outputs:  # the LM's own classification, beside the CNN's
            record["lm_label"] = class_names[int(outputs["lm_label_ids"][row])]
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------- scores


def score_records(records: Iterable[dict], references_path: str) -> dict:
    """Caption metrics of `records` against a references file, over the images it lists that were captioned.

    Scores each record's first caption (exact match, BLEU-4, CIDEr-D from `imgllm.captions`), and, where the
    reference lines carry a "label", the accuracy of the CNN's top label and of the LM's label (--lm-classify).
    """
    from imgllm.captions import caption_metrics, group_captions, read_captions_file

    paths, references, labels = group_captions(read_captions_file(references_path))
    by_path = {os.path.abspath(path): (refs, label) for path, refs, label in zip(paths, references, labels)}
    hypotheses, matched_refs, cnn_hits, lm_hits = [], [], [], []
    for record in records:
        reference = by_path.get(os.path.abspath(record["path"]))
        if reference is None or "error" in record:
            continue
        refs, label = reference
        hypotheses.append(record["captions"][0])
        matched_refs.append(refs)
        cnn_hits.append(record["labels"][0]["label"] == label)
        if "lm_label" in record:
            lm_hits.append(record["lm_label"] == label)
    if not hypotheses:
        return {"images": 0}
    scores = {"images": len(hypotheses), **caption_metrics(hypotheses, matched_refs),
              "cnn_accuracy": sum(cnn_hits) / len(cnn_hits)}
    if lm_hits:
        scores["lm_accuracy"] = sum(lm_hits) / len(lm_hits)
    return scores


# ----------------------------------------------------------------------------------------------- html


def thumbnail_data_uri(item: Item) -> str | None:
    """A small PNG of the image as a data: URI, or None when it cannot be read."""
    from PIL import Image

    try:
        image = Image.fromarray(item.load(None))
    except Exception:  # noqa: BLE001 - the page shows the record's error instead
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    if max(image.size) < 64:  # CIFAR-size images: scale up so they are visible
        factor = 64 // max(image.size) + 1
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(path: str, records: Iterable[dict], items_by_key: dict[str, Item]) -> None:
    """A page with one row per record: embedded thumbnail, labels with probabilities, captions or the error."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>imgllm captions</title>\n<style>"
                "body{font-family:sans-serif}td{padding:6px;vertical-align:top;border-bottom:1px solid #ddd}"
                "img{image-rendering:pixelated}.error{color:#b00}</style>\n<table>\n")
        for record in records:
            item = items_by_key.get(record["path"], Item(record["path"]))
            uri = thumbnail_data_uri(item)
            image = f"<img src='{uri}' alt=''>" if uri else ""
            if "error" in record:
                text = f"<span class='error'>{html.escape(record['error'])}</span>"
            else:
                labels = ", ".join(f"{html.escape(e['label'])} {100 * e['prob']:.1f}%" for e in record["labels"])
                captions = "".join(f"<li>{html.escape(c)}</li>" for c in record["captions"])
                text = f"<b>{labels}</b><ul>{captions}</ul>"
            f.write(f"<tr><td>{image}</td><td><code>{html.escape(record['path'])}</code><br>{text}</td></tr>\n")
        f.write("</table>\n")


# ----------------------------------------------------------------------------------------------- running


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache in `directory`, with thresholds at zero so every program is kept."""
    if not directory:
        return
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def generation_config(args: argparse.Namespace, pipeline_config: dict):
    """The `GenerationConfig` for the decoding flags."""
    from imgllm.language.decoding import GenerationConfig

    sample = args.decoding == "sample"
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens or pipeline_config["max_new_tokens"], do_sample=sample,
        temperature=args.temperature, top_k=args.top_k if sample else 0, top_p=args.top_p if sample else 1.0,
        num_beams=args.num_beams if args.decoding == "beam" else 1, num_return_sequences=args.num_captions,
        eos_token_id=pipeline_config["eos_id"], pad_token_id=pipeline_config["pad_id"])


def plan_batches(items: list[Item], done: set[str], batch_size: int) -> list[tuple[int, list[Item]]]:
    """Batches over the full input list (so batch i always holds the same items and key), minus finished ones.

    A batch is run when any of its items is missing from the output; only the missing ones are written.
    """
    batches = [(start // batch_size, items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    return [(index, chunk) for index, chunk in batches if any(item.key not in done for item in chunk)]


def run_captions(args: argparse.Namespace) -> int:
    """The caption command; returns the exit status."""
    enable_compilation_cache(args.compilation_cache)
    items = expand_inputs(args.inputs, data_dir=args.data_dir)
    if not items:
        print("infer.py: no input images found", file=sys.stderr)
        return 2

    import concurrent.futures

    import jax
    import numpy as np

    from imgllm import parallel
    from imgllm.pipeline import checkpoint as pipeline_checkpoint
    from imgllm.pipeline import compile_captioner, inference_params, place_images, place_params

    loaded = pipeline_checkpoint.load_pipeline(args.checkpoint, read_params=False)
    config = loaded.config
    spec = loaded.spec(generation_config(args, config), template=args.template, top_k=args.top_labels,
                       flip_tta=args.tta, lm_classify=args.lm_classify)
    output = RecordFile(args.output, args.format, spec.top_k, args.num_captions)
    previous = output.existing_records() if args.resume else []
    if args.output is not None and not args.resume and os.path.exists(args.output):
        os.remove(args.output)
    done = {record["path"] for record in previous}
    succeeded = sum("error" not in record for record in previous)

    mesh = parallel.make_mesh()
    devices = parallel.global_batch_divisor(mesh)
    batch_size = -(-args.batch_size // devices) * devices
    pending = plan_batches(items, done, batch_size)
    todo = sum(item.key not in done for _, chunk in pending for item in chunk)
    base_key = jax.random.PRNGKey(args.seed)
    if pending:
        # Read the weights in a thread while compiling against their shapes (a cache hit after the first run).
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            params_future = reader.submit(pipeline_checkpoint.read_pipeline_params, args.checkpoint)
            shapes = jax.eval_shape(inference_params, pipeline_checkpoint.read_params_shapes(args.checkpoint))
            captioner = compile_captioner(spec, mesh, shapes, batch_size)
            params = place_params(inference_params(params_future.result()), mesh)

    from tqdm import tqdm

    progress = tqdm(total=todo, unit="img", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)
    output.open()
    new_records: list[dict] = []

    def finish(batch: Batch, result: dict | None) -> None:
        nonlocal succeeded
        if result is None:  # every file of the batch failed to load: nothing was computed
            records = make_records(batch, {}, (), [])
        else:
            result = jax.device_get(result)
            captions = loaded.decode_captions(np.asarray(result["caption_ids"]))
            records = make_records(batch, result, loaded.class_names, captions)
        records = [r for r in records if r["path"] not in done]
        output.write(records)
        done.update(r["path"] for r in records)
        succeeded += sum("error" not in r for r in records)
        if (args.html or args.references) and args.output is None:
            new_records.extend(records)
        progress.update(len(records))

    try:
        in_flight = None  # the previous batch, finished on the host while the device runs the next one
        for batch in prefetch_batches(pending, batch_size, spec.image_size, workers=args.workers):
            result = None
            if len(batch.errors) < len(batch.items):
                key = place_params(jax.random.fold_in(base_key, batch.index), mesh)
                result = captioner(params, place_images(batch.images, mesh), key)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (batch, result)
        if in_flight is not None:
            finish(*in_flight)
    finally:
        progress.close()
        output.close()

    if args.html or args.references:
        records = output.existing_records() if args.output is not None else new_records
    if args.html:
        write_html(args.html, records, {item.key: item for item in items})
    if args.references:
        print(json.dumps({"scores": score_records(records, args.references)}), file=sys.stderr)
    if succeeded == 0:
        print("infer.py: no image could be captioned (see the error records)", file=sys.stderr)
        return 1
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    """Writes a pipeline checkpoint from a captioner run, or from a classifier run and a GPT-2."""
    if args.captioner:
        if args.classifier or args.lm or args.tokenizer:
            raise SystemExit("infer.py assemble: --captioner holds its CNN, LM and tokenizer; "
                             "drop --classifier/--lm/--tokenizer")
        from imgllm.train.export import export_pipeline_checkpoint

        out = export_pipeline_checkpoint(args.captioner, args.out, max_new_tokens=args.max_new_tokens or 0,
                                         overwrite=args.overwrite)
    else:
        if not (args.classifier and args.lm):
            raise SystemExit("infer.py assemble: give --captioner WORKDIR, or both --classifier and --lm")
        from imgllm.train.export import assemble_pipeline_checkpoint

        out = assemble_pipeline_checkpoint(args.out, classifier=args.classifier, lm=args.lm,
                                           tokenizer=args.tokenizer, template=args.template, top_k=args.top_labels,
                                           max_new_tokens=args.max_new_tokens or 20, overwrite=args.overwrite)
    print(out)
    return 0


# ----------------------------------------------------------------------------------------------- flags


def caption_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer.py", description="Caption images with a pipeline checkpoint.",
                                     epilog="Other command: infer.py assemble --help")
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns, or tfds:NAME:SPLIT")
    parser.add_argument("--checkpoint", required=True, help="pipeline checkpoint directory (infer.py assemble)")
    parser.add_argument("--output", "-o", help="output file (default: stdout, no resuming)")
    parser.add_argument("--format", choices=("jsonl", "csv"), default=None,
                        help="output format (default: csv for a .csv output, else jsonl)")
    parser.add_argument("--html", help="also write an HTML page with thumbnails, labels and captions")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (rounded up to the devices)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--decoding", choices=("greedy", "beam", "sample"), default="greedy")
    parser.add_argument("--num-beams", type=int, default=4, help="beams for --decoding beam")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --decoding sample")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter for --decoding sample (0: off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--num-captions", type=int, default=1, help="captions per image")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length (default: checkpoint's)")
    parser.add_argument("--top-labels", type=int, default=None, help="labels per image (default: checkpoint's)")
    parser.add_argument("--template", default=None,
                        help="prompt template, e.g. 'A photo of a {label}.' or 'This shows {topk}.'")
    parser.add_argument("--tta", action="store_true", help="average the CNN over the image and its mirror")
    parser.add_argument("--lm-classify", action="store_true",
                        help="also report the LM's classification by prompt likelihood (checkpoints with a bridge)")
    parser.add_argument("--references", default=None,
                        help='JSON lines of {"path", "caption"} (several per image allowed; e.g. written by '
                             "python -m imgllm.data.demo): score the captions against them (exact match, BLEU-4, "
                             "CIDEr-D; and label accuracy when lines have a label)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="overwrite the output instead of skipping the images already in it")
    parser.add_argument("--data-dir", default=None, help="tfds data directory for tfds: inputs")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    parser.add_argument("--compilation-cache", default=os.environ.get("IMGLLM_COMPILATION_CACHE", DEFAULT_CACHE_DIR),
                        help="JAX persistent compilation cache directory ('' to turn off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def assemble_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer.py assemble",
                                     description="Build a pipeline checkpoint from a captioner run "
                                                 "(--captioner), or from a classifier and a GPT-2.")
    parser.add_argument("--captioner", default=None,
                        help="train.py work directory of a captioner (CNN, visual prefix, LM and tokenizer)")
    parser.add_argument("--classifier", default=None, help="train.py work directory of the CNN")
    parser.add_argument("--lm", default=None, help="GPT-2 directory (config.json + model.safetensors) or hub name")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: the LM's)")
    parser.add_argument("--out", required=True, help="the pipeline checkpoint directory to write")
    parser.add_argument("--template", default="A photo of a {label}.", help="default prompt template")
    parser.add_argument("--top-labels", type=int, default=1, help="default number of labels per image")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default caption length (20; a captioner's: its longest caption + 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "assemble":
        return run_assemble(assemble_parser().parse_args(argv[1:]))
    if argv and argv[0] == "caption":
        argv = argv[1:]
    args = caption_parser().parse_args(argv)
    if args.format is None:
        args.format = "csv" if (args.output or "").lower().endswith(".csv") else "jsonl"
    if args.batch_size < 1 or args.num_captions < 1:
        raise SystemExit("infer.py: --batch-size and --num-captions must be >= 1")
    if args.decoding == "beam" and args.num_captions > args.num_beams:
        raise SystemExit(f"infer.py: --num-captions {args.num_captions} exceeds --num-beams {args.num_beams}")
    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"infer.py: --checkpoint {args.checkpoint!r} is not a directory")
    return run_captions(args)


if __name__ == "__main__":
    sys.exit(main())
