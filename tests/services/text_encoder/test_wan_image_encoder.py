"""Wan 2.1 I2V's CLIP vision encoder vs diffusers' WanImageToVideoPipeline.encode_image (transformers'
CLIPImageProcessor, here its PIL backend, + CLIPVisionModel's penultimate hidden states), from the same tiny
hub-layout directory, CPU fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tiny_text_encoders import tiny_clip_vision_model
from transformers import CLIPImageProcessorPil
from transformers.utils import logging as transformers_logging

from services.common.errors import InvalidArgument, NotFound
from services.common.models import Component, find_component
from services.text_encoder.encoders.clip_vision import (
    ClipImageConfig,
    ClipVisionEncoder,
    load_clip_vision,
    preprocess,
)
from services.text_encoder.registry import IMAGE_ENCODERS

TOL = 1e-5
# (image_size, patch_size) of the tiny tower; the processor resizes and crops to image_size
GEOMETRIES = {"56px": (56, 14), "224px": (224, 32)}


def image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random picture (bicubic resizing of noise alone says little) in `mode`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / (5 + 3 * c) + c) * np.cos(yy / (7 + c)) for c in range(4)], -1)
    pixels = np.clip(127.5 * (base + 1) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    rgba = Image.fromarray(pixels, "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


IMAGES = {
    "landscape": image(96, 64),
    "portrait": image(50, 91, seed=1),
    "square-small": image(40, 40, seed=2),  # upscaled
    "rgba": image(80, 72, "RGBA", seed=3),  # composited on white
    "grey": image(64, 100, "L", seed=4),
    "palette": image(70, 70, "P", seed=5),
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`image_encoder/` + `image_processor/` (+ model_index.json) written by WanImageToVideoPipeline itself."""
    size, patch = GEOMETRIES[request.param]
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        image_processor=processor,
        image_encoder=tiny_clip_vision_model(0, image_size=size, patch_size=patch),
    )
    path = tmp_path_factory.mktemp("wan_i2v") / "model"
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> WanImageToVideoPipeline:
    none = dict(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=None, transformer_2=None
    )
    return WanImageToVideoPipeline.from_pretrained(model_dir, **none)


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> ClipVisionEncoder:
    component = find_component(model_dir, ["image_encoder"])
    assert component.class_name == "CLIPVisionModel"
    return IMAGE_ENCODERS[component.class_name](component, torch.device("cpu"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(IMAGES))
def test_one_image_equals_wan_i2v_pipeline(
    encoder: ClipVisionEncoder, pipe: WanImageToVideoPipeline, name: str
) -> None:
    img = IMAGES[name]
    pixels = pipe.image_processor(images=img, return_tensors="pt").pixel_values
    assert torch.equal(preprocess([img], encoder.config), pixels)
    with torch.no_grad():
        ref = pipe.encode_image(img, device=torch.device("cpu"))
    got = encoder.encode_images([img])
    patches = (pipe.image_encoder.config.image_size // pipe.image_encoder.config.patch_size) ** 2
    assert got.shape == (1, 1 + patches, 32)
    assert max_diff(got, ref) <= TOL
    with torch.no_grad():  # the penultimate layer, not the last one
        last = pipe.image_encoder(pixel_values=pixels).last_hidden_state
    assert max_diff(got, last) > 1e-3


def test_first_and_last_frame_equal_flf2v(encoder: ClipVisionEncoder, pipe: WanImageToVideoPipeline) -> None:
    first, last = IMAGES["landscape"], IMAGES["rgba"]
    with torch.no_grad():
        ref = pipe.encode_image([first, last], device=torch.device("cpu"))  # as FLF2V calls it
    got = encoder.encode_images([first, last])
    assert got.shape[0] == 2 and max_diff(got, ref) <= TOL
    assert max_diff(got[1:], encoder.encode_images([last])) <= TOL  # rows are independent, in order


def test_checkpoint_dtype_is_kept(model_dir: Path, tmp_path: Path) -> None:
    for folder in ("image_encoder", "image_processor"):
        shutil.copytree(model_dir / folder, tmp_path / folder)
    component = find_component(tmp_path, ["image_encoder"])
    enc = load_clip_vision(component, torch.device("cpu"))
    enc.model.to(torch.bfloat16)
    assert not enc.model.training and enc.encode_images([IMAGES["grey"]]).dtype == torch.bfloat16


def test_bad_inputs(encoder: ClipVisionEncoder, model_dir: Path, tmp_path: Path) -> None:
    for images, words in (
        ([], ["1 to 16", "got 0"]),
        ([IMAGES["grey"]] * 17, ["got 17"]),
        ([IMAGES["grey"], "cat.png"], ["images[1]", "str"]),
    ):
        with pytest.raises(InvalidArgument) as info:
            encoder.encode_images(images)
        assert all(w in str(info.value) for w in words), str(info.value)
    shutil.copytree(model_dir / "image_encoder", tmp_path / "image_encoder")
    with pytest.raises(NotFound) as info:
        load_clip_vision(Component(tmp_path / "image_encoder", "CLIPVisionModel", {}), torch.device("cpu"))
    assert "image_processor/preprocessor_config.json" in str(info.value)


def test_processor_config_forms(model_dir: Path) -> None:
    saved = json.loads((model_dir / "image_processor" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor"
    config = ClipImageConfig.from_dict(saved)
    edge = saved["size"]["shortest_edge"]
    legacy = {**saved, "size": edge, "crop_size": edge}  # older configs give plain ints
    assert ClipImageConfig.from_dict(legacy) == config
    assert config.resized_hw(64, 96) == (edge, int(edge * 96 / 64))
    with pytest.raises(InvalidArgument, match="do_pad"):
        ClipImageConfig.from_dict({**saved, "do_pad": True})
    with pytest.raises(InvalidArgument, match="longest_edge"):
        ClipImageConfig.from_dict({**saved, "size": {"shortest_edge": 224, "longest_edge": 448}})
    with pytest.raises(InvalidArgument, match="SiglipImageProcessor"):
        ClipImageConfig.from_dict({**saved, "image_processor_type": "SiglipImageProcessor"})
