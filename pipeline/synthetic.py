"""A generated, licence-free image-caption corpus whose captions describe the pictures exactly.

Each picture holds one to three shapes (circle, square, triangle) in named colours, sizes and grid
positions on a plain background; its caption says exactly that, e.g. "a large red circle at the top
left and a small blue square in the centre, on a white background." Generation is deterministic
from the seed, so the demo's data is the same on every machine. Because caption and picture carry
the same information, a model that learns shows it in both directions: image tokens get cheaper
after the caption (text-first documents) and captions get cheaper after the image.

    python -c "from moma.pipeline.synthetic import write_folder_corpus; write_folder_corpus('shapes', 2000)"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (140, 140, 140), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.32}
# 3 x 3 grid of named positions (column, row) -> phrase
POSITIONS = {
    (0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
    (0, 1): "on the left", (1, 1): "in the centre", (2, 1): "on the right",
    (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right",
}


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
          colour: tuple[int, int, int]) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def make_example(rng: np.random.Generator, size: int = 96) -> tuple[Image.Image, str]:
    """One picture and its exact caption."""
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(1, 4))
    cells = rng.permutation(len(POSITIONS))[:count]
    phrases = []
    for cell_index in cells:
        cell = list(POSITIONS)[int(cell_index)]
        shape = str(rng.choice(SHAPES))
        size_name = str(rng.choice(list(SIZES)))
        colour = str(rng.choice([c for c in COLOURS if c != bg_name]))  # never invisible on its background
        centre = ((cell[0] + 0.5) * size / 3, (cell[1] + 0.5) * size / 3)
        _draw(draw, shape, centre, SIZES[size_name] * size / 2 * 1.5, COLOURS[colour])
        phrases.append(f"a {size_name} {colour} {shape} {POSITIONS[cell]}")
    text = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return img, f"{text}, on a {bg_name} background."


def write_folder_corpus(out: str | Path, count: int, seed: int = 0, size: int = 96) -> Path:
    """Write `count` pairs as ``{i}.png`` + ``{i}.txt`` (the folder-with-sidecars source format)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img, caption = make_example(rng, size)
        img.save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption + "\n")
    (out / "README.json").write_text(json.dumps({"generator": "moma.pipeline.synthetic", "count": count,
                                                 "seed": seed, "size": size}) + "\n")
    return out
