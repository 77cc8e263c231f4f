"""FLUX.1 DiT (the denoiser transformer), modelled on black-forest-labs/flux `src/flux/model.py`.

Module and parameter names are BFL's: an official `flux1-dev.safetensors` state dict loads as it is, and
`services.denoiser.convert.flux` maps the diffusers layout onto it. Build on the meta device and load with
`load_state_dict(sd, assign=True)` to avoid allocating random weights first.

Conventions (the same as BFL's `Flux.forward` and diffusers' `FluxTransformer2DModel.forward`):
- `img` is the packed latent: a `(B, 16, H/8, W/8)` VAE latent cut into 2x2 patches, `(B, H/16 * W/16, 64)`,
  channels ordered `(c, ph, pw)`; `img_ids[..., 1:]` are the (row, col) of each patch, `img_ids[..., 0]` is 0
  for the generated image (Kontext uses 1 for reference-image tokens); `txt_ids` are zeros.
- `timesteps` is sigma in [0, 1] (the model multiplies by 1000 inside); `guidance` is the raw distilled
  guidance scale, e.g. 3.5 (also multiplied by 1000 inside). Both are embedded in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from services.denoiser.models.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    Linear,
    MLPEmbedder,
    Rope,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass(frozen=True)
class FluxParams:
    """Architecture of a FLUX.1 transformer; names as in BFL's `FluxParams`."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool


FLUX_DEV = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embed=False)
FLUX_KREA_DEV = FLUX_DEV
FLUX_KONTEXT_DEV = FLUX_DEV  # reference-image tokens are appended to `img` with img_ids[..., 0] = 1
FLUX_FILL_DEV = replace(FLUX_DEV, in_channels=384)  # latent + masked image + mask
FLUX_CANNY_DEV = replace(FLUX_DEV, in_channels=128)  # latent + control latent
FLUX_DEPTH_DEV = FLUX_CANNY_DEV

PRESETS: dict[str, FluxParams] = {
    "flux-dev": FLUX_DEV,
    "flux-schnell": FLUX_SCHNELL,
    "flux-krea-dev": FLUX_KREA_DEV,
    "flux-kontext-dev": FLUX_KONTEXT_DEV,
    "flux-fill-dev": FLUX_FILL_DEV,
    "flux-canny-dev": FLUX_CANNY_DEV,
    "flux-depth-dev": FLUX_DEPTH_DEV,
}


def preset(name: str) -> FluxParams:
    """The params of a named FLUX.1 variant; `KeyError` lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown FLUX.1 preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def _batched_ids(ids: Tensor, name: str, batch: int, length: int, n_axes: int) -> Tensor:
    """`(L, n)` or `(B, L, n)` -> `(B | 1, L, n)`, checked against the sequence it positions."""
    if ids.ndim == 2:
        ids = ids.unsqueeze(0)
    if ids.ndim != 3 or ids.shape[0] not in (1, batch) or ids.shape[1:] != (length, n_axes):
        raise ValueError(
            f"{name} must be ({length}, {n_axes}) or ({batch}, {length}, {n_axes}), got {tuple(ids.shape)}"
        )
    return ids


class Flux(nn.Module):
    """FLUX.1 transformer: `double_blocks` (MMDiT) then `single_blocks` over the joint `[txt, img]` sequence."""

    def __init__(self, params: FluxParams):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(
                f"hidden_size {params.hidden_size} is not a multiple of num_heads {params.num_heads}"
            )
        head_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != head_dim or any(d % 2 for d in params.axes_dim):
            raise ValueError(f"axes_dim {params.axes_dim} must be even and sum to the head dim {head_dim}")
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else None
        self.txt_in = Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)

    def position_embedding(self, img_ids: Tensor, txt_ids: Tensor) -> Rope:
        """RoPE for the joint `[txt, img]` sequence: complex64 `(B | 1, Lt + Li, 1, Dh / 2)`.

        ids `(L, n_axes)` or `(B | 1, L, n_axes)`. The ids are the same at every step of a request: compute this
        once and pass it to each `forward(..., pe=pe)` (the FLUX adapter does); `forward` without `pe` calls it.
        """
        img_ids = img_ids.unsqueeze(0) if img_ids.ndim == 2 else img_ids
        txt_ids = txt_ids.unsqueeze(0) if txt_ids.ndim == 2 else txt_ids
        if img_ids.shape[0] != txt_ids.shape[0]:
            batch = max(img_ids.shape[0], txt_ids.shape[0])
            img_ids = img_ids.expand(batch, -1, -1)
            txt_ids = txt_ids.expand(batch, -1, -1)
        return self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # ids (B | 1, Lt + Li, n)

    def _check_inputs(self, img: Tensor, txt: Tensor, timesteps: Tensor, y: Tensor) -> None:
        p = self.params
        if img.ndim != 3 or img.shape[2] != p.in_channels:
            raise ValueError(f"img must be (B, L, {p.in_channels}), got {tuple(img.shape)}")
        batch = img.shape[0]
        if txt.ndim != 3 or txt.shape[0] != batch or txt.shape[2] != p.context_in_dim:
            raise ValueError(f"txt must be ({batch}, Lt, {p.context_in_dim}), got {tuple(txt.shape)}")
        if y.shape != (batch, p.vec_in_dim):
            raise ValueError(f"y must be ({batch}, {p.vec_in_dim}), got {tuple(y.shape)}")
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be ({batch},), got {tuple(timesteps.shape)}")

    def _check_pe(self, pe: Tensor, batch: int, length: int) -> None:
        want = (length, 1, self.hidden_size // self.num_heads // 2)
        if (
            pe.dtype != torch.complex64
            or pe.ndim != 4
            or pe.shape[0] not in (1, batch)
            or pe.shape[1:] != want
        ):
            raise ValueError(
                f"pe must be complex64 (1 | {batch}, {', '.join(map(str, want))}) from position_embedding, "
                f"got {pe.dtype} {tuple(pe.shape)}"
            )

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        pe: Rope | None = None,
    ) -> Tensor:
        """Velocity prediction `(B, L, C_out)` for packed latents `img (B, L, C_in)`.

        img_ids `(L, n_axes)` or `(B, L, n_axes)`; txt `(B, Lt, context_in_dim)` with txt_ids likewise;
        timesteps `(B,)` sigma in [0, 1]; y `(B, vec_in_dim)` pooled CLIP; guidance `(B,)` raw scale, required
        exactly when `params.guidance_embed`; pe `position_embedding(img_ids, txt_ids)` when the caller keeps
        it across steps (computed here otherwise).
        """
        self._check_inputs(img, txt, timesteps, y)
        n_axes = len(self.params.axes_dim)
        img_ids = _batched_ids(img_ids, "img_ids", img.shape[0], img.shape[1], n_axes)
        txt_ids = _batched_ids(txt_ids, "txt_ids", img.shape[0], txt.shape[1], n_axes)
        if pe is None:
            pe = self.position_embedding(img_ids, txt_ids)
        else:
            self._check_pe(pe, img.shape[0], txt.shape[1] + img.shape[1])

        img = self.img_in(img)  # (B, Li, D)
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))  # (B, D)
        if self.guidance_in is not None:
            if guidance is None or guidance.shape != timesteps.shape:
                got = None if guidance is None else tuple(guidance.shape)
                raise ValueError(
                    f"this model embeds guidance: pass guidance of shape ({img.shape[0]},), got {got}"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        elif guidance is not None:
            raise ValueError(
                "this model has no guidance embedding (guidance_embed=False): pass guidance=None"
            )
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)  # (B, Lt, D)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        if not self.single_blocks:
            return self.final_layer(img, vec)
        x = torch.cat((txt, img), dim=1)  # (B, Lt + Li, D)
        *blocks, last = self.single_blocks
        for block in blocks:
            x = block(x, vec, pe)
        img = last(x, vec, pe, start=txt.shape[1])  # (B, Li, D): the text tokens' outputs are never used
        return self.final_layer(img, vec)  # (B, Li, C_out)
