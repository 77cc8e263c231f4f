"""The training dataset: images and captions from a local folder or an S3 prefix, bucketed by aspect ratio.

The folder holds images and one of `metadata.csv` (columns named by the spec, `image,prompt` by default),
`metadata.jsonl` or `metadata.json` (a list of objects). Every row is checked before training starts: a
missing or unreadable image is a `SpecError("dataset.uri", ...)` naming the file. Images are resized to
cover their bucket and center-cropped into it; a batch is drawn from one bucket. The order is a pure function
of (seed, epoch), so the data position (epoch, batch) is all a checkpoint needs to resume it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.spec import METADATA_FILES, SpecError
from trainer.storage import Storage, StorageError

FIELD = "dataset.uri"
MULTIPLE = 16  # FLUX: VAE 8x, then 2x2 patches
MAX_ASPECT = 2.0  # widest bucket: 2:1


@dataclass(frozen=True)
class Row:
    image: str  # path relative to the dataset root
    caption: str


@dataclass(frozen=True)
class Item:
    """One image of the dataset, checked: where it lies locally, its caption and its bucket (w, h)."""

    image: str
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) of the training crop


def _rows_from_records(records: list[Any], name: str, image_col: str, caption_col: str) -> list[Row]:
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise SpecError(FIELD, f"{name}: entry {i} is not an object")
        if image_col not in rec:
            raise SpecError("dataset.imageColumn", f"{name}: entry {i} has no {image_col!r} ({sorted(rec)})")
        if caption_col not in rec:
            raise SpecError(
                "dataset.captionColumn", f"{name}: entry {i} has no {caption_col!r} ({sorted(rec)})"
            )
        rows.append(Row(str(rec[image_col]), str(rec[caption_col] or "")))
    return rows


def read_metadata(storage: Storage, image_col: str, caption_col: str) -> list[Row]:
    """The rows of the first metadata file present (csv, jsonl, json); SpecError names what is wrong."""
    for name in METADATA_FILES:
        try:
            raw = storage.read(name)
        except FileNotFoundError:
            continue
        except StorageError as e:
            raise SpecError(FIELD, str(e)) from None
        text = raw.decode("utf-8-sig", errors="replace")
        try:
            if name.endswith(".csv"):
                records: list[Any] = list(csv.DictReader(io.StringIO(text)))
            elif name.endswith(".jsonl"):
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
                if not isinstance(records, list):
                    raise SpecError(FIELD, f"{storage.uri(name)}: expected a JSON list of objects")
        except (json.JSONDecodeError, csv.Error) as e:
            raise SpecError(FIELD, f"{storage.uri(name)} cannot be parsed: {e}") from None
        rows = _rows_from_records(records, storage.uri(name), image_col, caption_col)
        if not rows:
            raise SpecError(FIELD, f"{storage.uri(name)} lists no images")
        return rows
    raise SpecError(FIELD, f"{storage.root_uri} holds none of {list(METADATA_FILES)}")


def _safe_name(image: str) -> str:
    path = PurePosixPath(image)
    if not image or path.is_absolute() or ".." in path.parts:
        raise SpecError(FIELD, f"image {image!r} must be a path inside the dataset folder")
    return path.as_posix()


def fetch_images(storage: Storage, rows: list[Row], download_dir: Path) -> dict[str, Path]:
    """Local paths of every image (S3 images are downloaded into `download_dir`, again only when the size of
    the object changed)."""
    paths: dict[str, Path] = {}
    for row in rows:
        name = _safe_name(row.image)
        if name in paths:
            continue
        local = storage.local_path(name)
        if local is None:
            local = download_dir / name
            if not local.is_file() or local.stat().st_size != storage.size(name):
                try:
                    data = storage.read(name)
                except FileNotFoundError:
                    raise SpecError(FIELD, f"image {storage.uri(name)} does not exist") from None
                except StorageError as e:
                    raise SpecError(FIELD, f"image {storage.uri(name)}: {e}") from None
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
        paths[name] = local
    return paths


def image_size(path: Path, uri: str) -> tuple[int, int]:
    """(width, height) after EXIF rotation; decodes the whole image so a truncated file fails here."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).size
    except FileNotFoundError:
        raise SpecError(FIELD, f"image {uri} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SpecError(FIELD, f"image {uri} is not a readable image ({type(e).__name__}: {e})") from None


def make_buckets(resolution: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(w, h) multiples of 16 with w * h close to resolution^2, aspect ratios up to `max_aspect`."""
    area = resolution * resolution
    buckets = set()
    w = MULTIPLE
    while w <= resolution * max_aspect:
        h = max(MULTIPLE, round(area / w / MULTIPLE) * MULTIPLE)
        if max(w / h, h / w) <= max_aspect and abs(w * h - area) <= 0.2 * area:
            buckets.add((w, h))
        w += MULTIPLE
    buckets.add((resolution, resolution))
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log) to the image's; ties go to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover (w, h), center-crop to it: (3, h, w) float32 in [-1, 1]."""
    w, h = size
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = max(w / img.width, h / img.height)
        rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - w) // 2, (rh - h) // 2
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (h, w, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, h, w)


def build_items(
    storage: Storage, rows: list[Row], paths: dict[str, Path], resolution: int, bucketing: bool
) -> list[Item]:
    """Check every image (SpecError naming the first bad one) and give each its training size."""
    buckets = make_buckets(resolution) if bucketing else [(resolution, resolution)]
    items = []
    for row in rows:
        name = _safe_name(row.image)
        w, h = image_size(paths[name], storage.uri(name))
        items.append(Item(name, paths[name], row.caption, pick_bucket(w, h, buckets)))
    return items


class BucketSampler:
    """Batches of dataset indices, each from one bucket, in an order fixed by (seed, epoch).

    An epoch shuffles each bucket's indices (every item `repeats` times), cuts them into batches (the last
    one of a bucket may be smaller), and shuffles the batches. `position` is (epoch, batch in epoch).
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, repeats: int, seed: int) -> None:
        if not sizes:
            raise SpecError(FIELD, "the dataset is empty")
        self.sizes = sizes
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.batch = 0
        self._plan: list[list[int]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"diffmesh-data:{self.seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for _ in range(self.repeats):
            for i, size in enumerate(self.sizes):
                by_bucket.setdefault(size, []).append(i)
        batches = []
        for size in sorted(by_bucket):
            idx = by_bucket[size]
            rng.shuffle(idx)
            batches += [idx[k : k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def next(self) -> list[int]:
        if self._plan is None:
            self._plan = self.epoch_batches(self.epoch)
        if self.batch >= len(self._plan):
            self.epoch, self.batch = self.epoch + 1, 0
            self._plan = self.epoch_batches(self.epoch)
        out = self._plan[self.batch]
        self.batch += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch, "items": len(self.sizes)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["items"] != len(self.sizes):
            raise ValueError(
                f"checkpoint data position is for seed {state['seed']} and {state['items']} items, "
                f"not seed {self.seed} and {len(self.sizes)} items"
            )
        self.epoch, self.batch, self._plan = state["epoch"], state["batch"], None
