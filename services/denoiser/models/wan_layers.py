"""Building blocks of the Wan DiT, with the module names of Wan-Video/Wan2.1 `wan/modules/model.py`.

Parameter names match the official checkpoints (`blocks.N.self_attn.q`, `blocks.N.norm3`,
`head.modulation`...), so an official state dict loads without renaming. Tensors are `(B, L, D)` token
sequences; attention heads are `(B, L, H, Dh)` views of the projections.

Numerics follow diffusers' `WanTransformer3DModel` (the oracle of our tests):
- the timestep sinusoid, the adaLN modulation (`table + e`), the LayerNorms and the gated residuals are
  float32, cast back to the weights' dtype before each Linear;
- QK RMS norms run over all heads at once (`dim`, not `head_dim`), in float32, followed by RoPE in the same
  float32 chain (diffusers rounds to the weights' dtype in between; we do not);
- RoPE is a complex64 `(1, L, 1, Dh / 2)` tensor `e^(i * angle)` over adjacent channel pairs `(2i, 2i + 1)`,
  the head's pairs split into frame / row / column axes as Wan does.

Attention, RoPE application and the oneDNN `Linear` are FLUX's (`flux_layers`): the same kernels and fast paths.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.denoiser.models.flux_layers import Linear, Rope, apply_rope, attention


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """`[cos, sin]` of `t * max_period ** (-i / (dim / 2))`, in float32: `(N,) -> (N, dim)`. `t` is on the
    model's 0..1000 scale (sigma * 1000), not multiplied here."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by the frame, row and column index:
    `(d - 4 (d // 6), 2 (d // 6), 2 (d // 6))`, e.g. (44, 42, 42) for head dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_rope(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10_000.0, device: torch.device | None = None
) -> Rope:
    """RoPE of a `(F, H, W)` token grid, tokens in row-major `(f, h, w)` order: complex64 `(1, F * H * W, 1,
    head_dim / 2)`. Angles in float64 (cos and sin rounded to float32 once), as the reference; MPS: float32."""
    device = torch.device("cpu") if device is None else device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    per_axis = []
    for n, d in zip(grid, rope_axes(head_dim), strict=True):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=dtype, device=device) / d)  # (d / 2,)
        per_axis.append(torch.arange(n, dtype=dtype, device=device)[:, None] * omega)  # (n, d / 2)
    f, h, w = grid
    angle = torch.cat(
        [
            per_axis[0][:, None, None].expand(f, h, w, -1),
            per_axis[1][None, :, None].expand(f, h, w, -1),
            per_axis[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(1, f * h * w, 1, head_dim // 2)
    return torch.complex(torch.cos(angle).float(), torch.sin(angle).float())


class TimeEmbedding(NamedTuple):
    """The timestep conditioning of one forward, per sample or per token.

    Per token (Wan 2.2 TI2V, timestep `(B, L)`), `e` and `e0` hold one row per distinct timestep value and
    `index` says which row each token uses: a latent whose first frame is clean has two values, not `B * L` rows.
    """

    e: Tensor  # (N, D) the time embedding: the head's modulation input
    e0: Tensor  # (N, 6, D) its projection: the blocks' modulation input
    index: Tensor | None  # (B, L) int64 row of e / e0 per token; None: row b is sample b (N = B)


def modulation(table: Tensor, emb: Tensor, index: Tensor | None, scales: tuple[int, ...]) -> list[Tensor]:
    """adaLN parameters `table (1, k, D) + emb (N, k, D)` in float32, with 1 added to the chunks in `scales`
    (so they multiply as `1 + scale`): k float32 tensors `(B, 1, D)` per sample, or `(B, L, D)` per token."""
    mod = table.float() + emb.float()  # (N, k, D)
    for i in scales:
        mod[:, i] += 1
    if index is None:
        return list(mod.unsqueeze(2).unbind(1))  # (B, 1, D) each
    return [F.embedding(index, mod[:, i]) for i in range(mod.shape[1])]  # (B, L, D) each


def modulate(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale1p: Tensor) -> Tensor:
    """`norm(x) * (1 + scale) + shift` in float32, returned in x's dtype: x `(B, L, D)`, shift and `1 + scale`
    float32 `(B, 1 | L, D)`. For one sample with per-sample modulation the modulation is the LayerNorm's affine
    transform: one pass over `x` instead of two."""
    xf = x.float()
    if shift.shape[:2] == (1, 1):
        out = F.layer_norm(xf, norm.normalized_shape, scale1p.flatten(), shift.flatten(), norm.eps)
    else:
        out = torch.addcmul(shift, F.layer_norm(xf, norm.normalized_shape, None, None, norm.eps), scale1p)
    return out.to(x.dtype)


def layer_norm_f32(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """`norm(x)` computed in float32 (affine parameters too), returned in x's dtype."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """`x + y * gate` in float32, in x's dtype; gate float32 `(B, 1 | L, D)`."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        return torch.addcmul(x, y, gate)
    return torch.addcmul(x.float(), y.float(), gate).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned `weight`; float32 output (statistics, weight in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    return x.unflatten(-1, (num_heads, -1))  # (B, L, D) -> (B, L, H, Dh), a view


class SelfAttention(nn.Module):
    """Self attention over the video tokens: q, k, v, o projections, QK RMS norms over `dim`, 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, pe: Rope) -> Tensor:
        """x `(B, L, D)`, pe `(1, L, 1, Dh / 2)` -> `(B, L, D)`."""
        q = apply_rope(_heads(self.norm_q(self.q(x)), self.num_heads), pe)  # (B, L, H, Dh) float32
        k = apply_rope(_heads(self.norm_k(self.k(x)), self.num_heads), pe)
        v = _heads(self.v(x), self.num_heads)
        return self.o(attention(q, k, v))


class CrossAttention(nn.Module):
    """Attention of the video tokens to the text tokens; with `image`, also to the CLIP image tokens (Wan 2.1
    I2V / FLF2V) through their own `k_img`, `v_img`: a second softmax whose output is added to the text one."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.k_img = Linear(dim, dim) if image else None
        self.v_img = Linear(dim, dim) if image else None
        self.norm_k_img = RMSNorm(dim, eps) if image else None

    def forward(self, x: Tensor, context: Tensor, context_img: Tensor | None) -> Tensor:
        """x `(B, L, D)`, context `(B, Lt, D)`, context_img `(B, Li, D)` (exactly when built with `image`)."""
        h = self.num_heads
        q = _heads(self.norm_q(self.q(x)), h)  # (B, L, H, Dh) float32
        out = attention(q, _heads(self.norm_k(self.k(context)), h), _heads(self.v(context), h))  # (B, L, D)
        if self.k_img is not None and self.v_img is not None and self.norm_k_img is not None:
            if context_img is None:
                raise ValueError("this cross attention has image keys (k_img): pass the image tokens")
            k_img = _heads(self.norm_k_img(self.k_img(context_img)), h)
            out = out + attention(q, k_img, _heads(self.v_img(context_img), h))
        return self.o(out)


class AttentionBlock(nn.Module):
    """Wan block: modulated self attention, (normed) cross attention, modulated GELU MLP. Wan's norms: `norm1`
    before self attention, `norm3` (affine) before cross attention, `norm2` before the MLP."""

    def __init__(
        self, dim: int, ffn_dim: int, num_heads: int, eps: float, cross_attn_norm: bool, image: bool
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else None
        self.cross_attn = CrossAttention(dim, num_heads, eps, image)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, t: TimeEmbedding, context: Tensor, context_img: Tensor | None, pe: Rope
    ) -> Tensor:
        """x `(B, L, D)`, context `(B, Lt, D)`, context_img `(B, Li, D)` or None -> `(B, L, D)`."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = modulation(
            self.modulation, t.e0, t.index, scales=(1, 4)
        )
        x = gated_residual(x, self.self_attn(modulate(self.norm1, x, shift_a, scale_a), pe), gate_a)
        normed = x if self.norm3 is None else layer_norm_f32(self.norm3, x)
        x = x + self.cross_attn(normed, context, context_img)
        return gated_residual(x, self.ffn(modulate(self.norm2, x, shift_f, scale_f)), gate_f)


class Head(nn.Module):
    """Final modulated LayerNorm (shift first, then scale) and the projection to patch values."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: TimeEmbedding) -> Tensor:
        """x `(B, L, D)` -> `(B, L, out_features)`."""
        shift, scale = modulation(self.modulation, t.e[:, None], t.index, scales=(1,))
        return self.head(modulate(self.norm, x, shift, scale))


class MLPProj(nn.Module):
    """CLIP image features -> image tokens of width `dim`: LayerNorm, Linear, GELU, Linear, LayerNorm (norms in
    float32). FLF2V adds a learned position embedding `emb_pos (1, 2 * 257, in_dim)` over the first and last
    frames' tokens first."""

    def __init__(self, in_dim: int, out_dim: int, pos_len: int | None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            Linear(in_dim, in_dim),
            nn.GELU(),
            Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, in_dim)) if pos_len is not None else None

    def forward(self, image: Tensor) -> Tensor:
        """`(B, Li, in_dim)` -> `(B, Li, out_dim)`."""
        if self.emb_pos is not None:
            image = image + self.emb_pos
        norm_in, fc1, act, fc2, norm_out = self.proj
        return layer_norm_f32(norm_out, fc2(act(fc1(layer_norm_f32(norm_in, image)))))
