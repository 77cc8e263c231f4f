"""Single weight files (ComfyUI-style `clip_l.safetensors`, `t5xxl.safetensors`, under optional prefixes):
sniffed, configured from tensor shapes, and equal to the same weights loaded from the hub layout."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file
from text_encoder_stage import Stage, serve
from tiny_text_encoders import randomize_, tiny_clip_text_model, tiny_t5_encoder, write_flux_text_encoders
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from services.common.models import Component
from services.text_encoder.encoders.clip import ClipTextEncoder
from services.text_encoder.encoders.single_file import load_single_file
from services.text_encoder.encoders.t5 import T5TextEncoder

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, cinematic lighting, highly detailed"]
# Every released CLIP text tower has 64-wide heads, which is what a single file's config is inferred with.
CLIP_64 = dict(hidden_size=128, num_attention_heads=2, hidden_act="gelu", projection_dim=128)


def plain(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in sd.items() if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX-layout folder whose CLIP has 64-wide heads, and single files of its two encoders beside it."""
    root = tmp_path_factory.mktemp("single")
    flux = write_flux_text_encoders(root / "flux")
    clip = tiny_clip_text_model(3, **CLIP_64)
    shutil.rmtree(flux / "text_encoder")
    clip.save_pretrained(flux / "text_encoder")
    files = root / "files"
    files.mkdir()
    sd = plain(clip.state_dict(), "text_encoders.clip_l.transformer.text_model.")
    sd["text_encoders.clip_l.transformer.text_projection.weight"] = torch.eye(128)  # ignored
    save_file(sd, files / "clip_l.safetensors")
    t5 = tiny_t5_encoder(1).state_dict()  # the same weights as flux/text_encoder_2
    save_file(plain({k: v for k, v in t5.items() if k != "shared.weight"}), files / "t5.safetensors")
    shutil.copytree(flux / "tokenizer_2", files / "t5.tokenizer")
    save_file(plain(t5), files / "lonely_t5.safetensors")  # no tokenizer beside it
    save_file({"model.diffusion_model.foo.weight": torch.zeros(2, 2)}, files / "mystery.safetensors")
    return root


@pytest.fixture(scope="module")
def stage(models: Path) -> Iterator[Stage]:
    with serve(models) as s:
        yield s


@pytest.mark.parametrize(("file", "folder"), [("clip_l", "text_encoder"), ("t5", "text_encoder_2")])
def test_single_file_equals_hub_layout(stage: Stage, models: Path, file: str, folder: str) -> None:
    resp, single = stage.encode(
        model=str(models / "files" / f"{file}.safetensors"), prompts=PROMPTS, max_sequence_length=24
    )
    ref_resp, hub = stage.encode(
        model=str(models / "flux"), prompts=PROMPTS, encoders=[folder], max_sequence_length=24
    )
    assert sorted(single) == sorted(hub)
    for name, tensor in hub.items():
        assert torch.equal(single[name], tensor), name
    assert list(resp.token_counts) == list(ref_resp.token_counts)
    assert list(resp.truncated) == list(ref_resp.truncated)


@pytest.mark.parametrize(
    ("file", "code", "words"),
    [
        ("mystery", grpc.StatusCode.INVALID_ARGUMENT, ["mystery.safetensors", "model.diffusion_model.foo"]),
        ("lonely_t5", grpc.StatusCode.NOT_FOUND, ["lonely_t5.tokenizer", "tokenizer_2"]),
    ],
)
def test_bad_single_files(
    stage: Stage, models: Path, file: str, code: grpc.StatusCode, words: list[str]
) -> None:
    got, details = stage.code(model=str(models / "files" / f"{file}.safetensors"), prompts=["a cat"])
    assert got == code, details
    assert all(w in details for w in words), details
    got, details = stage.code(model=str(models / "files" / "t5.safetensors"), prompts=["a"], encoders=["x"])
    assert got == grpc.StatusCode.NOT_FOUND and "t5.safetensors" in details


def test_checkpoint_dtype_is_kept(tmp_path: Path) -> None:
    clip = tiny_clip_text_model(0, **CLIP_64)
    save_file(
        plain({k: v.to(torch.bfloat16) for k, v in clip.state_dict().items()}), tmp_path / "c.safetensors"
    )
    enc = load_single_file(Component(tmp_path / "c.safetensors", "single-file", {}), torch.device("cpu"))
    assert isinstance(enc, ClipTextEncoder)
    assert enc.model.dtype == torch.bfloat16 and not enc.model.training
    assert enc.encode(PROMPTS).outputs["pooled_prompt_embeds"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["t5-relu", "umt5"])
def test_t5_variants_from_shapes(models: Path, tmp_path: Path, kind: str) -> None:
    if kind == "umt5":
        cfg = UMT5Config(**{**tiny_t5_encoder().config.to_dict(), "architectures": None})
        ref = randomize_(UMT5EncoderModel(cfg), 5)
    else:
        ref = tiny_t5_encoder(5, feed_forward_proj="relu", num_heads=2, d_kv=16)
    prefix = "text_encoders.t5xxl.transformer."
    save_file(plain(ref.state_dict(), prefix), tmp_path / "enc.safetensors")
    shutil.copytree(models / "flux" / "tokenizer_2", tmp_path / "tokenizer")
    enc = load_single_file(Component(tmp_path / "enc.safetensors", "single-file", {}), torch.device("cpu"))
    assert isinstance(enc, T5TextEncoder)
    assert type(enc.model).__name__ == ("UMT5EncoderModel" if kind == "umt5" else "T5EncoderModel")
    ids = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")(
        PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want = ref(ids)[0]
    got = enc.encode(PROMPTS, max_sequence_length=32).outputs["prompt_embeds"]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
