"""A small generated image-caption dataset for the trainer tests: solid shapes drawn with PIL, captions that
name them, a `metadata.csv` (or .jsonl / .json) beside them, and a spec for a tiny training run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220)}


def draw(shape: str, color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, (128, 128, 128))
    d = ImageDraw.Draw(img)
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=color)
    return img


def make_dataset(folder: Path, n: int = 8, metadata: str = "csv", wide: int = 2) -> list[dict[str, str]]:
    """`n` images (64x64; the last `wide` ones 96x48 for a second bucket) and their metadata file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLORS)
    for i in range(n):
        shape, color = SHAPES[i % len(SHAPES)], names[i % len(names) if i < 3 else (i // 3) % len(names)]
        size = (96, 48) if i >= n - wide else (64, 64)
        name = f"img_{i:02d}.png"
        draw(shape, COLORS[color], size).save(folder / name)
        rows.append({"image": name, "prompt": f"a {color} {shape} on a grey background"})
    if metadata == "csv":
        with (folder / "metadata.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
    elif metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / "metadata.json").write_text(json.dumps(rows))
    return rows


def spec(model: Path | str, dataset: Path | str, output: Path | str, **overrides: Any) -> dict[str, Any]:
    """A TrainSpec (JSON mapping) for a tiny LoRA run."""
    base: dict[str, Any] = {
        "name": "tiny-lora",
        "family": "flux",
        "baseModel": str(model),
        "dataset": {"uri": str(dataset)},
        "mode": "LORA",
        "lora": {"rank": 4, "alpha": 4},
        "learningRate": 1e-3,
        "steps": 8,
        "batchSize": 2,
        "resolution": 64,
        "bucketing": True,
        "seed": 7,
        "output": str(output),
    }
    base.update(overrides)
    return base
