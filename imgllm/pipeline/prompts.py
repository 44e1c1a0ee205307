"""Caption prompt templates tokenised once, before jit, into small tables that jitted code gathers rows from.

Templates use slots: ``{label}``/``{labelN}`` (the N-th most probable class name, N = 1..top_k),
``{prob}``/``{probN}`` (its probability as a whole percentage) and ``{topk}`` (shorthand for
``{label1} ({prob1}%), {label2} ({prob2}%), ...`` over all top_k labels); ``{{``/``}}`` are literal braces.

    tokenize_template  template + class names → TokenizedTemplate (literal pieces, and one SlotTable per slot kind)
    assemble_prompts   TokenizedTemplate + top-k label ids + percentages → left-padded prompt ids, inside jit

(The prompts the LM *classification* scores are another thing: `imgllm.language.scoring.ClassPromptTable`.)
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from imgllm.language.scoring import spoken_label

DEFAULT_TEMPLATE = "A photo of a {label}."

# Percentages are phrased as whole numbers 0..100; their token ids come from one table of 101 rows.
_PERCENT_VALUES = 101
_SLOT = re.compile(r"^(label|prob)(\d*)$")


# ----------------------------------------------------------------------------------------------- tokenised templates


@dataclasses.dataclass(frozen=True)
class SlotTable:
    """Token ids of every value a template slot can take (class names, or percentages 0..100), right-padded:
    ids[i][:lengths[i]] tokenises value i.

    Tuples, not arrays, so that a `PipelineSpec` holding them stays hashable (a static jit argument).
    """

    ids: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]

    @property
    def width(self) -> int:
        return len(self.ids[0])


@dataclasses.dataclass(frozen=True)
class PromptPiece:
    """One piece of a template: literal token ids (kind "text"), or a slot filled per image from a SlotTable.

    kind "label" takes row `topk_ids[:, rank]` of `slot_tables[table]`; kind "prob" takes row `percent[:, rank]`
    of it.
    """

    kind: str
    ids: tuple[int, ...] = ()
    rank: int = 0
    table: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizedTemplate:
    """A tokenised caption-prompt template: the pieces in order and the slot tables their slots select rows from
    (`tokenize_template` makes it; hashable, a field of the static `PipelineSpec`)."""

    template: str
    pieces: tuple[PromptPiece, ...]
    slot_tables: tuple[SlotTable, ...]
    num_classes: int
    top_k: int

    @property
    def width(self) -> int:
        """Static prompt length (the longest possible prompt; shorter ones are left-padded to it)."""
        return sum(len(p.ids) if p.kind == "text" else self.slot_tables[p.table].width for p in self.pieces)


def expand_template(template: str, top_k: int) -> str:
    """Replaces the ``{topk}`` slot by explicit ``{labelN} ({probN}%)`` slots joined with ", " (``{{topk}}`` is the
    literal text "{topk}" and stays as it is)."""
    listing = ", ".join(f"{{label{n}}} ({{prob{n}}}%)" for n in range(1, top_k + 1))
    pieces = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        pieces.append(literal.replace("{", "{{").replace("}", "}}"))
        if field == "topk" and not spec and not conversion:
            pieces.append(listing)
        elif field is not None:
            pieces.append("{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(pieces)


def check_label_templates(templates: Sequence[str]) -> None:
    """Raises ValueError naming a template of LM classification whose fields are not exactly ``{label}``:
    ``{label.__class__}``, ``{label[0]}``, ``{label!r}`` or ``{label:>9}`` would be evaluated by str.format, and put
    object attributes into prompts."""
    for template in templates:
        try:
            fields = [
                (field, spec, conversion)
                for _, field, spec, conversion in string.Formatter().parse(template)
                if field is not None
            ]
        except ValueError as error:
            raise ValueError(
                f"prompt template {template!r}: {error} (write {{{{ and }}}} for literal braces)"
            ) from None
        bad = [
            field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            for field, spec, conversion in fields
            if field != "label" or spec or conversion
        ]
        if bad:
            raise ValueError(
                f"prompt template {template!r}: unknown slot {{{bad[0]}}}; {{label}} is the only slot "
                "(write {{ and }} for literal braces)"
            )


def parse_template(template: str, top_k: int) -> list[tuple[str, Any]]:
    """Splits a template into [("text", str) | ("label", rank) | ("prob", rank)], ranks counted from 0.

    Raises ValueError naming the template and the slot when a slot is unknown or asks for a rank above top_k.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    parts: list[tuple[str, Any]] = []
    for literal, field, spec, conversion in string.Formatter().parse(expand_template(template, top_k)):
        if literal:
            parts.append(("text", literal))
        if field is None:
            continue
        match = _SLOT.match(field)
        if match is None or spec or conversion:
            raise ValueError(
                f"prompt template {template!r}: unknown slot {{{field}}}; use {{label}}, {{labelN}}, "
                "{prob}, {probN} or {topk}"
            )
        rank = int(match.group(2) or 1) - 1
        if not 0 <= rank < top_k:
            raise ValueError(
                f"prompt template {template!r}: slot {{{field}}} needs top_k >= {rank + 1}, but top_k={top_k}"
            )
        parts.append((match.group(1), rank))
    if not parts:
        raise ValueError("prompt template is empty; the language model needs at least one prompt token")
    check_slots_stand_apart(template, parts)
    return parts


def check_slots_stand_apart(template: str, parts: Sequence[tuple[str, Any]]) -> None:
    """Raises ValueError naming the template when a slot touches a letter or digit of the text (or another slot):
    "{label}s" would be tokenised as " cat" + "s", not as the " cats" of the filled-in prompt, since slots and text
    are tokenised apart (`tokenize_template`)."""
    edges = [("a", "a") if kind != "text" else (value[:1], value[-1:]) for kind, value in parts]  # slot: a word
    for n in range(len(parts) - 1):
        if "text" != parts[n][0] or "text" != parts[n + 1][0]:
            if edges[n][1].isalnum() and edges[n + 1][0].isalnum():
                glued = "".join(
                    value[-8:] if kind == "text" else f"{{{kind}{value + 1 if value else ''}}}"
                    for kind, value in parts[n : n + 2]
                )
                raise ValueError(
                    f"prompt template {template!r}: a slot is glued to text or another slot ({glued!r}) "
                    "and would be tokenised apart from it; put a space or punctuation between them"
                )


def slot_table(encode: Callable[[str], Sequence[int]], texts: Sequence[str], pad_id: int) -> SlotTable:
    """Tokenises every text once into a right-padded table (pad_id fills, lengths say what is real)."""
    rows = [tuple(int(i) for i in encode(text)) for text in texts]
    empty = [text for text, row in zip(texts, rows) if not row]
    if empty:
        raise ValueError(f"these prompt values tokenise to nothing: {empty[:5]}")
    width = max(len(row) for row in rows)
    return SlotTable(
        ids=tuple(row + (pad_id,) * (width - len(row)) for row in rows), lengths=tuple(len(row) for row in rows)
    )


def tokenize_template(
    encode: Callable[[str], Sequence[int]],
    template: str,
    class_names: Sequence[str],
    top_k: int,
    pad_id: int,
    *,
    bos_id: int | None = None,
) -> TokenizedTemplate:
    """Tokenises a template's pieces once: literal segments, class names (as `spoken_label` reads them) and
    percentages.

    Byte-level BPE (GPT-2) attaches a space to the word after it (" cat" is one token, "cat" another), and its
    pre-tokeniser never merges across a space or punctuation boundary. So a space just before a slot moves into
    the slot's values (the table of " cat", " dog", ...), and tokenising the pieces separately gives the same ids
    as tokenising the whole filled-in prompt. `encode` maps a string to ids without special tokens.
    bos_id: start every prompt with this token (the visual-prefix convention: [prefix][BOS][text]); the
    template may then be empty.
    """
    if not class_names:
        raise ValueError("tokenize_template needs at least one class name")
    if top_k > len(class_names):
        raise ValueError(f"top_k={top_k} exceeds the number of classes ({len(class_names)})")
    values = {"label": [spoken_label(name) for name in class_names], "prob": [str(n) for n in range(_PERCENT_VALUES)]}
    tables: list[SlotTable] = []
    table_index: dict[tuple[str, str], int] = {}
    pieces = [PromptPiece("text", ids=(int(bos_id),))] if bos_id is not None else []
    parts = parse_template(template, top_k) if template or bos_id is None else []
    for position, (kind, value) in enumerate(parts):
        if kind == "text":
            followed_by_slot = position + 1 < len(parts) and parts[position + 1][0] != "text"
            text = value[:-1] if followed_by_slot and value.endswith(" ") else value
            if text:
                pieces.append(PromptPiece("text", ids=tuple(int(i) for i in encode(text))))
            continue
        previous = parts[position - 1] if position else None
        space = " " if previous is not None and previous[0] == "text" and previous[1].endswith(" ") else ""
        if (kind, space) not in table_index:
            table_index[kind, space] = len(tables)
            tables.append(slot_table(encode, [space + v for v in values[kind]], pad_id))
        pieces.append(PromptPiece(kind, rank=value, table=table_index[kind, space]))
    return TokenizedTemplate(
        template=template, pieces=tuple(pieces), slot_tables=tuple(tables), num_classes=len(class_names), top_k=top_k
    )


def fill_template(template: str, labels: Sequence[str], percents: Sequence[int]) -> str:
    """The prompt string for one image (what `assemble_prompts` builds as ids); for checks and display."""
    top_k = len(labels)
    values = {f"label{n + 1}": spoken_label(labels[n]) for n in range(top_k)}
    values.update({f"prob{n + 1}": str(int(percents[n])) for n in range(top_k)})
    values.update(label=spoken_label(labels[0]), prob=str(int(percents[0])))
    return expand_template(template, top_k).format(**values)


def probability_percents(probs: jax.Array) -> jax.Array:
    """Probabilities in [0, 1] → whole percentages 0..100 (int32), rounded to nearest."""
    return jnp.clip(jnp.round(probs * 100.0), 0, _PERCENT_VALUES - 1).astype(jnp.int32)


def assemble_prompts(
    template: TokenizedTemplate, topk_ids: jax.Array, percents: jax.Array, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """Builds left-padded prompt ids and mask [B, P] from the template's pieces and slot tables, inside jit.

    Each piece contributes a fixed-width block (a literal, or the selected table row with its padding marked
    invalid); concatenating the blocks gives the prompt with holes. A stable sort on the validity bit then moves
    the holes to the left while keeping the real tokens in order: the left-padded prompt generation expects.
    """
    batch = topk_ids.shape[0]
    blocks, valid = [], []
    for piece in template.pieces:
        if piece.kind == "text":
            blocks.append(jnp.broadcast_to(jnp.asarray(piece.ids, jnp.int32), (batch, len(piece.ids))))
            valid.append(jnp.ones((batch, len(piece.ids)), bool))
            continue
        table = template.slot_tables[piece.table]
        rows = (topk_ids if piece.kind == "label" else percents)[:, piece.rank]
        blocks.append(jnp.asarray(table.ids, jnp.int32)[rows])
        lengths = jnp.asarray(table.lengths, jnp.int32)[rows]
        valid.append(jnp.arange(table.width)[None, :] < lengths[:, None])
    ids, valid = jnp.concatenate(blocks, axis=1), jnp.concatenate(valid, axis=1)
    order = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)
    ids = jnp.take_along_axis(ids, order, axis=1)
    mask = jnp.take_along_axis(valid, order, axis=1)
    return jnp.where(mask, ids, pad_id).astype(jnp.int32), mask.astype(jnp.int32)
