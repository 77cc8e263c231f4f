"""Scoring images of the shapes dataset (trainer/datasets/shapes.py): a deterministic classifier, the
evaluation loop over a prompt set, and a contact sheet.

The classifier (`classify`), numpy + PIL only, on an RGB image of any size N x N (or N x M):

1. Background: every border pixel (a band of max(1, N/32) px) votes for its nearest colour of the whole
   palette (shape colours, the held-out concept and the backgrounds: a red background reads "red", not the
   nearest background); the winner names the background. Its reference colour `bg` is the median of the
   border pixels that voted for it (the image's own tint, not the palette's).
2. A rough shape mask: pixels farther than ROUGH_DISTANCE (40) from `bg` in RGB. Fewer than MIN_AREA
   (0.5 %) of the pixels: no shape (shape and colour "none").
3. Shape colour: the median of the rough mask eroded by max(1, N/32) px (the core, free of anti-aliased
   edges; the whole rough mask if the core is empty), named by the nearest palette colour.
4. The mask: each pixel's coverage `alpha` = its projection on the segment bg -> shape colour; the mask is
   alpha > 0.5 after a 3 x 3 mean of alpha (an anti-aliased edge splits where the coverage is a half, so
   areas are unbiased; the mean evens out a model's pixel noise), kept to its largest 4-connected
   component, holes filled. Below MIN_AREA again: no shape.
5. Shape class by geometry of the mask: `extent` = area / bounding-box area, `solidity` = area / convex-hull
   area (the hull of the pixels' corners):
       solidity < 0.85   -> cross     (ideal 0.71, measured 0.71-0.78; the others are convex: >= 0.93)
       extent >= 0.91    -> square    (ideal 1.0, measured >= 0.99)
       extent >= 0.67    -> circle    (ideal pi/4 = 0.785, measured 0.75-0.83)
       otherwise         -> diamond when the mask is symmetric top to bottom (IoU with its vertical flip
                            >= SYMMETRY_DIAMOND 0.7: a diamond ~1, an apex-up triangle ~1/3), else triangle
                            (ideal 0.5 both, measured 0.52-0.59: the 3 x 3 mean blunts the corners)
   The thresholds sit halfway between the ranges measured on 600 generator images at 64 px (the widest;
   they narrow at 128 and 256 px).

On the generator's own images the classifier is exact on every attribute at 64 and 128 px (the tests check
>= 99 % on a few hundred of each); with Gaussian pixel noise of sigma 16 (of 255) added it still is, on
300 images at 64 px. A model's output is read the same way: a blob is classified by its extent
and solidity, a missing shape is "none" (wrong on colour and class).

Sample i of each prompt is generated with seed `seed + i`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from trainer.datasets.shapes import PALETTE, parse_caption

ROUGH_DISTANCE = 40.0
MIN_AREA = 0.005
SOLIDITY_CROSS = 0.85
EXTENT_SQUARE = 0.91
EXTENT_CIRCLE = 0.67
SYMMETRY_DIAMOND = 0.7
NONE = "none"

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # (K, 3)


@dataclass(frozen=True)
class Prediction:
    shape: str  # a shape of SHAPES, or "none"
    colour: str  # a palette colour, or "none"
    background: str
    area: float = 0.0  # fraction of the image the mask covers
    extent: float = 0.0
    solidity: float = 0.0


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of each (..., 3) pixel's nearest colour (RGB Euclidean)."""
    d = ((pixels[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def _shift_and(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion by one pixel (outside the image counts as empty)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _grow(seed: np.ndarray, within: np.ndarray) -> np.ndarray:
    """The 4-connected region of `within` reached from `seed`."""
    region = seed & within
    while True:
        p = np.pad(region, 1)
        grown = (region | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & within
        if (grown == region).all():
            return region
        region = grown


def _box3(a: np.ndarray) -> np.ndarray:
    """3 x 3 mean (edges replicated): evens out pixel noise before the threshold."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    best, left = np.zeros_like(mask), mask.copy()
    while left.sum() > best.sum():
        seed = np.zeros_like(mask)
        seed[np.unravel_index(left.argmax(), mask.shape)] = True
        comp = _grow(seed, left)
        if comp.sum() > best.sum():
            best = comp
        left &= ~comp
    return best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    border = np.zeros_like(mask)
    border[[0, -1], :] = border[:, [0, -1]] = True
    outside = _grow(border, ~mask)
    return ~outside


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (their corners), by monotone chain + shoelace."""
    ys = np.flatnonzero(mask.any(1))
    pts = set()
    for y in ys:
        xs = np.flatnonzero(mask[y])
        for x in (xs[0], xs[-1] + 1):
            pts.update(((int(x), int(y)), (int(x), int(y) + 1)))
    pts = sorted(pts)

    def half(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in points:
            while (
                len(out) >= 2
                and (
                    (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                    - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                )
                <= 0
            ):
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return 0.5 * abs(
        sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1], strict=True))
    )


def classify(image: Image.Image) -> Prediction:
    """(shape, colour, background) of an image, by the rules of the module docstring."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w = img.shape[:2]
    band = max(1, min(h, w) // 32)
    edge = np.zeros((h, w), bool)
    edge[:band, :] = edge[-band:, :] = edge[:, :band] = edge[:, -band:] = True
    border = img[edge]  # (P, 3)
    votes = _nearest(border)
    winner = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    background = _NAMES[winner]
    bg = np.median(border[votes == winner], axis=0)

    min_px = MIN_AREA * h * w
    rough = np.sqrt(((img - bg) ** 2).sum(-1)) > ROUGH_DISTANCE
    if rough.sum() < min_px:
        return Prediction(NONE, NONE, background)
    core = rough
    for _ in range(band):
        core = _shift_and(core)
    fg = np.median(img[core if core.any() else rough], axis=0)
    colour = _NAMES[int(_nearest(fg))]

    axis = fg - bg
    alpha = ((img - bg) @ axis) / max(float(axis @ axis), 1e-6)
    mask = _fill_holes(_largest_component(_box3(alpha) > 0.5))
    area = int(mask.sum())
    if area < min_px:
        return Prediction(NONE, colour, background)
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    extent = area / ((ys[-1] - ys[0] + 1) * (xs[-1] - xs[0] + 1))
    solidity = area / _hull_area(mask)
    if solidity < SOLIDITY_CROSS:
        shape = "cross"
    elif extent >= EXTENT_SQUARE:
        shape = "square"
    elif extent >= EXTENT_CIRCLE:
        shape = "circle"
    else:
        box = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
        flipped = box[::-1]
        iou = (box & flipped).sum() / max(int((box | flipped).sum()), 1)
        shape = "diamond" if iou >= SYMMETRY_DIAMOND else "triangle"
    return Prediction(shape, colour, background, area / (h * w), round(extent, 4), round(solidity, 4))


# ---------------------------------------------------------------------------------------------------------
# The evaluation.

ATTRIBUTES = ("colour", "background", "shape")


@dataclass(frozen=True)
class Sample:
    prompt: str
    seed: int
    wanted: dict[str, str]  # colour, background, shape
    got: Prediction

    @property
    def correct(self) -> dict[str, bool]:
        hits = {a: getattr(self.got, a) == self.wanted[a] for a in ATTRIBUTES}
        return {**hits, "all": all(hits.values())}


def _accuracy(samples: Sequence[Sample]) -> dict[str, float]:
    keys = (*ATTRIBUTES, "all")
    if not samples:
        return dict.fromkeys(keys, math.nan)
    return {k: sum(s.correct[k] for s in samples) / len(samples) for k in keys}


@dataclass
class EvalReport:
    samples: list[Sample] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> dict[str, float]:
        """Fractions correct over every sample: colour (of the shape), background, shape (class), all."""
        return _accuracy(self.samples)

    def per_prompt(self) -> list[dict]:
        prompts = list(dict.fromkeys(s.prompt for s in self.samples))
        return [{"prompt": p, **_accuracy([s for s in self.samples if s.prompt == p])} for p in prompts]

    def table(self) -> str:
        """The per-prompt rows, then the totals, as text."""
        keys = (*ATTRIBUTES, "all")
        lines = [f"{'prompt':<44} {'colour':>7} {'backgr':>7} {'shape':>7} {'all':>7}"]
        for row in self.per_prompt():
            lines.append(f"{row['prompt']:<44} " + " ".join(f"{row[k]:>7.0%}" for k in keys))
        lines.append("")
        acc, n = self.accuracy, len(self.samples)
        for key, name in zip(keys, ("shape colour", "background", "shape class", "all three"), strict=True):
            hits = sum(s.correct[key] for s in self.samples)
            lines.append(f"{name:<13} {acc[key]:>7.1%}  ({hits}/{n})")
        return "\n".join(lines)

    def to_json(self, **extra: object) -> str:
        rows = [
            {"prompt": s.prompt, "seed": s.seed, "wanted": s.wanted, "got": asdict(s.got), **s.correct}
            for s in self.samples
        ]
        body = {**extra, "accuracy": self.accuracy, "per_prompt": self.per_prompt(), "samples": rows}
        return json.dumps(body, indent=2)

    def tiles(self) -> list[tuple[str, bool]]:
        """(label, all correct) per sample, for `contact_sheet`."""
        return [
            (
                f"want {s.wanted['colour']} {s.wanted['shape']}/{s.wanted['background']}\n"
                f"got  {s.got.colour} {s.got.shape}/{s.got.background}",
                s.correct["all"],
            )
            for s in self.samples
        ]


def run_eval(
    generate: Callable[[str, int], Image.Image],
    prompts: Sequence[str],
    n_per_prompt: int,
    seed: int = 0,
    on_sample: Callable[[Sample], None] | None = None,
) -> EvalReport:
    """Generate `n_per_prompt` images per prompt (sample i with seed `seed + i`) and classify each."""
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt={n_per_prompt}: expected >= 1")
    wanted = {}
    for p in prompts:
        shape, colour, background = parse_caption(p)  # every prompt checked before the first generation
        wanted[p] = {"colour": colour, "background": background, "shape": shape}
    report = EvalReport()
    for p in prompts:
        for i in range(n_per_prompt):
            img = generate(p, seed + i).convert("RGB")
            sample = Sample(p, seed + i, wanted[p], classify(img))
            report.samples.append(sample)
            report.images.append(img)
            if on_sample is not None:
                on_sample(sample)
    return report


# ---------------------------------------------------------------------------------------------------------
# The contact sheet.

TILE = 128  # images are scaled (nearest) to at least this side
_LABEL_W = 168
_GREEN, _RED = (30, 170, 60), (210, 30, 30)


def contact_sheet(
    images: Sequence[Image.Image], labels: Sequence[tuple[str, bool]], cols: int
) -> Image.Image:
    """A grid of the images, each with its label (text, ok) underneath and a green (ok) or red border."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not images or cols < 1:
        raise ValueError(f"need images and cols >= 1 (got {len(images)} images, cols={cols})")
    font = ImageFont.load_default(11)
    lines = max(text.count("\n") + 1 for text, _ in labels)
    side = max(TILE, *(max(im.size) for im in images))
    pad, line_h = 3, 13
    tile_w = max(side, _LABEL_W) + 2 * pad
    tile_h = side + 2 * pad + lines * line_h + 2
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (im, (text, ok)) in enumerate(zip(images, labels, strict=True)):
        x0, y0 = (k % cols) * tile_w, (k // cols) * tile_h
        scale = side / max(im.size)
        shown = im.convert("RGB").resize(
            (round(im.width * scale), round(im.height * scale)), Image.Resampling.NEAREST
        )
        draw.rectangle((x0, y0, x0 + tile_w - 1, y0 + tile_h - 1), fill=_GREEN if ok else _RED)
        draw.rectangle(
            (x0 + pad, y0 + pad, x0 + tile_w - pad - 1, y0 + tile_h - pad - 1), fill=(255, 255, 255)
        )
        sheet.paste(shown, (x0 + (tile_w - shown.width) // 2, y0 + pad))
        draw.multiline_text((x0 + pad + 2, y0 + pad + side + 1), text, fill=(0, 0, 0), font=font, spacing=2)
    return sheet
