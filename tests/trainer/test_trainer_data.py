"""The dataset: metadata in csv / jsonl / json, aspect-ratio buckets, resize + center crop, and a batch order that
is a pure function of (seed, epoch) and resumes from its position."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_dataset import make_dataset

from trainer.data import (
    BucketSampler,
    build_items,
    fetch_images,
    load_pixels,
    make_buckets,
    pick_bucket,
    read_metadata,
)
from trainer.spec import SpecError
from trainer.storage import LocalStorage


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
def test_metadata_formats_give_the_same_rows(tmp_path, kind):
    expected = make_dataset(tmp_path, n=4, metadata=kind)
    rows = read_metadata(LocalStorage(tmp_path), "image", "prompt")
    assert [(r.image, r.caption) for r in rows] == [(e["image"], e["prompt"]) for e in expected]


def test_metadata_problems_name_the_field(tmp_path):
    make_dataset(tmp_path, n=2)
    with pytest.raises(SpecError, match=r"dataset\.captionColumn: .*'caption'"):
        read_metadata(LocalStorage(tmp_path), "image", "caption")
    (tmp_path / "metadata.csv").write_text("image,prompt\n../../etc/passwd,x\n")
    rows = read_metadata(LocalStorage(tmp_path), "image", "prompt")
    with pytest.raises(SpecError, match="must be a path inside the dataset folder"):
        fetch_images(LocalStorage(tmp_path), rows, tmp_path / "dl")
    (tmp_path / "metadata.csv").unlink()
    with pytest.raises(SpecError, match=r"dataset.uri: .* holds none of"):
        read_metadata(LocalStorage(tmp_path), "image", "prompt")


def test_buckets_are_multiples_of_16_around_the_resolution():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (384, 688) in buckets and (688, 384) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.8 * 512 * 512 <= w * h <= 1.2 * 512 * 512 and max(w / h, h / w) <= 2.0
    assert pick_bucket(1000, 1000, buckets) == (512, 512)
    w, h = pick_bucket(1600, 900, buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.2


def test_images_cover_their_bucket_and_are_center_cropped(tmp_path):
    img = Image.new("RGB", (96, 48), (0, 0, 0))
    img.paste((255, 255, 255), (40, 0, 56, 48))  # a white band in the middle
    img.save(tmp_path / "x.png")
    pixels = load_pixels(tmp_path / "x.png", (32, 32))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 16].mean() > 0.9 and pixels[:, :, 0].mean() < -0.9  # the band stays centred


def test_items_get_buckets_with_or_without_bucketing(tmp_path):
    make_dataset(tmp_path, n=4, wide=1)
    storage = LocalStorage(tmp_path)
    rows = read_metadata(storage, "image", "prompt")
    paths = fetch_images(storage, rows, tmp_path / "dl")
    assert {it.size for it in build_items(storage, rows, paths, 64, True)} == {(64, 64), (96, 48)}
    assert {it.size for it in build_items(storage, rows, paths, 64, False)} == {(64, 64)}


def test_sampler_order_is_seeded_one_bucket_per_batch_and_resumable():
    sizes = [(64, 64)] * 5 + [(96, 48)] * 3
    a = BucketSampler(sizes, batch_size=2, repeats=2, seed=3)
    batches = [a.next() for _ in range(20)]
    for batch in batches:
        assert len({sizes[i] for i in batch}) == 1
    epoch = a.epoch_batches(0)
    assert sorted(i for b in epoch for i in b) == sorted(list(range(8)) * 2)  # every item `repeats` times
    assert batches != [BucketSampler(sizes, 2, 2, seed=4).next() for _ in range(20)]
    b = BucketSampler(sizes, 2, 2, seed=3)
    for _ in range(13):
        b.next()
    c = BucketSampler(sizes, 2, 2, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(7)] == batches[13:]
    with pytest.raises(ValueError, match="seed"):
        BucketSampler(sizes, 2, 2, seed=9).load_state_dict(b.state_dict())


def test_pixels_are_rgb_for_other_modes(tmp_path):
    Image.new("L", (20, 20), 255).save(tmp_path / "g.png")
    assert torch.allclose(load_pixels(tmp_path / "g.png", (16, 16)), torch.ones(3, 16, 16))
