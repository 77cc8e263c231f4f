"""FLUX.1 autoencoder: the SD-style AutoencoderKL (16 latent channels, 8x spatial for FLUX).

Architecture and parameter names follow black-forest-labs/flux `src/flux/modules/autoencoder.py`, so a
BFL `ae.safetensors` loads with `load_state_dict` and no renaming (`encoder.down.N.block.M.norm1`,
`encoder.mid.attn_1.q` as 1x1 convs, `decoder.up.N` indexed by resolution level, i.e. `decoder.up.0` is
the full-resolution level that runs LAST). Optional `quant_conv` / `post_quant_conv` (present in SD 1.5 /
SDXL VAEs, absent in FLUX) are switched on by params flags.

Latent convention: `encode` returns normalised latents `(mean - shift) * scale` (what the denoiser sees),
`decode` takes normalised latents; `encode_raw` / `decode_raw` skip the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp diffusers' DiagonalGaussianDistribution applies


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int  # informational only (BFL keeps it; the forward never uses it)
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    norm_groups: int = 32
    use_quant_conv: bool = False  # 1x1 conv on the (B, 2z, h, w) moments after the encoder (SD VAEs)
    use_post_quant_conv: bool = False  # 1x1 conv on the (B, z, h, w) latent before the decoder (SD VAEs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError(f"ch_mult must not be empty, got {self.ch_mult!r}")
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"channel widths {widths} must be divisible by norm_groups={self.norm_groups}")
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")

    @property
    def downscale(self) -> int:
        """Spatial factor between image and latent (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


FLUX_AE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
SD15_VAE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=4,
    scale_factor=0.18215,
    shift_factor=0.0,
    use_quant_conv=True,
    use_post_quant_conv=True,
)
SDXL_VAE = AutoEncoderParams(
    resolution=1024,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=4,
    scale_factor=0.13025,
    shift_factor=0.0,
    use_quant_conv=True,
    use_post_quant_conv=True,
)
PRESETS: dict[str, AutoEncoderParams] = {"FLUX_AE": FLUX_AE, "SD15_VAE": SD15_VAE, "SDXL_VAE": SDXL_VAE}


def preset(name: str) -> AutoEncoderParams:
    if name not in PRESETS:
        raise KeyError(f"unknown autoencoder preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, q/k/v/proj_out as 1x1 convs (BFL names)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C)
        q, k, v = (t(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) zero padding, as in LDM / BFL."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (resnets), empty `attn` (kept for name parity), optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        g = p.norm_groups
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i_level, mult in enumerate(p.ch_mult):
            block_out = p.ch * mult
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            last = i_level == len(p.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = MidBlock(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        g = p.norm_groups
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[Level] = []
        for i_level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[i_level]
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            levels.insert(0, Level(blocks, None if i_level == 0 else Upsample(block_in), "upsample"))
        self.up = nn.ModuleList(levels)  # up[0] is full resolution (runs last), as in BFL
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        z2 = 2 * params.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, kernel_size=1) if params.use_quant_conv else None
        zc = params.z_channels
        self.post_quant_conv = nn.Conv2d(zc, zc, kernel_size=1) if params.use_post_quant_conv else None

    # -- normalisation -------------------------------------------------------------------------------
    def normalize(self, z_raw: Tensor) -> Tensor:
        return (z_raw - self.params.shift_factor) * self.params.scale_factor

    def denormalize(self, z: Tensor) -> Tensor:
        return z / self.params.scale_factor + self.params.shift_factor

    # -- encode --------------------------------------------------------------------------------------
    def _check_image(self, x: Tensor) -> None:
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected an image (B, {p.in_channels}, H, W), got shape {tuple(x.shape)}")
        f = p.downscale
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")

    def encode_moments(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image in [-1, 1] -> (B, 2z, H/f, W/f) moments: mean and logvar, concatenated."""
        self._check_image(x)
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    @staticmethod
    def moments_to_raw(
        moments: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean (sample=False) or a draw mean + std * eps (eps float32 from `generator`, like diffusers)."""
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        if generator is None:
            eps = torch.randn(mean.shape, dtype=torch.float32, device=mean.device)
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=generator.device)
        return mean + std * eps.to(device=mean.device, dtype=mean.dtype)

    def encode_raw(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) -> un-normalised latent (B, z, H/f, W/f)."""
        return self.moments_to_raw(self.encode_moments(x), sample=sample, generator=generator)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> normalised latent (mean - shift) * scale, (B, z, H/f, W/f)."""
        return self.normalize(self.encode_raw(x, sample=sample, generator=generator))

    # -- decode --------------------------------------------------------------------------------------
    def decode_raw(self, z_raw: Tensor) -> Tensor:
        """Un-normalised latent (B, z, h, w) -> image (B, out_ch, h*f, w*f)."""
        if z_raw.ndim != 4 or z_raw.shape[1] != self.params.z_channels:
            raise ValueError(
                f"expected a latent (B, {self.params.z_channels}, h, w), got shape {tuple(z_raw.shape)}"
            )
        if self.post_quant_conv is not None:
            z_raw = self.post_quant_conv(z_raw)
        return self.decoder(z_raw)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent (B, z, h, w) -> image (B, out_ch, h*f, w*f), nominally in [-1, 1]."""
        return self.decode_raw(self.denormalize(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
