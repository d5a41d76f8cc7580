"""Shapes: a procedural picture/question dataset (Pillow + numpy only; no torch).

Each picture holds one to three shapes (circle, square, triangle, diamond, star) in six colors, of
varied sizes, each in its own cell of a 3x3 grid, on a varied background (light or dark, flat or
graded, with or without noise). A picture comes with a caption and every question/answer pair
that has one right answer:

    count       How many shapes are there?            two
    count_kind  How many circles are there?           one       (also zero, for an absent kind)
    color       What color is the triangle?           red       (only when one triangle is present)
    shape       What shape is the blue one?           star      (only when one shape is blue)
    where       Where is the red circle?              top left  (a color+shape pair is unique)
    caption     Describe the picture.                 a red circle at the top left and a ...

Splits never share an image. Every picture is rendered and its pixels hashed; a picture whose
hash falls in bucket 0 of `_BUCKETS` belongs to the held-out split (and to the demo), any other to
the training split, and a generator drops pictures of the other split. On top of that, each split
draws its seeds from its own stream (`np.random.default_rng([stream, index, attempt])`).

    ex = example("heldout", 7)          # deterministic: the same picture and question every time
    ex.image, ex.question, ex.answer, ex.kind, ex.qa, ex.caption
    ex = random_example()               # a fresh held-out-bucket picture (for `make demo`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 84  # the model's input size: 3x3 cells of 28 px = 2x2 patches of 14 px each
GRID = 3
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges
MAX_JITTER = 3.0  # px a shape's center may move from its cell's center (less where it would leave the cell)

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 70, 200),
    "orange": (250, 130, 20),
}
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
NUMBERS = ("zero", "one", "two", "three")
QUESTION_KINDS = ("count", "count_kind", "color", "shape", "where", "caption")

SPLITS = {"train": 0, "heldout": 1, "demo": 2}  # seed streams
_BUCKETS = 8  # 1 in 8 pictures (by pixel hash) is held out
_MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    row: int  # grid cell
    col: int
    x: float  # center, pixels at IMAGE_SIZE
    y: float
    size: float  # radius-like half extent, pixels

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Background:
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]  # == top: flat
    noise: float  # std of per-pixel gray noise
    noise_seed: int


@dataclass(frozen=True)
class QA:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


@dataclass(frozen=True)
class Example:
    split: str
    index: int
    seed: tuple[int, ...]  # the rng seed the picture was drawn from
    shapes: tuple[Shape, ...]
    background: Background
    image: Image.Image
    qa: tuple[QA, ...]  # every question with one right answer
    pick: int  # the question this example asks (index into qa)

    @property
    def question(self) -> str:
        return self.qa[self.pick].question

    @property
    def answer(self) -> str:
        return self.qa[self.pick].answer

    @property
    def kind(self) -> str:
        return self.qa[self.pick].kind

    @property
    def caption(self) -> str:
        return caption(self.shapes)

    @property
    def digest(self) -> str:
        return image_digest(self.image)


# ---------------------------------------------------------------------------------------------
# Scenes


def random_scene(rng: np.random.Generator) -> tuple[tuple[Shape, ...], Background]:
    n = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs: set[tuple[str, str]] = set()
    shapes = []
    for cell in cells:
        while (pair := (str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))))) in pairs:
            pass  # a color+shape pair appears once, so "Where is the red circle?" has one answer
        pairs.add(pair)
        shapes.append(_place(pair, int(cell), rng))
    return tuple(shapes), _background(rng)


def _place(pair: tuple[str, str], cell: int, rng: np.random.Generator) -> Shape:
    cell_px = IMAGE_SIZE / GRID
    size = float(rng.uniform(6.0, 11.5))
    slack = min(cell_px / 2 - size - 1, MAX_JITTER)
    row, col = divmod(cell, GRID)
    x = (col + 0.5) * cell_px + float(rng.uniform(-slack, slack))
    y = (row + 0.5) * cell_px + float(rng.uniform(-slack, slack))
    return Shape(pair[0], pair[1], row, col, x, y, size)


def _background(rng: np.random.Generator) -> Background:
    dark = rng.random() < 0.4
    lo, hi = (0, 70) if dark else (175, 255)

    def tone():
        base = rng.integers(lo, hi)
        return tuple(int(np.clip(base + rng.integers(-20, 21), 0, 255)) for _ in range(3))

    top = tone()
    bottom = tone() if rng.random() < 0.5 else top
    noise = float(rng.choice([0.0, 0.0, 4.0, 8.0]))
    return Background(top, bottom, noise, int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------
# Rendering


def render(shapes: tuple[Shape, ...], background: Background, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB picture of `size` px. Shapes are drawn at SUPERSAMPLE x and box-filtered down."""
    ss = size * SUPERSAMPLE
    canvas = Image.fromarray(_background_pixels(background, size)).resize((ss, ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    scale = ss / IMAGE_SIZE
    for s in shapes:
        _draw(draw, s, scale)
    return canvas.reduce(SUPERSAMPLE)


def _background_pixels(bg: Background, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size)[:, None, None]  # [H, 1, 1]
    rgb = (1 - t) * np.asarray(bg.top, float) + t * np.asarray(bg.bottom, float)  # [H, 1, 3]
    rgb = np.broadcast_to(rgb, (size, size, 3)).copy()
    if bg.noise:
        rgb += np.random.default_rng(bg.noise_seed).normal(0, bg.noise, (size, size, 1))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, s: Shape, scale: float) -> None:
    x, y, r = s.x * scale, s.y * scale, s.size * scale
    fill = COLORS[s.color]
    if s.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s.kind == "square":
        q = r * 0.88  # same visual area as the others
        draw.rectangle((x - q, y - q, x + q, y + q), fill=fill)
    elif s.kind == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)], fill=fill)
    elif s.kind == "diamond":
        draw.polygon([(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)], fill=fill)
    elif s.kind == "star":
        draw.polygon(_star(x, y, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {s.kind!r}; allowed: {SHAPES}")


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return [(x + rr * np.cos(a), y + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def image_digest(image: Image.Image) -> str:
    """sha256 of the RGB pixels (and size): two pictures share an image iff their digests match."""
    rgb = image.convert("RGB")
    return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def is_heldout_image(image: Image.Image) -> bool:
    return int(image_digest(image)[:8], 16) % _BUCKETS == 0


# ---------------------------------------------------------------------------------------------
# Questions and answers


def caption(shapes: tuple[Shape, ...]) -> str:
    """`a red circle at the top left and a blue star at the center`, in reading order."""
    ordered = sorted(shapes, key=lambda s: (s.row, s.col))
    return " and ".join(f"{_article(s.color)} {s.color} {s.kind} at the {s.position}" for s in ordered)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions(shapes: tuple[Shape, ...], rng: np.random.Generator) -> tuple[QA, ...]:
    """Every question about the picture with one right answer (plus one absent-kind count)."""
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    qa = [QA("count", "How many shapes are there?", NUMBERS[len(shapes)])]
    absent = [k for k in SHAPES if k not in kinds]
    for k in sorted(set(kinds)) + [str(rng.choice(absent))]:
        qa.append(QA("count_kind", f"How many {k}s are there?", NUMBERS[kinds.count(k)]))
    for s in shapes:
        if kinds.count(s.kind) == 1:
            qa.append(QA("color", f"What color is the {s.kind}?", s.color))
        if colors.count(s.color) == 1:
            qa.append(QA("shape", f"What shape is the {s.color} one?", s.kind))
        qa.append(QA("where", f"Where is the {s.color} {s.kind}?", s.position))
    qa.append(QA("caption", "Describe the picture.", caption(shapes)))
    return tuple(qa)


def pick_question(qa: tuple[QA, ...], rng: np.random.Generator) -> int:
    """A question kind uniformly at random, then one question of that kind."""
    kinds = sorted({q.kind for q in qa}, key=QUESTION_KINDS.index)
    kind = kinds[int(rng.integers(len(kinds)))]
    return int(rng.choice([i for i, q in enumerate(qa) if q.kind == kind]))


def normalize_answer(text: str) -> str:
    """What exact match compares: lower case, single spaces, no trailing period."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def vocabulary() -> list[str]:
    """Every word the questions, answers, captions and the chat template use (for the tokenizer)."""
    words = {"user", "assistant", "system", ":", "?", ".", "a", "an", "and", "at", "the"}
    words |= {"how", "many", "shapes", "are", "there", "what", "color", "is", "shape", "one", "where"}
    words |= {"describe", "picture"}
    words |= set(SHAPES) | {f"{k}s" for k in SHAPES} | set(COLORS) | set(NUMBERS)
    words |= {w for row in POSITIONS for p in row for w in p.split()}
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Splits


def example(split: str, index: int, size: int = IMAGE_SIZE) -> Example:
    """The `index`-th picture of `split` (deterministic) with one of its questions picked. `size`:
    the picture's side in pixels; the scene, its split and its questions are those of the 84 px
    picture, re-rendered at `size` (the shapes-hd model's 168 px)."""
    ex = _draw_example(split, index, (SPLITS[_check_split(split)], index))
    return ex if size == IMAGE_SIZE else at_size(ex, size)


def examples(split: str, n: int, start: int = 0, size: int = IMAGE_SIZE) -> Iterator[Example]:
    for i in range(start, start + n):
        yield example(split, i, size)


def at_size(ex: Example, size: int) -> Example:
    """The same scene and question, its picture rendered at `size` px."""
    if size < IMAGE_SIZE:
        raise ValueError(f"picture size {size} px: allowed sizes are >= {IMAGE_SIZE} px")
    return dataclasses.replace(ex, image=render(ex.shapes, ex.background, size))


def random_example(seed: int | None = None, size: int = IMAGE_SIZE) -> Example:
    """A fresh picture from the held-out bucket (never a training image), for the demo."""
    seed = secrets.randbits(63) if seed is None else seed
    ex = _draw_example("demo", seed, (SPLITS["demo"], seed))
    return ex if size == IMAGE_SIZE else at_size(ex, size)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(SPLITS)}")
    return split


def _draw_example(split: str, index: int, stream: tuple[int, ...]) -> Example:
    want_heldout = split != "train"
    for attempt in range(_MAX_ATTEMPTS):
        seed = (*stream, attempt)
        rng = np.random.default_rng(seed)
        shapes, bg = random_scene(rng)
        image = render(shapes, bg)
        if is_heldout_image(image) == want_heldout:
            qa = questions(shapes, rng)
            return Example(split, index, seed, shapes, bg, image, qa, pick_question(qa, rng))
    raise RuntimeError(f"no {split} picture in {_MAX_ATTEMPTS} attempts for index {index}")  # p ~ 1e-12
