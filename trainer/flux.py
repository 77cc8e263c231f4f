"""FLUX.1 for the trainer: which encoders make its text features, how the denoiser is loaded and called in a
training step, and how a fine-tuned transformer is saved back in the diffusers layout.

A training step packs the cached latents `(B, 16, h, w)` into tokens `(B, h/2 * w/2, 64)`, draws noise in the
latent shape (as the sampler does) and a sigma per sample, and regresses the velocity with the distilled guidance
embedded as a constant (1.0, as the diffusers FLUX LoRA scripts recommend for training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from services.common.errors import DiffmeshError
from services.common.models import Component, find_component, read_json
from services.denoiser.adapters.flux import image_ids, load_hub, pack
from services.denoiser.convert.flux import bfl_to_diffusers
from services.denoiser.models.flux import Flux
from services.denoiser.sampling.schedules import SchedulerConfig
from trainer.objective import flow_matching_loss, interpolate, sample_sigmas
from trainer.spec import SpecError
from trainer.storage import Storage

NAME = "flux"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5 (sequence)
TEXT_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds")
VAE_COMPONENT = "vae"
DENOISER_COMPONENT = "transformer"
COMPONENTS = (*TEXT_COMPONENTS, VAE_COMPONENT, DENOISER_COMPONENT)
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}  # as orchestrator.families.flux
DEFAULTS_FILE = "diffmesh.json"
TRAIN_GUIDANCE = 1.0
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def max_sequence_length(model_dir: Path) -> int:
    """T5 length: the model's `diffmesh.json` `defaults.max_sequence_length`, else 512 (dev) / 256 (schnell)."""
    path = model_dir / DEFAULTS_FILE
    if path.is_file():
        recorded = read_json(path).get("defaults", {})
        if isinstance(recorded, dict) and "max_sequence_length" in recorded:
            return int(recorded["max_sequence_length"])
    config_path = model_dir / DENOISER_COMPONENT / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    return MAX_SEQUENCE_LENGTH["schnell" if config.get("guidance_embeds") is False else "dev"]


@dataclass
class Denoiser:
    """The DiT to train, the scheduler config that sets its sigma shift, and where it came from."""

    model: Flux
    scheduler: SchedulerConfig
    component: Component


def load_denoiser(model_dir: Path, device: torch.device) -> Denoiser:
    """The hub `transformer/` folder as our BFL-named `Flux`, in its checkpoint dtype, on `device`."""
    try:
        component = find_component(model_dir, [DENOISER_COMPONENT])
        if component.class_name != "FluxTransformer2DModel":
            raise SpecError(
                "baseModel", f"{component.path} is a {component.class_name!r}, not a FluxTransformer2DModel"
            )
        adapter = load_hub(component, device)
    except DiffmeshError as e:
        raise SpecError("baseModel", f"{model_dir}: {e}") from None
    adapter.lora.close()  # the inference LoRA hooks are not needed while training
    return Denoiser(adapter.model, adapter.scheduler, component)


def training_loss(
    model: Flux,
    latents: Tensor,
    text: dict[str, Tensor],
    scheduler: SchedulerConfig,
    generator: torch.Generator,
    guidance: float = TRAIN_GUIDANCE,
) -> Tensor:
    """Flow-matching loss of one batch: latents `(B, 16, h, w)`, text "prompt_embeds" `(B, L, D)` and
    "pooled_prompt_embeds" `(B, Dp)`. Noise and sigmas come from `generator` (CPU), in that order."""
    b, _, h, w = latents.shape
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
    x0, noise = pack(latents.float()), pack(noise)  # (B, h/2 * w/2, 64)
    sigma = sample_sigmas(b, x0.shape[1], scheduler, generator).to(device)  # (B,)
    x_t, target = interpolate(x0, noise, sigma)
    # Under autocast the ops pick their dtype; otherwise inputs take the weights' dtype.
    dtype = torch.float32 if torch.is_autocast_enabled(device.type) else model.img_in.weight.dtype
    txt = text["prompt_embeds"].to(device, dtype)
    pred = model(
        img=x_t.to(dtype),
        img_ids=image_ids(h // 2, w // 2).to(device),
        txt=txt,
        txt_ids=torch.zeros(txt.shape[1], 3, device=device),
        timesteps=sigma,
        y=text["pooled_prompt_embeds"].to(device, dtype),
        guidance=torch.full((b,), guidance, device=device) if model.params.guidance_embed else None,
    )
    return flow_matching_loss(pred, target)


def save_transformer(model: Flux, base: Component, storage: Storage, folder: str) -> list[str]:
    """A diffusers `transformer/` folder: the base config.json and the weights in diffusers keys."""
    config: dict[str, Any] = dict(base.config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = bfl_to_diffusers(state, source="trained model")
    storage.write(f"{folder}/{WEIGHTS_NAME}", safetensors_bytes(weights, metadata={"format": "pt"}))
    storage.write(f"{folder}/config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    return [f"{folder}/{WEIGHTS_NAME}", f"{folder}/config.json"]
