"""Denoiser models by the class name in their config (`_class_name`, e.g. "FluxTransformer2DModel").

Each loader takes the component and the device and returns an object with
`denoise(inputs: DenoiseInputs, on_step: Callable[[int, int], None], is_cancelled: Callable[[], bool])
-> dict[str, Tensor]` ("latents", and "audio_latents" for joint models). Families add theirs here.
"single-file" is an original checkpoint given as the model spec: its family is told from its key names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from services.common.errors import InvalidArgument
from services.common.memory import RESIDENT, MemoryPlan, memory_aware
from services.common.models import Component
from services.common.runtime import Loader
from services.denoiser.adapters import flux, wan_load
from services.denoiser.convert.flux import CheckpointLayoutError, detect_flux_layout, strip_prefix
from services.denoiser.convert.wan import detect_wan_layout

SINGLE_FILE_FAMILIES = ("FLUX.1", "Wan 2.1 / 2.2")


def _keys(path: Path) -> list[str]:
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"{path}: single-file denoisers must be .safetensors (got {path.suffix!r})")
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@memory_aware
def load_single_file(component: Component, device: torch.device, memory: MemoryPlan = RESIDENT):
    """Tell the family of one original checkpoint file by its key names, then load it."""
    path = Path(component.path)
    keys = list(strip_prefix(dict.fromkeys(_keys(path))).keys())  # type: ignore[arg-type]
    tried = []
    for detect, load in (
        (detect_flux_layout, flux.load_single_file),
        (detect_wan_layout, wan_load.load_single_file),
    ):
        try:
            detect(keys, source=str(path))
        except CheckpointLayoutError as e:
            tried.append(str(e))
            continue
        return load(path, device, memory)
    raise InvalidArgument(f"not a checkpoint of a known family {SINGLE_FILE_FAMILIES}: {'; '.join(tried)}")


DENOISERS: dict[str, Loader] = {
    "FluxTransformer2DModel": flux.load_hub,
    "WanTransformer3DModel": wan_load.load_hub,
    "single-file": load_single_file,
}
