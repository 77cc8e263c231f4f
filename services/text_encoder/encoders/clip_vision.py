"""CLIP vision encoder of Wan 2.1 I2V / FLF2V: images -> "image_embeds" (N, 1 + patches, D), the hidden states
of the penultimate layer, as diffusers' `WanImageToVideoPipeline.encode_image` computes them.

The preprocessing follows the model's `image_processor/preprocessor_config.json` (a CLIPImageProcessor) and
is done here with PIL and torch, step for step as transformers' PIL backend does it: RGB (alpha composited
on white), resize with PIL (shortest edge, bicubic), centre crop, `uint8 * rescale_factor` in float64 then
float32, `(x - mean) / std` in float32. (transformers' torchvision backend resizes with torch instead and
differs by up to a few 1e-2 in pixel space.)

FLF2V passes the first and last frame together: `encode_images([first, last])` -> (2, L, D); the pipeline
repeats that per batch item and Wan's transformer reads each consecutive pair as one (1, 2 L, D) sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.common.errors import InvalidArgument, NotFound
from services.common.models import Component, read_json
from services.text_encoder.encoders.base import from_pretrained

if TYPE_CHECKING:  # PIL and transformers are imported when a model loads, not with the service
    from PIL import Image
    from transformers import CLIPVisionModel

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "preprocessor_config.json"
MAX_IMAGES = 16
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIPImageProcessor's default


@dataclass(frozen=True)
class ClipImageConfig:
    """A CLIPImageProcessor config; defaults are transformers' CLIPImageProcessor defaults.

    Resize to `shortest_edge` (aspect kept) or to exactly `size` (height, width); crop to `crop_size`."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "preprocessor config") -> ClipImageConfig:
        """Parse `preprocessor_config.json`; settings this preprocessing cannot honour are InvalidArgument."""
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind not in ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"):
            raise InvalidArgument(f"{source}: image_processor_type {kind!r} is not a CLIPImageProcessor")
        if config.get("do_pad"):
            raise InvalidArgument(f"{source}: do_pad=true is not supported")
        size = config.get("size", {"shortest_edge": 224})
        size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
        crop = config.get("crop_size", {"height": 224, "width": 224})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
        if set(size) not in ({"shortest_edge"}, {"height", "width"}) or set(crop) != {"height", "width"}:
            raise InvalidArgument(
                f"{source}: size {size} / crop_size {crop} not supported (size: shortest_edge or "
                "height + width; crop_size: height + width)"
            )
        mean = config.get("image_mean", OPENAI_CLIP_MEAN)
        std = config.get("image_std", OPENAI_CLIP_STD)
        parsed = cls(
            do_convert_rgb=bool(config.get("do_convert_rgb", True)),
            do_resize=bool(config.get("do_resize", True)),
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            resample=int(config.get("resample", BICUBIC)),
            do_center_crop=bool(config.get("do_center_crop", True)),
            crop_size=(crop["height"], crop["width"]),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=tuple(float(m) for m in (mean if isinstance(mean, list | tuple) else [mean] * 3)),
            image_std=tuple(float(s) for s in (std if isinstance(std, list | tuple) else [std] * 3)),
        )
        if len(parsed.image_mean) != 3 or len(parsed.image_std) != 3:
            raise InvalidArgument(f"{source}: image_mean / image_std need 3 values, got {mean} / {std}")
        return parsed

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: the short side to `shortest_edge`, the long one scaled and
        truncated, as transformers' `get_resize_output_image_size(default_to_square=False)`."""
        if self.size is not None:
            return self.size
        edge = int(self.shortest_edge)  # type: ignore[arg-type]
        if width <= height:
            return int(edge * height / width), edge
        return edge, int(edge * width / height)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency is composited onto white first (transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(images: Sequence[Image.Image], config: ClipImageConfig) -> torch.Tensor:
    """pixel_values (N, 3, H, W) float32, as CLIPImageProcessor's PIL backend makes them."""
    out = []
    for i, image in enumerate(images):
        if config.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise InvalidArgument(f"images[{i}]: mode {image.mode} with do_convert_rgb=false; need RGB")
        if config.do_resize:
            height, width = config.resized_hw(image.height, image.width)
            image = image.resize((width, height), resample=config.resample)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
        if config.do_center_crop:
            (crop_h, crop_w), (h, w) = config.crop_size, pixels.shape[1:]
            if crop_h > h or crop_w > w:
                raise InvalidArgument(
                    f"images[{i}]: {w}x{h} after resizing is smaller than the crop {crop_w}x{crop_h}"
                )
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
            pixels = pixels[:, top : top + crop_h, left : left + crop_w]
        x = (pixels.double() * config.rescale_factor).float() if config.do_rescale else pixels.float()
        if config.do_normalize:
            mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        out.append(x)
    if len({tuple(x.shape) for x in out}) > 1:
        raise InvalidArgument(f"images give pixel arrays of different sizes {[tuple(x.shape) for x in out]}")
    return torch.stack(out)


class ClipVisionEncoder:
    """`encode_images(images)` -> "image_embeds" (N, 1 + patches, D): CLIP's penultimate hidden states."""

    kind = "clip_vision"
    outputs = ("image_embeds",)

    def __init__(self, model: CLIPVisionModel, config: ClipImageConfig, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.device = device

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, L, D) in the model's dtype, one row per image in the given order (FLF2V: [first, last])."""
        from PIL import Image

        if not isinstance(images, list | tuple) or not 1 <= len(images) <= MAX_IMAGES:
            got = len(images) if isinstance(images, list | tuple) else type(images).__name__
            raise InvalidArgument(f"images: need 1 to {MAX_IMAGES} images, got {got}")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InvalidArgument(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        pixel_values = preprocess(images, self.config)  # (N, 3, H, W)
        with torch.inference_mode():
            out = self.model(pixel_values=pixel_values.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2]


def load_processor_config(component: Path) -> ClipImageConfig:
    """`image_processor/preprocessor_config.json` beside `image_encoder/` (the hub layout), else the file in
    the component folder itself."""
    candidates = [component.parent / "image_processor" / PROCESSOR_FILE, component / PROCESSOR_FILE]
    for path in candidates:
        if path.is_file():
            return ClipImageConfig.from_dict(read_json(path), str(path))
    raise NotFound(f"no image processor for {component}: looked for {', '.join(str(c) for c in candidates)}")


def load_clip_vision(component: Component, device: torch.device) -> ClipVisionEncoder:
    """`image_encoder/` (CLIPVisionModel config.json + safetensors) with `image_processor/` beside it."""
    from transformers import CLIPVisionModel

    config = load_processor_config(Path(component.path))
    return ClipVisionEncoder(from_pretrained(CLIPVisionModel, component.path, device), config, device)
