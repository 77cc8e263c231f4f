"""Wan 2.1 / 2.2 in the sampling loop against diffusers' Wan pipelines (DESIGN §5): tiny random transformers saved
with a scheduler by the pipeline's own `save_pretrained`, loaded by the service's registry, sampled with the same
seed and embeddings; the final latents agree to 1e-4 (float32) for T2V (UniPC and Euler, with and without CFG,
the request's shift), Wan 2.2 A14B's two experts, TI2V-5B (text- and image-to-video), I2V / FLF2V / I2V-A14B and
video-to-video. Then: both checkpoint layouts, memory modes, and bad input -> InvalidArgument."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanVideoToVideoPipeline,
)
from safetensors.torch import save_file
from tiny_wan import I2V_TEXT_TOKENS, IMAGE_DIM, IMAGE_TOKENS, T2V_TEXT_TOKENS, TEXT_DIM, tiny_wan
from tiny_wan_vae import make_tiny_wan_vae

from services.common.errors import InvalidArgument
from services.common.memory import MemoryPlan
from services.common.models import find_component
from services.denoiser.adapters.wan import frame_mask
from services.denoiser.inputs import DenoiseInputs
from services.denoiser.registry import DENOISERS

CPU = torch.device("cpu")
NOOP = (lambda s, t: None, lambda: False)
TOL = 1e-4
SEED = 7
SIZE = {"2.1": (32, 48), "2.2": (64, 64)}  # (height, width): multiples of 16 / 32


def unipc(shift: float = 3.0) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def embeds(tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, TEXT_DIM, generator=g), torch.randn(1, tokens, TEXT_DIM, generator=g)


def inputs(**kw) -> DenoiseInputs:
    pos, neg = embeds(T2V_TEXT_TOKENS)
    height, width = SIZE["2.1"]
    base = dict(
        seed=SEED,
        steps=3,
        width=width,
        height=height,
        num_frames=5,
        batch_size=1,
        guidance=None,
        cfg_scale=None,
        positive={"prompt_embeds": pos},
        negative={"prompt_embeds": neg},
    )
    base.update(kw)
    return DenoiseInputs(**base)


def load(path: Path, plan: MemoryPlan | None = None):
    component = find_component(path, ["transformer"])
    return DENOISERS[component.class_name](component, CPU, plan or MemoryPlan())


def ours(model: Path, **kw) -> torch.Tensor:
    return load(model).denoise(inputs(**kw), *NOOP)["latents"]


def diffusers_latents(pipe, scheduler, request: DenoiseInputs, **kw) -> torch.Tensor:
    """The pipeline's latents for the request's seed, sizes, steps, scales and prompt embeddings."""
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=request.positive["prompt_embeds"],
        negative_prompt_embeds=request.negative["prompt_embeds"],
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.steps,
        guidance_scale=request.cfg_scale or 1.0,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="latent",
        **kw,
    ).frames


def assert_parity(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory) -> tuple[WanPipeline, Path]:
    pipe = WanPipeline(None, None, make_tiny_wan_vae("2.1"), unipc(), transformer=tiny_wan("t2v"))
    path = tmp_path_factory.mktemp("wan21-t2v")
    pipe.save_pretrained(path, max_shard_size="40KB")
    assert len(list((path / "transformer").glob("*.safetensors"))) > 1  # sharded
    return pipe, path


# -- T2V --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [None, 4.0])
@pytest.mark.parametrize("solver", ["", "euler"])
def test_t2v_matches_wan_pipeline(t2v, solver: str, cfg_scale: float | None):
    """UniPC from the model's config, or flow-match Euler at the same shift when the request asks for it."""
    pipe, path = t2v
    request = inputs(solver=solver, cfg_scale=cfg_scale)
    scheduler = unipc(3.0) if solver == "" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    seen: list[tuple[int, int]] = []
    got = load(path).denoise(request, lambda s, t: seen.append((s, t)), lambda: False)["latents"]
    assert_parity(got, diffusers_latents(pipe, scheduler, request))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_euler_config_and_the_requests_shift(t2v, tmp_path: Path):
    pipe, path = t2v
    request = inputs(shift=5.0, cfg_scale=3.0)
    assert_parity(ours(path, shift=5.0, cfg_scale=3.0), diffusers_latents(pipe, unipc(5.0), request))
    euler = WanPipeline(
        None, None, make_tiny_wan_vae("2.1"), FlowMatchEulerDiscreteScheduler(shift=2.0), pipe.transformer
    )
    euler.save_pretrained(tmp_path)
    request = inputs(cfg_scale=3.0)
    want = diffusers_latents(pipe, FlowMatchEulerDiscreteScheduler(shift=2.0), request)
    assert_parity(ours(tmp_path, cfg_scale=3.0), want)


# -- Wan 2.2 A14B: two experts --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a14b(tmp_path_factory: pytest.TempPathFactory) -> tuple[WanPipeline, Path]:
    pipe = WanPipeline(
        None,
        None,
        make_tiny_wan_vae("2.1"),
        unipc(),
        transformer=tiny_wan("t2v", seed=0),
        transformer_2=tiny_wan("t2v", seed=1),
        boundary_ratio=0.875,
    )
    path = tmp_path_factory.mktemp("wan22-a14b")
    pipe.save_pretrained(path)
    return pipe, path


@pytest.mark.parametrize("cfg_scale_2", [None, 2.0])
def test_two_experts_switch_at_the_boundary(a14b, cfg_scale_2: float | None):
    """4 UniPC steps at shift 3 run t = 999, 900, 750, 500: boundary 0.875 gives two steps to each expert."""
    pipe, path = a14b
    assert json.loads((path / "model_index.json").read_text())["boundary_ratio"] == 0.875
    request = inputs(steps=4, cfg_scale=4.0, cfg_scale_2=cfg_scale_2)
    want = diffusers_latents(pipe, unipc(), request, guidance_scale_2=cfg_scale_2)
    adapter = load(path)
    assert len(adapter.models) == 2
    assert_parity(adapter.denoise(request, *NOOP)["latents"], want)
    one_expert = WanPipeline(None, None, pipe.vae, unipc(), transformer=pipe.transformer)
    assert (want - diffusers_latents(one_expert, unipc(), request)).abs().max() > 1e-2  # the switch mattered


def test_two_experts_stream_in_sequential_mode(a14b):
    _, path = a14b
    request = inputs(steps=4, cfg_scale=4.0, cfg_scale_2=2.0)
    want = load(path).denoise(request, *NOOP)["latents"]
    adapter = load(path, MemoryPlan("sequential"))
    torch.testing.assert_close(adapter.denoise(request, *NOOP)["latents"], want, atol=1e-6, rtol=0)
    assert adapter.residency.streamer.loads == 4 * 2 * 2  # 4 steps, cond + uncond, 2 blocks of one expert


def test_boundary_ratio_needs_transformer_2(a14b, tmp_path: Path):
    _, path = a14b
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "transformer_2")
    with pytest.raises(InvalidArgument, match=r"boundary_ratio=0\.875 needs transformer_2"):
        load(tmp_path)


# -- TI2V-5B: the 2.2 VAE's latent, per-token timesteps ------------------------------------------------------------
def test_ti2v_text_to_video(tmp_path: Path):
    pipe = WanPipeline(
        None, None, make_tiny_wan_vae("2.2"), unipc(5.0), tiny_wan("ti2v"), expand_timesteps=True
    )
    pipe.save_pretrained(tmp_path)
    height, width = SIZE["2.2"]
    request = inputs(height=height, width=width, cfg_scale=4.0)
    got = load(tmp_path).denoise(request, *NOOP)["latents"]
    assert got.shape == (1, 48, 2, 4, 4)
    assert_parity(got, diffusers_latents(pipe, unipc(5.0), request))


def test_ti2v_image_to_video(tmp_path: Path):
    pipe = WanImageToVideoPipeline(
        None, None, make_tiny_wan_vae("2.2"), unipc(5.0), transformer=tiny_wan("ti2v"), expand_timesteps=True
    )
    pipe.save_pretrained(tmp_path)
    height, width = SIZE["2.2"]
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    pixels = pipe.video_processor.preprocess(image, height=height, width=width).float()
    _, first, _ = pipe.prepare_latents(
        pixels, 1, 48, height, width, 5, torch.float32, CPU, None, torch.zeros(1, 48, 2, 4, 4)
    )
    assert first.shape == (1, 48, 1, 4, 4)  # the first image's normalised latents
    request = inputs(
        height=height, width=width, cfg_scale=4.0, reference_latents=[first[:, :, 0]]
    )  # 4-D: an image
    want = diffusers_latents(pipe, unipc(5.0), request, image=image)
    got = load(tmp_path).denoise(request, *NOOP)["latents"]
    assert_parity(got, want)
    assert torch.equal(got[:, :, 0], first[:, :, 0])


# -- I2V / FLF2V / I2V-A14B: mask and condition-video latents beside the noise --------------------------------------
@pytest.mark.parametrize("geometry", ["i2v", "flf2v", "i2v-a14b"])
def test_image_to_video(tmp_path: Path, geometry: str):
    last = geometry == "flf2v"
    experts = (
        {
            "transformer": tiny_wan(geometry, seed=0),
            "transformer_2": tiny_wan(geometry, seed=1),
            "boundary_ratio": 0.9,
        }
        if geometry == "i2v-a14b"
        else {"transformer": tiny_wan(geometry)}
    )
    pipe = WanImageToVideoPipeline(None, None, make_tiny_wan_vae("2.1"), unipc(), **experts)
    pipe.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    height, width = SIZE["2.1"]
    first_image, last_image = torch.rand(2, 1, 3, height, width, generator=g)
    clip = torch.randn(2 if last else 1, IMAGE_TOKENS, IMAGE_DIM, generator=g)  # the image encoder's output
    pipe.encode_image = lambda image, device: clip  # CLIP features given directly, as the service gets them

    pixels = [
        pipe.video_processor.preprocess(i, height=height, width=width).float()
        for i in (first_image, last_image)
    ]
    _, condition = pipe.prepare_latents(
        pixels[0],
        1,
        16,
        height,
        width,
        5,
        torch.float32,
        CPU,
        None,
        torch.zeros(1, 16, 2, 4, 6),
        pixels[1] if last else None,
    )
    given = torch.tensor([1.0, 0, 0, 0, 1] if last else [1.0, 0, 0, 0, 0])
    assert torch.equal(frame_mask(given, 2)[None, :, :, None, None].expand(1, 4, 2, 4, 6), condition[:, :4])

    pos, neg = embeds(I2V_TEXT_TOKENS)  # diffusers splits 512 text tokens from the image tokens
    request = inputs(
        positive={"prompt_embeds": pos},
        negative={"prompt_embeds": neg},
        cfg_scale=4.0,
        reference_latents=[condition[:, 4:]],
        mask=1 - given if last else None,
        image_embeds={} if geometry == "i2v-a14b" else {"image_embeds": clip},
    )
    want = diffusers_latents(
        pipe, unipc(), request, image=first_image, last_image=last_image if last else None
    )
    assert_parity(load(tmp_path).denoise(request, *NOOP)["latents"], want)


# -- video-to-video ---------------------------------------------------------------------------------------
def test_video_to_video(t2v):
    pipe, path = t2v
    v2v = WanVideoToVideoPipeline(None, None, pipe.transformer, pipe.vae, unipc())
    height, width = SIZE["2.1"]
    video = torch.rand(1, 5, 3, height, width, generator=torch.Generator().manual_seed(4))
    pixels = v2v.video_processor.preprocess_video(video, height=height, width=width).float()
    vae = pipe.vae.config
    mean = torch.tensor(vae.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.latents_std).view(1, 16, 1, 1, 1)
    init = (pipe.vae.encode(pixels).latent_dist.mode() - mean) * inv_std
    request = inputs(
        steps=4, cfg_scale=4.0, init_latents=init, strength=0.7
    )  # int(2.8): 2 of the 4 steps run
    v2v.set_progress_bar_config(disable=True)
    want = v2v(
        video=video,
        prompt_embeds=request.positive["prompt_embeds"],
        negative_prompt_embeds=request.negative["prompt_embeds"],
        height=height,
        width=width,
        num_inference_steps=4,
        guidance_scale=4.0,
        strength=0.7,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).frames
    seen: list[tuple[int, int]] = []
    got = load(path).denoise(request, lambda s, t: seen.append((s, t)), lambda: False)["latents"]
    assert_parity(got, want)
    assert seen == [(1, 2), (2, 2)]


# -- layouts and memory modes ----------------------------------------------------------------------------------
def test_official_single_file_gives_the_hub_latents(t2v, tmp_path: Path):
    _, path = t2v
    hub = load(path)
    want = hub.denoise(inputs(cfg_scale=4.0), *NOOP)["latents"]
    sd = {
        f"model.diffusion_model.{k}": v.contiguous() for k, v in hub.model.state_dict().items()
    }  # Wan names
    single = tmp_path / "wan2.1_t2v_tiny.safetensors"
    save_file(sd, single)
    with pytest.raises(InvalidArgument, match="num_heads"):  # dim 32: not the released head dim 128
        load(single)
    single.with_suffix(".json").write_text('{"num_attention_heads": 2}')
    got = load(single).denoise(inputs(cfg_scale=4.0), *NOOP)["latents"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["offload", "sequential"])
def test_memory_modes_give_the_resident_latents(t2v, mode: str):
    _, path = t2v
    want = load(path).denoise(inputs(cfg_scale=4.0), *NOOP)["latents"]
    adapter = load(path, MemoryPlan(mode))
    torch.testing.assert_close(
        adapter.denoise(inputs(cfg_scale=4.0), *NOOP)["latents"], want, atol=1e-6, rtol=0
    )
    if mode == "sequential":
        blocks = adapter.model.blocks
        assert adapter.residency.streamer.loads == 3 * 2 * len(blocks)  # 3 steps, cond + uncond
        assert all(p.device.type == "meta" for b in blocks for p in b.parameters())


def test_bf16_weights_run_close_to_float32(t2v):
    _, path = t2v
    fp32 = load(path).denoise(inputs(), *NOOP)["latents"]
    adapter = load(path, MemoryPlan.parse("resident", "bfloat16"))
    assert adapter.compute_dtype == torch.bfloat16 and adapter.dtype == torch.float32
    assert adapter.model.time_embedding[0].weight.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    bf16 = adapter.denoise(inputs(), *NOOP)["latents"]
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.1


# -- bad input ----------------------------------------------------------------------------------------------
I2V_REF = torch.zeros(1, 16, 2, 4, 6)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"num_frames": 6}, "num_frames=6"),
        ({"width": 40}, "width=40"),
        ({"height": 24}, "height=24"),
        ({"positive": {"text": torch.zeros(1, 4, TEXT_DIM)}}, "prompt_embeds"),
        ({"positive": {"prompt_embeds": torch.zeros(1, 4, 8)}}, f"(B, L, {TEXT_DIM})"),
        ({"cfg_scale": 5.0, "negative": {}}, "negative"),
        ({"cfg_scale_2": 3.0}, "cfg_scale_2=3.0"),
        ({"guidance": 3.5}, "guidance=3.5"),
        ({"solver": "dpm++"}, "dpm++"),
        ({"sigmas": [1.0, 0.5, 0.2]}, "sampler.sigmas"),
        ({"reference_latents": [I2V_REF]}, "reference_latents"),
        ({"mask": torch.ones(5)}, "mask"),
        ({"image_embeds": {"image_embeds": torch.zeros(1, 5, IMAGE_DIM)}}, "image_embeds"),
        ({"init_latents": torch.zeros(1, 16, 3, 4, 6)}, "init_latents"),
    ],
)
def test_bad_t2v_inputs_are_invalid_argument(t2v, kw, needle):
    with pytest.raises(InvalidArgument) as err:
        load(t2v[1]).denoise(inputs(**kw), *NOOP)
    assert needle in str(err.value)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wan21-i2v")
    WanImageToVideoPipeline(
        None, None, make_tiny_wan_vae("2.1"), unipc(), transformer=tiny_wan("i2v")
    ).save_pretrained(path)
    return path


CLIP = {"image_embeds": torch.zeros(1, IMAGE_TOKENS, IMAGE_DIM)}


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"image_embeds": CLIP}, "reference_latents"),
        ({"reference_latents": [I2V_REF]}, "image_embeds"),
        ({"reference_latents": [torch.zeros(1, 16, 1, 4, 6)], "image_embeds": CLIP}, "reference_latents[0]"),
        (
            {"reference_latents": [I2V_REF], "image_embeds": {"image_embeds": torch.zeros(1, 5, 7)}},
            "image_embeds",
        ),
        ({"reference_latents": [I2V_REF], "image_embeds": CLIP, "mask": torch.full((5,), 0.5)}, "mask"),
        ({"reference_latents": [I2V_REF], "image_embeds": CLIP, "mask": torch.ones(9)}, "mask"),
    ],
)
def test_bad_i2v_inputs_are_invalid_argument(i2v: Path, kw, needle):
    with pytest.raises(InvalidArgument) as err:
        load(i2v).denoise(inputs(**kw), *NOOP)
    assert needle in str(err.value)


def test_ti2v_sizes_are_multiples_of_32(tmp_path: Path):
    WanPipeline(
        None, None, make_tiny_wan_vae("2.2"), unipc(5.0), tiny_wan("ti2v"), expand_timesteps=True
    ).save_pretrained(tmp_path)
    with pytest.raises(InvalidArgument, match=r"width=48: .* multiple of 32"):
        load(tmp_path).denoise(inputs(height=64, width=48), *NOOP)
