"""Reading whole numbers (`mnist-cnn predict --number`), measured on composed numbers.

    .venv/bin/python benchmarks/number_reading.py [--count 30] [--count-4 150] [--model RUN_DIR] [--out benchmarks/results]

Numbers of 1–8 digits are composed from MNIST *test* digits (never seen in training) and
from DejaVu font glyphs: random gaps (wide, close, boxes overlapping without the ink
touching), and for half the numbers of two or more digits exactly one pair whose ink
touches or slightly overlaps; scale and baseline jitter; drawn in the styles users' images
come in (a canvas, a scan on paper, a phone photo: uneven light, blur, noise, JPEG). Each is
read as `predict --number` reads it. Printed: whole-number accuracy by length and by
touching or not, per-digit accuracy, how often the number of digits found is right, and for
single digits how often `--number` answers what `predict` (one digit) answers.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import table  # noqa: E402

from mnist_cnn.data import load_dataset  # noqa: E402
from mnist_cnn.number import read_image  # noqa: E402
from mnist_cnn.predict import make_predictor  # noqa: E402
from mnist_cnn.preprocess import ImageError, preprocess  # noqa: E402
from mnist_cnn.checkpoints import PRETRAINED_DIR, model_or_default  # noqa: E402
from mnist_cnn.runtime import cpu_model  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed-Oblique.ttf", "DejaVuSerifCondensed-Italic.ttf")
STYLES = ("canvas", "paper", "photo")
INK_LEVEL = 0.2 * 255  # what counts as ink when placing digits (preprocess' INK_THRESHOLD)
FONT_SHARE = 0.25  # of the numbers, made of font glyphs rather than MNIST digits


def crop(glyph: np.ndarray) -> np.ndarray:
    """A white-on-black glyph cropped to its ink."""
    mask = glyph > INK_LEVEL
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return glyph[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


class Glyphs:
    """Where the digits come from: MNIST test digits by label, and DejaVu glyphs."""

    def __init__(self):
        test = load_dataset("mnist", splits=("test",))["test"]
        images, labels = test.images[:, 0].numpy(), test.labels.numpy()
        self.mnist = {d: images[labels == d] for d in range(10)}
        self.fonts = [ImageFont.truetype(str(FONT_DIR / name), 96) for name in FONTS if (FONT_DIR / name).is_file()]

    def mnist_digit(self, digit: int, rng: np.random.Generator) -> np.ndarray:
        pool = self.mnist[digit]
        return crop(pool[rng.integers(len(pool))])

    def font_digit(self, digit: int, font: ImageFont.FreeTypeFont) -> np.ndarray:
        sheet = Image.new("L", (160, 160), 0)
        ImageDraw.Draw(sheet).text((20, 10), str(digit), fill=255, font=font)
        return crop(np.asarray(sheet))


def scaled(glyph: np.ndarray, height: float) -> np.ndarray:
    h, w = glyph.shape
    size = (max(1, round(w * height / h)), max(1, round(height)))
    return np.asarray(Image.fromarray(glyph).resize(size, Image.Resampling.BICUBIC), np.float32) / 255


def compose(glyphs: list[np.ndarray], touching: int | None, rng: np.random.Generator):
    """Ink in [0, 1] (white on black) with the glyphs left to right, and the ink gap used
    between each pair. Pair `touching` (index of its left glyph) touches or overlaps by a
    pixel or two; the others are apart by 2 px to 0.45 of the digits' height."""
    height = rng.uniform(36, 90)  # the digits' height in pixels
    parts = [scaled(g, height * rng.uniform(0.88, 1.12)) for g in glyphs]
    margin = int(height * 0.6)
    width = sum(p.shape[1] for p in parts) + int(len(parts) * 0.5 * height) + 2 * margin
    canvas = np.zeros((int(height * 2) + 2 * margin, width), np.float32)
    baseline = margin + int(height * 1.2)
    x, gaps = margin, []
    for index, part in enumerate(parts):
        h, w = part.shape
        top = baseline - h + int(round(rng.normal(0, 0.04 * height)))
        if index:
            if touching == index - 1:
                gap = -int(rng.integers(0, max(1, int(0.04 * height)) + 1))
            elif rng.random() < 0.3:
                gap = int(rng.integers(2, max(3, int(0.08 * height))))
            else:
                gap = int(rng.uniform(0.08, 0.45) * height)
            x = place(canvas, part, top, gap)
            gaps.append(gap)
        canvas[top:top + h, x:x + w] = np.maximum(canvas[top:top + h, x:x + w], part)
    cols = np.flatnonzero((canvas > 0.2).any(axis=0))
    return canvas[:, :cols[-1] + 1 + margin], gaps


def place(canvas: np.ndarray, part: np.ndarray, top: int, gap: int) -> int:
    """The column at which `part` has `gap` empty pixels between its ink and the ink already
    on `canvas`, row by row (diagonal neighbours counted: 0 means touching)."""
    ink = canvas > 0.2
    last = np.where(ink.any(axis=1), ink.shape[1] - 1 - np.argmax(ink[:, ::-1], axis=1), -10_000)
    right = np.maximum(np.maximum(last, np.roll(last, 1)), np.roll(last, -1))[top:top + part.shape[0]]
    mine = part > 0.2
    first = np.where(mine.any(axis=1), np.argmax(mine, axis=1), 10_000)
    closest = int(np.min(first - right))
    if closest > 5_000:  # no row in common (a far baseline): beside the ink so far
        return int(np.flatnonzero(ink.any(axis=0))[-1]) + 1 + gap
    return gap + 1 - closest


def render(ink: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    """Ink as a user's image: canvas (black on white PNG), paper (scan), photo (uneven light,
    blur, noise, JPEG)."""
    if style == "canvas":
        return Image.fromarray((255 - ink * 255).astype(np.uint8))
    paper, dark = rng.uniform(215, 245), rng.uniform(15, 70)
    page = paper - ink * (paper - dark)
    if style == "photo":
        h, w = page.shape
        light = np.linspace(-1, 1, w)[None, :] * rng.uniform(-12, 12) + np.linspace(-1, 1, h)[:, None] * rng.uniform(-8, 8)
        page = page + light
        page = np.asarray(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2))), np.float32)
    page = page + rng.normal(0, 4, page.shape)
    image = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))
    if style == "photo":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=int(rng.integers(70, 92)))
        image = Image.open(io.BytesIO(buffer.getvalue()))
    return image


def samples(glyphs: Glyphs, counts: dict[tuple[int, bool], int], seed: int):
    """(length, touching, source, style, truth, image) for each requested cell."""
    rng = np.random.default_rng(seed)
    for (length, touching), count in counts.items():
        for _ in range(count):
            truth = [int(d) for d in rng.integers(0, 10, length)]
            if length > 1 and truth[0] == 0 and rng.random() < 0.8:
                truth[0] = int(rng.integers(1, 10))  # numbers rarely start with 0 (some do: 007)
            font = rng.random() < FONT_SHARE
            if font:
                face = glyphs.fonts[rng.integers(len(glyphs.fonts))]
                parts = [glyphs.font_digit(d, face) for d in truth]
            else:
                parts = [glyphs.mnist_digit(d, rng) for d in truth]
            pair = int(rng.integers(0, length - 1)) if touching else None
            ink, _ = compose(parts, pair, rng)
            style = STYLES[rng.integers(len(STYLES))]
            yield length, touching, "font" if font else "mnist", style, "".join(map(str, truth)), render(ink, style, rng)


def measure(predictor, items) -> list[dict]:
    records = []
    for length, touching, source, style, truth, image in items:
        started = time.perf_counter()
        try:
            reading = read_image(predictor, image, min_confidence=predictor.min_confidence)
            names = [d["name"] for d in reading.digits]
            text, unsure = reading.text, [d["unsure"] for d in reading.digits]
        except ImageError:
            names, text, unsure = [], "", []
        seconds = time.perf_counter() - started
        record = {"length": length, "touching": touching, "source": source, "style": style, "truth": truth,
                  "read": "".join(names), "text": text, "seconds": seconds,
                  "digits_right": sum(a == b for a, b in zip(names, truth)) if len(names) == length else 0,
                  "any_unsure": any(unsure)}
        if length == 1:
            single = int(np.argmax(predictor.probabilities(preprocess(image)[None])[0]))
            record["single"] = predictor.classes[single]
        records.append(record)
    return records


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} % ({part}/{whole})" if whole else "–"


def summarise(records: list[dict]) -> tuple[str, dict]:
    rows, figures = [], {}
    for length in sorted({r["length"] for r in records}):
        for touching in (False, True):
            cell = [r for r in records if r["length"] == length and r["touching"] == touching]
            if not cell:
                continue
            right = sum(r["read"] == r["truth"] for r in cell)
            sure = sum(r["text"] == r["truth"] for r in cell)
            count = sum(len(r["read"]) == length for r in cell)
            digits = sum(r["digits_right"] for r in cell)
            key = f"{length}-{'touching' if touching else 'apart'}"
            figures[key] = {"numbers": len(cell), "right": right, "right_and_sure": sure,
                            "count_right": count, "digits_right": digits, "digits": length * len(cell)}
            rows.append([length, "one pair" if touching else "no", percent(right, len(cell)),
                         percent(sure, len(cell)), percent(count, len(cell)),
                         percent(digits, length * len(cell)),
                         f"{1000 * np.median([r['seconds'] for r in cell]):.0f}"])
    text = table(["digits", "touching", "number right", "right, none unsure", "digit count right",
                  "digits right", "median ms"], rows)
    by_source = []
    for source in ("mnist", "font"):
        for style in STYLES:
            cell = [r for r in records if r["source"] == source and r["style"] == style]
            if cell:
                by_source.append([source, style, percent(sum(r["read"] == r["truth"] for r in cell), len(cell)),
                                  percent(sum(r["digits_right"] for r in cell), sum(r["length"] for r in cell))])
    four = []
    for touching in (False, True):
        for source in ("mnist", "font"):
            cell = [r for r in records if r["length"] == 4 and r["touching"] == touching and r["source"] == source]
            if cell:
                four.append(["one pair" if touching else "no", source, percent(sum(r["read"] == r["truth"] for r in cell), len(cell)),
                             percent(sum(r["digits_right"] for r in cell), 4 * len(cell))])
    text += "\n\n4-digit numbers by source:\n\n" + table(["touching", "digits from", "number right", "digits right"], four)
    text += "\n\nBy source and style (all lengths):\n\n" + table(["digits from", "style", "number right", "digits right"], by_source)
    singles = [r for r in records if r["length"] == 1]
    if singles:
        same = sum(r["read"] == r["single"] for r in singles)
        figures["singles_unchanged"] = {"same": same, "numbers": len(singles)}
        text += (f"\n\nSingle digits: --number answers what predict answers for {percent(same, len(singles))}; "
                 f"predict alone is right for {percent(sum(r['single'] == r['truth'] for r in singles), len(singles))}.")
    total_digits = sum(r["length"] for r in records)
    figures["per_digit"] = {"digits_right": sum(r["digits_right"] for r in records), "digits": total_digits}
    text += f"\nAll digits (as part of their number): {percent(figures['per_digit']['digits_right'], total_digits)} right."
    return text, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run folder or model file (default: as predict, the newest run or the shipped model)")
    parser.add_argument("--count", type=int, default=30, help="numbers per length and touching kind (default: 30)")
    parser.add_argument("--count-4", type=int, default=150, help="numbers of 4 digits per touching kind, the goals' cells (default: 150)")
    parser.add_argument("--max-length", type=int, default=8, help="(default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--out", type=Path, help="also write DATE-numbers.md and .json in this folder")
    parser.add_argument("--note", default="", help="a line added to the report (e.g. the machine's load)")
    args = parser.parse_args(argv)
    model = model_or_default(args.model)
    predictor = make_predictor(model, device="cpu")
    shipped = Path(model).resolve() in (PRETRAINED_DIR.resolve(), (PRETRAINED_DIR / "model.safetensors").resolve())
    name = "the shipped model (src/mnist_cnn/pretrained)" if shipped else str(model)
    counts = {}
    for length in range(1, args.max_length + 1):
        for touching in ((False,) if length == 1 else (False, True)):
            counts[(length, touching)] = args.count_4 if length == 4 else args.count
    if 1 <= args.max_length:
        counts[(1, False)] = 2 * args.count
    started = time.perf_counter()
    records = measure(predictor, samples(Glyphs(), counts, args.seed))
    seconds = time.perf_counter() - started
    text, figures = summarise(records)
    today = datetime.date.today().isoformat()
    header = (f"# Reading whole numbers, {today}\n\n"
              f"Model: {name} ({predictor.describe()['architecture']}, test accuracy "
              f"{100 * (predictor.describe()['test_accuracy'] or 0):.2f} % per digit), its own unsure threshold "
              f"{predictor.min_confidence:.3f}. Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
              f"Python {platform.python_version()}. {len(records)} numbers (seed {args.seed}), "
              f"{seconds:.0f} s in all.{(' ' + args.note) if args.note else ''}\n\n"
              "Number right: every digit's label right (the count of digits too); right, none unsure: "
              "and no digit below the model's threshold (`text` has no `?`).\n\n")
    report = header + text + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{today}-numbers.md").write_text(report)
        (args.out / f"{today}-numbers.json").write_text(json.dumps(
            {"date": today, "model": name, "machine": cpu_model(), "cpus": os.cpu_count(),
             "seed": args.seed, "seconds": seconds, "figures": figures, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
