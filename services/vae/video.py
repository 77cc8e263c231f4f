"""Video in and out of the VAE service: MP4 (H.264 through the ffmpeg binary of imageio-ffmpeg) and the frame
rules of video VAEs.

Pixels are `(3, F, H, W)` in [-1, 1], as the VAE decodes them; frames are quantised as images are
(`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded). MP4 is lossy (yuv420p, CRF 17 by default); PNG frames are the
lossless output.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)
MAX_VIDEO_BYTES = 1 << 30
MAX_VIDEO_PIXELS = 1 << 28  # decoded frames x height x width
DEFAULT_FPS = 16.0
CRF = 17


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise InvalidArgument(f"video pixels: expected (3, F, H, W), got {list(pixels.shape)}")
    rgb = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(1, 2, 3, 0).contiguous().numpy()


def encode_mp4(pixels: torch.Tensor, fps: float = DEFAULT_FPS, crf: int = CRF) -> bytes:
    """(3, F, H, W) in [-1, 1] -> MP4 bytes (H.264, yuv420p: width and height must be even)."""
    if not 0 < fps <= 240:
        raise InvalidArgument(f"fps={fps} is out of range (0, 240]")
    frames = to_uint8_frames(pixels)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise InvalidArgument(f"MP4 needs an even width and height, got {w}x{h}")
    try:
        return _write_mp4(frames, fps, crf)
    except OSError as e:  # ffmpeg exited early: seen once in CI (no stderr), not reproduced in 200 runs
        log.warning("ffmpeg failed (%s); encoding the video once more", e)
        return _write_mp4(frames, fps, crf)


def _write_mp4(frames: np.ndarray, fps: float, crf: int) -> bytes:
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    fd, name = tempfile.mkstemp(suffix=".mp4", prefix="diffmesh-")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            name,
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            output_params=["-crf", str(crf)],
            macro_block_size=1,
            ffmpeg_log_level="warning",
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return Path(name).read_bytes()
    finally:
        Path(name).unlink(missing_ok=True)


def decode_mp4(data: bytes, field: str, max_frames: int = 0) -> tuple[torch.Tensor, float]:
    """Encoded video bytes -> ((3, F, H, W) in [-1, 1], fps). `max_frames` > 0 keeps the first ones."""
    import imageio_ffmpeg

    if len(data) > MAX_VIDEO_BYTES:
        raise InvalidArgument(f"{field}: {len(data)} bytes of video; at most {MAX_VIDEO_BYTES}")
    fd, name = tempfile.mkstemp(suffix=".mp4", prefix="diffmesh-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            reader = imageio_ffmpeg.read_frames(name, pix_fmt="rgb24")  # parses ffmpeg's log for the size
            meta = next(reader)
            w, h = meta["size"]
            frames = []
            for raw in reader:
                frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3))
                if max_frames and len(frames) >= max_frames:
                    reader.close()
                    break
                if len(frames) * h * w > MAX_VIDEO_PIXELS:
                    reader.close()
                    raise InvalidArgument(
                        f"{field}: over {MAX_VIDEO_PIXELS} pixels of {w}x{h} frames; keep fewer with num_frames"
                    )
        except (RuntimeError, OSError, StopIteration, ValueError) as e:
            raise InvalidArgument(f"{field}: not a readable video ({type(e).__name__}: {e})") from None
    finally:
        Path(name).unlink(missing_ok=True)
    if not frames:
        raise InvalidArgument(f"{field}: the video has no frames")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return video, float(meta.get("fps") or DEFAULT_FPS)


def check_frames(num_frames: int, field: str = "num_frames", temporal: int = 4) -> None:
    """Causal video VAEs take 4k + 1 frames (the first frame alone, then groups of 4)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        lower = (num_frames - 1) // temporal * temporal + 1 if num_frames > 1 else 1
        raise InvalidArgument(
            f"{field}={num_frames}: a video needs {temporal}k+1 frames (e.g. {lower} or {lower + temporal})"
        )


def resize_video(video: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] resized frame by frame (Lanczos on the 8-bit frames, as diffusers' video
    processor) when a size is given and differs."""
    from PIL import Image

    if not (width and height) or tuple(video.shape[2:]) == (height, width):
        return video
    frames = []
    for frame in to_uint8_frames(video):
        img = Image.fromarray(frame, "RGB").resize((width, height), Image.Resampling.LANCZOS)
        frames.append(torch.from_numpy(np.asarray(img).copy()))
    return torch.stack(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
