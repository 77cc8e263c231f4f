"""A seeded procedural dataset of simple shapes, and the vocabulary the evaluation shares with it.

Each image is one shape, flat-coloured, on a flat background, rendered anti-aliased (drawn at 4x the
resolution, then box-downsampled, so an edge pixel is the exact coverage blend of the two colours).

- Shapes (`SHAPES`): circle, square, triangle (apex up, base = height), cross (a plus sign, arms 1/3 of
  its size thick). All four fill a square bounding box of side `size`; they differ by how much of it they
  fill (1.0, 0.785, 0.5, 0.556) and by convexity (only the cross is not convex), which is what the
  classifier in `orchestrator/eval/shapes.py` measures.
- Shape colours (`COLOURS`, RGB): red (215, 35, 35), green (40, 170, 70), blue (40, 90, 220),
  yellow (240, 210, 40), purple (140, 60, 190), orange (250, 130, 20). Closest pair: yellow/orange, 83 apart
  in RGB; every colour is >= 90 from every background.
- Backgrounds (`BACKGROUNDS`): white (255, 255, 255), black (0, 0, 0), grey (128, 128, 128). The two sets
  are disjoint, so a shape never has its background's colour.
- Held-out concepts the base model never sees: the colour "pink" (250, 130, 200) (`CONCEPTS`) and the
  shape "diamond" (a square turned 45 degrees, filling half its bounding box like the triangle but symmetric
  top to bottom) (`CONCEPT_SHAPES`). `--concept none` (the default) leaves them out; `--concept pink` adds a
  seventh shape colour, `--concept diamond` a fifth shape; `--only-concept` makes every sample show the
  concept (a LoRA's dataset). `CONCEPT` is the one the shipped LoRA teaches: "diamond" (pink needs a VAE
  that has seen pink, so a new colour means retraining the autoencoder; a new shape does not).
- Size: 35-65 % of the side; position: the centre jitters as far as keeps a margin of 6 % of the side.
- Captions: the canonical "a red circle on a white background" (40 % of samples; the evaluation's form)
  or one of the paraphrases in `TEMPLATES`, chosen by the seed.

Sample i of seed s draws from its own stream, `numpy.random.default_rng((s, i))`: a dataset is a pure
function of its arguments, and the first k samples do not depend on n.

Layout written (a folder or `s3://bucket/prefix/`): `images/00000.png ...`, `metadata.csv` (`image,prompt`,
paths relative to the root; written last, so a partial dataset has none), `labels.jsonl` (ground truth:
image, prompt, shape, colour, background, bbox [x0, y0, x1, y1] in pixels, size, template) and
`dataset.json` (the arguments and the palette). S3 through `minio`, with the connection from
DIFFMESH_S3_ENDPOINT / _ACCESS_KEY / _SECRET_KEY (or `<NAME>_FILE`) / _SECURE / _REGION.

    python -m trainer.datasets.shapes --out data/shapes --n 20000 --seed 0
    python -m trainer.datasets.shapes --out data/pink --n 2000 --seed 1 --concept pink --only-concept

No torch here: the orchestrator imports this vocabulary.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
CONCEPTS: dict[str, RGB] = {"pink": (250, 130, 200)}  # held out of the base dataset
CONCEPT_SHAPES = ("diamond",)  # held out of the base dataset
ALL_SHAPES = (*SHAPES, *CONCEPT_SHAPES)
CONCEPT = "diamond"  # the concept the shipped LoRA teaches
PALETTE: dict[str, RGB] = {**COLOURS, **CONCEPTS, **BACKGROUNDS}  # every colour word we know

TEMPLATES = (
    "{a_colour} {shape} on a {background} background",  # canonical (index 0)
    "a {background} background with {a_colour} {shape}",
    "{colour} {shape}, {background} background",
    "a picture of {a_colour} {shape} over {background}",
    "{a_colour} {shape} against a {background} background",
    "an image of {a_colour} {shape} on {background}",
    "{colour} {shape} on {background}",
    "a simple drawing of {a_colour} {shape}, {background} background",
)
CANONICAL_SHARE = 0.4
SIZE_RANGE = (0.35, 0.65)  # shape size as a fraction of the side
MARGIN = 0.06  # fraction of the side kept free around the shape
SUPERSAMPLE = 4
CROSS_ARM = 1 / 3  # arm thickness as a fraction of the cross's size
_SYNONYMS = {"gray": "grey"}


@dataclass(frozen=True)
class Label:
    """The ground truth of one sample; bbox (x0, y0, x1, y1) and size in pixels of the image."""

    image: str
    prompt: str
    shape: str
    colour: str
    background: str
    bbox: tuple[float, float, float, float]
    size: float
    template: int


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(shape: str, colour: str, background: str, template: int = 0) -> str:
    """The caption of a sample; template 0 is the canonical "a red circle on a white background"."""
    return TEMPLATES[template].format(
        a_colour=_article(colour), colour=colour, shape=shape, background=background
    )


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a caption in any of our forms: the colour word right before the shape
    word is the shape's, the other colour word the background's. ValueError when that is not there."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    shapes = [i for i, w in enumerate(words) if w in ALL_SHAPES]
    if len(shapes) != 1:
        raise ValueError(f"caption {text!r}: expected one shape word of {list(ALL_SHAPES)}")
    i = shapes[0]
    if i == 0 or words[i - 1] not in PALETTE:
        raise ValueError(f"caption {text!r}: no colour word before {words[i]!r}; known: {list(PALETTE)}")
    others = [w for j, w in enumerate(words) if w in PALETTE and j != i - 1]
    if len(others) != 1:
        raise ValueError(f"caption {text!r}: expected one background colour word besides {words[i - 1]!r}")
    return words[i], words[i - 1], others[0]


def shape_colours(concept: str | None = None, only_concept: bool = False) -> list[str]:
    """The shape colours a dataset draws from: the base six, plus the concept, or the concept alone."""
    if concept is not None and concept not in (*CONCEPTS, *CONCEPT_SHAPES):
        raise ValueError(f"concept {concept!r}: known: {[*CONCEPTS, *CONCEPT_SHAPES]} (or None)")
    if concept in CONCEPT_SHAPES:
        return list(COLOURS)
    if only_concept:
        if concept is None:
            raise ValueError("only_concept needs a concept")
        return [concept]
    return [*COLOURS, *([concept] if concept else [])]


def dataset_shapes(concept: str | None = None, only_concept: bool = False) -> list[str]:
    """The shapes a dataset draws from: the base four, plus a shape concept, or that shape alone."""
    if concept not in CONCEPT_SHAPES:
        return list(SHAPES)
    return [concept] if only_concept else [*SHAPES, concept]


def render(
    shape: str, colour: str, background: str, centre: tuple[float, float], size: float, resolution: int = 64
) -> Image.Image:
    """One shape of `size` pixels centred at `centre` (pixels) on a `resolution`-square RGB image."""
    if shape not in ALL_SHAPES:
        raise ValueError(f"shape {shape!r}: known: {list(ALL_SHAPES)}")
    k = SUPERSAMPLE
    img = Image.new("RGB", (resolution * k, resolution * k), PALETTE[background])
    draw = ImageDraw.Draw(img)
    fill = PALETTE[colour]
    cx, cy, h = centre[0] * k, centre[1] * k, size * k / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:  # cross
        t = h * CROSS_ARM
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    return img.reduce(k)  # box filter: each pixel is the mean of its k x k subpixels


def draw_sample(
    rng: np.random.Generator,
    resolution: int,
    colours: list[str],
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    shapes: list[str] | None = None,
) -> tuple[Image.Image, Label]:
    """A random sample (attributes given are kept); its label has no image path."""
    shape = shape or (shapes or SHAPES)[rng.integers(len(shapes or SHAPES))]
    colour = colour or colours[rng.integers(len(colours))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = float(rng.uniform(*SIZE_RANGE)) * resolution
    lo, hi = size / 2 + MARGIN * resolution, resolution - size / 2 - MARGIN * resolution
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    template = 0 if rng.random() < CANONICAL_SHARE else int(rng.integers(1, len(TEMPLATES)))
    img = render(shape, colour, background, (cx, cy), size, resolution)
    bbox = tuple(round(v, 2) for v in (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))
    prompt = caption(shape, colour, background, template)
    return img, Label("", prompt, shape, colour, background, bbox, round(size, 2), template)


def samples(
    n: int, seed: int, resolution: int = 64, concept: str | None = None, only_concept: bool = False
) -> Iterator[tuple[Image.Image, Label]]:
    """The dataset's samples in order: (image, label), sample i drawn from default_rng((seed, i))."""
    if n < 1:
        raise ValueError(f"n={n}: expected >= 1")
    if resolution < 16:
        raise ValueError(f"resolution={resolution}: expected >= 16")
    colours = shape_colours(concept, only_concept)
    shapes = dataset_shapes(concept, only_concept)
    for i in range(n):
        img, label = draw_sample(np.random.default_rng((seed, i)), resolution, colours, shapes=shapes)
        yield img, Label(**{**asdict(label), "image": f"images/{i:05d}.png"})


def render_prompt(prompt: str, seed: int, resolution: int = 64) -> Image.Image:
    """An image of ours for a caption (any template), its size and position drawn from `seed`."""
    shape, colour, background = parse_caption(prompt)
    rng = np.random.default_rng((seed, 1 << 31))
    return draw_sample(rng, resolution, [colour], shape, colour, background)[0]


def eval_prompts(kind: str = "base") -> list[str]:
    """The fixed evaluation prompts, canonical form. "base": 24 (every shape x every base colour, the
    background cycling so each shape and each colour meets all three); "concept" (= "diamond"): 12 (a diamond
    in every base colour on two backgrounds each); "pink": 12 (every shape x every background, in pink)."""
    bgs = list(BACKGROUNDS)
    if kind == "base":
        return [
            caption(shape, colour, bgs[(s + c) % len(bgs)])
            for s, shape in enumerate(SHAPES)
            for c, colour in enumerate(COLOURS)
        ]
    if kind in ("concept", "diamond"):
        return [
            caption("diamond", colour, bgs[(c + k) % len(bgs)])
            for c, colour in enumerate(COLOURS)
            for k in (0, 1)
        ]
    if kind == "pink":
        return [caption(shape, "pink", bg) for shape in SHAPES for bg in bgs]
    raise ValueError(f"prompt set {kind!r}: known: ['base', 'concept', 'diamond', 'pink']")


# ---------------------------------------------------------------------------------------------------------
# Writing the layout.


class _Sink:
    """A local folder, or an S3 prefix through minio (bucket created when missing)."""

    def __init__(self, out: str, env: Mapping[str, str]) -> None:
        self.out = out
        self.client = None
        if out.startswith("s3://"):
            from minio import Minio

            self.bucket, _, prefix = out.removeprefix("s3://").partition("/")
            if not self.bucket:
                raise ValueError(f"--out {out!r}: expected s3://bucket/prefix/")
            self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            self.client = Minio(
                env.get("DIFFMESH_S3_ENDPOINT", "127.0.0.1:8333"),
                access_key=_secret(env, "DIFFMESH_S3_ACCESS_KEY"),
                secret_key=_secret(env, "DIFFMESH_S3_SECRET_KEY"),
                secure=env.get("DIFFMESH_S3_SECURE", "").strip().lower() in ("1", "true", "yes", "on"),
                region=env.get("DIFFMESH_S3_REGION") or None,
            )
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        else:
            self.root = Path(out).expanduser()
            (self.root / "images").mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        if self.client is not None:
            self.client.put_object(self.bucket, self.prefix + name, io.BytesIO(data), len(data))
            return
        path = self.root / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def _secret(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else env.get(name) or None


def write_dataset(
    out: str | Path,
    n: int,
    seed: int,
    resolution: int = 64,
    concept: str | None = None,
    only_concept: bool = False,
    env: Mapping[str, str] | None = None,
) -> list[Label]:
    """Write the dataset to a folder or `s3://bucket/prefix/`; returns the labels."""
    sink = _Sink(str(out), os.environ if env is None else env)
    labels = []
    for img, label in samples(n, seed, resolution, concept, only_concept):
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        sink.write(label.image, buf.getvalue())
        labels.append(label)
    info = {
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "concept": concept,
        "only_concept": only_concept,
        "shapes": dataset_shapes(concept, only_concept),
        "colours": shape_colours(concept, only_concept),
        "backgrounds": list(BACKGROUNDS),
        "palette": PALETTE,
    }
    sink.write("dataset.json", json.dumps(info, indent=2).encode())
    sink.write("labels.jsonl", "".join(json.dumps(asdict(lb)) + "\n" for lb in labels).encode())
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["image", "prompt"])
    rows.writerows([lb.image, lb.prompt] for lb in labels)
    sink.write("metadata.csv", text.getvalue().encode())  # last: its presence marks a complete dataset
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.datasets.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="a folder or s3://bucket/prefix/")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument(
        "--concept",
        choices=[*CONCEPTS, *CONCEPT_SHAPES, "none"],
        default="none",
        help="add a held-out concept",
    )
    p.add_argument("--only-concept", action="store_true", help="every sample shows the concept (LoRA data)")
    args = p.parse_args(argv)
    concept = None if args.concept == "none" else args.concept
    if args.only_concept and concept is None:
        p.error("--only-concept needs --concept " + "|".join([*CONCEPTS, *CONCEPT_SHAPES]))
    if args.n < 1 or args.resolution < 16:
        p.error(f"--n {args.n} must be >= 1 and --resolution {args.resolution} >= 16")
    labels = write_dataset(args.out, args.n, args.seed, args.resolution, concept, args.only_concept)
    print(f"{len(labels)} images ({args.resolution}px, concept {args.concept}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
