"""Training the KL autoencoder (`component: "vae"`, mode FULL) on a dataset's images; captions are not used.

- The model: our `AutoEncoder` (BFL names) of the geometry the base model's `vae/config.json` (a diffusers
  `AutoencoderKL` config) describes: `init: random` builds it from that config with a seeded init (the
  weights there, if any, are ignored); `init: pretrained` loads them.
- The loss, per batch of images x in [-1, 1] (Kingma & Welling 2014; the LDM autoencoder of Rombach et al. 2022
  without its perceptual and GAN terms, which flat-coloured images do not need):
  ``L1(decode(z), x) + KL_WEIGHT * KL(q(z|x) || N(0, I))``, with z drawn from the posterior
  (reparameterised, the noise from the training generator) and both terms means over their elements.
  KL_WEIGHT = 1e-4 per latent element keeps the posterior variances from collapsing to zero and the means
  bounded, while the reconstruction dominates (the LDM's 1e-6 is on sums: 12 image values per latent value
  at 8x, 16 channels, so ~1e-5 in these units; more regularisation gives the denoiser smoother latents).
- At the end, the normalisation the denoiser needs: `shift_factor` = the mean and `scaling_factor` = 1 / the
  standard deviation of the posterior means over the whole dataset (one scalar each, as FLUX.1's VAE has).
- Saved as a diffusers `AutoencoderKL` folder `vae/` (config.json + diffusion_pytorch_model.safetensors in
  diffusers keys), which diffusers' `AutoencoderKL.from_pretrained` and our VAE loader both read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.common.errors import DiffmeshError
from services.common.models import find_component
from services.vae.autoencoder_kl import load_hub
from services.vae.convert.flux import bfl_to_diffusers
from services.vae.models.flux import LOGVAR_MAX, LOGVAR_MIN, AutoEncoder, AutoEncoderParams
from trainer.data import FIELD, Item, load_pixels
from trainer.spec import SpecError, TrainSpec
from trainer.storage import Storage, write_weights

log = logging.getLogger(__name__)
COMPONENT = "vae"
FOLDER = "vae"
KL_WEIGHT = 1e-4
STATS_BATCH = 64


def params_from_config(config: dict[str, Any], source: str) -> AutoEncoderParams:
    """A diffusers `AutoencoderKL` config -> our params (normalisation 1 / 0 until `latent_stats` sets it)."""
    widths = [int(c) for c in config.get("block_out_channels") or []]
    if not widths or any(w % widths[0] for w in widths):
        raise SpecError("baseModel", f"{source}: block_out_channels {widths} must be multiples of the first")
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != len(widths):
            raise SpecError("baseModel", f"{source}: {key} has {len(config[key])} entries, not {len(widths)}")
    try:
        return AutoEncoderParams(
            resolution=int(config.get("sample_size") or 256),
            in_channels=int(config.get("in_channels", 3)),
            ch=widths[0],
            out_ch=int(config.get("out_channels", 3)),
            ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=int(config.get("layers_per_block", 1)),
            z_channels=int(config.get("latent_channels", 4)),
            scale_factor=float(config.get("scaling_factor") or 1.0),
            shift_factor=float(config.get("shift_factor") or 0.0),
            norm_groups=int(config.get("norm_num_groups", 32)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        )
    except ValueError as e:
        raise SpecError("baseModel", f"{source}: {e}") from None


def diffusers_config(p: AutoEncoderParams) -> dict[str, Any]:
    """The `AutoencoderKL` config.json of params `p` (what `save_pretrained` writes, less version noise)."""
    n = len(p.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [p.ch * m for m in p.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": p.in_channels,
        "latent_channels": p.z_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": p.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": p.norm_groups,
        "out_channels": p.out_ch,
        "sample_size": p.resolution,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": p.use_post_quant_conv,
        "use_quant_conv": p.use_quant_conv,
    }


def new_autoencoder(params: AutoEncoderParams, seed: int) -> AutoEncoder:
    """PyTorch's default init from a seeded RNG (the global RNG's state is restored after)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AutoEncoder(params)
    finally:
        torch.random.set_rng_state(state)


def build(spec: TrainSpec, model_dir: Path) -> AutoEncoder:
    """The autoencoder to train, float32 on the CPU: from `vae/config.json` (random) or its weights."""
    try:
        component = find_component(model_dir, [COMPONENT])
    except DiffmeshError as e:
        raise SpecError("baseModel", f"{model_dir}: {e}") from None
    if component.class_name != "AutoencoderKL":
        raise SpecError("baseModel", f"{component.path} is a {component.class_name!r}, not an AutoencoderKL")
    if spec.init == "random":
        return new_autoencoder(params_from_config(component.config, str(component.path)), spec.seed)
    try:
        return load_hub(component, torch.device("cpu")).model.float()
    except DiffmeshError as e:
        raise SpecError("baseModel", f"{component.path}: {e}") from None


def kl_divergence(moments: Tensor) -> Tensor:
    """Mean over elements of KL(N(mean, var) || N(0, 1)) = 0.5 (mean^2 + var - 1 - logvar)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    return 0.5 * torch.mean(mean**2 + logvar.exp() - 1.0 - logvar)


def training_loss(
    model: AutoEncoder, x: Tensor, generator: torch.Generator, kl_weight: float = KL_WEIGHT
) -> Tensor:
    """L1 reconstruction of a posterior sample + kl_weight * KL; x `(B, 3, H, W)` in [-1, 1]."""
    moments = model.encode_moments(x)  # (B, 2z, h, w)
    mean, logvar = moments.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(x.device)
    z = mean + torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)) * eps.to(mean.dtype)
    recon = model.decode_raw(z)
    return torch.mean(torch.abs(recon.float() - x.float())) + kl_weight * kl_divergence(moments)


class Images:
    """Every image of the dataset decoded once and held as uint8 `(3, h, w)` (a quarter of float32)."""

    def __init__(self, items: list[Item]) -> None:
        self.pixels: list[Tensor] = []
        for it in items:
            try:
                x = load_pixels(it.path, it.size)
            except OSError as e:
                raise SpecError(FIELD, f"image {it.image} cannot be decoded: {e}") from None
            self.pixels.append(((x + 1.0) * 127.5).round().to(torch.uint8))

    def batch(self, indices: list[int], device: torch.device) -> Tensor:
        """(B, 3, h, w) float32 in [-1, 1] (indices of one bucket)."""
        x = torch.stack([self.pixels[i] for i in indices]).to(device)
        return x.float() / 127.5 - 1.0


@torch.no_grad()
def latent_stats(model: AutoEncoder, images: Images, device: torch.device) -> tuple[float, float]:
    """(shift, scale): the mean and 1 / std of every posterior-mean element over the dataset."""
    total, total_sq, count = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(images.pixels):
        by_size.setdefault(tuple(p.shape), []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), STATS_BATCH):
            x = images.batch(indices[start : start + STATS_BATCH], device)
            mean = model.encode_raw(x.to(next(model.parameters()).dtype)).double()
            total += float(mean.sum())
            total_sq += float((mean**2).sum())
            count += mean.numel()
    model.train(was_training)
    mu = total / count
    std = max(total_sq / count - mu * mu, 1e-12) ** 0.5
    return mu, 1.0 / std


def save(model: AutoEncoder, storage: Storage, folder: str = FOLDER) -> list[str]:
    """A diffusers `AutoencoderKL` folder: config.json (with the model's normalisation) and the weights."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = bfl_to_diffusers(state)
    written = write_weights(storage, folder, weights)
    config = diffusers_config(model.params)
    storage.write(f"{folder}/config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    return [*written, f"{folder}/config.json"]


def calibrate(model: AutoEncoder, images: Images, device: torch.device) -> AutoEncoder:
    """The same weights with `shift_factor` / `scale_factor` measured on the dataset (`latent_stats`)."""
    shift, scale = latent_stats(model, images, device)
    log.info("latent statistics: shift_factor %.5f scaling_factor %.5f", shift, scale)
    params = AutoEncoderParams(**{**model.params.__dict__, "shift_factor": shift, "scale_factor": scale})
    out = AutoEncoder(params)
    out.load_state_dict(model.state_dict())
    return out.to(device)
