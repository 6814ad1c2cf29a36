"""An image of a number → its digits, left to right, each a 28×28 digit made exactly as
`preprocess` makes one digit (so a model sees each piece as it would see that digit alone).

The ink is found as for one digit (`normalise_ink`, `INK_THRESHOLD`), then:
1. connected components (8-connected, from runs of ink on each row: numpy and a short loop
   over runs, no per-pixel Python);
2. specks (tiny next to the largest mark) are dropped;
3. strokes of one digit that do not touch (the bar of a 5, the top of a 7) are joined back:
   a short mark that lies over or under another, horizontally, is part of it;
4. a group wider than a digit may hold several touching digits: it is cut at columns where
   the ink is thinnest, and of all the ways to cut it into pieces of a digit's width the one
   the classifier is most sure of wins (the sum of the log of each piece's top probability).

Images with more than WORK_MAX_PIXELS pixels are scaled down first (time and memory stay
bounded); boxes are given in the original image's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from mnist_cnn.preprocess import INK_THRESHOLD, ImageError, fit_digit, normalise_ink, to_gray, upright

WORK_MAX_PIXELS = 4_000_000  # larger images are scaled down by a whole factor before reading
MAX_RUNS = 500_000  # more runs of ink than this is texture or noise, not a written number
SPECK_AREA = 0.02  # a mark with fewer pixels than this fraction of the largest mark is a speck
SPECK_SIZE = 0.12  # ... or one whose longer side is below this fraction of the digits' height
STROKE_HEIGHT = 0.55  # a mark shorter than this fraction of a digit's height is part of one
SPLIT_ASPECT = 0.9  # a group wider than this times a digit's height may hold several digits ...
MIN_PIECE_ASPECT = 0.12  # a piece's width, as a fraction of a digit's height: a narrow 1
MAX_PIECE_ASPECT = 1.6  # ... and at most this
# How likely a digit is to be this wide (ink width / height): the log of its frequency in
# MNIST's training digits relative to the commonest, smoothed (narrow 1s to wide 2s and 5s).
ASPECT_PRIOR = ((0.0, -6.0), (0.12, -5.0), (0.2, -1.5), (0.45, -1.5), (0.55, 0.0), (1.0, 0.0),
                (1.1, -1.3), (1.2, -2.2), (1.3, -3.5), (1.5, -4.5), (1.8, -6.0), (3.0, -10.0))
MIN_PIECE_HEIGHT = 0.5  # a piece's ink is at least this fraction of a digit's height
PIECE_COST = 1.0  # nats: what each piece costs, so that a cut must be worth it
MAX_CUTS = 24  # candidate cut columns tried per group
MAX_DIGITS = 100  # more pieces than this is not a number; refused

Classify = Callable[[np.ndarray], np.ndarray]  # uint8 (N, 28, 28) → (N, classes) probabilities


@dataclass
class Piece:
    """One digit of a number: where it is and what the model will see."""

    box: tuple[int, int, int, int]  # [x0, y0, x1, y1) in the original image's pixels
    digit: np.ndarray  # uint8 (28, 28), as preprocess makes a single digit


@dataclass
class Components:
    """Connected components of a mask, from its runs of ink."""

    labels: np.ndarray  # int32 (H, W): 0 background, 1..n the component of each ink pixel
    boxes: np.ndarray  # int (n, 4): x0, y0, x1, y1 (exclusive)
    areas: np.ndarray  # int (n,): ink pixels


def working_image(image: Image.Image) -> tuple[Image.Image, int]:
    """The image scaled down by a whole factor to at most WORK_MAX_PIXELS pixels, and the factor."""
    image = upright(image)
    factor = math.ceil(math.sqrt(image.width * image.height / WORK_MAX_PIXELS))
    if factor <= 1:
        return image, 1
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F", "RGBa", "La"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    return image.reduce(factor), factor


def components(mask: np.ndarray) -> Components:
    """8-connected components of a boolean (H, W) mask."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)  # row-major order: the runs of each row, left to right
    _, ends = np.nonzero(steps == -1)  # exclusive
    if len(rows) > MAX_RUNS:
        raise ImageError(f"too many separate marks ({len(rows):,} runs of ink) to read a number")
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(height + 1)).tolist()
    starts_l, ends_l = starts.tolist(), ends.tolist()
    for row in range(height - 1):
        i, i_end, j, j_end = first[row], first[row + 1], first[row + 1], first[row + 2]
        while i < i_end and j < j_end:
            # runs [s, e) on neighbouring rows touch (8-connected) when s_a <= e_b and s_b <= e_a
            if starts_l[i] <= ends_l[j] and starts_l[j] <= ends_l[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends_l[i] < ends_l[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
    _, run_label = np.unique(roots, return_inverse=True)
    count = int(run_label.max()) + 1 if len(rows) else 0
    lengths = ends - starts
    labels = np.zeros(height * width, np.int32)
    if len(rows):
        offsets = rows * width + starts
        run_of_pixel = np.repeat(np.arange(len(rows)), lengths)
        pixel = offsets[run_of_pixel] + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        labels[pixel] = run_label[run_of_pixel] + 1
    boxes = np.zeros((count, 4), np.int64)
    boxes[:, 0], boxes[:, 1] = width, height
    np.minimum.at(boxes[:, 0], run_label, starts)
    np.minimum.at(boxes[:, 1], run_label, rows)
    np.maximum.at(boxes[:, 2], run_label, ends)
    np.maximum.at(boxes[:, 3], run_label, rows + 1)
    areas = np.bincount(run_label, weights=lengths, minlength=count).astype(np.int64)
    return Components(labels.reshape(height, width), boxes, areas)


def drop_specks(found: Components) -> list[int]:
    """The indices of the marks that are not specks."""
    if not len(found.areas):
        return []
    heights = found.boxes[:, 3] - found.boxes[:, 1]
    sizes = np.maximum(heights, found.boxes[:, 2] - found.boxes[:, 0])
    large = found.areas >= SPECK_AREA * found.areas.max()
    reference = float(np.median(heights[found.areas >= 0.2 * found.areas.max()]))
    return [int(i) for i in np.flatnonzero(large & (sizes >= SPECK_SIZE * reference))]


def digit_height(found: Components, kept: list[int]) -> float:
    """The height of a digit here: the median height of the marks at least half as tall as
    the tallest."""
    heights = found.boxes[kept, 3] - found.boxes[kept, 1]
    return float(np.median(heights[heights >= 0.5 * heights.max()])) if kept else 0.0


def join_strokes(found: Components, kept: list[int], height: float) -> list[list[int]]:
    """Marks grouped into digits, ordered left to right. A mark shorter than STROKE_HEIGHT
    of a digit is never a digit of its own (the bar of a 5, the top of a 7, a stroke broken
    by faint ink): it joins the digit it overlaps most horizontally, or the nearest one
    within a third of a digit's height; farther away it is noise and dropped."""
    boxes = found.boxes
    full = [i for i in kept if boxes[i, 3] - boxes[i, 1] >= STROKE_HEIGHT * height]
    groups = [[i] for i in sorted(full or kept, key=lambda i: boxes[i, 0])]
    if not full:
        return groups
    for index in sorted(set(kept) - set(full), key=lambda i: -found.areas[i]):
        x0, x1 = boxes[index, 0], boxes[index, 2]
        # overlap with each group's columns; negative: the gap between them
        overlaps = [min(x1, boxes[g, 2].max()) - max(x0, boxes[g, 0].min()) for g in groups]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= -height / 3:
            groups[best].append(index)
    return groups


def piece_ink(ink: np.ndarray, found: Components, group: list[int], x0: int, x1: int):
    """The group's ink between columns x0 and x1 (other marks in that area blanked), cropped
    to its rows of ink; with its top row. None when it holds no ink."""
    box = found.boxes[group]
    y0, y1 = int(box[:, 1].min()), int(box[:, 3].max())
    labels = found.labels[y0:y1, x0:x1]
    own = np.isin(labels, np.asarray(group) + 1)
    part = np.where(own | (labels == 0), ink[y0:y1, x0:x1], 0.0)
    rows = np.flatnonzero((own & (part > INK_THRESHOLD)).any(axis=1))
    if not len(rows):
        return None, 0
    return part[rows[0]:rows[-1] + 1], y0 + int(rows[0])


def cut_columns(profile: np.ndarray, height: int) -> list[int]:
    """Candidate columns to cut a group at: where its ink is thinnest (local minima of the
    column profile), at most MAX_CUTS, at least a narrow digit's width from either end."""
    width = len(profile)
    margin = max(1, int(MIN_PIECE_ASPECT * height))
    window = max(1, width // 40)
    candidates = []
    for x in range(margin, width - margin + 1):
        low, high = max(0, x - window), min(width, x + window + 1)
        if profile[min(x, width - 1)] <= profile[low:high].min():
            candidates.append(x)
    # thin stretches give runs of equal minima: keep their middles, and a spread of the rest
    merged: list[int] = []
    for x in candidates:
        if merged and x - merged[-1][-1] <= 1:
            merged[-1].append(x)
        else:
            merged.append([x])
    cuts = [run[len(run) // 2] for run in merged]
    step = max(1, int(0.25 * height))
    cuts += [x for x in range(margin, width - margin + 1, step) if all(abs(x - c) > window for c in cuts)]
    if len(cuts) > MAX_CUTS:
        cuts = sorted(cuts, key=lambda x: profile[min(x, width - 1)])[:MAX_CUTS]
    return sorted(set(cuts))


def aspect_prior(aspect: float) -> float:
    return float(np.interp(aspect, *zip(*ASPECT_PRIOR)))


def split_group(ink: np.ndarray, found: Components, group: list[int], height: float, classify: Classify):
    """A group → [(x0, x1), ...] column ranges of its digits: itself when it is as narrow as
    a digit, else the cuts the classifier is most sure of (each extra piece costing
    SPLIT_PENALTY), among pieces of a digit's width and height."""
    box = found.boxes[group]
    x0, y0, x1, y1 = int(box[:, 0].min()), int(box[:, 1].min()), int(box[:, 2].max()), int(box[:, 3].max())
    width, height = x1 - x0, max(height, y1 - y0)
    if width <= SPLIT_ASPECT * height:
        return [(x0, x1)]
    own = np.isin(found.labels[y0:y1, x0:x1], np.asarray(group) + 1)
    profile = own.sum(axis=0).astype(np.float32)
    nodes = [0, *cut_columns(profile, height), width]
    spans, digits, prior = [], [], []
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            span = nodes[j] - nodes[i]
            if span > MAX_PIECE_ASPECT * height:
                break
            if span < MIN_PIECE_ASPECT * height:
                continue
            part, _ = piece_ink(ink, found, group, x0 + nodes[i], x0 + nodes[j])
            if part is None or part.shape[0] < MIN_PIECE_HEIGHT * height:
                continue
            spans.append((i, j))
            digits.append(fit_digit(part))
            inked = np.flatnonzero((part > INK_THRESHOLD).any(axis=0))
            prior.append(aspect_prior((inked[-1] - inked[0] + 1) / height))
    if not spans:
        return [(x0, x1)]
    scores = np.log(np.clip(classify(np.stack(digits)).max(axis=1), 1e-9, 1.0)) + np.array(prior) - PIECE_COST
    score = {span: float(s) for span, s in zip(spans, scores)}
    # best[j]: the best total score of pieces covering columns nodes[0]..nodes[j]
    best, back = [0.0] + [-math.inf] * (len(nodes) - 1), [-1] * len(nodes)
    for j in range(1, len(nodes)):
        for i in range(j):
            if (i, j) in score and best[i] + score[(i, j)] > best[j]:
                best[j], back[j] = best[i] + score[(i, j)], i
    if back[-1] < 0:
        return [(x0, x1)]
    ranges, j = [], len(nodes) - 1
    while j > 0:
        ranges.append((x0 + nodes[back[j]], x0 + nodes[j]))
        j = back[j]
    return ranges[::-1]


def segment(image: Image.Image, *, classify: Classify, source: str = "image") -> list[Piece]:
    """The digits written in `image`, left to right (an empty list when there is no ink).
    `classify` scores candidate cuts of touching digits (a predictor's `probabilities`)."""
    work, factor = working_image(image)
    try:
        ink = normalise_ink(to_gray(work))
    except ValueError as error:  # a mode Pillow cannot convert to grayscale
        raise ImageError(f"{source}: cannot read image mode {image.mode} ({error})") from None
    found = components(ink > INK_THRESHOLD)
    kept = drop_specks(found)
    height = digit_height(found, kept)
    pieces: list[Piece] = []
    for group in join_strokes(found, kept, height):
        for x0, x1 in split_group(ink, found, group, height, classify):
            part, top = piece_ink(ink, found, group, x0, x1)
            if part is None:
                continue
            cols = np.flatnonzero((part > INK_THRESHOLD).any(axis=0))
            box = (x0 + int(cols[0]), top, x0 + int(cols[-1]) + 1, top + part.shape[0])
            box = tuple(min(v * factor, limit) for v, limit in zip(box, (*image.size, *image.size)))
            pieces.append(Piece(box=box, digit=fit_digit(part, source=source)))
            if len(pieces) > MAX_DIGITS:
                raise ImageError(f"{source}: more than {MAX_DIGITS} marks; not a number this can read")
    return pieces
