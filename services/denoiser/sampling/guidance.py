"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6).

Two kinds of "guidance" exist in the families we serve, and only one of them lives here:

- True CFG: two predictions, conditional and unconditional (negative prompt), combined by :func:`cfg`.
  SD 1.5 / SDXL, Wan, Qwen-Image, Z-Image, and FLUX.1 with ``true_cfg_scale > 1`` and a negative prompt.
  Diffusers runs it only when the scale is > 1; the denoise loop should skip it likewise (one forward).
- Embedded (distilled) guidance: FLUX.1-dev was distilled to take the guidance scale as a model input
  (``guidance = full((B,), scale, float32)``; the transformer embeds ``guidance * 1000`` next to the
  timestep). That is one forward, no combination: pass it to the model adapter through ``extra_args``;
  nothing here is involved. FLUX.1-schnell takes no guidance input at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from services.denoiser.sampling.solvers import Model


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``: Ho & Salimans 2022, eq. 6 with ``scale = 1 + w``.

    The same expression, in the same order, as diffusers' pipelines (FLUX ``true_cfg_scale``, SD
    ``guidance_scale``), so results match bit for bit. Works on any prediction (velocity, epsilon, v).
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must have one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}"
        )
    return uncond + scale * (cond - uncond)


def _cat_pair(name: str, uncond: Any, cond: Any) -> Any:
    """``uncond`` and ``cond`` stacked along dim 0 (uncond first); ``None`` / equal non-tensors pass once."""
    if isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor):
        if uncond.shape[1:] != cond.shape[1:] or uncond.dtype != cond.dtype:
            raise ValueError(
                f"cond[{name!r}] {tuple(cond.shape)} {cond.dtype} and uncond[{name!r}] "
                f"{tuple(uncond.shape)} {uncond.dtype} cannot be batched (pad them to one shape)"
            )
        return torch.cat([uncond, cond])
    if isinstance(uncond, torch.Tensor) or isinstance(cond, torch.Tensor) or uncond != cond:
        raise ValueError(f"cond[{name!r}] and uncond[{name!r}] must both be tensors or be equal")
    return cond


def batched_cfg_model(model_fn: Model, scale: float) -> Model:
    """Wrap ``model_fn(x, sigma, **kwargs) -> pred`` into a guided model that runs cond and uncond as one
    forward of batch ``2B``: ``model(x, sigma, *, cond, uncond, **shared) -> cfg(pred_c, pred_u, scale)``.

    ``cond`` / ``uncond`` are mappings with the same keys (the conditioning that differs: text
    embeddings, masks, pooled vectors...); each pair is concatenated along dim 0, uncond first as in
    diffusers' SD pipelines. Everything with a batch dimension must go there; ``shared`` kwargs (e.g.
    position ids without a batch dimension) are passed unchanged. ``sigma`` is passed unchanged too: the
    model adapter expands it to the batch it gets. Use it with a solver as
    ``extra_args={"cond": {...}, "uncond": {...}, **shared}``.

    Equal to two separate calls combined by :func:`cfg` up to float rounding (kernels may block a batch
    of 2B differently); diffusers' FLUX true CFG makes two calls, SD makes one batched call.
    """

    def model(
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        **shared: Any,
    ) -> torch.Tensor:
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
        overlap = set(cond) & set(shared)
        if overlap:
            raise ValueError(f"keys {sorted(overlap)} given both as shared and as cond/uncond")
        batched = {k: _cat_pair(k, uncond[k], cond[k]) for k in cond}
        batch = x.shape[0]
        out = model_fn(torch.cat([x, x]), sigma, **batched, **shared)  # (2B, ...)
        if out.shape[0] != 2 * batch:
            raise ValueError(f"model_fn returned batch {out.shape[0]} for a doubled batch of {2 * batch}")
        pred_uncond, pred_cond = out.chunk(2)
        return cfg(pred_cond, pred_uncond, scale)

    return model
