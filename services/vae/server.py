"""VAE service: pixels <-> normalised latents, tiled for large images."""

from __future__ import annotations

import io
import time

import grpc
import torch
from PIL import Image

from protos import vae_pb2, vae_pb2_grpc
from services.common import validate
from services.common.errors import InvalidArgument
from services.common.runtime import StageRuntime
from services.common.server import Binding, request_id
from services.common.settings import Settings
from services.common.store import TensorStore
from services.vae.registry import VAES
from services.vae.video import DEFAULT_FPS, check_frames, decode_mp4, encode_mp4, resize_video

MODEL_FOLDERS = ("vae",)
MAX_INPUTS = 16
MAX_SIDE = 8192
MAX_PIXELS = 1 << 28  # per request, every image and frame counted (81 frames of 1280x720 are 2**26.2)
SERVICE = vae_pb2.DESCRIPTOR.services_by_name["Vae"].full_name


def image_to_tensor(data: bytes, width: int, height: int, field: str) -> torch.Tensor:
    """Encoded image -> (3, H, W) float32 in [-1, 1], resized (Lanczos, as diffusers' VaeImageProcessor) when a size is given."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.width * img.height > MAX_SIDE * MAX_SIDE:  # before the pixels are decoded into memory
            raise InvalidArgument(
                f"{field}: a {img.width}x{img.height} image; at most {MAX_SIDE}x{MAX_SIDE} pixels"
            )
        img.load()
    except InvalidArgument:
        raise
    except Exception as e:
        raise InvalidArgument(f"{field}: not a readable image ({type(e).__name__}: {e})") from None
    img = img.convert("RGB")
    if width and height and img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)


def tensor_to_png(pixels: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> PNG, the diffusers convention: (x/2+0.5).clamp(0,1)*255, rounded."""
    rgb = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    img = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy(), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def check_pixels(pixels: torch.Tensor, field: str) -> torch.Tensor:
    """An image (3, H, W) or a video (3, F, H, W) with at least one frame and sides in [1, MAX_SIDE]."""
    if pixels.ndim not in (3, 4) or pixels.shape[0] != 3:
        raise InvalidArgument(
            f"{field}: expected an image (3, H, W) or a video (3, F, H, W), got {list(pixels.shape)}"
        )
    h, w = pixels.shape[-2:]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE) or pixels.shape[1] < 1:
        raise InvalidArgument(
            f"{field}: shape {list(pixels.shape)}; each side must be in [1, {MAX_SIDE}] "
            "(width and height resize an encoded image)"
        )
    return pixels


def check_budget(pixels: int, what: str) -> None:
    if pixels > MAX_PIXELS:
        raise InvalidArgument(f"{what}: {pixels} pixels in all; at most {MAX_PIXELS} per request")


def condition_video(images: list[torch.Tensor], positions: list[int], num_frames: int) -> torch.Tensor:
    """(1, 3, num_frames, H, W): zeros with image i at frame positions[i] (negative: from the end)."""
    check_frames(num_frames, "num_frames (with frame_positions)")
    if len(positions) != len(images):
        raise InvalidArgument(f"frame_positions has {len(positions)} entries for {len(images)} inputs")
    if any(t.ndim != 3 for t in images):
        raise InvalidArgument("frame_positions places images: every input must be one image, not a video")
    video = images[0].new_zeros(1, 3, num_frames, *images[0].shape[1:])
    seen = set()
    for i, (pos, img) in enumerate(zip(positions, images, strict=True)):
        frame = pos + num_frames if pos < 0 else pos
        if not 0 <= frame < num_frames or frame in seen:
            raise InvalidArgument(
                f"frame_positions[{i}]={pos}: outside [-{num_frames}, {num_frames}) or repeated"
            )
        seen.add(frame)
        video[0, :, frame] = img
    return video


class VaeServicer(vae_pb2_grpc.VaeServicer):
    def __init__(self, runtime: StageRuntime) -> None:
        self.rt = runtime

    def Encode(self, request: vae_pb2.VaeEncodeRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        validate.count("inputs", len(request.inputs), 1, MAX_INPUTS)
        for f in ("width", "height"):
            if getattr(request, f):
                validate.in_range(f, getattr(request, f), 16, MAX_SIDE)
        images = []
        for i, media in enumerate(request.inputs):
            kind = media.WhichOneof("source")
            if kind == "data" and (media.mime_type.startswith("video/") or media.data[4:8] == b"ftyp"):
                video, _ = decode_mp4(media.data, f"inputs[{i}]", request.num_frames)
                images.append(resize_video(video, request.width, request.height))
            elif kind == "data":
                images.append(image_to_tensor(media.data, request.width, request.height, f"inputs[{i}]"))
            elif kind == "tensor":
                images.append(self.rt.input(media.tensor, f"inputs[{i}].tensor"))
            else:
                raise InvalidArgument(
                    f"inputs[{i}]: give encoded bytes or a tensor (got {kind or 'nothing'})"
                )
            check_pixels(images[-1], f"inputs[{i}]")
            check_budget(sum(t.numel() // 3 for t in images), "inputs")
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) != 1:
            raise InvalidArgument(f"inputs have different shapes {sorted(shapes)}; give width and height")
        if request.frame_positions:
            check_budget(request.num_frames * images[0].shape[-2] * images[0].shape[-1], "num_frames x H x W")
            pixels = condition_video(images, list(request.frame_positions), request.num_frames)
        else:
            pixels = torch.stack(images)  # (B, 3, H, W) or (B, 3, F, H, W)
        vae = self.rt.load(request.model, MODEL_FOLDERS, VAES)
        generator = torch.Generator("cpu").manual_seed(request.seed) if request.sample else None
        with self.rt.active(vae):
            latents = vae.encode(pixels, sample=request.sample, generator=generator, tiling=request.tiling)
        return vae_pb2.VaeEncodeResponse(
            latents=self.rt.output(rid, request.name or "latents", latents), timing=self.rt.timing(started)
        )

    def Decode(self, request: vae_pb2.VaeDecodeRequest, context: grpc.ServicerContext):
        started = time.perf_counter()
        rid = request_id(context)
        validate.required("model", request.model)
        latents = self.rt.input(request.latents, "latents")
        if latents.ndim not in (4, 5):
            raise InvalidArgument(
                f"latents: expected (B, C, H, W) or (B, C, F, H, W), got {list(latents.shape)}"
            )
        vae = self.rt.load(request.model, MODEL_FOLDERS, VAES)
        factor = getattr(vae, "factor", 8)
        h, w = latents.shape[-2] * factor, latents.shape[-1] * factor
        if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
            raise InvalidArgument(
                f"latents: {list(latents.shape)} decode to {w}x{h} pixels; each side must be in [1, {MAX_SIDE}]"
            )
        frames = latents.shape[2] * getattr(vae, "temporal_factor", 1) if latents.ndim == 5 else 1
        check_budget(latents.shape[0] * frames * h * w, "latents")
        with self.rt.active(vae):
            pixels = vae.decode(latents, tiling=request.tiling)
        resp = vae_pb2.VaeDecodeResponse(pixels=self.rt.output(rid, "pixels", pixels, inline=False))
        fmt = request.output_format
        if pixels.ndim == 4 and fmt in (vae_pb2.OUTPUT_FORMAT_UNSPECIFIED, vae_pb2.OUTPUT_FORMAT_PNG):
            resp.images.extend(tensor_to_png(p) for p in pixels)
        elif pixels.ndim == 5 and fmt == vae_pb2.OUTPUT_FORMAT_PNG:  # every frame of every video, in order
            resp.images.extend(tensor_to_png(frame) for video in pixels for frame in video.unbind(1))
        elif pixels.ndim == 5 and fmt in (vae_pb2.OUTPUT_FORMAT_UNSPECIFIED, vae_pb2.OUTPUT_FORMAT_MP4):
            if pixels.shape[0] != 1:
                raise InvalidArgument(f"MP4 output holds one video; the latents hold {pixels.shape[0]}")
            resp.video = encode_mp4(pixels[0], request.fps or DEFAULT_FPS)
        resp.timing.CopyFrom(self.rt.timing(started))
        return resp


def binding(settings: Settings, store: TensorStore) -> Binding:
    servicer = VaeServicer(StageRuntime("vae", settings, store))
    return Binding(SERVICE, vae_pb2_grpc.add_VaeServicer_to_server, servicer)
