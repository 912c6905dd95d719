"""Procedurally generated scenes: a textured background and a few objects, some carrying a character, with
the patches of the 24x24 grid each object covers (its evidence mask). Deterministic from a seed; no files."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 336
PATCH = 14
GRID = SIZE // PATCH  # 24

COLORS = {
    "red": (215, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 20),
    "purple": (145, 55, 195),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (30, 38), "large": (50, 60)}

# 5x7 bitmap glyphs: drawn as blocks, so rendering is the same everywhere (no font files).
GLYPHS = {
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
    "K": ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "2": ["01110", "10001", "00001", "00110", "01000", "10000", "11111"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
}
CHARACTERS = tuple(GLYPHS)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    #: Centre and half-extent in pixels.
    x: int
    y: int
    radius: int
    #: The character drawn on it, or None.
    label: str | None
    #: Indices (row * 24 + col) of the patches it covers.
    patches: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]

    def render(self) -> Image.Image:
        return render(self)[0]


def _background(rng: random.Random) -> np.ndarray:
    """A smooth two-colour gradient with soft blobs and faint stripes: non-uniform, low saturation."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y + 1.5) / 3.0
    low = np.array([rng.uniform(80, 150) for _ in range(3)], dtype=np.float32)
    high = low + np.array([rng.uniform(-35, 35) for _ in range(3)], dtype=np.float32)
    image = low + (high - low) * ramp[..., None]
    for _ in range(rng.randint(3, 6)):
        cx, cy, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
        image += blob[..., None] * rng.uniform(-30, 30)
    period, phase = rng.uniform(0.03, 0.08), rng.uniform(0, 1)
    stripes = np.sin(2 * np.pi * ((x + y) / period + phase))
    image += stripes[..., None] * rng.uniform(3, 8)
    return np.clip(image, 0, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def _draw_label(draw: ImageDraw.ImageDraw, label: str, x: int, y: int, cell: int, fill) -> None:
    rows = GLYPHS[label]
    left, top = x - (5 * cell) // 2, y - (7 * cell) // 2
    for row, bits in enumerate(rows):
        for col, bit in enumerate(bits):
            if bit == "1":
                draw.rectangle((left + col * cell, top + row * cell, left + (col + 1) * cell - 1,
                                top + (row + 1) * cell - 1), fill=fill)


def _patches(mask: np.ndarray, min_share: float = 0.05) -> tuple[int, ...]:
    """Patches of the 24x24 grid with at least `min_share` of their pixels covered by `mask`."""
    share = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    return tuple(int(i) for i in np.flatnonzero(share >= min_share))


def generate_scene(seed: int) -> Scene:
    """A scene of 3 to 6 non-overlapping objects; about half carry a character."""
    rng = random.Random(seed)
    count = rng.randint(3, 6)
    placed: list[tuple[int, int, int]] = []
    specs = []
    attempts = 0
    while len(specs) < count and attempts < 500:
        attempts += 1
        size = rng.choice(list(SIZES))
        radius = rng.randint(*SIZES[size]) // 2
        x = rng.randint(radius + 4, SIZE - radius - 5)
        y = rng.randint(radius + 4, SIZE - radius - 5)
        if any(abs(x - px) < radius + pr + 8 and abs(y - py) < radius + pr + 8 for px, py, pr in placed):
            continue
        placed.append((x, y, radius))
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        label = rng.choice(CHARACTERS) if size == "large" and shape in ("circle", "square") and rng.random() < 0.7 else None
        specs.append((shape, color, size, x, y, radius, label))
    objects = [SceneObject(shape, color, size, x, y, radius, label, object_patches(shape, x, y, radius))
               for shape, color, size, x, y, radius, label in specs]
    return Scene(seed, tuple(objects))


def object_patches(shape: str, x: int, y: int, radius: int) -> tuple[int, ...]:
    """The evidence of an object: the patches its drawn shape covers (at least 5% of a patch's pixels)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, x, y, radius, 255)
    return _patches(np.asarray(mask, dtype=np.float32) / 255.0)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The scene's image and a [24*24] map of which object (index + 1, 0 for none) covers each patch most."""
    rng = random.Random(scene.seed + 7919)
    image = Image.fromarray(_background(rng).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    owner = np.zeros(GRID * GRID, dtype=np.int64)
    for index, obj in enumerate(scene.objects):
        _draw_shape(draw, obj.shape, obj.x, obj.y, obj.radius, COLORS[obj.color])
        if obj.label is not None:
            ink = (255, 255, 255) if obj.color not in ("yellow", "orange") else (0, 0, 0)
            _draw_label(draw, obj.label, obj.x, obj.y, max(4, obj.radius // 5), ink)
        owner[list(obj.patches)] = index + 1
    return image, owner
