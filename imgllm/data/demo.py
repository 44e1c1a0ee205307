"""Procedurally generated "shapes" images with class labels and exact captions (no download).

Each image shows one or two coloured shapes on a dark, noisy, gradient background. Everything the
caption says is a deterministic function of what is drawn, and every attribute is visible at 32x32,
so a model can learn to reproduce the caption exactly:

* one object:  "a {size} {colour} {shape} {place}"
  with place one of "on the left", "on the right", "at the top", "at the bottom", "in the center";
* two objects: "a {size} {colour} {shape} {relation} a {size} {colour} {shape}"
  with relation "above" (stacked vertically) or "to the left of" (side by side).

The class label is the shape of the first object named in the caption, which is always the only
object, or the upper one ("above"), or the left one ("to the left of").

Image ``i`` of a split depends only on ``(seed, split, i)``: the same seed gives the same bytes, and
asking for more examples extends a split without changing its first images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from imgllm.data.dataset import ImageDataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart", "crescent", "bar")
# Very distinct, saturated colours; backgrounds stay dark and low in saturation so all of them stand out.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 110, 250),
    "yellow": (245, 225, 40),
    "purple": (170, 60, 230),
    "white": (245, 245, 245),
}
# Side of an object's bounding square as a fraction of the image side.
SIZES = {"small": 0.30, "large": 0.46}
# Object centre (x, y) as fractions of the image side, for single-object scenes.
PLACES = {
    "on the left": (0.26, 0.5),
    "on the right": (0.74, 0.5),
    "at the top": (0.5, 0.26),
    "at the bottom": (0.5, 0.74),
    "in the center": (0.5, 0.5),
}
RELATIONS = ("above", "to the left of")
DEFAULT_NUM_EXAMPLES = {"train": 10_000, "validation": 1_000, "test": 1_000}

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased, still deterministic
_JITTER = 0.05  # random shift of object centres, fraction of the image side
_COLOUR_JITTER = 12  # per-channel random change of an object's colour, keeps colour names unambiguous


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its attributes and its centre in pixels."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    rgb: tuple[int, int, int]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one demo image shows; `caption` and `label` are functions of it."""

    objects: tuple[ShapeObject, ...]  # first = the object that names the class
    place: str | None  # single-object scenes
    relation: str | None  # two-object scenes

    @property
    def label(self) -> int:
        return SHAPES.index(self.objects[0].shape)

    @property
    def caption(self) -> str:
        if self.relation is None:
            return f"{self.objects[0].phrase()} {self.place}"
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"


def caption_vocabulary() -> tuple[str, ...]:
    """Every word that can occur in a demo caption (sorted), e.g. for a small word-level tokenizer."""
    words = {"a"}
    for phrase in (*SHAPES, *COLOURS, *SIZES, *PLACES, *RELATIONS):
        words.update(phrase.split())
    return tuple(sorted(words))


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Outline of a polygonal shape in the unit box [-1, 1]^2 (y down); None for shapes built from discs."""
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)]
    if shape == "diamond":
        return [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    if shape == "cross":
        a = 0.32
        return [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    if shape == "bar":
        return [(-1.0, -0.36), (1.0, -0.36), (1.0, 0.36), (-1.0, 0.36)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [(float(r * np.cos(t)), float(r * np.sin(t) + 0.1)) for r, t in zip(radii, angles)]
    return None


def _draw_unit_shape(draw: ImageDraw.ImageDraw, shape: str, to_px) -> None:
    """Draws `shape` (white on black) with `to_px` mapping unit-box points to canvas pixels."""

    def disc(cx, cy, r, fill):
        (x0, y0), (x1, y1) = to_px((cx - r, cy - r)), to_px((cx + r, cy + r))
        draw.ellipse([x0, y0, x1, y1], fill=fill)

    polygon = _unit_polygon(shape)
    if polygon is not None:
        draw.polygon([to_px(p) for p in polygon], fill=255)
    elif shape == "circle":
        disc(0, 0, 1, 255)
    elif shape == "ring":
        disc(0, 0, 1, 255)
        disc(0, 0, 0.52, 0)
    elif shape == "crescent":
        disc(0, 0, 1, 255)
        disc(0.5, -0.1, 0.82, 0)
    elif shape == "heart":
        disc(-0.47, -0.38, 0.53, 255)
        disc(0.47, -0.38, 0.53, 255)
        draw.polygon([to_px(p) for p in [(-0.98, -0.2), (0.98, -0.2), (0.0, 1.0)]], fill=255)
    else:
        raise ValueError(f"unknown demo shape {shape!r}; known: {SHAPES}")


def shape_mask(obj: ShapeObject, image_size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 [image_size, image_size], of one object."""
    canvas_size = image_size * _SUPERSAMPLE
    canvas = Image.new("L", (canvas_size, canvas_size), 0)
    half_px = SIZES[obj.size] * image_size * _SUPERSAMPLE / 2
    cx, cy = (c * _SUPERSAMPLE for c in obj.center)

    def to_px(point):
        return (cx + point[0] * half_px, cy + point[1] * half_px)

    _draw_unit_shape(ImageDraw.Draw(canvas), obj.shape, to_px)
    small = canvas.reduce(_SUPERSAMPLE)  # box filter: exact average of each 4x4 block
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Dark, low-saturation background: a random base colour, a linear gradient and mild noise."""
    base = rng.uniform(20, 95, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    ramp = np.cos(angle) * coords[None, :, None] + np.sin(angle) * coords[:, None, None]
    gradient = ramp * rng.uniform(-40, 40, size=3).astype(np.float32)
    noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * 4
    return np.clip(base + gradient + noise, 0, 110)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of `options`, uniformly (rng.integers: much cheaper than rng.choice on a list of strings)."""
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, size: str, center: tuple[float, float]) -> ShapeObject:
    colour = _pick(rng, tuple(COLOURS))
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    rgb = tuple(min(max(c + int(j), 0), 255) for c, j in zip(COLOURS[colour], jitter))
    return ShapeObject(shape=_pick(rng, SHAPES), colour=colour, size=size, center=center, rgb=rgb)


def sample_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """Draws a random scene: attributes plus pixel positions that keep every object inside the image."""
    jitter = lambda: rng.uniform(-_JITTER, _JITTER) * image_size  # noqa: E731
    size_names = tuple(SIZES)
    if rng.random() < 0.5:
        place = _pick(rng, tuple(PLACES))
        size = _pick(rng, size_names)
        half = SIZES[size] * image_size / 2
        fx, fy = PLACES[place]
        center = tuple(float(np.clip(f * image_size + jitter(), half, image_size - half)) for f in (fx, fy))
        return Scene(objects=(_random_object(rng, size, center),), place=place, relation=None)

    relation = _pick(rng, RELATIONS)
    sizes = [_pick(rng, size_names) for _ in range(2)]
    halves = [SIZES[s] * image_size / 2 for s in sizes]
    # Along the relation's axis the two objects sit side by side, a random share of the free space apart.
    free = image_size - 2 * sum(halves)
    first_edge = rng.uniform(0, 0.5) * free
    gap = max(free - first_edge, 0) * rng.uniform(0.3, 1.0)
    along = (first_edge + halves[0], first_edge + 2 * halves[0] + gap + halves[1])
    across = float(np.clip(image_size / 2 + jitter(), max(halves), image_size - max(halves)))
    centers = [(across, a) if relation == "above" else (a, across) for a in along]
    objects = tuple(_random_object(rng, s, (float(c[0]), float(c[1]))) for s, c in zip(sizes, centers))
    return Scene(objects=objects, place=None, relation=relation)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Paints the scene's objects, in order, over a random background; uint8 [S, S, 3]."""
    image = _background(rng, image_size)
    for obj in scene.objects:
        alpha = shape_mask(obj, image_size)[..., None]
        image += alpha * (np.array(obj.rgb, np.float32) - image)
    return np.round(image).astype(np.uint8)


def _split_code(split: str) -> int:
    """A stable integer per split name (crc32, not Python's salted hash) for seeding."""
    return zlib.crc32(split.encode())


def generate_example(seed: int, split: str, index: int, image_size: int = 32) -> tuple[np.ndarray, Scene]:
    """Image `index` of `split` for `seed`: (uint8 [S, S, 3], its scene). Independent of other indices."""
    rng = np.random.default_rng((seed, _split_code(split), index))
    scene = sample_scene(rng, image_size)
    return render_scene(scene, image_size, rng), scene


def demo_scenes(split: str, *, seed: int = 0, num_examples: int, image_size: int = 32) -> list[Scene]:
    """The scenes of images 0..num_examples-1 of a split, without drawing them (a scene is sampled before it is
    drawn): ground truth for questions about the objects (their colours, sizes, ...)."""
    return [
        sample_scene(np.random.default_rng((seed, _split_code(split), index)), image_size)
        for index in range(num_examples)
    ]


def generate_demo(split: str, *, seed: int = 0, num_examples: int | None = None, image_size: int | None = None):
    """The demo split as an `ImageDataset` with one reference caption per image."""
    image_size = 32 if image_size is None else int(image_size)
    if image_size < 16:
        raise ValueError(f"demo image_size must be at least 16 pixels, got {image_size}")
    if num_examples is None:
        if split not in DEFAULT_NUM_EXAMPLES:
            raise ValueError(f"unknown demo split {split!r}; use one of {tuple(DEFAULT_NUM_EXAMPLES)}")
        num_examples = DEFAULT_NUM_EXAMPLES[split]
    examples = [generate_example(seed, split, i, image_size) for i in range(num_examples)]
    images = np.zeros((num_examples, image_size, image_size, 3), np.uint8)
    for index, (image, _) in enumerate(examples):
        images[index] = image
    return ImageDataset(
        images=images,
        labels=np.array([scene.label for _, scene in examples], dtype=np.int32),
        class_names=SHAPES,
        captions=tuple((scene.caption,) for _, scene in examples),
    )


def write_demo_images(
    out_dir: str, *, num_examples: int, seed: int = 1, split: str = "test", image_size: int = 32
) -> str:
    """Writes demo images as ``out_dir/<shape>/<index>.png`` plus ``out_dir/captions.jsonl`` (references).

    The captions file has one ``{"path", "caption", "label"}`` line per image, paths relative to ``out_dir``:
    the "captions:" folder format of `imgllm.captions`, and what ``infer.py --references`` scores against.
    Returns the captions file's path.
    """
    lines = []
    for index in range(num_examples):
        image, scene = generate_example(seed, split, index, image_size)
        relative = os.path.join(SHAPES[scene.label], f"{index:05d}.png")
        os.makedirs(os.path.join(out_dir, SHAPES[scene.label]), exist_ok=True)
        Image.fromarray(image).save(os.path.join(out_dir, relative))
        lines.append(json.dumps({"path": relative, "caption": scene.caption, "label": SHAPES[scene.label]}))
    captions_path = os.path.join(out_dir, "captions.jsonl")
    with open(captions_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return captions_path
