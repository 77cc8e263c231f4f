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
from services.denoiser.adapters import flux
from services.denoiser.convert.flux import CheckpointLayoutError, detect_flux_layout, strip_prefix

SINGLE_FILE_FAMILIES = ("FLUX.1",)


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
    try:
        detect_flux_layout(keys, source=str(path))
    except CheckpointLayoutError as e:
        raise InvalidArgument(f"not a checkpoint of a known family {SINGLE_FILE_FAMILIES}: {e}") from None
    return flux.load_single_file(path, device, memory)


DENOISERS: dict[str, Loader] = {
    "FluxTransformer2DModel": flux.load_hub,
    "single-file": load_single_file,
}
