"""Tiny random Wan transformers of each real geometry, built with diffusers (the oracle, DESIGN §5).

`tiny_wan(geometry)` returns a seeded `WanTransformer3DModel` with every parameter random (norm weights around
1, modulation tables, FLF2V's position embedding), so a converter or model that drops or swaps one shows up.
`tiny_wan_inputs(model)` gives diffusers' forward kwargs for it; `ours_inputs` the same for `WanDiT.forward`.
`diffusers_config(params)` is the diffusers config of any `WanParams` (e.g. to build a preset on the meta
device).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel

from services.denoiser.models.wan import WanParams

HEADS = 2
HEAD_DIM = 16  # RoPE axes (8, 4, 4)
DIM = HEADS * HEAD_DIM
TEXT_DIM = 24  # umT5-XXL: 4096
IMAGE_DIM = 20  # CLIP ViT-H/14 penultimate features: 1280
IMAGE_TOKENS = 5  # per frame; CLIP ViT-H/14: 257
# diffusers' WanAttnProcessor takes all but the last 512 context tokens as image tokens (hard-coded), so models
# with an image branch must be given exactly 512 text tokens; T2V-style models take any number.
I2V_TEXT_TOKENS = 512
T2V_TEXT_TOKENS = 7

BASE: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    eps=1e-6,
)
GEOMETRIES: dict[str, dict[str, Any]] = {
    # Wan 2.1 T2V 1.3B / 14B, and each expert of Wan 2.2 T2V-A14B
    "t2v": dict(in_channels=16, out_channels=16),
    # Wan 2.1 I2V 14B: 16 noise + 20 condition channels in, CLIP image tokens through add_k_proj / add_v_proj
    "i2v": dict(in_channels=36, out_channels=16, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM),
    # Wan 2.1 FLF2V 14B: I2V plus a learned position embedding over the first and last frames' image tokens
    "flf2v": dict(
        in_channels=36,
        out_channels=16,
        image_dim=IMAGE_DIM,
        added_kv_proj_dim=DIM,
        pos_embed_seq_len=2 * IMAGE_TOKENS,
    ),
    # Wan 2.2 TI2V 5B: the 48-channel Wan 2.2 VAE latent; per-token timesteps
    "ti2v": dict(in_channels=48, out_channels=48),
    # each expert of Wan 2.2 I2V-A14B: 36 channels in, no CLIP image branch
    "i2v-a14b": dict(in_channels=36, out_channels=16),
}


def tiny_wan_config(geometry: str, **overrides: Any) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` kwargs of a tiny model of `geometry` (a key of `GEOMETRIES`)."""
    if geometry not in GEOMETRIES:
        raise KeyError(f"unknown geometry {geometry!r}; known: {', '.join(GEOMETRIES)}")
    return {**BASE, **GEOMETRIES[geometry], **overrides}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norm weights around 1, weights ~ 1/sqrt(fan_in), biases and tables small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".weight") and p.ndim == 1:  # norms (Linear / Conv weights have ndim >= 2)
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(("scale_shift_table", "modulation", "pos_embed", "emb_pos")):
                p.copy_(0.3 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def tiny_wan(geometry: str, seed: int = 0, **overrides: Any) -> WanTransformer3DModel:
    """A random tiny diffusers Wan transformer of `geometry`, float32, in eval mode."""
    return randomize_(WanTransformer3DModel(**tiny_wan_config(geometry, **overrides)), seed)


def tiny_wan_inputs(
    model: WanTransformer3DModel,
    batch: int = 2,
    frames: int = 3,
    height: int = 4,
    width: int = 6,
    text_tokens: int | None = None,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """diffusers' forward kwargs: a latent `(B, C_in, F, H, W)`, timesteps `(B,)` on the 0..1000 scale, text
    tokens, and the CLIP image tokens as the pipeline passes them (FLF2V: `(2B, n, image_dim)`, first and last
    frame of each sample in turn)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if text_tokens is None:
        text_tokens = I2V_TEXT_TOKENS if cfg.image_dim is not None else T2V_TEXT_TOKENS
    x: dict[str, torch.Tensor] = dict(
        hidden_states=torch.randn(batch, cfg.in_channels, frames, height, width, generator=g).to(dtype),
        timestep=torch.tensor([999.0, 437.5, 20.0, 601.0][:batch]),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.text_dim, generator=g).to(dtype),
    )
    if cfg.image_dim is not None:
        images = 2 * batch if cfg.pos_embed_seq_len is not None else batch
        x["encoder_hidden_states_image"] = torch.randn(images, IMAGE_TOKENS, cfg.image_dim, generator=g).to(
            dtype
        )
    return x


def ours_inputs(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """diffusers' forward kwargs -> `WanDiT.forward` kwargs (FLF2V: first and last frame tokens of a sample
    side by side, `(B, 2n, image_dim)`)."""
    batch = x["hidden_states"].shape[0]
    image = x.get("encoder_hidden_states_image")
    if image is not None:
        image = image.reshape(batch, -1, image.shape[-1])
    return dict(
        x=x["hidden_states"],
        timestep=x["timestep"],
        context=x["encoder_hidden_states"],
        image_context=image,
    )


def diffusers_config(params: WanParams) -> dict[str, Any]:
    """The diffusers `WanTransformer3DModel` kwargs of `params`."""
    return dict(
        patch_size=params.patch_size,
        num_attention_heads=params.num_heads,
        attention_head_dim=params.dim // params.num_heads,
        in_channels=params.in_dim,
        out_channels=params.out_dim,
        text_dim=params.text_dim,
        freq_dim=params.freq_dim,
        ffn_dim=params.ffn_dim,
        num_layers=params.num_layers,
        cross_attn_norm=params.cross_attn_norm,
        eps=params.eps,
        image_dim=params.image_dim,
        added_kv_proj_dim=params.dim if params.image_dim is not None else None,
        pos_embed_seq_len=params.image_pos_len,
    )


def tiny_wan_params(geometry: str, **overrides: Any) -> WanParams:
    """Our `WanParams` of `tiny_wan(geometry, **overrides)`."""
    cfg = tiny_wan_config(geometry, **overrides)
    return WanParams(
        patch_size=tuple(cfg["patch_size"]),  # type: ignore[arg-type]
        in_dim=cfg["in_channels"],
        out_dim=cfg["out_channels"],
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        ffn_dim=cfg["ffn_dim"],
        freq_dim=cfg["freq_dim"],
        text_dim=cfg["text_dim"],
        num_heads=cfg["num_attention_heads"],
        num_layers=cfg["num_layers"],
        image_dim=cfg.get("image_dim"),
        image_pos_len=cfg.get("pos_embed_seq_len"),
        cross_attn_norm=cfg["cross_attn_norm"],
        eps=cfg["eps"],
    )
