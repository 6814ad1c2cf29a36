"""Non-digits for outlier exposure (Hendrycks et al. 2019): letters, symbols and scribbles
the model learns to answer with a flat distribution, so that `predict` says "unsure" for
them instead of naming a digit.

Each is drawn as a user would draw it on the page (black ink on a white 280×280 canvas,
mnist_cnn.serve's export), then goes through `preprocess` like any user image: the model
trains on non-digits exactly as it will meet them. Glyphs come from the DejaVu Sans fonts
that matplotlib (a dependency) ships, so every machine draws the same ones.

Characters a person could read as a digit (O, I, l, Z, S, B, g, q, ...) are never used:
pushing them away from a digit would teach the model to doubt real digits.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAGE = 280  # the page's exported canvas, in pixels (serve/static/app.js: EXPORT_SIZE)
# Read as digits by people, so neither trained as non-digits nor counted as such:
# 0: O o Q D, 1: I l i j | ! / \ ( ) [ ], 2: Z z, 4: y, 5: S s, 6: b G, 8: B, 9: g q a
DIGIT_LIKE = set("OoQDIlij|!/\\()[]ZzySsbGBgqa")
TRAIN_LETTERS = "".join(c for c in "ABCEFHJKLMNPRTUVWXYcdefhkmnprtuvwx" if c not in DIGIT_LIKE)
# Symbols, Greek and Cyrillic letters, math and shapes: none a person reads as a digit (no ∂ ∃ ¬
# Ю), none of benchmarks/not_a_digit.py's held-out shapes (no triangles, diamonds, arrows, ✓).
TRAIN_SYMBOLS = ("+=#&@%*?<>~^$€ηκνρτχωΛΞΠ∈∋⊂⊃∪∩∧∨∀∝∠⊥≤≥≡■●✗✚¢₩₽¤«»‰†‡"
                 "ЖДЛПШЩЯИЦжлпшяц")
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf")
# The kinds of training non-digits and their shares of the bank.
TRAIN_MIX = {"letter": 0.4, "symbol": 0.3, "scribble": 0.25, "blob": 0.05}


def matplotlib_font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("matplotlib is not installed: its DejaVu fonts draw the non-digits")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=64)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def blank_page() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    page = Image.new("L", (PAGE, PAGE), 255)
    return page, ImageDraw.Draw(page)


def draw_glyph(char: str, font_path: str | Path, rng: np.random.Generator, *,
               thickness: tuple[int, int] = (0, 5)) -> Image.Image:
    """One character, large, somewhere on the page, turned by up to ±12°, its strokes
    thickened by a random outline (as a brush is wider than a font's pen)."""
    size = int(rng.integers(110, 200))
    font = load_font(str(font_path), size)
    glyph = Image.new("L", (PAGE * 2, PAGE * 2), 0)
    ImageDraw.Draw(glyph).text((PAGE // 2, PAGE // 2), char, font=font, fill=255,
                               stroke_width=int(rng.integers(*thickness, endpoint=True)), stroke_fill=255)
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    box = glyph.getbbox()
    page, _ = blank_page()
    if box is None:
        return page
    glyph = glyph.crop(box)
    if max(glyph.size) > PAGE - 20:
        glyph.thumbnail((PAGE - 20, PAGE - 20))
    left = int(rng.integers(0, PAGE - glyph.width + 1))
    top = int(rng.integers(0, PAGE - glyph.height + 1))
    page.paste(0, (left, top), glyph)
    return page


def draw_strokes(strokes: Sequence[np.ndarray], width: int) -> Image.Image:
    """Polylines (each (n, 2) in page pixels) drawn with a round brush, as the page does."""
    page, draw = blank_page()
    radius = width / 2
    for points in strokes:
        xy = [tuple(map(float, p)) for p in points]
        if len(xy) > 1:
            draw.line(xy, fill=0, width=width, joint="curve")
        for x, y in xy[:: max(1, len(xy) - 1)]:  # round caps at both ends
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=0)
    return page


def bezier(control: np.ndarray, samples: int = 40) -> np.ndarray:
    """Points on the Bézier curve with these control points ((k, 2)), by de Casteljau."""
    t = np.linspace(0, 1, samples)[:, None, None]
    points = np.broadcast_to(control, (samples, *control.shape)).astype(np.float64)
    while points.shape[1] > 1:
        points = (1 - t) * points[:, :-1] + t * points[:, 1:]
    return points[:, 0]


def bezier_scribble(rng: np.random.Generator) -> Image.Image:
    """Training scribbles: one long wiggly cubic-Bézier chain (3-5 pieces) or two to four
    separate curves; long enough that no single digit stroke is among them."""
    margin = 30
    if rng.random() < 0.5:
        pieces = int(rng.integers(3, 6))
        control = rng.uniform(margin, PAGE - margin, (3 * pieces + 1, 2))
        strokes = [np.concatenate([bezier(control[3 * k:3 * k + 4]) for k in range(pieces)])]
    else:
        strokes = [bezier(rng.uniform(margin, PAGE - margin, (4, 2))) for _ in range(int(rng.integers(2, 5)))]
    return draw_strokes(strokes, int(rng.integers(8, 32)))


def blob(rng: np.random.Generator) -> Image.Image:
    """A filled shape or a few dots: what a slip of the brush or a smudge gives."""
    page, draw = blank_page()
    if rng.random() < 0.5:
        centre, radius = rng.uniform(80, 200, 2), rng.uniform(20, 90)
        angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(5, 10))))
        radii = radius * rng.uniform(0.5, 1.0, len(angles))
        draw.polygon([(float(centre[0] + r * math.cos(a)), float(centre[1] + r * math.sin(a)))
                      for a, r in zip(angles, radii)], fill=0)
    else:
        for _ in range(int(rng.integers(2, 7))):
            x, y = rng.uniform(20, PAGE - 20, 2)
            r = rng.uniform(4, 18)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return page


def training_drawings(count: int, *, seed: int) -> list[tuple[str, Image.Image]]:
    """`count` (kind, page) pairs of training non-digits, a function of `seed` alone."""
    rng = np.random.default_rng(seed)
    fonts = [matplotlib_font_dir() / name for name in TRAIN_FONTS]
    makers: dict[str, Callable[[], Image.Image]] = {
        "letter": lambda: draw_glyph(str(rng.choice(list(TRAIN_LETTERS))), fonts[rng.integers(len(fonts))], rng),
        "symbol": lambda: draw_glyph(str(rng.choice(list(TRAIN_SYMBOLS))), fonts[rng.integers(len(fonts))], rng),
        "scribble": lambda: bezier_scribble(rng),
        "blob": lambda: blob(rng),
    }
    kinds = rng.choice(list(TRAIN_MIX), size=count, p=list(TRAIN_MIX.values()))
    return [(str(kind), makers[kind]()) for kind in kinds]


def preprocess_drawings(pages: Sequence[Image.Image]) -> np.ndarray:
    """Pages → uint8 (N, 28, 28) through the user-image path (mnist_cnn.preprocess)."""
    from mnist_cnn.preprocess import preprocess

    return np.stack([preprocess(page) for page in pages]) if pages else np.zeros((0, 28, 28), np.uint8)


def training_outliers(count: int, *, seed: int) -> np.ndarray:
    """The outlier-exposure bank: uint8 (count, 28, 28) non-digits, as the model sees them."""
    return preprocess_drawings([page for _, page in training_drawings(count, seed=seed)])
