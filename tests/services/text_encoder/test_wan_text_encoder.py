"""Wan's umT5 text encoder through the real text-encoder servicer vs diffusers' WanPipeline.encode_prompt (the
oracle), from the same tiny hub-layout directory and from single safetensors files in both key layouts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file
from text_encoder_stage import Stage, serve
from tiny_text_encoders import T5_CONFIG, write_wan_text_encoder

from services.common.errors import InvalidArgument
from services.text_encoder.encoders.umt5 import WanT5TextEncoder, clean_prompt, load_wan_t5_file

TOL = 1e-6
LONG = " ".join(["a golden dragon flying over a misty castle at sunset"] * 60)  # > 512 tokens
PROMPTS = [
    "a photo of a cat",
    "  an  astronaut < a horse &amp;amp; a cat\n\n riding on the moon,   cinematic lighting ",  # cleaned first
    "cafÃ© au lait\x07 on a wooden table",  # mojibake and a control character: ftfy repairs them
    LONG,
]
NEGATIVE = "low quality, blurry, static"
LAYERS = T5_CONFIG["num_layers"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wan_text_encoder(tmp_path_factory.mktemp("wan") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> WanPipeline:
    """WanPipeline's own loading of the folder; no transformer or VAE."""
    diffusers_logging.set_verbosity_error()
    return WanPipeline.from_pretrained(model_dir, vae=None, transformer=None, transformer_2=None)


@pytest.fixture(scope="module")
def stage(model_dir: Path) -> Iterator[Stage]:
    with serve(model_dir.parent) as s:
        yield s


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


def to_wan_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' UMT5EncoderModel names -> Wan's own T5Encoder names (wan/modules/t5.py), by hand."""
    out = {
        "token_embedding.weight": sd.pop("shared.weight"),
        "norm.weight": sd.pop("encoder.final_layer_norm.weight"),
    }
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared
    for i in range(LAYERS):
        src, dst = f"encoder.block.{i}.layer.", f"blocks.{i}."
        out[dst + "norm1.weight"] = sd.pop(src + "0.layer_norm.weight")
        for n in "qkvo":
            out[dst + f"attn.{n}.weight"] = sd.pop(src + f"0.SelfAttention.{n}.weight")
        out[dst + "pos_embedding.embedding.weight"] = sd.pop(
            src + "0.SelfAttention.relative_attention_bias.weight"
        )
        out[dst + "norm2.weight"] = sd.pop(src + "1.layer_norm.weight")
        out[dst + "ffn.gate.0.weight"] = sd.pop(src + "1.DenseReluDense.wi_0.weight")
        out[dst + "ffn.fc1.weight"] = sd.pop(src + "1.DenseReluDense.wi_1.weight")
        out[dst + "ffn.fc2.weight"] = sd.pop(src + "1.DenseReluDense.wo.weight")
    assert not sd, f"unmapped keys {sorted(sd)}"
    return out


@pytest.fixture(scope="module")
def files(model_dir: Path, pipe: WanPipeline) -> Path:
    """The same weights as single files: transformers' names (bare, as ComfyUI's umt5_xxl_fp16, and under a
    prefix) with `<stem>.tokenizer/` beside them, Wan's own names with `tokenizer/`, and a pickle."""
    root = model_dir.parent / "files"
    root.mkdir()
    sd = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}  # clones: no shared storage
    save_file(sd, root / "umt5_xxl.safetensors")
    save_file(
        {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in sd.items()}, root / "prefixed.safetensors"
    )
    for stem in ("umt5_xxl", "prefixed"):
        shutil.copytree(model_dir / "tokenizer", root / f"{stem}.tokenizer")
    wan = to_wan_layout(dict(sd))
    save_file(wan, root / "models_t5_umt5-xxl-enc.safetensors")
    shutil.copytree(model_dir / "tokenizer", root / "tokenizer")
    torch.save(wan, root / "models_t5_umt5-xxl-enc-bf16.pth")
    save_file({**wan, "blocks.0.extra.weight": torch.zeros(2)}, root / "odd.safetensors")
    return root


@pytest.mark.parametrize("max_sequence_length", [512, 16])
def test_outputs_equal_wan_pipeline(
    stage: Stage, pipe: WanPipeline, model_dir: Path, max_sequence_length: int
) -> None:
    resp, out = stage.encode(model=str(model_dir), prompts=PROMPTS, max_sequence_length=max_sequence_length)
    _, neg = stage.encode(
        model=str(model_dir),
        prompts=[NEGATIVE] * len(PROMPTS),
        max_sequence_length=max_sequence_length,
        name="negative",
    )
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=max_sequence_length)
    assert list(out) == ["prompt_embeds"] and out["prompt_embeds"].shape == (4, max_sequence_length, 32)
    assert max_diff(out["prompt_embeds"], ref) <= TOL
    assert max_diff(neg["prompt_embeds"], ref_neg) <= TOL
    counts = [len(pipe.tokenizer(prompt_clean(p)).input_ids) for p in PROMPTS]
    assert list(resp.token_counts) == counts
    assert list(resp.truncated) == [n > max_sequence_length for n in counts]
    for row, n in zip(out["prompt_embeds"], counts, strict=True):  # real tokens, then exact zeros
        n = min(n, max_sequence_length)
        assert bool((row[:n].abs().sum(-1) > 0).all()) and not row[n:].any()


@pytest.mark.parametrize(
    "text",
    [
        *PROMPTS,
        "\t tabs\tand\r\nbreaks \u3000 ideographic space",
        "doesnâ€™t &lt;b&gt;bold&lt;/b&gt;",
        "ﬁsh &#39;n&#39; chips",
        "",
    ],
)
def test_prompt_cleaning_equals_wan(text: str) -> None:
    assert clean_prompt(text) == prompt_clean(text)


def test_default_length_is_512_and_longer_is_refused(
    stage: Stage, pipe: WanPipeline, model_dir: Path
) -> None:
    _, out = stage.encode(model=str(model_dir), prompts=PROMPTS[:1])
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS[:1], do_classifier_free_guidance=False, max_sequence_length=512)
    assert max_diff(out["prompt_embeds"], ref) <= TOL
    code, details = stage.code(model=str(model_dir), prompts=["a cat"], max_sequence_length=513)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "513" in details and "512" in details, details


def test_wan_mode_comes_from_the_model_index(stage: Stage, model_dir: Path, tmp_path: Path) -> None:
    """The same umT5 folder outside a Wan pipeline keeps the plain T5 encoder (no mask, no cut)."""
    _, wan = stage.encode(model=str(model_dir / "text_encoder"), prompts=PROMPTS[:2], max_sequence_length=24)
    _, hub = stage.encode(model=str(model_dir), prompts=PROMPTS[:2], max_sequence_length=24)
    assert torch.equal(wan["prompt_embeds"], hub["prompt_embeds"])
    plain = tmp_path / "plain"
    for folder in ("text_encoder", "tokenizer"):
        shutil.copytree(model_dir / folder, plain / folder)
    _, other = stage.encode(model=str(plain), prompts=PROMPTS[:2], max_sequence_length=24)
    assert (other["prompt_embeds"] - hub["prompt_embeds"]).abs().max().item() > 1e-3
    assert bool((other["prompt_embeds"][0, 10:].abs().sum(-1) > 0).all())  # padding rows are not zero


@pytest.mark.parametrize("file", ["umt5_xxl", "prefixed", "models_t5_umt5-xxl-enc"])
def test_single_files_equal_hub_layout(stage: Stage, model_dir: Path, files: Path, file: str) -> None:
    fields = dict(prompts=PROMPTS, max_sequence_length=40)
    resp, single = stage.encode(model=str(files / f"{file}.safetensors"), **fields)
    ref_resp, hub = stage.encode(model=str(model_dir), **fields)
    assert list(single) == ["prompt_embeds"]
    assert torch.equal(single["prompt_embeds"], hub["prompt_embeds"])
    assert list(resp.token_counts) == list(ref_resp.token_counts)


def test_wan_layout_gated_ffn_roles(files: Path) -> None:
    """Independently of the key table: Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x)))."""
    enc = load_wan_t5_file(files / "models_t5_umt5-xxl-enc.safetensors", torch.device("cpu"))
    assert isinstance(enc, WanT5TextEncoder)
    wan = load_file(files / "models_t5_umt5-xxl-enc.safetensors")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    gate = torch.nn.functional.gelu(x @ wan["blocks.1.ffn.gate.0.weight"].T, approximate="tanh")
    want = (x @ wan["blocks.1.ffn.fc1.weight"].T * gate) @ wan["blocks.1.ffn.fc2.weight"].T
    with torch.no_grad():
        got = enc.model.encoder.block[1].layer[1].DenseReluDense(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_bad_single_files(stage: Stage, files: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_wan_t5_file(files / "models_t5_umt5-xxl-enc-bf16.pth", torch.device("cpu"))
    assert all(w in str(info.value) for w in ("models_t5_umt5-xxl-enc-bf16.pth", "safetensors", "pickle"))
    with pytest.raises(InvalidArgument, match=r"blocks\.0\.extra\.weight"):
        load_wan_t5_file(files / "odd.safetensors", torch.device("cpu"))
    code, details = stage.code(model=str(files / "odd.safetensors"), prompts=["a cat"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "odd.safetensors" in details, details
