"""The shapes dataset generator: seeded, captions that parse back to their labels, the held-out concept only
where asked, the trainer's layout written to a folder and to a real S3 server."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from minio import Minio
from PIL import Image

from trainer.datasets import shapes
from trainer.datasets.shapes import (
    BACKGROUNDS,
    COLOURS,
    CONCEPT,
    SHAPES,
    TEMPLATES,
    caption,
    eval_prompts,
    main,
    parse_caption,
    samples,
    write_dataset,
)

PINK = "pink"  # the held-out colour (the shipped LoRA teaches the held-out shape, CONCEPT)


def test_same_seed_same_dataset_and_prefixes_do_not_depend_on_n():
    a = [(np.asarray(im), lb) for im, lb in samples(12, seed=3)]
    b = [(np.asarray(im), lb) for im, lb in samples(5, seed=3)]
    for (ia, la), (ib, lb) in zip(a[:5], b, strict=True):
        assert np.array_equal(ia, ib) and la == lb
    other = [lb for _, lb in samples(12, seed=4)]
    assert other != [lb for _, lb in a]


def test_samples_are_varied_and_labels_consistent():
    labels = [lb for _, lb in samples(400, seed=0)]
    assert set(Counter(lb.shape for lb in labels)) == set(SHAPES)
    assert set(Counter(lb.colour for lb in labels)) == set(COLOURS)
    assert set(Counter(lb.background for lb in labels)) == set(BACKGROUNDS)
    assert set(Counter(lb.template for lb in labels)) == set(range(len(TEMPLATES)))
    sizes = [lb.size / 64 for lb in labels]
    assert 0.35 <= min(sizes) < 0.4 and 0.6 < max(sizes) <= 0.65
    for lb in labels:
        assert lb.colour != lb.background
        x0, y0, x1, y1 = lb.bbox
        assert 0 < x0 < x1 < 64 and 0 < y0 < y1 < 64
        assert parse_caption(lb.prompt) == (lb.shape, lb.colour, lb.background)


def test_images_are_antialiased_at_the_asked_resolution():
    img, lb = next(samples(1, seed=1, resolution=96))
    assert img.size == (96, 96) and img.mode == "RGB"
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert {shapes.PALETTE[lb.colour], shapes.PALETTE[lb.background]} < colours  # plus edge blends
    assert len(colours) > 3


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_every_template_parses_back(template):
    for shape in (*SHAPES, CONCEPT):
        for colour in (*COLOURS, PINK):
            text = caption(shape, colour, "grey", template)
            assert parse_caption(text) == (shape, colour, "grey"), text
    assert caption("circle", "orange", "white") == "an orange circle on a white background"
    assert parse_caption("A Red Circle on a GRAY background") == ("circle", "red", "grey")


@pytest.mark.parametrize("text", ["a red blob on white", "red circle", "a red circle and a blue square", ""])
def test_unparseable_captions_raise(text):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(text)


def test_the_concepts_are_held_out_unless_asked_for():
    base = list(samples(300, seed=0))
    assert PINK not in {lb.colour for _, lb in base} and CONCEPT not in {lb.shape for _, lb in base}
    mixed = Counter(lb.colour for _, lb in samples(300, seed=0, concept=PINK))
    assert mixed[PINK] > 20 and len(mixed) == len(COLOURS) + 1
    only = Counter(lb.colour for _, lb in samples(50, seed=0, concept=PINK, only_concept=True))
    assert only == {PINK: 50}
    shapes_mixed = Counter(lb.shape for _, lb in samples(300, seed=0, concept=CONCEPT))
    assert shapes_mixed[CONCEPT] > 20 and len(shapes_mixed) == len(SHAPES) + 1
    only_shape = Counter(lb.shape for _, lb in samples(50, seed=0, concept=CONCEPT, only_concept=True))
    assert only_shape == {CONCEPT: 50}
    with pytest.raises(ValueError, match="only_concept needs a concept"):
        next(samples(1, seed=0, only_concept=True))
    with pytest.raises(ValueError, match="known"):
        next(samples(1, seed=0, concept="heart"))


def test_eval_prompts_are_fixed_and_balanced():
    base = eval_prompts("base")
    assert len(base) == len(set(base)) == 24 and base == eval_prompts()
    parsed = [parse_caption(p) for p in base]
    assert all(caption(*parse_caption(p)) == p for p in base)  # the canonical form
    assert Counter(s for s, _, _ in parsed) == dict.fromkeys(SHAPES, 6)
    assert Counter(c for _, c, _ in parsed) == dict.fromkeys(COLOURS, 4)
    assert Counter(b for _, _, b in parsed) == dict.fromkeys(BACKGROUNDS, 8)
    for colour in COLOURS:  # every colour meets every background
        assert {b for _, c, b in parsed if c == colour} == set(BACKGROUNDS)
    concept = eval_prompts("concept")
    assert len(concept) == 12 and {parse_caption(p)[0] for p in concept} == {CONCEPT}
    assert {parse_caption(p)[1] for p in concept} == set(COLOURS)
    pink = eval_prompts("pink")
    assert len(pink) == 12 and {parse_caption(p)[1] for p in pink} == {PINK}
    with pytest.raises(ValueError, match="prompt set"):
        eval_prompts("all")


def _check_layout(files: dict[str, bytes], n: int, resolution: int) -> None:
    rows = list(csv.DictReader(io.StringIO(files["metadata.csv"].decode())))
    assert files["metadata.csv"].decode().splitlines()[0] == "image,prompt"
    assert [r["image"] for r in rows] == [f"images/{i:05d}.png" for i in range(n)]
    labels = [json.loads(line) for line in files["labels.jsonl"].decode().splitlines()]
    assert [(lb["image"], lb["prompt"]) for lb in labels] == [(r["image"], r["prompt"]) for r in rows]
    assert set(labels[0]) == {"image", "prompt", "shape", "colour", "background", "bbox", "size", "template"}
    for r in rows:
        assert Image.open(io.BytesIO(files[r["image"]])).size == (resolution, resolution)
    info = json.loads(files["dataset.json"])
    assert (info["n"], info["resolution"]) == (n, resolution)


def test_write_dataset_to_a_folder_in_the_trainers_layout(tmp_path: Path, capsys):
    out = tmp_path / "ds"
    assert main(["--out", str(out), "--n", "6", "--seed", "2", "--resolution", "48"]) == 0
    assert "6 images" in capsys.readouterr().out
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not [name for name in files if name.endswith(".tmp")]
    _check_layout(files, 6, 48)
    # the trainer reads it as it is
    from trainer.data import read_metadata
    from trainer.storage import open_storage

    rows = read_metadata(open_storage(str(out)), "image", "prompt")
    assert [r.image for r in rows] == [f"images/{i:05d}.png" for i in range(6)]


def test_lora_dataset_holds_only_the_concept(tmp_path: Path):
    labels = write_dataset(tmp_path / "pink", n=8, seed=0, concept=PINK, only_concept=True)
    assert {lb.colour for lb in labels} == {PINK}
    info = json.loads((tmp_path / "pink" / "dataset.json").read_text())
    assert info["colours"] == [PINK] and info["only_concept"] is True
    labels = write_dataset(tmp_path / "diamond", n=8, seed=0, concept=CONCEPT, only_concept=True)
    assert {lb.shape for lb in labels} == {CONCEPT}
    info = json.loads((tmp_path / "diamond" / "dataset.json").read_text())
    assert info["shapes"] == [CONCEPT] and info["colours"] == list(COLOURS)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--only-concept"], "--only-concept needs --concept"),
        (["--concept", "heart"], "invalid choice: 'heart'"),
        (["--n", "0"], "--n 0 must be >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--n", "2", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_write_dataset_to_s3(s3_env: dict[str, str]):
    bucket = s3_env["DIFFMESH_S3_BUCKET"]
    labels = write_dataset(f"s3://{bucket}/data/shapes/", n=4, seed=5, env=s3_env)
    client = Minio(
        s3_env["DIFFMESH_S3_ENDPOINT"],
        access_key=s3_env["DIFFMESH_S3_ACCESS_KEY"],
        secret_key=s3_env["DIFFMESH_S3_SECRET_KEY"],
        secure=False,
    )
    files = {}
    for obj in client.list_objects(bucket, "data/shapes/", recursive=True):
        resp = client.get_object(bucket, obj.object_name)
        files[obj.object_name.removeprefix("data/shapes/")] = resp.read()
        resp.close()
        resp.release_conn()
    assert len(files) == 4 + 3
    _check_layout(files, 4, 64)
    assert [json.loads(line)["prompt"] for line in files["labels.jsonl"].decode().splitlines()] == [
        lb.prompt for lb in labels
    ]
