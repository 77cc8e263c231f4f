"""The shapes classifier on the generator's own images (every shape, colour and background, the held-out
concept too, at 64 and 128 px), the evaluation loop and the contact sheet."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from orchestrator.eval.shapes import Prediction, classify, contact_sheet, run_eval
from trainer.datasets.shapes import CONCEPT, eval_prompts, render_prompt, samples


@pytest.mark.parametrize("concept", ["pink", CONCEPT])
@pytest.mark.parametrize(("resolution", "n"), [(64, 400), (128, 200)])
def test_classifier_reads_the_generators_images(resolution, n, concept):
    errors, seen = Counter(), Counter()
    for img, lb in samples(n, seed=11, resolution=resolution, concept=concept):
        got = classify(img)
        seen[lb.shape] += 1
        seen[lb.colour] += 1
        for attr in ("shape", "colour", "background"):
            errors[attr] += getattr(got, attr) != getattr(lb, attr)
    assert seen[concept] > 0 and all(seen[s] > 0 for s in ("circle", "square", "triangle", "cross"))
    for attr in ("shape", "colour", "background"):
        assert errors[attr] / n <= 0.01, (attr, errors)


def test_classifier_tolerates_pixel_noise():
    rng = np.random.default_rng(0)
    hits = 0
    for img, lb in samples(60, seed=2, concept=CONCEPT):
        noisy = np.asarray(img, np.float32) + rng.normal(0, 12, (64, 64, 3))
        got = classify(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
        hits += (got.shape, got.colour, got.background) == (lb.shape, lb.colour, lb.background)
    assert hits >= 59


def test_a_blank_image_has_no_shape():
    got = classify(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert got == Prediction("none", "none", "grey")
    # a red background is read as red, not as the nearest background colour
    assert classify(Image.new("RGB", (32, 32), (210, 40, 40))).background == "red"


def test_run_eval_on_the_generators_own_images_is_perfect():
    prompts = eval_prompts("base")[:8] + eval_prompts("concept")[:4]
    calls = []

    def generate(prompt: str, seed: int) -> Image.Image:
        calls.append((prompt, seed))
        return render_prompt(prompt, seed)

    report = run_eval(generate, prompts, n_per_prompt=3, seed=100)
    assert calls == [(p, 100 + i) for p in prompts for i in range(3)]
    assert report.accuracy == {"colour": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}
    rows = report.per_prompt()
    assert [r["prompt"] for r in rows] == prompts and all(r["all"] == 1.0 for r in rows)
    table = report.table()
    assert "shape colour   100.0%  (36/36)" in table and "all three      100.0%" in table
    body = json.loads(report.to_json(model="m"))
    assert body["model"] == "m" and len(body["samples"]) == 36 and body["accuracy"]["shape"] == 1.0
    assert body["samples"][0]["wanted"] == {"colour": "red", "background": "white", "shape": "circle"}


def test_run_eval_on_blank_images_scores_no_shape():
    prompts = eval_prompts("base")
    report = run_eval(lambda p, s: Image.new("RGB", (64, 64), (255, 255, 255)), prompts, 1)
    acc = report.accuracy
    assert acc["shape"] == 0.0 and acc["colour"] == 0.0 and acc["all"] == 0.0
    assert acc["background"] == pytest.approx(1 / 3)  # the white-background prompts


def test_run_eval_checks_the_prompts_before_generating():
    def generate(prompt: str, seed: int) -> Image.Image:
        raise AssertionError("no generation expected")

    with pytest.raises(ValueError, match="caption 'a cat'"):
        run_eval(generate, ["a red circle on a white background", "a cat"], 1)
    with pytest.raises(ValueError, match="n_per_prompt=0"):
        run_eval(generate, ["a red circle on a white background"], 0)


def test_contact_sheet_is_a_grid_with_coloured_borders():
    images = [render_prompt(p, 0) for p in eval_prompts("base")[:5]]
    labels = [("want red circle/white\ngot  red circle/white", True)] * 4 + [("want x\ngot y", False)]
    sheet = contact_sheet(images, labels, cols=2)
    w, h = sheet.size
    assert w % 2 == 0 and h % 3 == 0 and w // 2 >= 128 and h // 3 > 128  # 2 columns, 3 rows
    tile_w, tile_h = w // 2, h // 3
    assert sheet.getpixel((0, 0)) == (30, 170, 60)  # first tile: correct
    assert sheet.getpixel((0, 2 * tile_h)) == (210, 30, 30)  # fifth tile: wrong
    assert sheet.getpixel((tile_w, 2 * tile_h)) == (255, 255, 255)  # no sixth tile
    big = contact_sheet([Image.new("RGB", (200, 100))], [("a", True)], cols=4)
    assert big.width >= 4 * 200 and big.height >= 200
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        contact_sheet(images[:2], labels[:1], cols=2)
