"""VAEs by the class name in their config (`_class_name`, e.g. "AutoencoderKL", "AutoencoderKLWan").

Each loader takes the component and the device and returns an object with
`encode(pixels (B, 3, H, W) | (B, 3, F, H, W) in [-1, 1], *, sample: bool, generator, tiling) -> latents`
and `decode(latents, *, tiling) -> pixels` in [-1, 1], latents normalised as the denoiser expects.
"single-file" is an original checkpoint file given as the model spec. Families add theirs here.
"""

from __future__ import annotations

from services.common.runtime import Loader
from services.vae import autoencoder_kl

VAES: dict[str, Loader] = {
    "AutoencoderKL": autoencoder_kl.load_hub,
    "single-file": autoencoder_kl.load_single_file,
}
