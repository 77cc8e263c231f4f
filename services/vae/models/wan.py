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
from torch import Tensor, nn

from services.vae.models.wan_layers import (
    CausalConv3d,
    DownLevel,
    Resample,
    ResidualBlock,
    Stream,
    UpLevel,
    head_blocks,
    middle_blocks,
    patchify,
    run_blocks,
    unpatchify,
)

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
        self.middle = middle_blocks(width)
        self.head = head_blocks(width, 2 * p.z_dim)

    def forward(self, x: Tensor, stream: Stream) -> Tensor:
        """(B, C*p*p, T, H/p, W/p) -> moments (B, 2z, T', H/f, W/f) for one chunk of frames."""
        return run_blocks(self.conv1(x, stream), stream, self.downsamples, self.middle, self.head)


class Decoder3d(nn.Module):
    def __init__(self, p: WanVAEParams) -> None:
        super().__init__()
        levels = p.level_widths(p.dec_dim, encoder=False)
        temporal_up = p.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(p.z_dim, levels[0][0], 3, padding=1)
        self.middle = middle_blocks(levels[0][0])
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
        self.head = head_blocks(levels[-1][1], p.out_channels * p.patch_size**2)

    def forward(self, z: Tensor, stream: Stream) -> Tensor:
        """(B, z, t, h, w) -> (B, C*p*p, T', H/p, W/p) for one chunk of latent frames."""
        return run_blocks(self.conv1(z, stream), stream, self.middle, self.upsamples, self.head)


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
