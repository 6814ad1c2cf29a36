"""An image of a number → its digits, left to right, each a 28×28 digit made exactly as
`preprocess` makes one digit (so a model sees each piece as it would see that digit alone).

The ink is found as for one digit (`normalise_ink`, `INK_THRESHOLD`), then:
1. connected components (8-connected, from runs of ink on each row: numpy and a short loop
   over runs, no per-pixel Python);
2. specks (tiny next to the largest mark) are dropped;
3. strokes of one digit that do not touch (the bar of a 5, the top of a 7) are joined back:
   a mark much shorter than a digit is never a digit of its own, it joins its neighbour;
4. a group wider than half a digit's height, or narrower but not read as one digit with
   confidence (two touching 1s), may hold several touching digits: candidate
   cuts start where the ink is thinnest and follow the path crossing the least ink, and of
   all the ways to cut the group into pieces of a digit's size the one that scores best
   wins: each piece scores as the class it most likely is (its log-probability plus how
   usual its width is for that class), minus a cost per piece; no piece may be read less
   surely than the uncut group (up to MIN_CUT_CONFIDENCE).

Images with more than WORK_MAX_PIXELS pixels are scaled down first, and cuts are searched
at most SEARCH_HEIGHT pixels high (time and memory stay bounded); boxes are given in the
original image's pixels. Tuned on composed numbers (benchmarks/number_reading.py with
seeds other than the one it reports).
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
SPLIT_ASPECT = 0.5  # a group wider than this times a digit's height may hold several digits
WHOLE_SURE = 0.9  # ... and a narrower one too, unless the classifier is less sure than this of it
MIN_PIECE_ASPECT = 0.15  # a piece's width, as a fraction of a digit's height: a narrow 1
MAX_PIECE_ASPECT = 1.6  # ... and at most this
MIN_PIECE_HEIGHT = 0.5  # a piece's ink is at least this fraction of a digit's height
# How wide each digit is: mean and spread of log(ink width / ink height) of MNIST's training
# digits by class (measured 2026-12-01; spreads below 0.25 widened to 0.25 for other hands
# and fonts). A piece scores as the class it is most likely to be, its width included.
LOG_ASPECT = np.array([-0.105, -0.916, -0.051, -0.223, -0.223, -0.051, -0.357, -0.223, -0.223, -0.357])
LOG_ASPECT_SPREAD = np.array([0.25, 0.454, 0.25, 0.25, 0.25, 0.252, 0.25, 0.25, 0.25, 0.25])
NARROW_SPREAD = 0.5  # the spread on the narrow side
PIECE_COST = 0.25  # nats: what each piece costs, so that a cut must be worth it
# Each piece of a cut must be read at least as surely as the uncut group, up to this: a wide
# 2 whose tail, cut off, is read as nothing in particular (p ~ 0.1) stays whole, while a "17"
# read as one unsure digit may still be cut into two surer ones.
MIN_CUT_CONFIDENCE = 0.7
MAX_CUTS = 24  # candidate cut columns tried per group
SEARCH_HEIGHT = 128  # pixels: taller groups are searched for cuts at this height
MAX_DIGITS = 100  # more marks than this is not a number: refused

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


def working_image(image: Image.Image) -> tuple[Image.Image, int, tuple[int, int]]:
    """The image turned upright (EXIF) and scaled down by a whole factor to at most
    WORK_MAX_PIXELS pixels, the factor, and the upright image's size."""
    image = upright(image)
    size = image.size
    factor = math.ceil(math.sqrt(image.width * image.height / WORK_MAX_PIXELS))
    if factor <= 1:
        return image, 1, size
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")  # 16-bit values kept (to_gray scales "I" by its maximum)
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F", "RGBa", "La"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    return image.reduce(factor), factor, size


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


@dataclass
class Group:
    """A digit or several touching ones: its ink (other marks blanked) within its box."""

    x0: int
    y0: int
    ink: np.ndarray  # float32 (h, w): the image's normalised ink in the box, other marks at 0
    own: np.ndarray  # bool (h, w): this group's ink pixels


def group_of(ink: np.ndarray, found: Components, marks: list[int]) -> Group:
    box = found.boxes[marks]
    x0, y0, x1, y1 = int(box[:, 0].min()), int(box[:, 1].min()), int(box[:, 2].max()), int(box[:, 3].max())
    labels = found.labels[y0:y1, x0:x1]
    own = np.isin(labels, np.asarray(marks) + 1)
    return Group(x0, y0, np.where(own | (labels == 0), ink[y0:y1, x0:x1], 0.0).astype(np.float32), own)


def piece_of(group: Group, left: np.ndarray, right: np.ndarray):
    """The group's ink between two cut paths (per row: from column left[r] up to right[r]),
    cropped to its ink: (ink, (x0, y0, x1, y1) in the working image), or None if empty."""
    cols = np.arange(group.ink.shape[1])
    region = (cols >= left[:, None]) & (cols < right[:, None])
    inked = region & group.own
    rows, columns = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    if not len(rows):
        return None
    top, bottom, first, last = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    part = np.where(region, group.ink, 0.0)[top:bottom, first:last]
    return part, (group.x0 + int(first), group.y0 + int(top), group.x0 + int(last), group.y0 + int(bottom))


def cut_path(ink: np.ndarray, column: int, reach: int) -> np.ndarray:
    """The path from top to bottom, starting anywhere and moving at most one column per row,
    that crosses the least ink within `reach` columns of `column`: touching digits are cut
    where they touch even when they lean into each other. (h,) the column of each row."""
    height, width = ink.shape
    low, high = max(0, column - reach), min(width, column + reach + 1)
    cost = ink[:, low:high] + 0.02 * np.abs(np.arange(low, high) - column)[None, :]
    total = cost[0].copy()
    moves = np.zeros(cost.shape, np.int8)
    for row in range(1, height):
        options = np.stack([np.r_[np.inf, total[:-1]], total, np.r_[total[1:], np.inf]])
        moves[row] = np.argmin(options, axis=0) - 1
        total = cost[row] + options[moves[row] + 1, np.arange(len(total))]
    path = np.empty(height, np.int64)
    path[-1] = int(np.argmin(total))
    for row in range(height - 1, 0, -1):
        path[row - 1] = path[row] + moves[row, path[row]]
    return path + low


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


def piece_scores(probabilities: np.ndarray, aspects: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities and (N,) width/height → (N,) log-scores: the best over the
    classes of log p(class) plus the log-likelihood of that width for that class (for data
    sets other than MNIST's ten digits: the top log-probability alone)."""
    logp = np.log(np.clip(probabilities, 1e-9, 1.0))
    if logp.shape[1] != len(LOG_ASPECT):
        return logp.max(axis=1)
    offset = np.log(aspects)[:, None] - LOG_ASPECT[None, :]
    # narrower than usual is common in people's writing (a tall thin 0); wider is what two
    # touching digits look like, so only width is held to MNIST's spread
    z = offset / np.where(offset < 0, np.maximum(LOG_ASPECT_SPREAD, NARROW_SPREAD), LOG_ASPECT_SPREAD)
    return (logp - 0.5 * z ** 2).max(axis=1)


def split_group(group: Group, height: float, classify: Classify) -> list[tuple[np.ndarray, np.ndarray]]:
    """A group → the (left, right) cut paths of its digits: itself when it is as narrow as a
    digit, else the cuts whose pieces the classifier is most sure of, each piece's score
    being `piece_scores` minus PIECE_COST."""
    h, width = group.ink.shape
    height = max(height, h)
    edges = np.zeros(h, np.int64), np.full(h, width, np.int64)
    if width < 2 * MIN_PIECE_ASPECT * height:
        return [edges]
    if width <= SPLIT_ASPECT * height and classify(fit_digit(group.ink)[None]).max() >= WHOLE_SURE:
        return [edges]  # as narrow as one digit and read as one with confidence
    step = math.ceil(h / SEARCH_HEIGHT)
    if step > 1:  # search at SEARCH_HEIGHT pixels high, then scale the cuts back up
        small = Group(0, 0, *(np.asarray(Image.fromarray(a.astype(np.float32), "F").resize(
            (max(1, width // step), max(1, h // step)), Image.Resampling.BOX)) for a in (group.ink, group.own)))
        small.own = small.own > 0.3
        rows = np.minimum(np.arange(h) // step, small.ink.shape[0] - 1)
        cuts = split_group(small, height / step, classify)
        return [(left[rows] * step, np.where(right[rows] >= small.ink.shape[1], width, right[rows] * step))
                for left, right in cuts]
    profile = group.own.sum(axis=0).astype(np.float32)
    reach = max(1, int(0.15 * height))
    paths = [edges[0], *(cut_path(group.ink, c, reach) for c in cut_columns(profile, height)), edges[1]]
    spans, digits, aspects = [], [], []
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            span = np.median(paths[j] - paths[i])
            if span > MAX_PIECE_ASPECT * height:
                break
            if span < MIN_PIECE_ASPECT * height:
                continue
            piece = piece_of(group, paths[i], paths[j])
            if piece is None or piece[0].shape[0] < MIN_PIECE_HEIGHT * height:
                continue
            spans.append((i, j))
            digits.append(fit_digit(piece[0]))
            aspects.append(piece[0].shape[1] / piece[0].shape[0])
    if not spans:
        return [edges]
    probabilities = classify(np.stack(digits))
    scores = piece_scores(probabilities, np.array(aspects)) - PIECE_COST
    # a fixed minimum (0.7 before 2026-12-01) kept unsure wholes, a "17" read as one digit,
    # over their surer halves: the minimum is now the whole's own confidence, up to 0.7
    whole = (0, len(paths) - 1)
    top = probabilities.max(axis=1)
    floor = min(MIN_CUT_CONFIDENCE, float(top[spans.index(whole)]) if whole in spans else 0.0)
    score = {span: float(s) for span, s, p in zip(spans, scores, top) if span == whole or p >= floor}
    # best[j]: the best total score of pieces covering the group from its left edge to path j
    best, back = [0.0] + [-math.inf] * (len(paths) - 1), [-1] * len(paths)
    for j in range(1, len(paths)):
        for i in range(j):
            if (i, j) in score and best[i] + score[(i, j)] > best[j]:
                best[j], back[j] = best[i] + score[(i, j)], i
    if back[-1] < 0:
        return [edges]
    ranges, j = [], len(paths) - 1
    while j > 0:
        ranges.append((paths[back[j]], paths[j]))
        j = back[j]
    return ranges[::-1]


def segment(image: Image.Image, *, classify: Classify, source: str = "image") -> list[Piece]:
    """The digits written in `image`, left to right (an empty list when there is no ink).
    `classify` scores candidate cuts of touching digits (a predictor's `probabilities`)."""
    work, factor, size = working_image(image)
    try:
        ink = normalise_ink(to_gray(work))
    except ValueError as error:  # a mode Pillow cannot convert to grayscale
        raise ImageError(f"{source}: cannot read image mode {image.mode} ({error})") from None
    try:
        found = components(ink > INK_THRESHOLD)
    except ImageError as error:
        raise ImageError(f"{source}: {error}") from None
    kept = drop_specks(found)
    height = digit_height(found, kept)
    groups = join_strokes(found, kept, height)
    if len(groups) > MAX_DIGITS:
        raise ImageError(f"{source}: {len(groups):,} separate marks; more than the {MAX_DIGITS} digits "
                         "a number read here may have")
    pieces: list[Piece] = []
    for marks in groups:
        group = group_of(ink, found, marks)
        for left, right in split_group(group, height, classify):
            piece = piece_of(group, left, right)
            if piece is None:
                continue
            part, box = piece
            box = tuple(min(v * factor, limit) for v, limit in zip(box, (*size, *size)))
            pieces.append(Piece(box=box, digit=fit_digit(part, source=source)))
    # left to right by the middle of each box (a short mark joined to a digit can move its edge)
    return sorted(pieces, key=lambda piece: piece.box[0] + piece.box[2])
