"""The VAE service's single-file entry tells a Wan VAE from a KL autoencoder by its keys (the KL path: the
FLUX single-file tests in test_flux_vae.py go through the same entry)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_wan_vae import make_tiny_wan_vae

from services.common.models import Component
from services.vae.convert.wan import diffusers_to_official
from services.vae.registry import VAES
from services.vae.wan import WanVae

CPU = torch.device("cpu")


def test_single_files_are_dispatched_by_their_keys(tmp_path: Path) -> None:
    file = tmp_path / "wan_2.1_vae.safetensors"
    sd = diffusers_to_official(make_tiny_wan_vae("2.1").state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    assert isinstance(VAES["single-file"](Component(file, "single-file", {}), CPU), WanVae)
