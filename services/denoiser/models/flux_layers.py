"""Building blocks of the FLUX.1 DiT, with the module names of black-forest-labs/flux `modules/layers.py`.

Parameter names match the official checkpoints, so a BFL state dict loads without renaming. Tensors are
`(B, L, D)` token sequences; attention works on `(B, H, L, Dh)`; RoPE is a `(cos, sin)` pair of float32
`(B | 1, 1, L, Dh / 2)` tensors that rotates adjacent channel pairs `(2i, 2i + 1)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (B | 1, 1, L, Dh / 2) float32


def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding `[cos, sin]` of `time_factor * t`, in float32: `(B,) -> (B, dim)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class EmbedND(nn.Module):
    """Multi-axis RoPE: axis `i` of the ids rotates `axes_dim[i]` channels. No weights.

    Keeps the last result: a loop that calls the model with the same ids every step computes RoPE once.
    """

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)
        self._cache: tuple[Tensor, Rope] | None = None

    def forward(self, ids: Tensor) -> Rope:
        """`ids (B | 1, L, n_axes)` -> `(cos, sin)`, each `(B | 1, 1, L, dim / 2)` float32."""
        cached = self._cache
        if (
            cached is not None
            and cached[0].shape == ids.shape
            and cached[0].device == ids.device
            and cached[0].dtype == ids.dtype
            and torch.equal(cached[0], ids)
        ):
            return cached[1]
        # float64 angles as in the reference; MPS has no float64.
        dtype = torch.float32 if ids.device.type == "mps" else torch.float64
        angles = []
        for i, d in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (
                torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d
            )  # (d / 2,)
            angles.append(ids[..., i].to(dtype)[..., None] * omega)  # (B, L, d / 2)
        angle = torch.cat(angles, dim=-1).unsqueeze(1)  # (B, 1, L, dim / 2)
        pe = (torch.cos(angle).float(), torch.sin(angle).float())
        self._cache = (ids.detach().clone(), pe)
        return pe


def apply_rope(x: Tensor, pe: Rope) -> Tensor:
    """Rotate channel pairs `(2i, 2i + 1)` of `x (B, H, L, Dh)` in float32; returns `x`'s dtype."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, Dh / 2) each
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)  # (B, H, L, Dh / 2, 2)
    return out.flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Rope) -> Tensor:
    """RoPE on q, k, then SDPA: `(B, H, L, Dh)` x3 -> `(B, L, H * Dh)`."""
    x = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v)  # (B, H, L, Dh)
    return x.transpose(1, 2).flatten(2)  # (B, L, H * Dh)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projection `(B, L, 3 * H * Dh)` -> q, k, v, each `(B, H, L, Dh)`."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
    return q, k, v


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned `scale` (statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


class QKNorm(nn.Module):
    """Per-head RMS norms of queries and keys."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """Fused qkv projection, QK norm and output projection; used piecewise by the double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(B, L, D)` -> normed q, k and v, each `(B, H, L, Dh)`."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class ModulationOut(NamedTuple):
    shift: Tensor  # (B, 1, D)
    scale: Tensor  # (B, 1, D)
    gate: Tensor  # (B, 1, D)


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """`(1 + scale) * x + shift` on a normed `(B, L, D)`."""
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


class Modulation(nn.Module):
    """adaLN-Zero: `vec (B, D)` -> one (double: two) `(shift, scale, gate)` triples of `(B, 1, D)`."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # (B, 1, D) each
        return [ModulationOut(*out[i : i + 3]) for i in range(0, self.multiplier, 3)]


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """MMDiT block: separate weights for image and text tokens, one joint attention over `[txt, img]`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Rope) -> tuple[Tensor, Tensor]:
        """img `(B, Li, D)`, txt `(B, Lt, D)`, vec `(B, D)`, pe over `Lt + Li` -> (img, txt)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_mod1))
        q = torch.cat((txt_q, img_q), dim=2)  # (B, H, Lt + Li, Dh)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe)  # (B, Lt + Li, D)
        txt_attn, img_attn = attn.split((txt.shape[1], img.shape[1]), dim=1)

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(modulate(self.img_norm2(img), img_mod2)))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence, with one fused input projection (`linear1`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv + mlp in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # attn out + mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Rope) -> Tensor:
        """x `(B, L, D)`, vec `(B, D)` -> `(B, L, D)`."""
        (mod,) = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), mod)).split(
            (3 * self.hidden_size, self.mlp_hidden_dim), dim=-1
        )  # (B, L, 3D), (B, L, M)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=-1))  # (B, L, D)
        return torch.addcmul(x, mod.gate, out)


class LastLayer(nn.Module):
    """Final adaLN (shift first, then scale: the reverse of diffusers' `norm_out`) and projection."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x `(B, L, D)`, vec `(B, D)` -> `(B, L, C_out)`."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))
