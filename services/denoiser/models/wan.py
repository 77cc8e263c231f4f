"""Wan 2.1 / 2.2 DiT (the video denoiser transformer), modelled on Wan-Video/Wan2.1 `wan/modules/model.py`.

Module and parameter names are the official Wan ones (`patch_embedding`, `blocks.N.self_attn.q`,
`head.head`...): an official (or ComfyUI) checkpoint loads as it is, and `services.denoiser.convert.wan` maps
the diffusers layout onto it. Build on the meta device and load with `load_state_dict(sd, assign=True)`;
float32 and bf16 weights run in their own dtype (inputs are cast to it).

`WanDiT.forward(x, timestep, context, image_context=None) -> (B, out_dim, F, H, W)`, the velocity:
- `x (B, in_dim, F, H, W)`: the VAE latent. For I2V (in_dim 36) the caller has already concatenated the
  16-channel noisy latent with the 20-channel condition (4 mask + 16 image latent channels) on dim 1, as
  diffusers' and Wan's pipelines do. F, H, W must be multiples of the patch size (1, 2, 2).
- `timestep`: on the model's 0..1000 scale (sigma * 1000, the scheduler's timestep, NOT sigma), float or int;
  `(B,)` one per sample, or `(B, L)` one per token (Wan 2.2 TI2V, diffusers' `expand_timesteps`: L = F * H/2 *
  W/2 tokens in (f, h, w) row-major order, e.g. 0 for the clean first frame's tokens and t elsewhere). The
  sinusoid is float32.
- `context (B, Lt, text_dim)`: umT5 hidden states. Wan's pipelines pass Lt = 512, zero-padded after the
  prompt; any Lt works here (diffusers hard-codes 512 text tokens for I2V models; we take the image tokens
  separately).
- `image_context (B, Li, image_dim)`: penultimate CLIP ViT-H/14 features (Li = 257), exactly when
  `params.image_dim` is set (Wan 2.1 I2V / FLF2V). FLF2V: the first and the last frame's features concatenated
  on the token axis (Li = 2 * 257 = `params.image_pos_len`); diffusers takes these as (2B, 257, D) and views
  them as (B, 514, D), the same order.

Reduced precision: `model.to(torch.bfloat16)` runs everything in bf16 (the modulation, norms and residuals
still in float32). `model.cast_(torch.bfloat16)` keeps in float32 what diffusers keeps in float32 when it
loads bf16 / fp16 weights (`_keep_in_fp32_modules`: the time embedding MLP, every modulation table, the affine
cross-attention and image-embedding norms; `keeps_float32(key)` tells it for a state dict), as diffusers'
pipelines run.

RoPE is computed once per (F', H', W') token grid (and device) and cached on the module. q, k and v are
separate Linears as in the checkpoints: fusing them into one GEMM gained 0-7 % on this CPU and would bypass
the LoRA hooks the service puts on every Linear, so it is not done.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.denoiser.models.flux_layers import Linear, Rope
from services.denoiser.models.wan_layers import (
    AttentionBlock,
    Head,
    MLPProj,
    TimeEmbedding,
    grid_rope,
    sinusoidal_embedding,
)

ROPE_THETA = 10_000.0
ROPE_CACHE_SIZE = 8
# Parameters diffusers keeps in float32 under a bf16 / fp16 load (its `_keep_in_fp32_modules`, in Wan names).
FLOAT32_PARAMS = re.compile(
    r"^(time_embedding\.|head\.modulation$|blocks\.\d+\.(modulation$|norm3\.)|img_emb\.proj\.[04]\.)"
)


def keeps_float32(key: str) -> bool:
    """Whether the Wan-layout parameter `key` stays float32 in bf16 / fp16 (`WanDiT.cast_`)."""
    return FLOAT32_PARAMS.match(key) is not None


@dataclass(frozen=True)
class WanParams:
    """Architecture of a Wan transformer; names as in Wan's `WanModel` config."""

    patch_size: tuple[int, int, int]
    in_dim: int  # latent channels in (I2V: 16 noise + 4 mask + 16 image latent = 36)
    out_dim: int  # latent channels out
    dim: int
    ffn_dim: int
    freq_dim: int  # timestep sinusoid width
    text_dim: int  # umT5-XXL: 4096
    num_heads: int
    num_layers: int
    image_dim: int | None = None  # CLIP image features (ViT-H/14: 1280): Wan 2.1 I2V / FLF2V only
    image_pos_len: int | None = None  # FLF2V: learned position embedding over 2 * 257 image tokens
    cross_attn_norm: bool = True
    eps: float = 1e-6


WAN21_T2V_1_3B = WanParams(
    patch_size=(1, 2, 2),
    in_dim=16,
    out_dim=16,
    dim=1536,
    ffn_dim=8960,
    freq_dim=256,
    text_dim=4096,
    num_heads=12,
    num_layers=30,
)
WAN21_T2V_14B = replace(WAN21_T2V_1_3B, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN21_I2V_14B = replace(WAN21_T2V_14B, in_dim=36, image_dim=1280)  # 480P and 720P
WAN21_FLF2V_14B = replace(WAN21_I2V_14B, image_pos_len=2 * 257)
WAN22_TI2V_5B = replace(
    WAN21_T2V_1_3B, in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30
)
# The A14B models are two experts (high noise, low noise) of 2.1's 14B geometry; 2.2 I2V has no CLIP branch.
WAN22_T2V_A14B = WAN21_T2V_14B
WAN22_I2V_A14B = replace(WAN21_T2V_14B, in_dim=36)

PRESETS: dict[str, WanParams] = {
    "wan2.1-t2v-1.3b": WAN21_T2V_1_3B,
    "wan2.1-t2v-14b": WAN21_T2V_14B,
    "wan2.1-i2v-14b": WAN21_I2V_14B,
    "wan2.1-flf2v-14b": WAN21_FLF2V_14B,
    "wan2.2-ti2v-5b": WAN22_TI2V_5B,
    "wan2.2-t2v-a14b": WAN22_T2V_A14B,
    "wan2.2-i2v-a14b": WAN22_I2V_A14B,
}


def preset(name: str) -> WanParams:
    """The params of a named Wan variant; `KeyError` lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown Wan preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def _check_params(p: WanParams) -> None:
    if p.dim % p.num_heads or (p.dim // p.num_heads) % 2:
        raise ValueError(f"dim {p.dim} must be num_heads {p.num_heads} times an even head dim")
    if p.freq_dim % 2:
        raise ValueError(f"freq_dim {p.freq_dim} must be even")
    if len(p.patch_size) != 3:
        raise ValueError(f"patch_size must be (t, h, w), got {p.patch_size}")
    if p.image_pos_len is not None and p.image_dim is None:
        raise ValueError("image_pos_len (FLF2V) needs image_dim")


class WanDiT(nn.Module):
    """Wan transformer: patchify, `num_layers` blocks (self attention with 3D RoPE, cross attention to text and
    optionally CLIP image tokens, MLP; adaLN from the timestep), modulated head, unpatchify."""

    def __init__(self, params: WanParams):
        super().__init__()
        _check_params(params)
        p = params
        self.params = params
        self.head_dim = p.dim // p.num_heads
        self.patch_embedding = nn.Conv3d(p.in_dim, p.dim, kernel_size=p.patch_size, stride=p.patch_size)
        self.text_embedding = nn.Sequential(
            Linear(p.text_dim, p.dim), nn.GELU(approximate="tanh"), Linear(p.dim, p.dim)
        )
        self.time_embedding = nn.Sequential(Linear(p.freq_dim, p.dim), nn.SiLU(), Linear(p.dim, p.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(p.dim, 6 * p.dim))
        image = p.image_dim is not None
        self.blocks = nn.ModuleList(
            AttentionBlock(p.dim, p.ffn_dim, p.num_heads, p.eps, p.cross_attn_norm, image)
            for _ in range(p.num_layers)
        )
        self.head = Head(p.dim, math.prod(p.patch_size) * p.out_dim, p.eps)
        self.img_emb = MLPProj(p.image_dim, p.dim, p.image_pos_len) if p.image_dim is not None else None
        self._rope: dict[tuple, Rope] = {}

    def position_embedding(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """RoPE of the `(F', H', W')` token grid: complex64 `(1, F' H' W', 1, head_dim / 2)`, cached per grid
        and device (the grid is the same at every step of a request)."""
        # inference tensors (made under inference_mode) cannot be saved for backward: cached apart
        key = (tuple(grid), device, torch.is_inference_mode_enabled())
        pe = self._rope.get(key)
        if pe is None:
            if len(self._rope) >= ROPE_CACHE_SIZE:
                self._rope.pop(next(iter(self._rope)))
            pe = self._rope[key] = grid_rope(key[0], self.head_dim, ROPE_THETA, device)
        return pe

    def cast_(self, dtype: torch.dtype) -> WanDiT:
        """Cast the floating parameters to `dtype` in place, except those `keeps_float32` names (float32)."""
        for name, param in self.named_parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.float32 if keeps_float32(name) else dtype)
        return self

    def time_conditioning(self, timestep: Tensor, dtype: torch.dtype) -> TimeEmbedding:
        """`(B,)` or `(B, L)` timesteps (0..1000) -> the embeddings (in `dtype`) the blocks and head modulate
        with. Per-token timesteps are embedded once per distinct value; constant rows take the per-sample path."""
        index = None
        values = timestep
        if timestep.ndim == 2:
            if bool((timestep == timestep[:, :1]).all()):
                values = timestep[:, 0]
            else:
                values, index = torch.unique(timestep, return_inverse=True)  # (N,), (B, L)
        # float32 when its weights are (`cast_`), as diffusers' time embedder; then in the model's dtype
        embed_dtype = torch.float32 if self.time_embedding[0].weight.dtype == torch.float32 else dtype
        e = self.time_embedding(sinusoidal_embedding(values, self.params.freq_dim).to(embed_dtype)).to(dtype)
        e0 = self.time_projection(e).unflatten(1, (6, self.params.dim))  # (N, 6, D)
        return TimeEmbedding(e, e0, index)

    def _check_inputs(
        self, x: Tensor, timestep: Tensor, context: Tensor, image_context: Tensor | None
    ) -> tuple[int, int, int]:
        p = self.params
        if x.ndim != 5 or x.shape[1] != p.in_dim:
            raise ValueError(f"x must be (B, {p.in_dim}, F, H, W), got {tuple(x.shape)}")
        if any(n % k for n, k in zip(x.shape[2:], p.patch_size, strict=True)) or 0 in x.shape[2:]:
            raise ValueError(
                f"x's (F, H, W) = {tuple(x.shape[2:])} must be non-zero multiples of the patch size "
                f"{p.patch_size}"
            )
        grid = tuple(n // k for n, k in zip(x.shape[2:], p.patch_size, strict=True))
        batch, tokens = x.shape[0], math.prod(grid)
        if timestep.shape not in ((batch,), (batch, tokens)):
            raise ValueError(
                f"timestep must be ({batch},) or ({batch}, {tokens}) (one per token of the {grid} grid), "
                f"got {tuple(timestep.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != p.text_dim:
            raise ValueError(f"context must be ({batch}, Lt, {p.text_dim}), got {tuple(context.shape)}")
        if p.image_dim is None:
            if image_context is not None:
                raise ValueError(
                    "this model has no image embedding (image_dim=None): pass image_context=None"
                )
        else:
            want = "Li" if p.image_pos_len is None else str(p.image_pos_len)
            if (
                image_context is None
                or image_context.ndim != 3
                or image_context.shape[0] != batch
                or image_context.shape[2] != p.image_dim
                or (p.image_pos_len is not None and image_context.shape[1] != p.image_pos_len)
            ):
                got = None if image_context is None else tuple(image_context.shape)
                raise ValueError(f"image_context must be ({batch}, {want}, {p.image_dim}), got {got}")
        return grid  # type: ignore[return-value]

    def _patchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """`(B, C, F, H, W)` -> `(B, L, D)`: the patch embedding (a strided Conv3d) as one matmul."""
        b, c = x.shape[:2]
        (f, h, w), (pt, ph, pw) = grid, self.params.patch_size
        # (B, C, F', pt, H', ph, W', pw) -> (B, F', H', W', C, pt, ph, pw)
        x = x.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(b, f * h * w, c * pt * ph * pw)  # (B, L, C pt ph pw): the Conv3d weight's order
        return F.linear(x, self.patch_embedding.weight.flatten(1), self.patch_embedding.bias)

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """`(B, L, pt ph pw C)` -> `(B, C, F, H, W)`."""
        b = x.shape[0]
        (f, h, w), (pt, ph, pw) = grid, self.params.patch_size
        # (B, F', H', W', pt, ph, pw, C) -> (B, C, F', pt, H', ph, W', pw)
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    def forward(
        self, x: Tensor, timestep: Tensor, context: Tensor, image_context: Tensor | None = None
    ) -> Tensor:
        """Velocity `(B, out_dim, F, H, W)`; see the module docstring for the inputs."""
        grid = self._check_inputs(x, timestep, context, image_context)
        dtype = self.patch_embedding.weight.dtype
        pe = self.position_embedding(grid, x.device)

        tokens = self._patchify(x.to(dtype), grid)  # (B, L, D)
        t = self.time_conditioning(timestep, dtype)
        txt = self.text_embedding(context.to(dtype))  # (B, Lt, D)
        img = None
        if self.img_emb is not None and image_context is not None:
            img = self.img_emb(image_context.to(dtype))  # (B, Li, D)
        for block in self.blocks:
            tokens = block(tokens, t, txt, img, pe)
        return self._unpatchify(self.head(tokens, t), grid)  # (B, out_dim, F, H, W)
