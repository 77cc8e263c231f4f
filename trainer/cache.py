"""Text embeddings and VAE latents, computed once before training and kept as safetensors files.

The encoders and the VAE are loaded in-process through the stages' own loaders (the registries keyed by the
component's class name), used once, and freed before the denoiser is loaded. Latents are the posterior MEAN,
normalised as the denoiser sees them. Entries are keyed by a hash of (model component, image content, size) and
(text encoders, caption, max_sequence_length), so a restarted or repeated run with the same inputs reuses them.
Each file is written to a temporary name and renamed: a killed run leaves no half-written entry.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from services.common.models import find_component, weight_files
from services.text_encoder.registry import ENCODERS
from services.vae.registry import VAES
from trainer.data import FIELD, Item, load_pixels
from trainer.spec import SpecError

log = logging.getLogger(__name__)
MEMORY_LIMIT = 1 << 30  # hold the whole cache in memory below this many bytes
TEXT_BATCH = 8
IMAGE_BATCH = 16  # images of one size encoded together


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def component_id(model_dir: Path, subfolder: str) -> str:
    """Identity of a model component: its path, config.json and weight files (names, sizes, mtimes)."""
    comp = find_component(model_dir, [subfolder])
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files(comp.path)]
    return _digest(str(comp.path), comp.config, files)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _collect() -> None:
    """Return the memory of models just dropped (the caller deletes its references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FeatureCache:
    """Per item: latents `(C, h, w)` and the text features of its caption; batches stacked on dim 0."""

    def __init__(
        self,
        folder: Path,
        latent_keys: list[str],
        text_keys: list[str],
        extra_keys: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.latent_keys = latent_keys
        self.text_keys = text_keys
        self.extra_keys = dict(extra_keys or {})  # caption -> key, for captions of no item (the empty one)
        files = {self._latent(k) for k in latent_keys} | {self._text(k) for k in text_keys}
        files |= {self._text(k) for k in self.extra_keys.values()}
        self.nbytes = sum(p.stat().st_size for p in files)
        self._memory: dict[Path, dict[str, Tensor]] | None = (
            {p: load_file(p) for p in files} if self.nbytes <= MEMORY_LIMIT else None
        )

    def _latent(self, key: str) -> Path:
        return self.folder / "latents" / f"{key}.safetensors"

    def _text(self, key: str) -> Path:
        return self.folder / "text" / f"{key}.safetensors"

    def _read(self, path: Path) -> dict[str, Tensor]:
        return self._memory[path] if self._memory is not None else load_file(path)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """(latents (B, C, h, w), {name: (B, ...)}) of the dataset items `indices` (one bucket)."""
        latents = torch.stack([self._read(self._latent(self.latent_keys[i]))["latents"] for i in indices])
        texts = [self._read(self._text(self.text_keys[i])) for i in indices]
        return latents, {name: torch.stack([t[name] for t in texts]) for name in texts[0]}

    def caption_features(self, caption: str) -> dict[str, Tensor]:
        """The text features of one of the `extra_captions` the cache was built with: {name: (...)}."""
        if caption not in self.extra_keys:
            raise KeyError(f"caption {caption!r} was not cached; cached extras: {sorted(self.extra_keys)}")
        return dict(self._read(self._text(self.extra_keys[caption])))


def build_cache(
    items: list[Item],
    model_dir: Path,
    folder: Path,
    device: torch.device,
    *,
    text_components: Sequence[str],
    text_outputs: Sequence[str],
    vae_component: str,
    max_sequence_length: int,
    extra_captions: Sequence[str] = (),
) -> FeatureCache:
    """Encode whatever is not cached yet (loading only the models needed), free the models, return the cache.
    `extra_captions` (e.g. the empty prompt, for caption dropout) are encoded too, read by `caption_features`."""
    vae_id = component_id(model_dir, vae_component)
    text_id = [component_id(model_dir, c) for c in text_components]
    latent_keys = [_digest(vae_id, file_sha256(it.path), it.size) for it in items]

    def text_key(caption: str) -> str:
        return _digest(text_id, caption, max_sequence_length, list(text_outputs))

    text_keys = [text_key(it.caption) for it in items]

    todo = {k: it for k, it in zip(latent_keys, items, strict=True)}
    todo = {k: it for k, it in todo.items() if not (folder / "latents" / f"{k}.safetensors").is_file()}
    if todo:
        log.info("encoding %d images with the VAE", len(todo))
        comp = find_component(model_dir, [vae_component])
        vae = VAES[comp.class_name](comp, device)
        by_size: dict[tuple[int, int], list[tuple[str, Item]]] = {}
        for key, it in todo.items():
            by_size.setdefault(it.size, []).append((key, it))
        for group in by_size.values():
            for start in range(0, len(group), IMAGE_BATCH):
                chunk = group[start : start + IMAGE_BATCH]
                pixels = []
                for _, it in chunk:
                    try:
                        pixels.append(load_pixels(it.path, it.size))
                    except OSError as e:
                        raise SpecError(FIELD, f"image {it.image} cannot be decoded: {e}") from None
                z = vae.encode(torch.stack(pixels), sample=False)  # posterior means, normalised (B, C, h, w)
                for row, (key, _) in enumerate(chunk):
                    _save({"latents": z[row].float()}, folder / "latents" / f"{key}.safetensors")
        del vae
        _collect()

    extra_keys = {c: text_key(c) for c in extra_captions}
    captions = {k: it.caption for k, it in zip(text_keys, items, strict=True)}
    captions.update({k: c for c, k in extra_keys.items()})
    captions = {k: c for k, c in captions.items() if not (folder / "text" / f"{k}.safetensors").is_file()}
    if captions:
        log.info("encoding %d captions (max_sequence_length %d)", len(captions), max_sequence_length)
        encoders = []
        for name in text_components:
            comp = find_component(model_dir, [name])
            encoders.append(ENCODERS[comp.class_name](comp, device))
        keys = list(captions)
        for start in range(0, len(keys), TEXT_BATCH):
            chunk = keys[start : start + TEXT_BATCH]
            merged: dict[str, Tensor] = {}
            for enc in encoders:
                out = enc.encode([captions[k] for k in chunk], max_sequence_length=max_sequence_length)
                merged.update(out.outputs)
            missing = [n for n in text_outputs if n not in merged]
            if missing:
                raise SpecError("baseModel", f"{model_dir}: the text encoders produce no {missing}")
            for row, key in enumerate(chunk):
                _save(
                    {n: merged[n][row].float() for n in text_outputs}, folder / "text" / f"{key}.safetensors"
                )
        encoders.clear()
        _collect()
    return FeatureCache(folder, latent_keys, text_keys, extra_keys)
