"""The HTML gallery (`imgllm.pipeline.gallery`): header, cards, marks of disagreement, escaping, pages.

Fast: tiny PNG files made here, records written by hand (no model, no JAX program).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from imgllm.pipeline.gallery import (
    GalleryHeader,
    card_html,
    distinct_captions,
    label_in_caption,
    mismatches,
    write_gallery,
)
from imgllm.pipeline.inputs import Item
from imgllm.pipeline.records import read_references, reference_for


def png(path, size: int = 8, value: int = 200) -> str:
    """A tiny RGB PNG at `path`; returns its path as a string."""
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return str(path)


def record(path: str, label: str = "cat", caption: str = "a photo of a cat.", **extra) -> dict:
    return {
        "path": path,
        "labels": [{"label": label, "prob": 0.9}, {"label": "dog", "prob": 0.05}],
        "captions": [caption],
        **extra,
    }


def cards(page: str) -> list[str]:
    """The cards of a page, each the text of one <article> element."""
    return re.findall(r"<article.*?</article>", page, flags=re.S)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def css_rules(page: str) -> dict[str, set[str]]:
    """The declarations of each selector in a page's <style> ("a,b{x:1}" gives both "a" and "b" {"x:1"})."""
    style = re.search(r"<style>(.*?)</style>", page, flags=re.S).group(1)
    rules: dict[str, set[str]] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", style):
        for selector in selectors.split(","):
            rules.setdefault(" ".join(selector.split()), set()).update(d.strip() for d in body.split(";") if d.strip())
    return rules


@pytest.fixture
def images(tmp_path):
    """Three tiny images under tmp_path/imgs (a.png, b.png, c.png)."""
    (tmp_path / "imgs").mkdir()
    return [png(tmp_path / "imgs" / f"{name}.png", value=40 * n) for n, name in enumerate("abc", 1)]


def test_header_says_checkpoint_decoding_counts_scores_and_mismatches(tmp_path, images):
    records = [record(images[0]), record(images[1], label="dog"), {"path": images[2], "error": "OSError: broken"}]
    references = {
        os.path.abspath(images[0]): {"captions": ["a cat."], "label": "cat"},
        os.path.abspath(images[1]): {"captions": ["a cat."], "label": "cat"},
    }
    header = GalleryHeader(
        checkpoint="/ckpt/demo",
        decoding={"decoding": "beam", "num_beams": 4},
        scores={"images": 2, "bleu4": 0.25, "cider": None},
    )
    [page] = write_gallery(tmp_path / "g.html", records, header=header, references=references)
    head = read(page).split("<main", 1)[0]
    assert '<dt>checkpoint</dt><dd class="checkpoint">/ckpt/demo</dd>' in head
    assert "decoding=beam, num_beams=4" in head
    assert '<dd class="images">3</dd>' in head and '<dd class="errors">1</dd>' in head  # counted from the records
    assert "bleu4 0.2500" in head and "cider n/a" in head
    assert "of 2 images with a reference" in head
    assert re.search(r'data-kind="cnn">\u2717 CNN label: 1<', head)
    assert re.search(r'data-kind="caption">\u2717 caption: 0<', head)
    assert "generated" not in head.lower()


def test_header_counts_given_win_and_no_mismatch_line_without_references(tmp_path, images):
    [page] = write_gallery(tmp_path / "g.html", [record(images[0])], header=GalleryHeader(num_images=7, num_errors=2))
    text = read(page)
    assert '<dd class="images">7</dd>' in text and '<dd class="errors">2</dd>' in text
    assert "mismatch" not in text.split("<main", 1)[0].split("</style>", 1)[1]


def test_grid_of_inline_cards_without_scripts_or_external_resources(tmp_path, images):
    records = [record(path) for path in images]
    [page] = write_gallery(str(tmp_path / "g.html"), records)
    text = read(page)
    assert "grid-template-columns:repeat(auto-fill,minmax(" in text
    assert "image-rendering:pixelated" in text
    assert len(cards(text)) == 3
    assert all('src="data:image/png;base64,' in card for card in cards(text))
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert [images[n] in card for n, card in enumerate(cards(text))] == [True] * 3  # in record order


def test_thumbnail_reads_through_the_item_given(tmp_path, images):
    """A record whose key is no file (a tfds key) gets its thumbnail from items_by_key."""

    class Stub(Item):
        def load(self, size, **_):
            return np.zeros((4, 4, 3), np.uint8)

    records = [record("tfds:demo:test:0"), record("tfds:demo:test:1")]
    [page] = write_gallery(tmp_path / "g.html", records, {"tfds:demo:test:0": Stub("tfds:demo:test:0")})
    first, second = cards(read(page))
    assert 'src="data:image/png;base64,' in first
    assert "no image" in second and "<img" not in second


def test_alt_text_is_the_first_caption_or_the_path(tmp_path, images):
    with_caption = card_html(record(images[0], caption="a red circle."), "data:image/png;base64,AA", None)
    assert 'alt="a red circle."' in with_caption
    without = card_html({"path": images[1], "labels": [], "captions": []}, "data:image/png;base64,AA", None)
    assert f'alt="image {images[1]}"' in without


def test_everything_from_records_and_references_is_escaped(tmp_path):
    bad = tmp_path / "x<b>&\"q'.png"
    path = png(bad)
    caption = "<script>alert(\"x\")</script> & 'cat'"
    records = [
        record(path, label="<i>cat</i>", caption=caption, lm_label="<u>", lm_probs={"<u>": 0.5}),
        {"path": "<img src=x onerror=alert(1)>", "error": 'OSError: <bad> & "worse"'},
    ]
    references = {os.path.abspath(path): {"captions": ["</li><script>"], "label": "<s>"}}
    [page] = write_gallery(
        tmp_path / "g.html",
        records,
        references=references,
        header=GalleryHeader(checkpoint="<ckpt>", decoding={"template": "A <x> {label}"}),
    )
    text = read(page)
    for raw in ("<script", "<b>&", "<i>cat", "<u>", "<bad>", "<s>", "<ckpt>", "<x>", "<img src=x"):
        assert raw not in text, raw
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;cat&#x27;" in text
    assert "x&lt;b&gt;&amp;&quot;q&#x27;.png" in text
    assert 'alt="&lt;script&gt;alert(&quot;x&quot;)' in text
    assert "OSError: &lt;bad&gt; &amp; &quot;worse&quot;" in text


def test_no_mark_when_all_agree(tmp_path, images):
    reference = {"captions": ["a cat."], "label": "cat"}
    card = card_html(record(images[0], lm_label="cat", caption="A Cat on a mat."), None, reference)
    assert mismatches(record(images[0], lm_label="cat"), reference) == ()
    assert "has-mismatch" not in card and "\u2717" not in card and 'class="mismatch' not in card


@pytest.mark.parametrize(
    "kind, changes, named",
    [
        ("cnn", dict(label="dog"), "CNN label"),
        ("lm", dict(lm_label="dog"), "LM label"),
        ("caption", dict(caption="a photo of a dog."), "caption"),
    ],
)
def test_each_kind_of_disagreement_is_marked_alone(images, kind, changes, named):
    reference = {"captions": ["a cat."], "label": "cat"}
    fields = {"lm_label": "cat", **changes}
    card = card_html(record(images[0], **fields), None, reference)
    assert mismatches(record(images[0], **fields), reference) == (kind,)
    assert 'class="card has-mismatch"' in card
    assert f"\u2717 disagrees with the reference:</span> {named}</p>" in card
    assert card.count('class="mismatch mismatch-') == 1 and f'class="mismatch mismatch-{kind}"' in card
    assert "\u2260 reference" in card


def test_all_three_disagreements_are_named():
    reference = {"captions": ["a cat."], "label": "cat"}
    card = card_html(record("p.png", label="dog", lm_label="frog", caption="a truck."), None, reference)
    assert "disagrees with the reference:</span> CNN label, LM label, caption</p>" in card
    assert all(f"mismatch-{kind}" in card for kind in ("cnn", "lm", "caption"))


def test_label_in_caption_takes_whole_words_ignoring_case():
    assert label_in_caption("pickup_truck", "A PICKUP  truck on a road.")
    assert label_in_caption("cat", "the cat.")
    assert not label_in_caption("cat", "a catalogue")
    assert not label_in_caption("cat", "two cats")
    assert not label_in_caption("pickup_truck", "a pickup_truck")


def test_lm_label_with_its_probability_and_caption_scores(images):
    card = card_html(
        record(
            images[0],
            lm_label="cat",
            lm_probs={"cat": 0.625, "dog": 0.375},
            captions=["a cat.", "the cat."],
            caption_scores=[-1.234, -5.0],
        ),
        None,
        None,
    )
    assert '<span class="kind">LM</span> <span class="label">cat</span> 62.5%' in card
    assert '<span class="label">cat</span> 90.0%' in card and '<span class="label">dog</span> 5.0%' in card
    assert '<span class="caption">a cat.</span> <span class="score">log p -1.23</span>' in card
    assert '<span class="caption">the cat.</span> <span class="score">log p -5.00</span>' in card
    no_probs = card_html(record(images[0], lm_label="cat"), None, None)  # an old record: no lm_probs, no scores
    assert '<span class="kind">LM</span> <span class="label">cat</span></p>' in no_probs
    assert "log p" not in no_probs


def test_references_are_read_matched_by_absolute_path_and_shown(tmp_path, images, monkeypatch):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        json.dumps({"path": "imgs/a.png", "caption": "a grey square.", "label": "square"})
        + "\n"
        + json.dumps({"path": "imgs/a.png", "caption": "one square.", "label": "square"})
        + "\n"
        + json.dumps({"path": "imgs/b.png", "caption": "a box."})
        + "\n"
    )
    references = read_references(str(refs))
    assert references[os.path.abspath(images[0])] == {"captions": ["a grey square.", "one square."], "label": "square"}
    assert references[os.path.abspath(images[1])]["label"] == "imgs"  # no label: the folder's name, as scored
    monkeypatch.chdir(tmp_path)
    assert reference_for(references, "imgs/a.png")["label"] == "square"  # a relative record path
    assert reference_for(references, "imgs/c.png") is None and reference_for(None, "imgs/a.png") is None
    [page] = write_gallery(
        tmp_path / "g.html",
        [record("imgs/a.png", label="square", caption="a square."), record("imgs/c.png")],
        references=references,
    )
    first, second = cards(read(page))
    assert (
        '<span class="kind">reference</span> <span class="kind">label</span> <span class="label">square</span>' in first
    )
    assert "<li>a grey square.</li><li>one square.</li>" in first and "has-mismatch" not in first
    assert "reference" not in second  # no reference: nothing shown, nothing marked


def test_error_record_is_an_error_card(tmp_path, images):
    [page] = write_gallery(tmp_path / "g.html", [record(images[0]), {"path": images[1], "error": "OSError: truncated"}])
    good, bad = cards(read(page))
    assert 'class="card error"' in bad and 'class="card error"' not in good
    assert "\u26a0 error" in bad and '<span class="error-message">OSError: truncated</span>' in bad
    assert "no image" in bad and "<img" not in bad  # an error record's file is not read again
    assert images[1] in bad


def test_pages_past_page_size_are_linked_and_share_the_header(tmp_path, images):
    records = [record(images[n % 3], caption=f"caption {n}.") for n in range(5)]
    pages = write_gallery(tmp_path / "out" / "g.html", records, header=GalleryHeader(checkpoint="/ckpt"), page_size=2)
    assert pages == [str(tmp_path / "out" / name) for name in ("g.html", "g-2.html", "g-3.html")]
    texts = [read(page) for page in pages]
    assert [len(cards(text)) for text in texts] == [2, 2, 1]
    assert ["caption 4." in text for text in texts] == [False, False, True]
    for number, text in enumerate(texts, 1):
        assert f"page {number} of 3" in text
        assert '<dd class="checkpoint">/ckpt</dd>' in text and '<dd class="images">5</dd>' in text
    assert 'rel="next" href="g-2.html"' in texts[0] and 'rel="prev"' not in texts[0]
    assert 'rel="prev" href="g.html"' in texts[1] and 'rel="next" href="g-3.html"' in texts[1]
    assert 'rel="prev" href="g-2.html"' in texts[2] and 'rel="next"' not in texts[2]


def test_one_page_when_records_fit_and_output_is_deterministic(tmp_path, images):
    records = [record(path) for path in images]
    first = write_gallery(tmp_path / "g.html", records, page_size=3)
    assert first == [str(tmp_path / "g.html")] and "page 1 of 1" in read(first[0])
    before = read(first[0])
    write_gallery(tmp_path / "g.html", records, page_size=3)
    assert read(first[0]) == before
    assert write_gallery(tmp_path / "empty.html", []) == [str(tmp_path / "empty.html")]
    assert "no records" in read(str(tmp_path / "empty.html"))
    with pytest.raises(ValueError, match="page_size"):
        write_gallery(tmp_path / "g.html", records, page_size=0)


def test_header_wraps_long_values_on_a_narrow_window(tmp_path, images):
    long_path = "/checkpoints/" + "x" * 300
    header = GalleryHeader(checkpoint=long_path, decoding={"template": "A_" * 100})
    [page] = write_gallery(tmp_path / "g.html", [record(images[0])], header=header)
    text = read(page)
    rules = css_rules(text)
    assert "overflow-wrap:anywhere" in rules["header"]  # a value without spaces breaks anywhere
    # The value column may shrink below its longest word (a plain 1fr column is at least that wide).
    assert "grid-template-columns:max-content minmax(0,1fr)" in rules["header dl"]
    assert "min-width:0" in rules["header dd"]
    assert "flex-wrap:wrap" in rules["nav.pages"]
    assert f'<dd class="checkpoint">{long_path}</dd>' in text.split("<main", 1)[0]


def test_identical_captions_are_shown_once_with_their_count(tmp_path, images):
    assert distinct_captions(["a cat", "a dog", "a cat"]) == [(0, 2), (1, 1)]
    assert distinct_captions([]) == []
    records = [record(images[0], captions=["a cat", "a dog", "a cat"], caption_scores=[-1.0, -2.0, -1.0])]
    [page] = write_gallery(tmp_path / "g.html", records)
    [card] = cards(read(page))
    assert [card.count(f'<span class="caption">{caption}</span>') for caption in ("a cat", "a dog")] == [1, 1]
    items = re.findall(r"<li>.*?</li>", card)
    assert len(items) == 2 and "a cat" in items[0] and "a dog" in items[1]  # first-seen order
    assert '<span class="count" title="2 identical captions">\u00d72</span>' in items[0]
    assert "\u00d7" not in items[1]
    assert '<span class="score">log p -1.00</span>' in items[0] and '<span class="score">log p -2.00</span>' in items[1]
