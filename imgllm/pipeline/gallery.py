"""The HTML gallery of caption records (`infer.py --html=PAGE`): one self-contained page per `page_size` records.

    write_gallery(PAGE, records, items_by_key, header=GalleryHeader(...), references=read_references(FILE))

Each page holds a header (checkpoint, decoding settings, counts, the scores of `score_records`, and how many images
disagree with their references) and a grid of cards, one per record: the thumbnail (a data URI), the path, the
CNN's labels, the LM's label, the captions with their scores (each distinct caption once, "×N" when it came N
times), and the reference caption(s) and label. Where the CNN's top label, the LM's label or the first caption's
object disagrees with the reference label, the card says so in words and with a symbol (not by colour alone). Error
records are error cards. The header wraps long values (paths, decoding settings) on a narrow window.

Nothing on a page is fetched: no JavaScript, no external style sheet or font, thumbnails inline; every text that
comes from a record or a references file (paths, captions, labels, error messages) is HTML-escaped. The output
is deterministic (no generation time), so two runs over the same records write the same pages.

Past `page_size` records, PAGE is the first page and PAGE's stem + "-2.html", "-3.html", ... the next ones, linked
by "previous" / "next" and each saying "page i of n".
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import html
import io
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from imgllm.pipeline.inputs import Item
from imgllm.pipeline.outputs import write_atomically
from imgllm.pipeline.records import lm_label_comparable, reference_for

MISMATCH_KINDS = ("cnn", "lm", "caption")  # what can disagree with a reference label, in display order
MISMATCH_NAMES = {"cnn": "CNN label", "lm": "LM label", "caption": "caption"}
MISMATCH_SYMBOL = "\u2717"  # ✗, beside the words: the mark does not rely on colour
DEFAULT_PAGE_SIZE = 1000
THUMBNAIL_SIZE = 128

STYLE = f"""
:root{{color-scheme:light}}
body{{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}}
header{{margin-bottom:12px;overflow-wrap:anywhere}}
header dl{{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 12px;margin:0}}
header dd{{min-width:0}}
dt{{font-weight:600}} dd{{margin:0}}
nav.pages{{margin:10px 0;display:flex;flex-wrap:wrap;gap:16px;align-items:center}} nav .disabled{{color:#aaa}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}}
.card{{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;overflow-wrap:anywhere}}
.card.has-mismatch{{border:2px solid #c60}} .card.error{{border:2px dashed #b00}}
.thumb{{display:block;width:{THUMBNAIL_SIZE}px;height:{THUMBNAIL_SIZE}px;object-fit:contain;
image-rendering:pixelated;margin:0 auto 6px;background:#eee}}
.no-thumb{{display:flex;align-items:center;justify-content:center;color:#666;font-size:12px}}
.path{{font-family:monospace;font-size:12px;color:#444}}
.card p{{margin:4px 0}} .card ol,.card ul{{margin:4px 0;padding-left:20px}}
.kind{{font-size:11px;text-transform:uppercase;color:#666}}
.score,.count{{color:#666;font-size:12px}}
.mismatch{{color:#a40;font-weight:600}}
.mismatches{{background:#fff3e0;border-radius:4px;padding:2px 4px}}
.reference{{border-top:1px solid #ddd;margin-top:6px;padding-top:4px}}
.error-mark{{color:#b00;font-weight:600}} .error-message{{color:#b00;font-family:monospace}}
"""


@dataclasses.dataclass(frozen=True)
class GalleryHeader:
    """What the header of every page says about the run.

    checkpoint: its path (and checkpoint_id, its fingerprint, when known); decoding: the settings that shaped the
    captions, option -> value (e.g. `run_options` less "checkpoint", "checkpoint_id" and "format");
    num_images, num_errors: None to count them from the records; scores: what `score_records` returned, or None.
    """

    checkpoint: str | None = None
    decoding: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_images: int | None = None
    num_errors: int | None = None
    scores: Mapping[str, Any] | None = None
    checkpoint_id: str | None = None
    title: str = "imgllm captions"


# ----------------------------------------------------------------------------------------------- thumbnails


def thumbnail_data_uri(item: Item) -> str | None:
    """A small PNG of the image as a data: URI, or None when it cannot be read."""
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


# ----------------------------------------------------------------------------------------------- mismatches


def label_in_caption(label: str, caption: str) -> bool:
    """Whether the class name `label` occurs as a word (or words: "pickup_truck" is "pickup truck") in `caption`,
    ignoring case. Only whole words count: "cat" is not in "a catalogue", nor in "two cats"."""
    words = label.replace("_", " ").split()
    if not words:
        return True
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in words) + r"(?!\w)"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def mismatches(
    record: Mapping[str, Any], reference: Mapping[str, Any] | None, lm_label_names: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The kinds (`MISMATCH_KINDS`) in which `record` disagrees with its reference's label: "cnn" (the CNN's top
    label differs), "lm" (the LM's label differs; only when the record has one chosen among labels that hold the
    reference's: `lm_label_comparable`), "caption" (the label's word is not in the first caption). Nothing for an
    error record, or without a reference or a reference label."""
    label = (reference or {}).get("label")
    if "error" in record or not label:
        return ()
    found = []
    if record.get("labels") and record["labels"][0]["label"] != label:
        found.append("cnn")
    if lm_label_comparable(record, reference, lm_label_names) and record["lm_label"] != label:
        found.append("lm")
    captions = record.get("captions") or [""]
    if not label_in_caption(label, captions[0]):
        found.append("caption")
    return tuple(found)


def mismatch_counts(
    records: Sequence[Mapping[str, Any]],
    references: Mapping[str, dict] | None,
    lm_label_names: Sequence[str] | None = None,
) -> dict[str, int]:
    """{"references": records with a reference (error records left out), "with_lm": those of them with an LM
    label comparable with it (`lm_label_comparable`), and per kind of `MISMATCH_KINDS`, how many of them disagree
    in it}."""
    counts = dict.fromkeys(("references", "with_lm", *MISMATCH_KINDS), 0)
    for record in records:
        reference = reference_for(references, record["path"])
        if reference is None or "error" in record:
            continue
        counts["references"] += 1
        counts["with_lm"] += lm_label_comparable(record, reference, lm_label_names)
        for kind in mismatches(record, reference, lm_label_names):
            counts[kind] += 1
    return counts


# ----------------------------------------------------------------------------------------------- html pieces


def escape(value: Any) -> str:
    """`value` as text safe in HTML content and in double- or single-quoted attributes."""
    return html.escape(str(value), quote=True)


def percent(prob: float) -> str:
    return f"{100 * float(prob):.1f}%"


def mark(kind: str) -> str:
    """The visible mark of a disagreement: a symbol and words, in a span of class "mismatch mismatch-KIND"."""
    return (
        f' <span class="mismatch mismatch-{kind}" title="disagrees with the reference label">'
        f"{MISMATCH_SYMBOL} \u2260 reference</span>"
    )


def alt_text(record: Mapping[str, Any]) -> str:
    """The thumbnail's alternative text: the first caption (what the image shows, as far as the model knows), or
    the path when there is none."""
    captions = record.get("captions") or []
    return captions[0] if captions and captions[0].strip() else f"image {record['path']}"


def thumbnail_html(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<div class="thumb no-thumb" role="img" aria-label="{escape(alt)}">no image</div>'
    return f'<img class="thumb" src="{escape(uri)}" alt="{escape(alt)}">'


def labels_html(record: Mapping[str, Any], found: Sequence[str]) -> str:
    """The CNN's labels with probabilities (the top one marked when it disagrees) and the LM's label, with its
    probability when "lm_probs" has it (marked likewise)."""
    entries = [
        f'<span class="label">{escape(e["label"])}</span> {percent(e["prob"])}'
        + (mark("cnn") if n == 0 and "cnn" in found else "")
        for n, e in enumerate(record.get("labels", ()))
    ]
    parts = [f'<p class="cnn"><span class="kind">CNN</span> {", ".join(entries) or "no labels"}</p>']
    if "lm_label" in record:
        prob = (record.get("lm_probs") or {}).get(record["lm_label"])
        shown = "" if prob is None else f" {percent(prob)}"
        parts.append(
            f'<p class="lm"><span class="kind">LM</span> <span class="label">{escape(record["lm_label"])}'
            f"</span>{shown}{mark('lm') if 'lm' in found else ''}</p>"
        )
    return "".join(parts)


def distinct_captions(captions: Sequence[str]) -> list[tuple[int, int]]:
    """(index of its first occurrence, number of occurrences) of each distinct caption, in first-seen order:
    ["a cat", "a dog", "a cat"] -> [(0, 2), (1, 1)]."""
    counts = collections.Counter(captions)
    first = {}
    for n, caption in enumerate(captions):
        first.setdefault(caption, n)
    return [(n, counts[caption]) for caption, n in first.items()]


def captions_html(record: Mapping[str, Any], found: Sequence[str]) -> str:
    """The distinct captions in first-seen order, each once, with "×N" when it occurs N > 1 times (sampled captions
    repeat) and its score (sum of its tokens' log-probabilities, at its first occurrence) when the record has
    "caption_scores"; the first caption marked when the reference label's word is not in it."""
    captions, scores = list(record.get("captions", ())), record.get("caption_scores") or []
    items = []
    for n, count in distinct_captions(captions):
        times = f' <span class="count" title="{count} identical captions">\u00d7{count}</span>' if count > 1 else ""
        score = f' <span class="score">log p {float(scores[n]):.2f}</span>' if n < len(scores) else ""
        flag = mark("caption") if n == 0 and "caption" in found else ""
        items.append(f'<li><span class="caption">{escape(captions[n])}</span>{times}{score}{flag}</li>')
    return f'<ol class="captions">{"".join(items)}</ol>' if items else "<p>no captions</p>"


def reference_html(reference: Mapping[str, Any] | None) -> str:
    if reference is None:
        return ""
    label = reference.get("label")
    label_part = f' <span class="kind">label</span> <span class="label">{escape(label)}</span>' if label else ""
    captions = "".join(f"<li>{escape(caption)}</li>" for caption in reference.get("captions", ()))
    return f'<div class="reference"><p><span class="kind">reference</span>{label_part}</p><ul>{captions}</ul></div>'


def card_html(
    record: Mapping[str, Any],
    thumbnail_uri: str | None,
    reference: Mapping[str, Any] | None,
    lm_label_names: Sequence[str] | None = None,
) -> str:
    """One record's card (pure: the thumbnail is given as a data URI, or None when the image cannot be read).

    An error record gives an error card (class "card error") with its message; a record that disagrees with its
    reference gets class "has-mismatch" and a line naming what disagrees, besides the marks at each place."""
    path = f'<p class="path">{escape(record["path"])}</p>'
    if "error" in record:
        return (
            f'<article class="card error">{thumbnail_html(thumbnail_uri, "unreadable image " + record["path"])}'
            f'{path}<p><span class="error-mark">\u26a0 error</span> '
            f'<span class="error-message">{escape(record["error"])}</span></p>{reference_html(reference)}'
            "</article>"
        )
    found = mismatches(record, reference, lm_label_names)
    summary = ""
    if found:
        summary = (
            f'<p class="mismatches"><span class="mismatch">{MISMATCH_SYMBOL} disagrees with the reference:'
            f"</span> {', '.join(MISMATCH_NAMES[kind] for kind in found)}</p>"
        )
    classes = "card has-mismatch" if found else "card"
    return (
        f'<article class="{classes}">{thumbnail_html(thumbnail_uri, alt_text(record))}{path}{summary}'
        f"{labels_html(record, found)}{captions_html(record, found)}{reference_html(reference)}</article>"
    )


def format_value(value: Any) -> str:
    """A header value as text: floats to 4 decimals, None as "n/a", the rest as str (escaped by the caller)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def header_html(header: GalleryHeader, counts: Mapping[str, int] | None) -> str:
    """The header every page shares: the run (checkpoint, decoding), the counts, the scores, and, with
    references (`counts`, from `mismatch_counts`), how many images disagree with them per kind."""
    rows = [("checkpoint", header.checkpoint if header.checkpoint is not None else "n/a")]
    if header.checkpoint_id:
        rows.append(("checkpoint id", header.checkpoint_id))
    decoding = ", ".join(f"{name}={format_value(value)}" for name, value in header.decoding.items())
    rows += [("decoding", decoding or "n/a"), ("images", header.num_images), ("errors", header.num_errors)]
    if header.scores is not None:
        rows.append(("scores", ", ".join(f"{name} {format_value(value)}" for name, value in header.scores.items())))
    body = "".join(
        f'<dt>{escape(name)}</dt><dd class="{escape(name.replace(" ", "-"))}">{escape(format_value(v))}</dd>'
        for name, v in rows
    )
    if counts is not None:
        lm = f" of {counts['with_lm']}" if counts["with_lm"] != counts["references"] else ""
        parts = [
            f'<span class="mismatch-count" data-kind="{kind}">{MISMATCH_SYMBOL} {MISMATCH_NAMES[kind]}: '
            f"{counts[kind]}{lm if kind == 'lm' else ''}</span>"
            for kind in MISMATCH_KINDS
        ]
        body += (
            f'<dt>mismatches</dt><dd class="mismatches-total">of {counts["references"]} images with a '
            f"reference: {'; '.join(parts)}</dd>"
        )
    return f"<header><h1>{escape(header.title)}</h1><dl>{body}</dl></header>"


def page_name(path: str, number: int) -> str:
    """The file of page `number` (1-based): `path` itself for the first, its stem + "-N.html" for the others."""
    return path if number == 1 else f"{os.path.splitext(path)[0]}-{number}.html"


def nav_html(path: str, number: int, total: int) -> str:
    """ "page i of n" with links to the previous and next pages (relative: the pages lie in one folder)."""

    def link(to: int, text: str, rel: str) -> str:
        href = urllib.parse.quote(os.path.basename(page_name(path, to)))
        return f'<a rel="{rel}" href="{escape(href)}">{text}</a>'

    previous = link(number - 1, "\u2190 previous", "prev") if number > 1 else '<span class="disabled">\u2190</span>'
    following = link(number + 1, "next \u2192", "next") if number < total else '<span class="disabled">\u2192</span>'
    return f'<nav class="pages">{previous}<span class="page">page {number} of {total}</span>{following}</nav>'


def page_html(title: str, header: str, cards: Sequence[str], nav: str) -> str:
    """A whole page: inline style, the shared header, the navigation above and below the grid of cards."""
    grid = "\n".join(cards) if cards else "<p>no records</p>"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{header}\n{nav}\n"
        f'<main class="grid">\n{grid}\n</main>\n{nav}\n</body></html>\n'
    )


# ----------------------------------------------------------------------------------------------- writing


def counted_header(header: GalleryHeader | None, records: Sequence[Mapping[str, Any]]) -> GalleryHeader:
    """`header` (an empty one when None) with its counts of images and errors filled from `records` when None."""
    header = header or GalleryHeader()
    errors = sum("error" in record for record in records)
    return dataclasses.replace(
        header,
        num_images=len(records) if header.num_images is None else header.num_images,
        num_errors=errors if header.num_errors is None else header.num_errors,
    )


def write_gallery(
    path: str | os.PathLike,
    records: Sequence[Mapping[str, Any]],
    items_by_key: Mapping[str, Item] | None = None,
    *,
    header: GalleryHeader | None = None,
    references: Mapping[str, dict] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    lm_label_names: Sequence[str] | None = None,
) -> list[str]:
    """Writes the gallery of `records` (module docstring) and returns the paths of its pages, first one `path`.

    items_by_key: how to read a record's image (tfds items need theirs); a record without one is read as the file
    at its path. Error records are not read. references: by absolute image path, as `read_references` returns
    them. lm_label_names: the labels the LM chose among (None: the checkpoint's classes), so that an LM label is
    marked only against a reference label it could have given. Each page is written atomically
    (`write_atomically`). Pages of an earlier, longer gallery beyond the
    last one written are left as they are (nothing links to them).
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    path, records, items_by_key = os.fspath(path), list(records), items_by_key or {}
    header = counted_header(header, records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    counts = mismatch_counts(records, references, lm_label_names) if references is not None else None
    shared = header_html(header, counts)
    total = max(1, -(-len(records) // page_size))
    written = []
    for number in range(1, total + 1):
        cards = []
        for record in records[(number - 1) * page_size : number * page_size]:
            item = items_by_key.get(record["path"]) or Item(record["path"])
            uri = None if "error" in record else thumbnail_data_uri(item)
            cards.append(card_html(record, uri, reference_for(references, record["path"]), lm_label_names))
        title = header.title if total == 1 else f"{header.title} ({number}/{total})"
        text = page_html(title, shared, cards, nav_html(path, number, total))
        name = page_name(path, number)
        write_atomically(name, lambda stream: stream.write(text))
        written.append(name)
    return written


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "GalleryHeader",
    "MISMATCH_KINDS",
    "card_html",
    "counted_header",
    "distinct_captions",
    "header_html",
    "label_in_caption",
    "mismatch_counts",
    "mismatches",
    "page_html",
    "page_name",
    "thumbnail_data_uri",
    "write_gallery",
]
