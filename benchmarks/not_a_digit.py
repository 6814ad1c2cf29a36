"""Not a digit: how often a model answers "unsure" for letters, symbols and scribbles it was
never trained on, and how often it still answers, and rightly, for users' digits.

    .venv/bin/python benchmarks/not_a_digit.py                 # the shipped model, its threshold
    .venv/bin/python benchmarks/not_a_digit.py --model runs/x --count 300 --write

Everything here is held out from outlier exposure's training set (mnist_cnn.outliers):
letters in other fonts (DejaVu Serif and Sans Mono, STIX, Computer Modern: all bundled with
matplotlib, so every machine draws the same), symbols of other shapes, and scribbles made by
other generators (random walks, spirals, zigzags, hatching, loops, stars, crossings-out
instead of Bézier curves). The digits are MNIST *test* digits made to look like users' files
(the styles the tests use: the page's canvas, paper, a photo, a transparent drawing, a small
light-on-dark image). Every image is encoded as a file and goes through `preprocess_file`,
the path of `mnist-cnn predict` and `/api/predict`; "unsure" is `Prediction.unsure` at the
model's own threshold (--min-confidence's default).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from mnist_cnn.outliers import (DIGIT_LIKE, PAGE, TRAIN_SYMBOLS, draw_glyph, draw_strokes,
                                matplotlib_font_dir)
from mnist_cnn.predict import Prediction, make_predictor
from mnist_cnn.preprocess import preprocess_file
from mnist_cnn.checkpoints import PRETRAINED_DIR

RESULTS = Path(__file__).parent / "results"
GOAL_UNSURE = 0.90  # of non-digits answered "unsure"
GOAL_ANSWERED = 0.97  # of user-style digits answered (not unsure) and right
TEST_FONTS = ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "STIXGeneral.ttf",
              "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")
TEST_LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in DIGIT_LIKE)
# Other shapes than training's symbols; none a person would read as a digit (no ∫, Φ, Θ).
TEST_SYMBOLS = "×÷±§¶£¥©®♥♦♣♠★☆♪→←∞ΩπΣλΔ√≈≠µ¿Ψ"
assert not set(TEST_SYMBOLS) & set(TRAIN_SYMBOLS)
KINDS = ("letter", "symbol", "scribble")


# ---------------------------------------------------------------- held-out non-digits


@lru_cache(maxsize=None)
def font_chars(path: Path) -> frozenset[str]:
    """The characters `path` draws as themselves: Computer Modern's fonts (cm*) map other
    code points to TeX's glyphs (Θ, Φ, ligatures), so only their ASCII letters count."""
    from fontTools.ttLib import TTFont

    chars = {chr(code) for code in TTFont(path, lazy=True)["cmap"].getBestCmap()}
    return frozenset(c for c in chars if c.isascii() and c.isalpha()) if path.name.startswith("cm") else frozenset(chars)


def glyph_maker(chars: str, rng: np.random.Generator) -> Callable[[], Image.Image]:
    """Draws a random character of `chars` in a random held-out font that has it."""
    folder = matplotlib_font_dir()
    choices = [(c, folder / name) for name in TEST_FONTS for c in sorted(set(chars) & font_chars(folder / name))]

    def make() -> Image.Image:
        char, font = choices[rng.integers(len(choices))]
        return draw_glyph(char, font, rng, thickness=(0, 6))

    return make


def random_walk(rng: np.random.Generator) -> list[np.ndarray]:
    """A pen wandering with momentum: 20-45 steps, turning up to ±70° each."""
    steps = int(rng.integers(20, 46))
    angle = np.cumsum(rng.uniform(-1.2, 1.2, steps)) + rng.uniform(0, 2 * math.pi)
    path = np.cumsum(np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(8, 22), 0)
    path -= path.min(0)
    path *= min(1.0, 220 / max(1.0, float(path.max())))
    return [path + rng.uniform(10, 50, 2)]


def spiral(rng: np.random.Generator) -> list[np.ndarray]:
    turns = rng.uniform(1.8, 3.5)
    t = np.linspace(0, 1, 200)
    theta = 2 * math.pi * turns * t + rng.uniform(0, 2 * math.pi)
    radius = 10 + rng.uniform(70, 120) * t
    squash = rng.uniform(0.6, 1.0)
    return [np.stack([140 + radius * np.cos(theta), 140 + squash * radius * np.sin(theta)], 1)]


def zigzag(rng: np.random.Generator) -> list[np.ndarray]:
    teeth = int(rng.integers(4, 9))
    x = np.linspace(20, 260, 2 * teeth + 1)
    y = np.where(np.arange(len(x)) % 2 == 0, 0.0, 1.0) * rng.uniform(50, 120) + rng.normal(0, 6, len(x))
    return [rotate(np.stack([x, 140 + y - y.mean()], 1), rng.uniform(-0.5, 0.5))]


def hatching(rng: np.random.Generator) -> list[np.ndarray]:
    lines = int(rng.integers(3, 7))
    gap, length = rng.uniform(25, 45), rng.uniform(120, 220)
    strokes = [np.array([[140 - length / 2, y], [140 + length / 2, y]]) + rng.normal(0, 5, (2, 2))
               for y in 140 + gap * (np.arange(lines) - (lines - 1) / 2)]
    angle = rng.uniform(0, math.pi)
    return [rotate(s, angle) for s in strokes]


def loops(rng: np.random.Generator) -> list[np.ndarray]:
    """Cursive loops in a row ("ellll"): 3-6 of them."""
    count = int(rng.integers(3, 7))
    t = np.linspace(0, 2 * math.pi * count, 60 * count)
    radius = rng.uniform(20, 35)
    x = 30 + t / (2 * math.pi * count) * 220 + radius * np.sin(t)
    y = 140 - radius * np.cos(t) * rng.uniform(0.8, 1.6)
    return [rotate(np.stack([x, y], 1), rng.uniform(-0.4, 0.4))]


def star(rng: np.random.Generator) -> list[np.ndarray]:
    """A star in one stroke: 5 or 7 points, every second or third vertex joined."""
    points, skip = (5, 2) if rng.random() < 0.6 else (7, 3)
    angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * skip * np.arange(points + 1) / points
    radius = rng.uniform(80, 120)
    return [np.stack([140 + radius * np.cos(angles), 140 + radius * np.sin(angles)], 1)]


def crossing_out(rng: np.random.Generator) -> list[np.ndarray]:
    """A patch scribbled over: 8-16 back-and-forth strokes with jitter."""
    count = int(rng.integers(8, 17))
    x = np.where(np.arange(count) % 2 == 0, 40.0, 240.0) + rng.normal(0, 15, count)
    y = np.linspace(60, 220, count) + rng.normal(0, 8, count)
    return [rotate(np.stack([x, y], 1), rng.uniform(-0.8, 0.8))]


def rotate(points: np.ndarray, angle: float) -> np.ndarray:
    centre = np.array([PAGE / 2, PAGE / 2])
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (points - centre) @ turn.T + centre


SCRIBBLES = {"random walk": random_walk, "spiral": spiral, "zigzag": zigzag, "hatching": hatching,
             "loops": loops, "star": star, "crossing-out": crossing_out}


def held_out_non_digits(count: int, *, seed: int = 0) -> list[tuple[str, str, Image.Image]]:
    """`count` (kind, detail, page) held-out non-digits, a third of each kind."""
    rng = np.random.default_rng(seed)
    letters, symbols = glyph_maker(TEST_LETTERS, rng), glyph_maker(TEST_SYMBOLS, rng)
    items = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        if kind == "letter":
            items.append((kind, "", letters()))
        elif kind == "symbol":
            items.append((kind, "", symbols()))
        else:
            name = list(SCRIBBLES)[rng.integers(len(SCRIBBLES))]
            items.append((kind, name, draw_strokes(SCRIBBLES[name](rng), int(rng.integers(6, 37)))))
    return items


# ---------------------------------------------------------------- users' digits


def canvas_style(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Drawn on the page: solid black strokes with soft edges on the 280×280 white canvas."""
    size = int(rng.integers(150, 260))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    ink = np.clip((big - 0.35) / 0.3, 0, 1)
    page = np.ones((PAGE, PAGE), np.float32)
    left, top = (int(v) for v in rng.integers(0, PAGE - size + 1, 2))
    page[top:top + size, left:left + size] -= ink
    return Image.fromarray((np.clip(page, 0, 1) * 255).astype(np.uint8))


def paper_style(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A scan: dark ink on light paper, large, off-centre, a little noise (tests' on_paper)."""
    size = int(rng.integers(100, 200))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    page = np.full((300, 420), 235.0, np.float32)
    left, top = int(rng.integers(0, 420 - size)), int(rng.integers(0, 300 - size))
    page[top:top + size, left:left + size] = 235 - big * (235 - 30)
    page += rng.normal(0, 4, page.shape)
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))


def photo_style(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A phone photo of paper: grey, a little unevenly lit, blue-black ink, blurred, JPEG (RGB)."""
    size = int(rng.integers(120, 260))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    height, width = 360, 480
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 200 + 15 * (cols / width) * rng.uniform(0.5, 1) + 8 * (rows / height) * rng.uniform(-1, 1)
    top, left = int(rng.integers(40, height - size - 40)), int(rng.integers(40, width - size - 40))
    gray = light.copy()
    gray[top:top + size, left:left + size] -= big * (light[top:top + size, left:left + size] - 45)
    gray += rng.normal(0, 5, gray.shape)
    rgb = np.stack([gray * 0.95, gray * 0.97, gray * 1.0 + 10 * big.max()], -1)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1.2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(60, 90)))
    return Image.open(io.BytesIO(buffer.getvalue()))


def transparent_style(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A drawing app's export: coloured strokes on a fully transparent background."""
    size = int(rng.integers(100, 180))
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
    rgba = np.zeros((260, 300, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 90, 3)
    top, left = int(rng.integers(0, 260 - size)), int(rng.integers(0, 300 - size))
    rgba[top:top + size, left:left + size, 3] = big
    return Image.fromarray(rgba, "RGBA")


def small_style(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Small and thick, light on dark (a thumbnail)."""
    return Image.fromarray(digit).resize((int(rng.integers(32, 48)), int(rng.integers(40, 56))))


STYLES = {"canvas": canvas_style, "paper": paper_style, "photo": photo_style,
          "transparent": transparent_style, "small": small_style}


def user_digits(images: np.ndarray, labels: np.ndarray, count: int, *,
                seed: int = 0) -> list[tuple[str, int, Image.Image]]:
    """`count` (style, label, image) of MNIST test digits in users' styles, styles in turn."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=count, replace=False)
    names = list(STYLES)
    return [(names[i % len(names)], int(labels[j]), STYLES[names[i % len(names)]](images[j], rng))
            for i, j in enumerate(chosen)]


# ---------------------------------------------------------------- measuring


def as_file(image: Image.Image) -> bytes:
    """The image as the file a user would send (PNG; JPEG photos stay JPEG)."""
    buffer = io.BytesIO()
    if image.format == "JPEG":
        image.save(buffer, "JPEG", quality=95)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def predict_images(predictor, images: list[Image.Image], *,
                   min_confidence: float | None = None) -> list[Prediction]:
    """Each image through preprocess_file and the model, judged as `predict` judges it."""
    threshold = predictor.min_confidence if min_confidence is None else min_confidence
    digits = np.stack([preprocess_file(as_file(image)) for image in images])
    return [Prediction(path="", probabilities=row.tolist(), classes=predictor.classes,
                       min_confidence=threshold) for row in predictor.probabilities(digits)]


def rates(non_digit_top: np.ndarray, digit_top: np.ndarray, digit_right: np.ndarray,
          threshold: float) -> tuple[float, float]:
    """(non-digits unsure, digits answered and right) at `threshold`."""
    return float((non_digit_top < threshold).mean()), float(((digit_top >= threshold) & digit_right).mean())


def measure(predictor, *, count: int, digits: int, seed: int = 0) -> dict:
    from mnist_cnn.data import load_dataset

    test = load_dataset("mnist")["test"]
    started = time.perf_counter()
    non_digits = held_out_non_digits(count, seed=seed)
    users = user_digits(test.images[:, 0].numpy(), test.labels.numpy(), digits, seed=seed)
    outside = predict_images(predictor, [page for _, _, page in non_digits])
    inside = predict_images(predictor, [image for _, _, image in users])
    threshold = predictor.min_confidence
    by_kind = {}
    for kind in KINDS + tuple(SCRIBBLES):
        chosen = [p for (k, detail, _), p in zip(non_digits, outside) if kind in (k, detail)]
        if chosen:
            by_kind[kind] = {"images": len(chosen), "unsure": sum(p.unsure for p in chosen) / len(chosen)}
    by_style = {}
    for style in STYLES:
        chosen = [(label, p) for (s, label, _), p in zip(users, inside) if s == style]
        right = [not p.unsure and p.label == label for label, p in chosen]
        by_style[style] = {"images": len(chosen), "answered_right": sum(right) / len(chosen),
                           "unsure": sum(p.unsure for _, p in chosen) / len(chosen),
                           "wrong": sum(not p.unsure and p.label != label for label, p in chosen) / len(chosen)}
    non_top = np.array([max(p.probabilities) for p in outside])
    top = np.array([max(p.probabilities) for p in inside])
    right = np.array([p.label == label for (_, label, _), p in zip(users, inside)])
    unsure, answered = rates(non_top, top, right, threshold)
    sweep = [{"threshold": t, **dict(zip(("unsure", "answered_right"), rates(non_top, top, right, t)))}
             for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    return {"threshold": threshold, "non_digits": count, "digits": digits, "seed": seed,
            "unsure": unsure, "answered_right": answered, "by_kind": by_kind, "by_style": by_style,
            "sweep": sweep, "seconds": time.perf_counter() - started}


def report(result: dict, model: str) -> str:
    from tables import table

    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    lines = [f"Model: {model}; its threshold (--min-confidence default): {result['threshold']:.4f}.", "",
             f"**Non-digits answered unsure: {pct(result['unsure'])}** of {result['non_digits']} "
             f"(goal ≥ {pct(GOAL_UNSURE)}); **user-style digits answered and right: "
             f"{pct(result['answered_right'])}** of {result['digits']} (goal ≥ {pct(GOAL_ANSWERED)}).", "",
             table(["held-out non-digits", "images", "unsure"],
                   [[k, v["images"], pct(v["unsure"])] for k, v in result["by_kind"].items()]), "",
             table(["user-style digits (MNIST test)", "images", "answered and right", "unsure", "wrong"],
                   [[k, v["images"], pct(v["answered_right"]), pct(v["unsure"]), pct(v["wrong"])]
                    for k, v in result["by_style"].items()]), "",
             table(["threshold", "non-digits unsure", "digits answered and right"],
                   [[f"{row['threshold']:.1f}", pct(row["unsure"]), pct(row["answered_right"])]
                    for row in result["sweep"]])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(PRETRAINED_DIR), help="model to measure (default: the shipped one)")
    parser.add_argument("--count", type=int, default=600, help="held-out non-digits (default: 600)")
    parser.add_argument("--digits", type=int, default=1000, help="user-style digits (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both sets (default: 0)")
    parser.add_argument("--write", action="store_true", help="save the report in benchmarks/results/")
    parser.add_argument("--label", default="", help="with --write: added to the file names (e.g. before)")
    parser.add_argument("--name", help="how the report names the model (default: its path)")
    args = parser.parse_args()
    predictor = make_predictor(args.model, device="cpu")
    result = measure(predictor, count=args.count, digits=args.digits, seed=args.seed)
    name = args.name or ("the shipped model" if Path(args.model) == PRETRAINED_DIR else args.model)
    text = report(result, name)
    print(text)
    if args.write:
        cpu = platform.processor() or platform.machine()
        today = date.today().isoformat()
        header = (f"## Not a digit, {today}\n\nMachine: {cpu_name() or cpu}, 2 cores shared with other "
                  f"jobs (times are noisy; the rates are not); `benchmarks/not_a_digit.py --count "
                  f"{args.count} --digits {args.digits} --seed {args.seed}`.\n\n")
        stem = f"{today}-not-a-digit" + (f"-{args.label}" if args.label else "")
        (RESULTS / f"{stem}.md").write_text(header + text + "\n")
        (RESULTS / f"{stem}.json").write_text(json.dumps({**result, "model": name}, indent=2) + "\n")
    return 0


def cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
