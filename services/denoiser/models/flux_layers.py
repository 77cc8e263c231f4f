"""Building blocks of the FLUX.1 DiT, with the module names of black-forest-labs/flux `modules/layers.py`.

Parameter names match the official checkpoints, so a BFL state dict loads without renaming. Tensors are
`(B, L, D)` token sequences; heads stay in the projections' own `(B, L, H, Dh)` layout (views, no copies) and
attention sees them as `(B, H, L, Dh)` strided views. RoPE is a complex64 `(B | 1, L, 1, Dh / 2)` tensor
`e^(i * angle)` that rotates adjacent channel pairs `(2i, 2i + 1)`: one complex multiply per tensor instead of
six real ops on strided halves.

Inference on the CPU takes faster kernels than the reference (measured in `bench/denoiser_step.py`): oneDNN
linears, float32-score attention for bf16, QK norm + RoPE in one float32 chain, LayerNorm + modulation as one
op for batch 1, and the last block computes image tokens only. With autograd on (the trainer) the same modules
run plain `nn.Linear` and SDPA.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = Tensor  # complex64 (B | 1, L, 1, Dh / 2): e^(i * angle) per token and channel pair
# bf16 attention on the CPU: heads per block, and float32 score elements per block (64 MiB).
HEADS_PER_BLOCK = 2
MAX_SCORES = 1 << 24
# oneDNN's linear (the kernel inductor's CPU backend calls); no autograd formula, so inference only.
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


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
    """Multi-axis RoPE: axis `i` of the ids rotates `axes_dim[i]` channels. No weights, no state: the ids are
    the same at every step of a request, so the caller computes this once and passes it to every forward."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Rope:
        """`ids (B | 1, L, n_axes)` -> complex64 `(B | 1, L, 1, dim / 2)`."""
        # float64 angles as in the reference (cos and sin rounded to float32 once); MPS has no float64.
        dtype = torch.float32 if ids.device.type == "mps" else torch.float64
        angles = []
        for i, d in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (
                torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d
            )  # (d / 2,)
            angles.append(ids[..., i].to(dtype)[..., None] * omega)  # (B, L, d / 2)
        angle = torch.cat(angles, dim=-1).unsqueeze(2)  # (B, L, 1, dim / 2)
        return torch.complex(torch.cos(angle).float(), torch.sin(angle).float())


def apply_rope(x: Tensor, pe: Rope) -> Tensor:
    """Rotate channel pairs `(2i, 2i + 1)` of `x (B, L, H, Dh)` (any strides, last one 1) by `pe`, in float32:
    `(x0 + i x1) * (cos + i sin)`. Returns float32 `(B, L, H, Dh)`."""
    if torch.compiler.is_compiling():
        # inductor has no complex codegen; the real form fuses into one kernel there
        cos, sin = torch.view_as_real(pe).unbind(-1)  # (B | 1, L, 1, Dh / 2) each
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, Dh / 2) complex64
    return torch.view_as_real(xc * pe).flatten(-2)


def rms_norm_rope(x: Tensor, scale: Tensor, pe: Rope, eps: float = 1e-6) -> Tensor:
    """Per-head RMS norm with a learned `scale`, then RoPE, in float32 throughout (no rounding in between):
    `x (B, L, H, Dh)` any float dtype, any strides -> float32 `(B, L, H, Dh)`."""
    xf = x.float()
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]  # (B, L, H, 1): small
    return apply_rope(xf * torch.rsqrt(ms + eps) * scale, pe)


def cat_tokens(parts: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """`torch.cat(parts, dim=1).to(dtype)` in one pass: each part is cast while it is copied in."""
    first = parts[0]
    out = first.new_empty((first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:]), dtype=dtype)
    start = 0
    for p in parts:
        out[:, start : start + p.shape[1]].copy_(p)
        start += p.shape[1]
    return out


def cpu_low_precision(v: Tensor) -> bool:
    """bf16 inference on the CPU, where `attention` computes float32 scores itself (q, k float32)."""
    return (
        v.device.type == "cpu"
        and v.dtype == torch.bfloat16
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def qk_dtype(v: Tensor) -> torch.dtype:
    """The dtype `attention` wants its (rotated) q and k in for this `v`."""
    return torch.float32 if cpu_low_precision(v) else v.dtype


def _attention_float32_scores(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention with float32 q, k, scores and softmax, probabilities rounded to `v`'s (bf16) dtype
    for the product with `v`: `HEADS_PER_BLOCK` heads (and a bounded block of queries) at a time, so
    the scores stay small. q `(B, Lq, H, Dh)`, k, v `(B, L, H, Dh)` -> `(B, Lq, H, Dh)` in v's dtype."""
    batch, lq, heads, dh = q.shape
    qt = (q * dh**-0.5).transpose(1, 2)  # (B, H, Lq, Dh)
    kt, vt = k.permute(0, 2, 3, 1), v.transpose(1, 2)  # (B, H, Dh, L), (B, H, L, Dh): views
    out = v.new_empty(batch, lq, heads, dh)
    rows = max(1, MAX_SCORES // (batch * HEADS_PER_BLOCK * k.shape[1]))
    for h in range(0, heads, HEADS_PER_BLOCK):
        hs = slice(h, h + HEADS_PER_BLOCK)
        for i in range(0, lq, rows):
            scores = torch.matmul(qt[:, hs, i : i + rows], kt[:, hs])  # (B, hs, rows, L) float32
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out[:, i : i + rows, hs] = torch.matmul(probs, vt[:, hs]).transpose(1, 2)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over heads: q `(B, Lq, H, Dh)`, k, v `(B, L, H, Dh)`, RoPE applied -> `(B, Lq, H * Dh)`
    in v's dtype.

    SDPA on `(B, H, L, Dh)` views (its CPU flash kernel writes the query's `(B, Lq, H, Dh)` layout: no copy on
    either side), except for bf16 inference on the CPU. There PyTorch's flash kernel is no faster than in
    float32; two matmuls per pair of heads with float32 scores are ~15 % faster at FLUX sizes and more accurate
    (q, k are not rounded after RoPE). Pairs, not single heads: half the parallel regions, which is what costs
    when another process holds a core.
    """
    if cpu_low_precision(v):
        return _attention_float32_scores(q.float(), k.float(), v).flatten(2)
    q, k = q.to(v.dtype), k.to(v.dtype)
    x = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # (B, H, Lq, Dh)
    return x.transpose(1, 2).flatten(2)  # (B, Lq, H * Dh): a view when SDPA kept the (B, Lq, H, Dh) layout


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projection `(B, L, 3 * H * Dh)` -> q, k, v, each a `(B, L, H, Dh)` view."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)  # (B, L, H, Dh) each
    return q, k, v


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters, state-dict keys and hooks, so LoRAs apply as before) that runs through
    oneDNN on the CPU for float32 / bf16 inference. At FLUX sizes on this AVX-512 CPU (AMD) that is 10-15 %
    faster than the default float32 GEMM (MKL), and the same in bf16 (where PyTorch already calls oneDNN).
    With autograd, autocast or torch.compile: `nn.Linear`. Weights stored in another dtype than the input's
    (float8 storage) are cast to the input's for the call."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != x.dtype:  # weights stored in another dtype (float8): computed in x's
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.weight.to(x.dtype), bias)
        if (
            _ONEDNN_LINEAR is not None
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # inductor picks its own GEMM
        ):
            return _ONEDNN_LINEAR(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned `scale` (statistics in float32). `QKNorm` uses its `scale`
    and `eps` in `rms_norm_rope`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


class QKNorm(nn.Module):
    """Per-head RMS norms of queries and keys, each followed by RoPE (one float32 pass chain, see
    `rms_norm_rope`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, pe_q: Rope, pe_k: Rope) -> tuple[Tensor, Tensor]:
        """q `(B, Lq, H, Dh)`, k `(B, L, H, Dh)` with their RoPE -> normed and rotated, float32."""
        q = rms_norm_rope(q, self.query_norm.scale, pe_q, self.query_norm.eps)
        return q, rms_norm_rope(k, self.key_norm.scale, pe_k, self.key_norm.eps)


class SelfAttention(nn.Module):
    """Fused qkv projection, QK norm and output projection; used piecewise by the double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: Tensor, pe: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """`(B, L, D)` and its tokens' RoPE -> q, k normed and rotated (float32), v; each `(B, L, H, Dh)`."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, pe, pe)
        return q, k, v


class ModulationOut(NamedTuple):
    shift: Tensor  # (B, 1, D)
    scale: Tensor  # (B, 1, D)
    gate: Tensor  # (B, 1, D)


def modulate(norm: nn.LayerNorm, x: Tensor, mod: ModulationOut) -> Tensor:
    """`(1 + scale) * norm(x) + shift` on `(B, L, D)`. For one sample the modulation is the LayerNorm's affine
    transform: one pass over `x` instead of two."""
    if x.shape[0] == 1:
        return F.layer_norm(
            x, norm.normalized_shape, (1 + mod.scale).flatten(), mod.shift.flatten(), norm.eps
        )
    return torch.addcmul(mod.shift, norm(x), 1 + mod.scale)


class Modulation(nn.Module):
    """adaLN-Zero: `vec (B, D)` -> one (double: two) `(shift, scale, gate)` triples of `(B, 1, D)`."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # (B, 1, D) each
        return [ModulationOut(*out[i : i + 3]) for i in range(0, self.multiplier, 3)]


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        Linear(mlp_hidden_dim, hidden_size, bias=True),
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
        lt = txt.shape[1]
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1, img, img_mod1), pe[:, lt:])
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1, txt, txt_mod1), pe[:, :lt])
        q = cat_tokens((txt_q, img_q), qk_dtype(img_v))  # (B, Lt + Li, H, Dh)
        k = cat_tokens((txt_k, img_k), qk_dtype(img_v))
        v = torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v)  # (B, Lt + Li, D)
        txt_attn, img_attn = attn.split((lt, img.shape[1]), dim=1)

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(modulate(self.img_norm2, img, img_mod2)))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(modulate(self.txt_norm2, txt, txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence, with one fused input projection (`linear1`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv + mlp in
        self.linear2 = Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # attn out + mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Rope, start: int = 0) -> Tensor:
        """x `(B, L, D)`, vec `(B, D)` -> `(B, L - start, D)`: the outputs of tokens `start:` only (every token
        is still attended to). The last block skips the text tokens the model then drops: their queries, MLP
        and output projection."""
        (mod,) = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm, x, mod)).split(
            (3 * self.hidden_size, self.mlp_hidden_dim), dim=-1
        )  # (B, L, 3D), (B, L, M)
        q, k, v = split_heads(qkv, self.num_heads)  # (B, L, H, Dh) each
        q, k = self.norm(q[:, start:], k, pe[:, start:], pe)
        attn = attention(q, k, v)  # (B, L - start, D)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp[:, start:])), dim=-1))  # (B, L - start, D)
        return torch.addcmul(x[:, start:], mod.gate, out)


class LastLayer(nn.Module):
    """Final adaLN (shift first, then scale: the reverse of diffusers' `norm_out`) and projection."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x `(B, L, D)`, vec `(B, D)` -> `(B, L, C_out)`."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))
