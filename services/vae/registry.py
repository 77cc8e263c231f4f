"""VAEs by the class name in their config (`_class_name`, e.g. "AutoencoderKL", "AutoencoderKLWan").

Each loader takes the component and the device and returns an object with
`encode(pixels (B, 3, H, W) | (B, 3, F, H, W) in [-1, 1], *, sample: bool, generator, tiling) -> latents`
and `decode(latents, *, tiling) -> pixels` in [-1, 1], latents normalised as the denoiser expects.
"single-file" is an original checkpoint file given as the model spec. Families add theirs here.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open

from services.common.models import Component
from services.common.runtime import Loader
from services.vae import autoencoder_kl, wan


def load_single_file(component: Component, device: torch.device) -> Any:
    """One VAE file: a Wan 2.1 / 2.2 VAE when its keys say so, else a KL autoencoder (FLUX's `ae.safetensors`)."""
    if component.path.suffix == ".safetensors":
        with safe_open(str(component.path), framework="pt") as f:
            if wan.is_wan_vae(list(f.keys())):
                return wan.load_single_file(component, device)
    return autoencoder_kl.load_single_file(component, device)


VAES: dict[str, Loader] = {
    "AutoencoderKL": autoencoder_kl.load_hub,
    "AutoencoderKLWan": wan.load_hub,
    "single-file": load_single_file,
}
