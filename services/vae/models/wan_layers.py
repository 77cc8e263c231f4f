"""Building blocks of the Wan video VAEs (`services.vae.models.wan`), with the module names of Wan-Video/Wan2.1
`wan/modules/vae.py` and Wan-Video/Wan2.2 `wan/modules/vae2_2.py`.

Videos are `(B, C, T, H, W)`. Every block that looks across frames is causal in time and takes a `Stream`, which
carries the input frames a module needs again from one chunk of frames to the next (see `Stream`), so a pass in
chunks equals one pass over every frame. `DownLevel` / `UpLevel` and their `AvgDown3D` / `DupUp3D` shortcuts are
Wan 2.2's residual levels; `patchify` / `unpatchify` are its 2x2 pixel patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Stream:
    """What a pass in chunks of frames carries from one chunk to the next.

    `memory` holds, per module, the input frames it needs again (the last two for a 3x3x3 causal conv, the last one
    for a temporal downsampler); `first` is true while the first chunk runs (its first frame is not resampled in
    time). With `remember=False` (one chunk holding every frame) nothing is kept.
    """

    def __init__(self, remember: bool = True) -> None:
        self.remember = remember
        self.first = True
        self.memory: dict[nn.Module, Tensor] = {}


def _frames_to_batch(x: Tensor) -> Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H, W)


def _batch_to_frames(x: Tensor, b: int) -> Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded 2*p_t frames in front and none behind (zeros in H and W as usual).

    In a `Stream`, the frames kept from the previous chunk replace (part of) the front zero padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        front = self.time_pad
        if stream is not None and front:
            past = stream.memory.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                front -= past.shape[2]
            if stream.remember:
                stream.memory[self] = x[:, :, -self.time_pad :].clone()
        return super().forward(F.pad(x, (*self.space_pad, front, 0)))


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (no mean subtraction, no eps beyond F.normalize's)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        normed = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; kept so the conv is `residual.6` as in the official names
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, stream) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across frames)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        b, c, _, h, w = x.shape
        y = self.norm(_frames_to_batch(x))  # (B*T, C, H, W)
        qkv = self.to_qkv(y).reshape(y.shape[0], 1, 3 * c, h * w).transpose(-1, -2)  # (B*T, 1, H*W, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # (B*T, 1, H*W, C) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(-1, c, h, w))  # (B*T, C, H, W)
        return x + _batch_to_frames(y, b)


class Upsample2x(nn.Module):
    """Nearest 2x in H and W, computed in float32 (the reference's bf16 fix)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """2x down / up in H and W (a 2-D conv per frame), optionally 2x in time (a causal conv over frames).

    upsample3d: every frame but the stream's very first becomes two, from a causal (3, 1, 1) conv with 2C outputs.
    downsample3d: the first frame is kept; then one frame out per two in, from a (3, 1, 1) conv of stride 2 over
    the frames including the previous chunk's last one.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _double_frames(self, x: Tensor, stream: Stream) -> Tensor:
        head = None
        if stream.first:
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, stream)  # (B, 2C, T, H, W): two frames per input frame
            x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return x if head is None else torch.cat([head, x], dim=2)

    def _halve_frames(self, x: Tensor, stream: Stream) -> Tensor:
        inp = x if stream.first else torch.cat([stream.memory[self], x], dim=2)
        if stream.remember:
            stream.memory[self] = x[:, :, -1:].clone()
        y = self.time_conv(inp) if inp.shape[2] >= 3 else inp[:, :, :0]  # windows at frames 0, 2, 4, ...
        return torch.cat([x[:, :, :1], y], dim=2) if stream.first else y

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, stream)
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), x.shape[0])
        if self.mode == "downsample3d":
            x = self._halve_frames(x, stream)
        return x


class AvgDown3D(nn.Module):
    """Wan 2.2 shortcut across a downsampler: fold (ft, 2, 2) blocks into channels, average groups of them."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.group = in_channels * factor_t * factor_s**2 // out_channels

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))  # whole time blocks, zeros in front
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, ft, fs_h, fs_w, T/ft, H/fs, W/fs)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2 shortcut across an upsampler: repeat channels, unfold them into (ft, 2, 2) blocks."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s**2 // in_channels

    def forward(self, x: Tensor, first: bool) -> Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T, ft, H, fs_h, W, fs_w)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first else x  # the stream's first frame is not doubled


class DownLevel(nn.Module):
    """Wan 2.2 encoder level (`Down_ResidualBlock`): residual blocks + resampler, plus an averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        skip = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, stream)
        return x + skip


class UpLevel(nn.Module):
    """Wan 2.2 decoder level (`Up_ResidualBlock`): residual blocks + resampler, plus a duplicating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        blocks: list[nn.Module] = []
        for _ in range(num_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        skip = None if self.avg_shortcut is None else self.avg_shortcut(x, first=stream.first)
        for block in self.upsamples:
            x = block(x, stream)
        return x if skip is None else x + skip


def middle_blocks(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def head_blocks(dim: int, out: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1)])


def run_blocks(x: Tensor, stream: Stream, *stages: nn.ModuleList) -> Tensor:
    for stage in stages:
        for block in stage:
            x = block(x) if isinstance(block, nn.SiLU | RMSNorm) else block(x, stream)
    return x


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, T, H*p, W*p) -> (B, C*p*p, T, H, W), channels ordered (c, p_w, p_h) as the reference."""
    if p == 1:
        return x
    b, c, t, hp, wp = x.shape
    x = x.reshape(b, c, t, hp // p, p, wp // p, p)  # (B, C, T, H, p_h, W, p_w)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, hp // p, wp // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """(B, C*p*p, T, H, W) -> (B, C, T, H*p, W*p), the inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)  # (B, C, p_w, p_h, T, H, W)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)
