"""Wan video VAEs: causal 3D autoencoders, Wan 2.1 (z 16, 4x time, 8x space) and Wan 2.2 (z 48, 4x time, 16x
space: a 2x2 pixel patchify, then residual levels whose shortcut averages / duplicates pixels across the resample).

Parameter names follow the official repositories (Wan-Video/Wan2.1 `wan/modules/vae.py`, Wan-Video/Wan2.2
`wan/modules/vae2_2.py`), so `Wan2.1_VAE.pth` converted to safetensors and ComfyUI's `wan_2.1_vae.safetensors` /
`wan2.2_vae.safetensors` load with no renaming: `encoder.conv1`, `encoder.downsamples.N` (2.1: a flat list of
residual blocks and resamplers; 2.2: one `Down_ResidualBlock` per level holding `.downsamples.M`), `encoder.middle.{0,1,2}`,
`encoder.head.{0,2}`, `conv1` (moments 1x1x1), `conv2` (latent 1x1x1), `decoder.conv1`, `decoder.middle`,
`decoder.upsamples.N` (likewise flat in 2.1, per level in 2.2), `decoder.head`. A residual block is
`residual.{0: norm, 2: conv, 3: norm, 6: conv}` + `shortcut`; a resampler is `resample.1` (the 2-D conv) + `time_conv`.

Time is causal: every 3x3x3 conv pads two frames in front, none behind, so frame t depends on frames <= t only.
That lets a pass run in chunks of frames (the reference decodes one latent frame at a time, and encodes 1 then 4
pixel frames at a time) with a `Stream` carrying each conv's last input frames over to the next chunk. The first
frame is special: the temporal downsampler keeps it as it is and the temporal upsampler does not double it, so
1 + 4k pixel frames <-> 1 + k latent frames. One chunk holding every frame gives the same result (to float rounding)
as any chunking: `chunked=False` in `encode_moments` / `decode_raw`.

Latent convention: `encode` returns normalised latents (z - latents_mean) * (1 / latents_std) per channel (what the
Wan denoiser sees, as diffusers' Wan pipelines compute it), `decode` takes normalised latents and returns pixels
clamped to [-1, 1]; `encode_raw` / `decode_raw` skip the normalisation (and the clamp).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp diffusers' DiagonalGaussianDistribution applies

# fmt: off
WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# fmt: on


@dataclass(frozen=True)
class WanVAEParams:
    dim: int  # encoder base width (96 in 2.1, 160 in 2.2)
    dec_dim: int  # decoder base width (96 in 2.1, 256 in 2.2)
    z_dim: int  # latent channels (16 / 48)
    latents_mean: tuple[float, ...]  # (z_dim,) per-channel normalisation
    latents_std: tuple[float, ...]  # (z_dim,)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels hold one more
    # per encoder resampler: also halve time? (reversed in the decoder: double time)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    residual: bool = False  # Wan 2.2 levels (Down_/Up_ResidualBlock with avg / dup shortcuts)
    patch_size: int = 1  # 2 in Wan 2.2: (3, 2H, 2W) pixels <-> (12, H, W) before the encoder
    in_channels: int = 3  # pixel channels (before patchify)
    out_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("dim_mult", "latents_mean", "latents_std", "temporal_downsample"):
            cast = {"dim_mult": int, "temporal_downsample": bool}.get(name, float)
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        sizes = ("dim", "dec_dim", "z_dim", "num_res_blocks", "patch_size", "in_channels", "out_channels")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult must be non-empty positive integers, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per resample ({len(self.dim_mult) - 1}), "
                f"got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean / latents_std need z_dim={self.z_dim} values, "
                f"got {len(self.latents_mean)} / {len(self.latents_std)}"
            )
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got min {min(self.latents_std)}")
        if not self.residual:
            odd = [self.dec_dim * m for m in self.dim_mult[1:] if (self.dec_dim * m) % 2]
            if odd:
                raise ValueError(f"Wan 2.1 upsamplers halve channels: decoder widths {odd} are odd")
            return
        for i, (cin, cout) in enumerate(self.level_widths(self.dim, encoder=True)):
            down = i < len(self.dim_mult) - 1
            factor = (2 if down and self.temporal_downsample[i] else 1) * (4 if down else 1)
            if cin * factor % cout:
                raise ValueError(f"encoder level {i}: {cin} channels x {factor} is not a multiple of {cout}")
        for i, (cin, cout) in enumerate(self.level_widths(self.dec_dim, encoder=False)):
            if i < len(self.dim_mult) - 1:
                factor = (2 if self.temporal_downsample[::-1][i] else 1) * 4
                if cout * factor % cin:
                    raise ValueError(
                        f"decoder level {i}: {cout} channels x {factor} is not a multiple of {cin}"
                    )

    def level_widths(self, base: int, encoder: bool) -> list[tuple[int, int]]:
        """(in, out) widths of each level, before the 2.1 decoder's halving."""
        mults = (1, *self.dim_mult) if encoder else (self.dim_mult[-1], *self.dim_mult[::-1])
        dims = [base * m for m in mults]
        return list(itertools.pairwise(dims))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for Wan 2.1, 16 for Wan 2.2)."""
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4)."""
        return 2 ** sum(self.temporal_downsample)


WAN21_VAE = WanVAEParams(dim=96, dec_dim=96, z_dim=16, latents_mean=WAN21_MEAN, latents_std=WAN21_STD)
WAN22_VAE = WanVAEParams(
    dim=160,
    dec_dim=256,
    z_dim=48,
    latents_mean=WAN22_MEAN,
    latents_std=WAN22_STD,
    residual=True,
    patch_size=2,
)
PRESETS: dict[str, WanVAEParams] = {"WAN21_VAE": WAN21_VAE, "WAN22_VAE": WAN22_VAE}


def preset(name: str) -> WanVAEParams:
    if name not in PRESETS:
        raise KeyError(f"unknown Wan VAE preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


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


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1)])


def _run(x: Tensor, stream: Stream, *stages: nn.ModuleList) -> Tensor:
    for stage in stages:
        for block in stage:
            x = block(x) if isinstance(block, nn.SiLU | RMSNorm) else block(x, stream)
    return x


class Encoder3d(nn.Module):
    def __init__(self, p: WanVAEParams) -> None:
        super().__init__()
        levels = p.level_widths(p.dim, encoder=True)
        self.conv1 = CausalConv3d(p.in_channels * p.patch_size**2, p.dim, 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(levels):
            down = i < len(levels) - 1
            temporal = down and p.temporal_downsample[i]
            if p.residual:
                blocks.append(DownLevel(cin, cout, p.num_res_blocks, temporal, down))
                continue
            for _ in range(p.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if down:
                blocks.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        width = levels[-1][1]
        self.middle = _middle(width)
        self.head = _head(width, 2 * p.z_dim)

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        """(B, C*p*p, T, H/p, W/p) -> moments (B, 2z, T', H/f, W/f) for one chunk of frames."""
        return _run(self.conv1(x, stream), stream, self.downsamples, self.middle, self.head)


class Decoder3d(nn.Module):
    def __init__(self, p: WanVAEParams) -> None:
        super().__init__()
        levels = p.level_widths(p.dec_dim, encoder=False)
        temporal_up = p.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(p.z_dim, levels[0][0], 3, padding=1)
        self.middle = _middle(levels[0][0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(levels):
            up = i < len(levels) - 1
            temporal = up and temporal_up[i]
            if p.residual:
                blocks.append(UpLevel(cin, cout, p.num_res_blocks + 1, temporal, up))
                continue
            if i > 0:
                cin //= 2  # the previous 2.1 upsampler's conv halved the channels
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if up:
                blocks.append(Resample(cout, "upsample3d" if temporal else "upsample2d", out_dim=cout // 2))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(levels[-1][1], p.out_channels * p.patch_size**2)

    def forward(self, z: Tensor, stream: Stream) -> Tensor:
        """(B, z, t, h, w) -> (B, C*p*p, T', H/p, W/p) for one chunk of latent frames."""
        return _run(self.conv1(z, stream), stream, self.middle, self.upsamples, self.head)


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


class WanVAE(nn.Module):
    def __init__(self, params: WanVAEParams) -> None:
        super().__init__()
        self.params = params
        z2 = 2 * params.z_dim
        self.encoder = Encoder3d(params)
        self.conv1 = CausalConv3d(z2, z2, 1)  # on the moments
        self.decoder = Decoder3d(params)
        self.conv2 = CausalConv3d(params.z_dim, params.z_dim, 1)  # on the latent

    # -- normalisation ------------------------------------------------------------------------------------------
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(1, z, 1, 1, 1) mean and 1/std, built as diffusers' Wan pipelines build them (float32, then cast)."""
        shape = (1, self.params.z_dim, 1, 1, 1)
        mean = torch.tensor(self.params.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = (1.0 / torch.tensor(self.params.latents_std)).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def normalize(self, z_raw: Tensor) -> Tensor:
        mean, inv_std = self._stats(z_raw)
        return (z_raw - mean) * inv_std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    # -- encode ---------------------------------------------------------------------------------------------------
    def check_video(self, x: Tensor) -> None:
        p = self.params
        if x.ndim != 5 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected a video (B, {p.in_channels}, F, H, W), got shape {tuple(x.shape)}")
        if (x.shape[2] - 1) % p.temporal_factor:
            raise ValueError(f"frame count must be {p.temporal_factor}k+1, got {x.shape[2]}")
        f = p.spatial_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")

    def encode_moments(self, x: Tensor, chunked: bool = True) -> Tensor:
        """(B, C, 1+4k, H, W) in [-1, 1] -> (B, 2z, 1+k, H/f, W/f): mean and logvar, concatenated.

        chunked: the first frame, then `temporal_factor` frames at a time, as the reference; else all at once.
        """
        self.check_video(x)
        x = patchify(x, self.params.patch_size)
        step = self.params.temporal_factor
        rest = x[:, :, 1:].split(step, dim=2) if x.shape[2] > 1 else ()
        chunks = [x[:, :, :1], *rest] if chunked else [x]
        stream = Stream(remember=chunked)
        out = []
        for chunk in chunks:
            out.append(self.encoder(chunk, stream))
            stream.first = False
        return self.conv1(torch.cat(out, dim=2))

    @staticmethod
    def moments_to_raw(
        moments: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean (sample=False) or a draw mean + std * eps (eps float32 from `generator`, like diffusers)."""
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        device = mean.device if generator is None else generator.device
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=device)
        return mean + std * eps.to(device=mean.device, dtype=mean.dtype)

    def encode_raw(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None, chunked: bool = True
    ) -> Tensor:
        return self.moments_to_raw(self.encode_moments(x, chunked), sample=sample, generator=generator)

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None, chunked: bool = True
    ) -> Tensor:
        """(B, C, 1+4k, H, W) in [-1, 1] -> normalised latents (B, z, 1+k, H/f, W/f)."""
        return self.normalize(self.encode_raw(x, sample=sample, generator=generator, chunked=chunked))

    # -- decode ---------------------------------------------------------------------------------------------------
    def decode_raw(self, z_raw: Tensor, chunked: bool = True) -> Tensor:
        """Un-normalised latents (B, z, t, h, w) -> pixels (B, C, 1+4(t-1), h*f, w*f), not clamped.

        chunked: one latent frame at a time (activations of one frame alive at once), else all frames in one pass.
        """
        p = self.params
        if z_raw.ndim != 5 or z_raw.shape[1] != p.z_dim:
            raise ValueError(f"expected latents (B, {p.z_dim}, t, h, w), got shape {tuple(z_raw.shape)}")
        x = self.conv2(z_raw)
        stream = Stream(remember=chunked)
        if not chunked:
            return unpatchify(self.decoder(x, stream), p.patch_size)
        out: Tensor | None = None
        at = 0
        for chunk in x.split(1, dim=2):
            frames = self.decoder(chunk, stream)  # (B, C*p*p, 1 or temporal_factor, H/p, W/p)
            stream.first = False
            if out is None:  # written in place: no list of chunks plus a concatenated copy
                total = 1 + p.temporal_factor * (x.shape[2] - 1)
                out = frames.new_empty(*frames.shape[:2], total, *frames.shape[3:])
            out[:, :, at : at + frames.shape[2]] = frames
            at += frames.shape[2]
        if out is None or at != out.shape[2]:
            raise ValueError(f"decoded {at} frames from {x.shape[2]} latent frames")
        return unpatchify(out, p.patch_size)

    def decode(self, z: Tensor, chunked: bool = True) -> Tensor:
        """Normalised latents (B, z, t, h, w) -> pixels (B, C, 1+4(t-1), h*f, w*f) clamped to [-1, 1]."""
        return self.decode_raw(self.denormalize(z), chunked=chunked).clamp(-1.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
