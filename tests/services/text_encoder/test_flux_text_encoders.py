"""FLUX.1's text encoders through the real text-encoder servicer vs diffusers' FluxPipeline.encode_prompt
(the oracle), from the same tiny hub-layout directory, CPU fp32."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as diffusers_logging
from text_encoder_stage import Stage, serve
from tiny_text_encoders import write_flux_text_encoders
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

TOL = 1e-5
LONG = ", ".join(["a photo of a cat riding a dragon over a misty forest at sunset"] * 60)  # > 512 T5 tokens
PROMPTS = ["a photo of a cat", LONG]
PROMPTS_2 = [
    "vintage watercolor of a tall horse near a misty river at sunrise, golden light",
    LONG + ", golden",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux_text_encoders(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def stage(model_dir: Path) -> Iterator[Stage]:
    with serve(model_dir.parent) as s:
        yield s


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> FluxPipeline:
    """FluxPipeline's own loading of the folders (classes as it declares them); no transformer or VAE."""
    diffusers_logging.set_verbosity_error()  # its truncation warnings print the whole padded prompt
    return FluxPipeline(
        scheduler=None,
        vae=None,
        transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(model_dir / "text_encoder_2").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(model_dir / "tokenizer_2"),
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@pytest.mark.parametrize("max_sequence_length", [512, 16])
def test_outputs_equal_flux_pipeline(
    stage: Stage, pipe: FluxPipeline, model_dir: Path, max_sequence_length: int
) -> None:
    resp, out = stage.encode(
        model=str(model_dir), prompts=PROMPTS, prompts_2=PROMPTS_2, max_sequence_length=max_sequence_length
    )
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            PROMPTS, PROMPTS_2, max_sequence_length=max_sequence_length
        )
    assert sorted(out) == ["clip_prompt_embeds", "pooled_prompt_embeds", "prompt_embeds"]
    assert out["prompt_embeds"].shape == (2, max_sequence_length, 32)
    assert max_diff(out["prompt_embeds"], prompt_embeds) <= TOL
    assert max_diff(out["pooled_prompt_embeds"], pooled) <= TOL
    assert out["clip_prompt_embeds"].shape == (2, 77, 32)
    clip_counts = [len(ids) for ids in pipe.tokenizer(PROMPTS).input_ids]
    t5_counts = [len(ids) for ids in pipe.tokenizer_2(PROMPTS_2).input_ids]
    assert 16 < t5_counts[0] < 77 < clip_counts[1] and t5_counts[1] > 512
    assert list(resp.token_counts) == [max(a, b) for a, b in zip(clip_counts, t5_counts, strict=True)]
    assert list(resp.truncated) == [max_sequence_length == 16, True]


def test_prompts_2_defaults_to_prompts(stage: Stage, pipe: FluxPipeline, model_dir: Path) -> None:
    _, out = stage.encode(model=str(model_dir), prompts=PROMPTS, outputs=["prompt_embeds"])
    with torch.no_grad():
        ref, _, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    assert max_diff(out["prompt_embeds"], ref) <= TOL


def test_encoder_subset_and_output_selection(stage: Stage, pipe: FluxPipeline, model_dir: Path) -> None:
    resp, out = stage.encode(model=str(model_dir), prompts=PROMPTS[:1], encoders=["text_encoder"])
    assert sorted(out) == ["clip_prompt_embeds", "pooled_prompt_embeds"]
    assert list(resp.token_counts) == [7] and list(resp.truncated) == [False]
    resp, out = stage.encode(
        model=str(model_dir), prompts=PROMPTS[:1], outputs=["pooled_prompt_embeds"], name="negative"
    )
    assert list(out) == ["pooled_prompt_embeds"]
    assert resp.outputs["pooled_prompt_embeds"].ref.uri.endswith(
        "/text_encoder/negative.pooled_prompt_embeds"
    )
    with torch.no_grad():
        assert max_diff(out["pooled_prompt_embeds"], pipe._get_clip_prompt_embeds(PROMPTS[:1])) <= TOL


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"model": "no/such/dir"}, grpc.StatusCode.NOT_FOUND, ["no/such/dir"]),
        ({"encoders": ["text_encoder_3"]}, grpc.StatusCode.NOT_FOUND, ["text_encoder_3", "text_encoder_2"]),
        (
            {"outputs": ["attention_mask"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["attention_mask", "prompt_embeds"],
        ),
        (
            {"max_sequence_length": 100000},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["max_sequence_length", "100000"],
        ),
        ({"max_sequence_length": 513}, grpc.StatusCode.INVALID_ARGUMENT, ["513", "512"]),
        ({"prompts_2": ["x", "y"]}, grpc.StatusCode.INVALID_ARGUMENT, ["prompts_2"]),
    ],
)
def test_bad_requests_over_grpc(
    stage: Stage, model_dir: Path, fields: dict[str, object], code: grpc.StatusCode, words: list[str]
) -> None:
    got, details = stage.code(**{"model": str(model_dir), "prompts": ["a cat"], **fields})
    assert got == code, details
    assert all(w in details for w in words), details
    _, out = stage.encode(model=str(model_dir), prompts=["a cat"], max_sequence_length=8)  # still serving
    assert out["prompt_embeds"].shape == (1, 8, 32)


def test_one_component_directory(stage: Stage, model_dir: Path) -> None:
    """A spec naming one encoder folder runs it alone, routed by its name (text_encoder_2 gets prompts_2)."""
    fields = dict(prompts=PROMPTS, prompts_2=PROMPTS_2, max_sequence_length=16)
    _, hub = stage.encode(model=str(model_dir), encoders=["text_encoder_2"], **fields)
    _, one = stage.encode(model=str(model_dir / "text_encoder_2"), **fields)
    assert list(one) == ["prompt_embeds"] and torch.equal(one["prompt_embeds"], hub["prompt_embeds"])
    got, details = stage.code(model=str(model_dir / "text_encoder_2"), prompts=["a"], encoders=["a", "b"])
    assert got == grpc.StatusCode.NOT_FOUND and "text_encoder_2" in details, details
