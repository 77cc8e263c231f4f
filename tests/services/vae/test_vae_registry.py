"""The VAE service's single-file entry tells a Wan VAE from a KL autoencoder (FLUX's ae) by its keys."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tiny_flux_vae import TINY_CONFIG
from tiny_wan_vae import make_tiny_wan_vae

from services.common.models import Component
from services.vae.autoencoder_kl import KLVae
from services.vae.convert.wan import diffusers_to_official
from services.vae.registry import VAES
from services.vae.wan import WanVae

CPU = torch.device("cpu")


def test_single_files_are_dispatched_by_their_keys(tmp_path: Path) -> None:
    file = tmp_path / "wan_2.1_vae.safetensors"
    sd = diffusers_to_official(make_tiny_wan_vae("2.1").state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    assert isinstance(VAES["single-file"](Component(file, "single-file", {}), CPU), WanVae)
    flux = tmp_path / "ae.safetensors"
    flux.with_suffix(".json").write_text(json.dumps(TINY_CONFIG))  # the tiny geometry (default: FLUX's)
    save_file({k: v.contiguous() for k, v in AutoencoderKL(**TINY_CONFIG).state_dict().items()}, str(flux))
    assert isinstance(VAES["single-file"](Component(flux, "single-file", {}), CPU), KLVae)
