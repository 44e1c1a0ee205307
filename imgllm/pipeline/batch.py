"""Batch captioning from Python: image files, folders, globs or tfds splits → records, written as they are made.

    from imgllm.pipeline import CaptionOptions, caption_files

    for record in caption_files("runs/demo/pipeline", ["photos/", "tfds:cifar10:test"], output="captions.jsonl"):
        print(record["path"], record["labels"][0]["label"], record["captions"][0])

`caption_files` is what ``infer.py`` runs (the script only parses flags and prints): it lists the inputs as a stream
(`imgllm.pipeline.inputs.InputStream`: the first batch is captioned before a big folder is listed), reads batches in
a background thread, runs the jitted `caption_images` over the device mesh, and turns each batch into records
(`imgllm.pipeline.records`), appended to the output as each batch finishes. What shapes the records is one
`CaptionOptions` (`imgllm.pipeline.options`), what does not (threads, progress, compilation cache, pixel limit) one
`RunSettings`. With an output file it resumes: images already in it are skipped, and with the same seed and batch
size the records are the ones an uninterrupted run writes (batch i always holds the same images and draws the random
key fold_in(seed, i)). A file that cannot be read gives an error record and the run goes on.

An output file is held by one run at a time (`imgllm.pipeline.outputs.OutputLock`, `<output>.lock`), and the
options that shape its records are kept beside it (`run_options`, `<output>.run.json`): resuming with other ones is
refused (`OutputError`) rather than mixing two runs' records in one file.

Without JAX coordination (a SLURM array, a batch queue), `caption_files(..., shard=(i, N))` runs on each machine:
shard i captions the batches b of the full input list with b % N == i (same batch size, same keys fold_in(seed, b))
into its own part of the output (`imgllm.pipeline.outputs.part_path`, resumable as any output), dropping the other
shards' items as the list streams by (its run options get the list's fingerprint and its own paths once the list is
read: `PartOptions`), and `merge_parts` writes the output one unsharded run writes, records and run options alike,
once every part is complete. In a multi-process JAX job (`imgllm.parallel.maybe_initialize_distributed`), each
process runs shard (process index, process count) on a mesh of its own devices (`parallel.make_local_mesh`: no
cross-host collective), and with an output file process 0 then merges the parts (`merged_after`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from imgllm import parallel
from imgllm.data.images import has_image_extension
from imgllm.pipeline.caption import PipelineSpec, compile_captioner, inference_params, place_images, place_params
from imgllm.pipeline.checkpoint import PipelineCheckpoint, load_pipeline, read_params_shapes, read_pipeline_params
from imgllm.pipeline.gallery import GalleryHeader, write_gallery
from imgllm.pipeline.inputs import (
    TFDS_PREFIX,
    Batch,
    InputStream,
    Item,
    check_shard,
    glob_once,
    in_shard,
    is_pattern,
    prefetch_batches,
    shard_item_index,
    stream_batches,
)
from imgllm.pipeline.options import DEFAULT_COMPILATION_CACHE, CaptionOptions, RunSettings
from imgllm.pipeline.outputs import (
    LOCK_SUFFIX,
    RUN_OPTIONS_SUFFIX,
    OutputError,
    OutputLock,
    changed_run_options,
    check_distinct_paths,
    check_run_options,
    check_writable,
    find_parts,
    listed_shard,
    part_path,
    part_positions,
    part_shard_problem,
    path_identity,
    prepare_output,
    read_run_options,
    refuse_written,
    shard_run_options,
    unsharded_run_options,
    write_run_options,
)
from imgllm.pipeline.records import (
    RECORD_FORMATS,
    RecordFile,
    check_recognised_output,
    format_for_path,
    make_records,
    read_references,
    score_records,
)

STDOUT = "-"  # output=STDOUT writes the records to standard output (no resuming)
IDENTITY_CONTENT_LIMIT = 1 << 20  # checkpoint_identity reads files up to this size; bigger ones by name and size


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache in `directory`, with thresholds at zero so every program is kept
    (a second run then skips compiling). None or "": leave JAX's settings alone. A directory that cannot be
    written (a read-only home) is skipped with a warning naming it: the run goes on, compiling as without a cache."""
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(
            f"the compilation cache {directory} cannot be written; running without it "
            "(--compilation-cache '' turns it off, or name a writable folder)",
            stacklevel=2,
        )
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def caption_files(
    checkpoint: str | os.PathLike | PipelineCheckpoint,
    inputs: Sequence[str | Item],
    options: CaptionOptions | None = None,
    *,
    output: str | os.PathLike | None = None,
    fmt: str | None = None,
    html: str | None = None,
    resume: bool = True,
    retry_errors: bool = False,
    settings: RunSettings | None = None,
    data_dir: str | None = None,
    references: str | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[dict]:
    """Captions images; yields one record per image (`imgllm.pipeline.records`), in output order.

    Twelve parameters, most keywords, for a reason: this is the public entry (infer.py's flags map onto it), and
    each keyword is one documented choice; inside, they travel as a `Destination` and a `RunSettings`.

    checkpoint: a pipeline checkpoint directory (its weights are read in a thread while the captioner compiles
    against their shapes), or a loaded `PipelineCheckpoint`. inputs: files, folders (recursive), glob patterns,
    tfds splits "tfds:NAME:SPLIT" (data_dir: their tfds data directory), or `Item`s; they are listed while the
    first batches are captioned (`imgllm.pipeline.inputs.InputStream`), so a folder of a million files starts at
    once. No input image at all: nothing is yielded (and nothing written).
    options: what is computed, `CaptionOptions` (None: its defaults, greedy decoding with the checkpoint's
    template and labels): decoding, template, labels, TTA, classifier, LM labels, dtype, seed (batch i draws
    fold_in(seed, i)) and batch size (images per step, rounded up to a multiple of the devices).
    settings: how the run goes, `RunSettings` (None: its defaults): threads decoding files, a progress bar on
    stderr, JAX's persistent compilation cache (`enable_compilation_cache`), the pixel limit past which an image
    gets an error record.
    output: None (records are only yielded), a JSON-lines or CSV file (fmt; default from the suffix), or "-"
    (standard output). Each batch's records are appended and flushed before they are yielded. An output file is
    locked for the run (`<output>.lock`): a second run on it raises `OutputInUseError`. The options that shape
    records are written to `<output>.run.json` (`run_options`).
    resume: with an output file, first yield the records already in it (a partly written last line is dropped)
    and caption only the images missing from it; records made with other options than this run's raise
    `OutputError` (naming the options), and so does a line that is not a record (naming the line).
    resume=False deletes the file first. retry_errors: when resuming, caption again the inputs whose records are
    error records (they are first removed from the file, atomically).
    html: when the iteration ends, write the gallery of every record (`imgllm.pipeline.gallery`: a header with the
    checkpoint, the options and the scores, a grid of thumbnails with labels, captions and, given `references` (a
    captions file of {"path", "caption", "label"?} lines), each image's reference and marks where the labels or the
    caption disagree with it; pages of 1000 images). That the path can be written, and the references read, is
    checked before anything is computed.
    shard: (i, N) to caption only shard i of N (0 <= i < N) of the input list, for N processes without JAX
    coordination: the batches b (of options.batch_size, rounded as for the whole list) with b % N == i, each
    drawing fold_in(seed, b) as in one run, so its records are that run's. An output file becomes its part
    (`imgllm.pipeline.outputs.part_path`: captions.jsonl → captions.shard-00003-of-00010.jsonl), locked, resumed
    and refused with other options (another shard among them) as an output is; `merge_parts` joins the parts.
    No html with a shard: merge_parts writes the page.
    In a multi-process JAX job (`jax.process_count() > 1`, `imgllm.parallel.maybe_initialize_distributed`), every
    process calls caption_files with the same arguments and captions shard (its index, the process count) on its
    local devices (shard must be None or that one), yielding its part's records; the batch size is rounded up to the
    least common multiple of the processes' device counts (`parallel.local_batch_multiple`), so all cut the same
    batches. With an output file, once every part has ended (a barrier) process 0 merges them into `output` and
    `html` (`merge_parts`), raising its OutputError naming the incomplete parts when a process failed.

    Nothing runs until the first record is asked for; the lock is held until the iteration ends or the generator is
    closed (`close()`, or its garbage collection). A failed image gives {"path", "error"}; count the records
    without "error" to know whether anything could be captioned.
    """
    options = CaptionOptions() if options is None else options  # made here, not at import: its dtype asks JAX
    if fmt is not None and fmt not in RECORD_FORMATS:
        raise ValueError(f"fmt must be one of {RECORD_FORMATS}, got {fmt!r}")
    shard = check_shard(shard)
    if shard is not None and html:
        raise ValueError(
            "html with shard: each shard writes a part of the output; write the page when merging the "
            "parts (merge_parts(output, html=...), infer.py merge --html)"
        )
    output = None if output is None else os.fspath(output)
    destination = Destination(output, fmt, html, resume, retry_errors, references, shard)
    return _caption_files(checkpoint, inputs, options, destination, settings or RunSettings(), data_dir)


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a run's records go, as `caption_files` documents each field: output (None: only yielded; STDOUT; a
    records file), its format fmt, the page html and the references it scores against, whether a run resumes and
    retries error records, and the shard the run captions (its records go to the output's part)."""

    output: str | None = None
    fmt: str | None = None
    html: str | None = None
    resume: bool = True
    retry_errors: bool = False
    references: str | None = None
    shard: tuple[int, int] | None = None

    @property
    def to_file(self) -> bool:
        """Whether the records go to a file (not only yielded, nor on standard output)."""
        return self.output is not None and self.output != STDOUT

    @property
    def path(self) -> str | None:
        """The records file this run writes: the output, or its part for a shard (`part_path`); None for none."""
        if not self.to_file:
            return None
        return self.output if self.shard is None else part_path(self.output, self.shard)

    def written(self) -> dict[str, str | None]:
        """What the run writes, by what it is (`check_distinct_paths`)."""
        path = self.path
        return {
            "the output": path,
            "the HTML page": self.html,
            "the output's lock": None if path is None else path + LOCK_SUFFIX,
            "the output's run options": None if path is None else path + RUN_OPTIONS_SUFFIX,
        }


def _caption_files(
    checkpoint, inputs, options: CaptionOptions, destination: Destination, settings: RunSettings, data_dir
) -> Iterator[dict]:
    enable_compilation_cache(settings.compilation_cache)
    processes = jax.process_count()
    if processes == 1:
        mesh = parallel.make_mesh()
        run, batch_multiple = destination, parallel.global_batch_divisor(mesh)
    else:
        run_shard = (jax.process_index(), processes)
        if destination.shard is not None and destination.shard != run_shard:
            raise ValueError(
                f"shard={destination.shard} in a job of {processes} processes: each process captions its own shard "
                f"(this one {run_shard[0]} of {processes}); leave shard out"
            )
        if destination.html and not destination.to_file:
            raise ValueError("html in a multi-process job needs an output file: process 0 writes the page when merging")
        mesh = parallel.make_local_mesh()  # no cross-host collective in the decoding loop
        run = dataclasses.replace(destination, shard=run_shard, html=None)  # the page is written by the merge
        batch_multiple = parallel.local_batch_multiple()  # the same batch plan on every process
    records = _caption_run(checkpoint, inputs, options, run, settings, data_dir, mesh, batch_multiple)
    if processes == 1 or not destination.to_file:  # one process, or records only: its records, nothing to merge
        yield from records
        return
    yield from merged_after(records, destination.output, html=destination.html)


_JOINED_RUNS = itertools.count()  # names each multi-process run's barriers (every process counts the same runs)


def merged_after(part: Iterator[dict], output: str, *, html: str | None) -> Iterator[dict]:
    """Yields this process's part of a multi-process run (`part`), then, once every process's part has ended (a
    barrier, `parallel.wait_for_processes`, also reached when this part fails), process 0 merges the parts into
    `output` and `html` (`merge_parts`: an OutputError naming the parts missing or incomplete when some process
    failed). The others wait for the merge to end (a second barrier), so that no process leaves the job before it."""
    name = f"imgllm-caption-{next(_JOINED_RUNS)}"
    finished = False
    try:
        yield from part
        finished = True
    finally:
        parallel.wait_for_processes(f"{name}-parts")
        if not finished:  # this part failed (its error goes on): nothing to merge here, let process 0 go on
            parallel.wait_for_processes(f"{name}-merged")
    try:
        if jax.process_index() == 0:
            merge_parts(output, html=html)
    finally:
        parallel.wait_for_processes(f"{name}-merged")


def _caption_run(
    checkpoint, inputs, options: CaptionOptions, run: Destination, settings: RunSettings, data_dir, mesh, batch_multiple
) -> Iterator[dict]:
    page_references = None
    if run.html:
        check_writable(run.html, "the HTML page")
        page_references = read_references(run.references) if run.references else None
    path = run.path
    with OutputLock(path) if path is not None else contextlib.nullcontext():
        page_items: dict[str, Item] | None = {} if run.html else None
        stream = open_inputs(inputs, options.batch_size, run, data_dir, batch_multiple, page_items)
        if stream.count == 0:
            return
        loaded = (
            checkpoint if isinstance(checkpoint, PipelineCheckpoint) else load_pipeline(checkpoint, read_params=False)
        )
        spec = loaded.spec_for(options)
        batch_size = run_batch_size(options.batch_size, stream, batch_multiple)
        record_file = (
            None
            if run.output is None
            else RecordFile(path, run.fmt or format_for_path(path), spec.top_k, options.num_captions)
        )
        recorded = (
            None
            if path is None and not run.html
            else run_options(  # kept beside the output, shown on the page
                loaded, options, spec, fmt=record_file.format if record_file else "jsonl", batch_size=batch_size
            )
        )
        part = PartOptions(path, recorded, run.shard, batch_size) if path and run.shard else None
        previous = []
        if path is not None:  # checked and recorded before anything is compiled
            if part is not None and run.resume:
                check_unlisted_part(record_file, part.now(stream), stream)
            retry = (lambda: [item.key for item in stream.read_to()]) if run.retry_errors else ()
            previous = prepare_output(
                record_file, part.now(stream) if part else recorded, resume=run.resume, retry=retry
            )
        yield from previous
        new_records: list[dict] | None = [] if run.html else None  # the page shows previous + new records
        pending = caption_pending(
            loaded,
            spec,
            mesh,
            stream,
            previous,
            record_file,
            batch_size=batch_size,
            seed=options.seed,
            settings=settings,
        )
        for record in pending:
            if part is not None:
                part.record_listing(stream)
            if new_records is not None:
                new_records.append(record)
            yield record
        if part is not None:
            part.record_listing(stream)
        if run.html:
            write_run_page(run, previous + new_records, recorded, page_items, page_references, spec.lm_label_names)


def open_inputs(
    inputs, batch_size: int, run: Destination, data_dir, batch_multiple: int, page_items: dict[str, Item] | None
) -> InputStream:
    """The run's `InputStream`, listed up to its first batch (or to its end when resuming a part that recorded its
    input list: other inputs are then refused before anything is compiled, as other options are). A shard keeps its
    own batches' items (cut as `run_batch_size` cuts them). A file the run writes is refused, before anything is
    computed, when an input names it (a file, or a pattern's match) and when it is the page with an image's name in
    a folder it captions; the output, its lock and run options met in a folder are skipped (an output "out.png"
    in the folder it captions: a file that is not records is refused as the output anyway). page_items (a run with
    a page) gathers the tfds items, whose images the page reads through them."""
    specs = [spec if isinstance(spec, Item) else os.fspath(spec) for spec in inputs]  # listed once: may be an iterator
    globbed = {spec: glob_once(spec) for spec in specs if isinstance(spec, str) and _is_path_pattern(spec)}
    named = [path for spec in specs for path in _named_files(spec, globbed)]
    if run.html and has_image_extension(run.html) and any(_is_below(run.html, spec) for spec in specs):
        named.append(run.html)  # the page would be listed as an image of a folder: refused now, not mid-run
    written = check_distinct_paths(
        run.written(), {"the input image": named, "the references": [run.references] if run.references else []}
    )
    own = [] if run.path is None else [run.path, run.path + LOCK_SUFFIX, run.path + RUN_OPTIONS_SUFFIX]
    own_names, own_files = {os.path.basename(path) for path in own}, {os.path.realpath(path) for path in own}

    def is_own(item: Item) -> bool:  # a path resolved only when its name is one of the run's files' names
        return (
            item.tfds_source is None
            and os.path.basename(item.key) in own_names
            and os.path.realpath(item.key) in own_files
        )

    def check(item: Item) -> None:
        if item.tfds_source is None:
            refuse_written(written, "the input image", item.key)
        elif page_items is not None:
            page_items[item.key] = item

    full_batch = -(-batch_size // batch_multiple) * batch_multiple  # batch 0 holds the first batch_size items anyway
    keep = None if run.shard is None else (lambda position: in_shard(position, run.shard, full_batch))
    stream = InputStream(
        specs, data_dir=data_dir, keep=keep, check=check, skip=is_own, matches=globbed, collect=run.shard is not None
    )
    stream.read_to(math.inf if _listed_before(run) else batch_size)
    return stream


def _is_below(path: str, spec: str | Item) -> bool:
    """Whether `path` lies in the folder input `spec` (False for any other kind of input)."""
    if isinstance(spec, Item) or spec.startswith(TFDS_PREFIX) or not os.path.isdir(spec):
        return False
    folder = os.path.realpath(spec)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _is_path_pattern(spec: str) -> bool:
    """Whether an input spec is a glob pattern of paths (`is_pattern`, not a tfds split)."""
    return not spec.startswith(TFDS_PREFIX) and is_pattern(spec)


def _named_files(spec: str | Item, globbed: Mapping[str, list[str]]) -> list[str]:
    """The files an input spec names as such: itself when it is a file (not a folder or a tfds split), a pattern's
    matches (in `globbed`) that are files (a pattern is matched whole before its first item anyway)."""
    if isinstance(spec, Item):
        return [spec.key] if spec.tfds_source is None else []
    if spec.startswith(TFDS_PREFIX) or os.path.isdir(spec):
        return []
    if spec in globbed:
        return [path for path in globbed[spec] if not os.path.isdir(path)]
    return [spec]


def _listed_before(run: Destination) -> bool:
    """Whether the run resumes a part whose run options hold its input list (`listed_shard`)."""
    if not run.resume or run.shard is None or run.path is None:
        return False
    try:
        recorded = read_run_options(run.path + RUN_OPTIONS_SUFFIX)
    except OutputError:  # refused, naming the file, when its records are read
        return False
    return recorded is not None and isinstance(recorded.get("shard"), dict) and listed_shard(recorded)


def run_batch_size(requested: int, stream: InputStream, multiple: int) -> int:
    """The run's batch size: `requested`, or the number of inputs when fewer (a batch of a million for ten images
    is gigabytes), rounded up to a multiple of `multiple` (the devices). `stream` is listed up to `requested`."""
    size = min(requested, stream.count) if stream.listing is not None else requested
    return -(-size // multiple) * multiple


@dataclasses.dataclass
class PartOptions:
    """A part's run options (`shard_run_options`): the shard's index, count and batch size from the start, its
    images, input fingerprint and paths (`InputStream.listing`) written beside the part once the inputs are listed."""

    path: str
    recorded: dict[str, Any]
    shard: tuple[int, int]
    batch_size: int
    listed: bool = False

    def now(self, stream: InputStream) -> dict[str, Any]:
        """The part's run options as far as `stream` has listed the inputs."""
        listing = stream.listing
        self.listed = listing is not None
        return shard_run_options(
            self.recorded,
            self.shard,
            batch_size=self.batch_size,
            inputs=None if listing is None else listing.fingerprint,
            paths=None if listing is None else listing.keys,
        )

    def record_listing(self, stream: InputStream) -> None:
        """Writes the part's run options with its input list, once, when `stream` has listed it."""
        if not self.listed and stream.listing is not None:
            write_run_options(self.path + RUN_OPTIONS_SUFFIX, self.now(stream))


def check_unlisted_part(record_file: RecordFile, options: Mapping[str, Any], stream: InputStream) -> None:
    """Refuses (OutputError, before anything is computed) to resume a part whose run stopped before it had listed
    its inputs when its records are no longer its shard's first images: the inputs changed since, so the records
    were made in other batches, with other random keys, than this run would make them in. A part written in one run
    is in its shard's order, so its records must be the first of the shard's images that `stream` keeps. (A part
    that recorded its input list is checked by its fingerprint, `check_run_options`.) options: the run's."""
    recorded = read_run_options(record_file.path + RUN_OPTIONS_SUFFIX)
    if recorded is None or listed_shard(recorded):
        return
    record_file.check_recognised()
    check_run_options(record_file.path, recorded, options)  # other options are named first, as prepare_output does
    records = record_file.existing_records()
    written_from, cwd = recorded.get("cwd") or os.getcwd(), os.getcwd()
    for record, item in itertools.zip_longest(records, stream.first_kept(len(records))):
        if item is None or path_identity(record["path"], written_from) != path_identity(item.key, cwd):
            raise OutputError(
                f"{record_file.path} was begun on other inputs: its records are not its shard's first images any "
                f"more ({record['path']!r} where the inputs now give {item.key if item else 'none'!r}); run this "
                "shard again with --no-resume, or with the inputs it began with"
            )


def write_run_page(
    run: Destination,
    shown: list[dict],
    recorded: Mapping[str, Any],
    page_items: Mapping[str, Item] | None,
    page_references: Mapping[str, dict] | None,
    lm_label_names: Sequence[str] | None,
) -> None:
    """The page of a run's records (`write_gallery`): previous and new ones, scored against the references."""
    scores = score_records(shown, run.references, lm_label_names=lm_label_names) if run.references else None
    write_gallery(
        run.html,
        shown,
        page_items,
        header=gallery_header(recorded, scores),
        references=page_references,
        lm_label_names=lm_label_names,
    )


def gallery_header(options: Mapping[str, Any], scores: Mapping[str, Any] | None = None) -> GalleryHeader:
    """The header of a run's gallery from its run options (`run_options`) and scores (`score_records`)."""
    return GalleryHeader(
        checkpoint=options["checkpoint"],
        checkpoint_id=options["checkpoint_id"],
        decoding={k: v for k, v in options.items() if k not in ("checkpoint", "checkpoint_id", "format", "cwd")},
        scores=scores,
    )


def caption_pending(
    loaded: PipelineCheckpoint,
    spec: PipelineSpec,
    mesh,
    inputs: InputStream,
    previous: list[dict],
    record_file: RecordFile | None,
    *,
    batch_size: int,
    seed: int,
    settings: RunSettings,
) -> Iterator[dict]:
    """Captions the items of `inputs` without a record in `previous` and yields their records, each batch's once it
    is written to `record_file` (when given). The batches are cut from the stream as it is listed (`stream_batches`),
    each with its index in the full input list (and so its random key); a shard's stream holds only its batches'
    items. With settings.progress, says on stderr what it is doing before the first image (how many are already
    done, loading and compiling), then shows a bar, whose total is known once the inputs are listed."""
    written_from = record_file.written_from if record_file is not None else os.getcwd()
    captioned = {path_identity(record["path"], written_from) for record in previous}
    done: set[str] = set()  # the keys of inputs already in `previous`
    pending = pending_batches(stream_batches(inputs, batch_size), captioned, done)
    first = next(pending, None)  # compile only when there is something to caption
    progress = settings.progress
    say = (lambda message: print(f"imgllm: {message}", file=sys.stderr, flush=True)) if progress else (lambda _: None)
    if previous:
        say(f"{len(previous)} images already done in the output")
    if first is not None:
        say(f"loading the checkpoint and compiling the captioner for batches of {batch_size}")
    captioner, params = compile_and_place(loaded, spec, mesh, batch_size) if first is not None else (None, None)
    bar = tqdm(total=None, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    if record_file is not None:
        record_file.open()
    try:
        batches = prefetch_batches(
            [] if first is None else itertools.chain([first], pending),
            batch_size,
            spec.image_size,
            workers=settings.workers,
            max_pixels=settings.max_pixels,
        )
        for records in captioned_batches(
            loaded, captioner, params, batches, jax.random.PRNGKey(seed), mesh, lm_label_names=spec.lm_label_names
        ):
            records = [record for record in records if record["path"] not in done]
            if record_file is not None:
                record_file.write(records)
            if inputs.listing is not None:  # exact once the items listed are all planned
                bar.total = inputs.kept - len(done)
            bar.update(len(records))
            yield from records
    finally:
        bar.close()
        if record_file is not None:
            record_file.close()


def pending_batches(
    batches: Iterable[tuple[int, list[Item]]], captioned: set[str], done: set[str]
) -> Iterator[tuple[int, list[Item]]]:
    """The batches with an item whose image has no record yet (`captioned`: the images of the records there, by
    `path_identity`); the keys of the items that have one are added to `done`. A batch is run when any of its items
    is missing; only the missing ones are written."""
    cwd = os.getcwd()
    for index, chunk in batches:
        found = [item.key for item in chunk if path_identity(item.key, cwd) in captioned] if captioned else []
        done.update(found)
        if len(found) < len(chunk):
            yield index, chunk


def run_options(
    loaded: PipelineCheckpoint, options: CaptionOptions, spec: PipelineSpec, *, fmt: str, batch_size: int
) -> dict[str, Any]:
    """The record of the `CaptionOptions` that shape a run's records, as `prepare_output` keeps it beside an
    output: resuming with others would mix two runs' records in one file. spec: `loaded.spec_for(options)`;
    batch_size: the run's, rounded up to the devices.

    Values are resolved against the checkpoint (template None and the checkpoint's template are one option; the
    labels per image are the spec's), and only those that matter are kept: the beam count for beam search, the
    sampling parameters, the seed and the batch size (batch i draws fold_in(seed, i)) for sampling alone, and the
    compute dtype (resolved) when it is not float32 (outputs written before the setting existed were float32 and
    recorded none). `RunSettings` and the page change no record and are left out. "checkpoint" (its path) is for the
    reader; "checkpoint_id" (`checkpoint_identity`) is what is compared; "cwd" is where the records' relative paths
    start (resuming from another folder matches them by the file). From `spec`, the LM's labels and how they are
    scored and the labels' classifier, when not the defaults of outputs written before these options existed (the
    CNN; no other label set).
    """
    config = loaded.config
    recorded = {
        "cwd": os.getcwd(),
        "checkpoint": None if loaded.directory is None else os.path.abspath(loaded.directory),
        "checkpoint_id": checkpoint_identity(loaded),
        "format": fmt,
        "decoding": options.method,
        "num_captions": options.num_captions,
        "max_new_tokens": options.max_new_tokens or config["max_new_tokens"],
        "template": config["template"] if options.template is None else options.template,
        "top_labels": spec.top_k,
        "tta": bool(options.tta),
        "lm_classify": bool(options.lm_classify),
    }
    if options.method == "beam":
        recorded["num_beams"] = options.num_beams
    if options.dtype != "float32":  # float32 records nothing, as outputs made before the setting
        recorded["dtype"] = options.dtype
    if spec.classify != "cnn":
        recorded["classify"] = spec.classify
    if spec.lm_label_names is not None:
        recorded["lm_labels"] = list(spec.lm_label_names)
        recorded["lm_label_prompts"] = hash_arrays(spec.lm_label_prompts.input_ids, spec.lm_label_prompts.target_mask)
    if spec.scores_labels_by_lm and spec.lm_scoring != "likelihood":
        recorded["lm_scoring"] = spec.lm_scoring
    if options.method == "sample":
        recorded.update(
            temperature=float(options.temperature),
            top_k=options.top_k,
            top_p=float(options.top_p),
            seed=options.seed,
            batch_size=batch_size,
        )
    return recorded


def hash_arrays(*arrays: Any) -> str:
    """A short content hash of arrays (their dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.asarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def checkpoint_identity(loaded: PipelineCheckpoint) -> str:
    """A cheap fingerprint of the checkpoint's files (`directory_identity`), or of its config for one made in memory
    (weights changed in memory after loading are not seen)."""
    if loaded.directory is not None:
        return directory_identity(loaded.directory)
    return hashlib.sha256(json.dumps(loaded.config, sort_keys=True).encode()).hexdigest()[:16]


def directory_identity(directory: str | os.PathLike) -> str:
    """A fingerprint of a directory without reading its big files: every file's relative path and size, and the
    content of those up to IDENTITY_CONTENT_LIMIT (config, tokenizer, orbax metadata with its save time). orbax
    names array data files with random ids per save, so a re-saved checkpoint differs and a copied one does not."""
    digest = hashlib.sha256()
    for root, subdirectories, files in os.walk(directory):
        subdirectories.sort()  # a fixed walk order
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            digest.update(f"{os.path.relpath(path, directory)}\0{size}\0".encode())
            if size <= IDENTITY_CONTENT_LIMIT:
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def compile_and_place(loaded: PipelineCheckpoint, spec: PipelineSpec, mesh, batch_size: int) -> tuple[Any, Any]:
    """(the captioner compiled for uint8 [batch_size, S, S, 3] images, the parameters replicated on the mesh).

    When the checkpoint's parameters are not read yet, they are read in a thread while the captioner compiles
    against their shapes (a compilation-cache hit after the first run).
    """
    if loaded.params is not None:
        shapes = jax.eval_shape(inference_params, loaded.params)
        return compile_captioner(spec, mesh, shapes, batch_size), place_params(inference_params(loaded.params), mesh)
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        params_future = reader.submit(read_pipeline_params, loaded.directory)
        shapes = jax.eval_shape(inference_params, read_params_shapes(loaded.directory))
        captioner = compile_captioner(spec, mesh, shapes, batch_size)
        params = place_params(inference_params(params_future.result()), mesh)
    return captioner, params


def captioned_batches(
    loaded: PipelineCheckpoint,
    captioner,
    params,
    batches: Iterator[Batch],
    base_key: jax.Array,
    mesh,
    *,
    lm_label_names: Sequence[str] | None = None,
) -> Iterator[list[dict]]:
    """Each batch's records: batch i is captioned with key fold_in(base_key, i), and its results are fetched and
    decoded on the host while the device already runs batch i + 1. A batch whose files all failed computes nothing.
    lm_label_names: the labels the LM scores, when not the checkpoint's classes (`PipelineSpec.lm_label_names`).
    """
    in_flight = None
    for batch in batches:
        result = None
        if len(batch.errors) < len(batch.items):
            key = place_params(jax.random.fold_in(base_key, batch.index), mesh)
            result = captioner(params, place_images(batch.images, mesh), key)
        if in_flight is not None:
            yield batch_records(loaded, *in_flight, lm_label_names=lm_label_names)
        in_flight = (batch, result)
    if in_flight is not None:
        yield batch_records(loaded, *in_flight, lm_label_names=lm_label_names)


def batch_records(
    loaded: PipelineCheckpoint,
    batch: Batch,
    result: Mapping[str, jax.Array] | None,
    *,
    lm_label_names: Sequence[str] | None = None,
) -> list[dict]:
    """The records of one batch from the captioner's (device) outputs, or its error records when it has none;
    lm_label_names: the labels the LM scored (`PipelineSpec.lm_label_names`; None: the checkpoint's classes)."""
    if result is None:  # every file of the batch failed to load: nothing was computed
        return make_records(batch, {}, (), [])
    result = jax.device_get(result)
    captions = loaded.decode_captions(np.asarray(result["caption_ids"]))
    return make_records(batch, result, loaded.class_names, captions, lm_label_names=lm_label_names)


# ----------------------------------------------------------------------------------------------- shards' parts


@dataclasses.dataclass
class Part:
    """A shard's part of an output as `read_part` finds it: `problem` ("absent", "7 of 9 images", ...) is None when
    it is complete; its run options, its records and their positions among the shard's images (`part_positions`)."""

    path: str
    shard: tuple[int, int]
    problem: str | None
    options: dict | None = None
    records: list[dict] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)


def merge_parts(output: str | os.PathLike, *, html: str | None = None, remove_parts: bool = False) -> list[dict]:
    """Writes `output` from the parts its shards wrote (`caption_files(..., shard=(i, N))`) and returns its records:
    the records, in input order, and the run options one unsharded run writes, the records file atomically.

    The parts are found beside `output` (`find_parts`): all must be of one N, present and complete, and made with
    the same options and inputs, else OutputError names each part that is missing or incomplete (with its counts),
    and nothing is written. Each part is read under its lock (a shard still running is refused). An existing
    output is replaced when it is a records file (never another file). html: also the page of the records
    (`write_gallery`; checked before). remove_parts: delete the parts and their run options once the output is
    written; they are kept otherwise (merging again gives the same output).
    """
    output = os.fspath(output)
    if html:
        check_writable(html, "the HTML page")
    count = parts_count(output)
    paths = [part_path(output, (index, count)) for index in range(count)]
    check_distinct_paths(
        {
            "the output": output,
            "the HTML page": html,
            "the output's lock": output + LOCK_SUFFIX,
            "the output's run options": output + RUN_OPTIONS_SUFFIX,
        },
        {"a part": paths + [path + RUN_OPTIONS_SUFFIX for path in paths]},
    )
    parts = [read_part(path, (index, count)) for index, path in enumerate(paths)]
    problems = [f"{part.path} ({part.problem})" for part in parts if part.problem]
    if problems:
        raise OutputError(
            f"cannot merge {output}: {len(problems)} of {count} parts missing or incomplete: "
            f"{'; '.join(problems)}; run (or resume) those shards, then merge again"
        )
    options = agreed_options(parts)
    records = records_in_input_order(parts)
    with OutputLock(output):
        check_recognised_output(output, options["format"])
        RecordFile(output, options["format"], options["top_labels"], options["num_captions"]).rewrite(records)
        write_run_options(output + RUN_OPTIONS_SUFFIX, options)
    if html:
        write_gallery(
            html,
            records,
            gallery_items(records, options.get("cwd")),
            header=gallery_header(options),
            lm_label_names=options.get("lm_labels"),
        )
    if remove_parts:
        for path in paths:
            delete_part(path)
    return records


def parts_count(output: str) -> int:
    """N of the parts beside `output` (`find_parts`); raises OutputError when there is none, or parts of several N
    (naming the first part of each)."""
    found = find_parts(output)
    counts = sorted({count for _, count in found})
    if not counts:
        raise OutputError(
            f"no parts of {output} to merge (shard i of N writes its part beside it, such as "
            f"{part_path(output, (0, 2))} for shard 0 of 2)"
        )
    if len(counts) > 1:
        runs = [
            f"{sum(n == count for _, n in found)} of {count} ({min(p for (_, n), p in found.items() if n == count)}"
            f"{', ...' if sum(n == count for _, n in found) > 1 else ''})"
            for count in counts
        ]
        raise OutputError(
            f"parts of {output} from runs of different shard counts are beside it ({'; '.join(runs)}): "
            "remove the parts of the run not to merge"
        )
    return counts[0]


def read_part(path: str, shard: tuple[int, int]) -> Part:
    """Shard (i, N)'s part at `path`, read under its lock (`OutputLock`: a shard still running is refused): why it
    cannot be merged (absent, not that shard's run options, images missing), or its records and their positions."""
    if not os.path.exists(path):
        return Part(path, shard, "absent")
    with OutputLock(path, advice="wait for that shard to end, then merge"):
        options = read_run_options(path + RUN_OPTIONS_SUFFIX)
        problem = part_shard_problem(options, shard, RECORD_FORMATS)
        if problem:
            return Part(path, shard, problem, options)
        records = RecordFile(path, options["format"], options["top_labels"], options["num_captions"]).read_records()
    positions = part_positions(path, records, options["shard_paths"])
    images = options["shard"]["images"]
    problem = None if len(records) == images else f"{len(records)} of {images} images"
    return Part(path, shard, problem, options, records, positions)


def comparable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A part's run options less what differs from shard to shard (its index, its number of images, their keys)."""
    shard = {name: value for name, value in options["shard"].items() if name not in ("index", "images")}
    return {**unsharded_run_options(options), "shard": shard}


def agreed_options(parts: Sequence[Part]) -> dict[str, Any]:
    """The run options one unsharded run records (the first part's less its shard), when every part was made with
    the same options and inputs; else raises OutputError naming a part that differs from most of the others (the
    one to run again) and what differs, or, when no options are held by most parts, two parts that differ."""
    options = [comparable_options(part.options) for part in parts]
    keys = [json.dumps(option, sort_keys=True) for option in options]
    common, held_by = collections.Counter(keys).most_common(1)[0]
    reference = keys.index(common)
    for part, option in zip(parts, options):
        changes = changed_run_options(options[reference], option)
        if not changes:
            continue
        if 2 * held_by > len(parts):
            raise OutputError(
                f"{part.path} was written with other options or inputs than the other parts "
                f"({'; '.join(changes)}): run that shard again as the others (--no-resume), then merge"
            )
        raise OutputError(
            f"{part.path} was written with other options or inputs than {parts[reference].path} "
            f"({'; '.join(changes)}): run again (--no-resume) whichever shard was not made as the run should be, "
            "then merge"
        )
    return unsharded_run_options(parts[0].options)


def records_in_input_order(parts: Sequence[Part]) -> list[dict]:
    """The records of complete parts of one run (`agreed_options`) in input order: the record at position q of
    shard (i, N) is input `shard_item_index(q, (i, N), batch_size)`. Raises OutputError when they do not fit."""
    ordered: list[dict | None] = [None] * sum(len(part.records) for part in parts)
    for part in parts:
        batch_size = part.options["shard"]["batch_size"]
        for record, position in zip(part.records, part.positions):
            index = shard_item_index(position, part.shard, batch_size)
            if index >= len(ordered) or ordered[index] is not None:
                raise OutputError(
                    f"{part.path}: its records do not fit the other parts' input list; run that shard "
                    "again as the others (--no-resume), then merge"
                )
            ordered[index] = record
    return ordered


def gallery_items(records: Sequence[Mapping[str, Any]], cwd: str | None) -> dict[str, Item]:
    """How the page reads the records' images from any folder: a relative file path from `cwd`, where the records
    were written (a tfds image is not read: its card has no thumbnail)."""
    if not cwd:
        return {}
    return {
        record["path"]: Item(os.path.join(cwd, record["path"]))
        for record in records
        if not record["path"].startswith(TFDS_PREFIX) and not os.path.isabs(record["path"])
    }


def delete_part(path: str) -> None:
    """Removes a part and its run options, under its lock."""
    with OutputLock(path, advice="wait for that shard to end"):
        for name in (path, path + RUN_OPTIONS_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)


__all__ = [
    "DEFAULT_COMPILATION_CACHE",
    "Destination",
    "Part",
    "PartOptions",
    "STDOUT",
    "agreed_options",
    "batch_records",
    "caption_files",
    "caption_pending",
    "captioned_batches",
    "checkpoint_identity",
    "compile_and_place",
    "delete_part",
    "directory_identity",
    "enable_compilation_cache",
    "gallery_header",
    "gallery_items",
    "merge_parts",
    "open_inputs",
    "parts_count",
    "pending_batches",
    "read_part",
    "records_in_input_order",
    "run_batch_size",
    "run_options",
    "write_run_page",
]
