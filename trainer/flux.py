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
from torch import Tensor

from services.common.errors import DiffmeshError
from services.common.models import Component, find_component, read_json
from services.denoiser.adapters.flux import image_ids, load_hub, pack
from services.denoiser.convert.flux import bfl_to_diffusers
from services.denoiser.models.flux import Flux, FluxParams
from services.denoiser.sampling.scheduler_config import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    SchedulerConfig,
)
from trainer.objective import flow_matching_loss, interpolate, sample_sigmas
from trainer.spec import SpecError
from trainer.storage import Storage, write_weights

NAME = "flux"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5 (sequence)
TEXT_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds")
VAE_COMPONENT = "vae"
DENOISER_COMPONENT = "transformer"
COMPONENTS = (*TEXT_COMPONENTS, VAE_COMPONENT, DENOISER_COMPONENT)
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}  # as orchestrator.families.flux
DEFAULTS_FILE = "diffmesh.json"
TRAIN_GUIDANCE = 1.0


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


def params_from_config(config: dict[str, Any], source: str) -> FluxParams:
    """A diffusers `FluxTransformer2DModel` config.json -> `FluxParams` (mlp ratio 4, theta 10000, qkv bias:
    what that class hard-codes); SpecError("baseModel") naming a missing field."""
    required = (
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
        "axes_dims_rope",
    )
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise SpecError("baseModel", f"{source}: the transformer config has no {missing}")
    if int(config.get("patch_size", 1)) != 1:
        raise SpecError(
            "baseModel", f"{source}: patch_size {config['patch_size']}; FLUX.1 packs 2x2 itself (1)"
        )
    head_dim = int(config["attention_head_dim"])
    axes = tuple(int(a) for a in config["axes_dims_rope"])
    if sum(axes) != head_dim:
        raise SpecError(
            "baseModel", f"{source}: axes_dims_rope {list(axes)} must sum to the head dim {head_dim}"
        )
    in_channels = int(config["in_channels"])
    return FluxParams(
        in_channels=in_channels,
        out_channels=int(config.get("out_channels") or in_channels),
        vec_in_dim=int(config["pooled_projection_dim"]),
        context_in_dim=int(config["joint_attention_dim"]),
        hidden_size=head_dim * int(config["num_attention_heads"]),
        mlp_ratio=4.0,
        num_heads=int(config["num_attention_heads"]),
        depth=int(config["num_layers"]),
        depth_single_blocks=int(config["num_single_layers"]),
        axes_dim=axes,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def init_random(params: FluxParams, seed: int) -> Flux:
    """A freshly initialised `Flux` (float32, CPU): PyTorch's default Linear init from a seeded global RNG,
    then adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", sec. 3.2): every
    modulation and the final projection start at zero, so each block starts as the identity and the
    model predicts v = 0."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Flux(params)
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for name, module in model.named_modules():
            zero = name.endswith(".lin") or name in ("final_layer.adaLN_modulation.1", "final_layer.linear")
            if zero and isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
    return model


def _scheduler_config(model_dir: Path, params: FluxParams) -> SchedulerConfig:
    """The model's `scheduler/scheduler_config.json`, else FLUX.1-dev's / -schnell's (as the denoiser does)."""
    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return FLUX_DEV_SCHEDULER if params.guidance_embed else FLUX_SCHNELL_SCHEDULER
    try:
        return SchedulerConfig.from_dict(read_json(path))
    except ValueError as e:
        raise SpecError("baseModel", f"{path}: {e}") from None


def new_denoiser(model_dir: Path, device: torch.device, seed: int) -> Denoiser:
    """`init: random`: our `Flux` built from `transformer/config.json` alone (weights there are ignored),
    seeded, float32, on `device`."""
    try:
        component = find_component(model_dir, [DENOISER_COMPONENT])
    except DiffmeshError as e:
        raise SpecError("baseModel", f"{model_dir}: {e}") from None
    if component.class_name != "FluxTransformer2DModel":
        raise SpecError(
            "baseModel", f"{component.path} is a {component.class_name!r}, not a FluxTransformer2DModel"
        )
    params = params_from_config(component.config, str(component.path / "config.json"))
    model = init_random(params, seed).to(device)
    return Denoiser(model, _scheduler_config(model_dir, params), component)


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
    written = write_weights(storage, folder, weights)
    storage.write(f"{folder}/config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    return [*written, f"{folder}/config.json"]


def drop_captions(
    text: dict[str, Tensor], empty: dict[str, Tensor], probability: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Caption dropout: each sample's text features `(B, ...)` replaced by the empty prompt's `(...)` with
    `probability` (one uniform draw per sample from `generator`), so the model also learns the unconditional
    velocity that classifier-free guidance (Ho & Salimans 2022) extrapolates from."""
    b = next(iter(text.values())).shape[0]
    drop = torch.rand(b, generator=generator) < probability  # (B,)
    out = {}
    for name, value in text.items():
        mask = drop.view(-1, *([1] * (value.ndim - 1)))
        out[name] = torch.where(mask, empty[name].to(value.dtype).expand_as(value), value)
    return out
