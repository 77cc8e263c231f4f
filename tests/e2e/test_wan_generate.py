"""Wan text-to-video end to end: our engine on tiny saved WanPipelines gives diffusers' frames for the same
seed — Wan 2.1 with UniPC and with flow-match Euler, with and without CFG, and Wan 2.2 A14B's two experts with
their own guidance scales — in-process and through `diffmesh up`'s services; MP4 and PNG-frame outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_flux import psnr, to_uint8
from tiny_wan_pipeline import make_tiny_wan_pipeline

from orchestrator.client import Client
from protos import orchestrator_pb2
from services.vae.video import decode_mp4

PROMPT = "a red ball bouncing on a white floor"
MIN_PSNR = 40.0
FRAMES, SIZE, STEPS = 5, 32, 3


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("wan")
    out = {}
    for name, kw in {
        "unipc": dict(experts=1, sampler="unipc"),
        "euler": dict(experts=1, sampler="euler"),
        "a14b": dict(experts=2, sampler="unipc"),
    }.items():
        out[name] = (root / name, make_tiny_wan_pipeline(root / name, **kw))
    return out


def request(path: Path, **kw) -> orchestrator_pb2.GenerateRequest:
    base = dict(
        model=str(path), prompt=PROMPT, seed=11, steps=STEPS, width=SIZE, height=SIZE, num_frames=FRAMES
    )
    base.update(kw)
    req = orchestrator_pb2.GenerateRequest(**base)
    req.output.video_frames_png = True
    return req


def frames_of(result: orchestrator_pb2.GenerateResult) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in result.images])


def reference(pipe, **kw) -> np.ndarray:
    args = dict(prompt=PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS)
    args.update(kw)
    if "video" in args:  # video-to-video: the frame count is the input's
        del args["num_frames"]
    with torch.no_grad():
        video = pipe(**args, generator=torch.Generator("cpu").manual_seed(11), output_type="np").frames[0]
    return to_uint8(video)


@pytest.mark.parametrize(
    ("name", "ours", "theirs"),
    [
        ("unipc", dict(cfg_scale=4.0), dict(guidance_scale=4.0)),
        ("unipc", dict(cfg_scale=1.0), dict(guidance_scale=1.0)),
        (
            "euler",
            dict(cfg_scale=4.0, negative_prompt="blurry"),
            dict(guidance_scale=4.0, negative_prompt="blurry"),
        ),
        ("a14b", dict(cfg_scale=4.0, cfg_scale_2=2.0), dict(guidance_scale=4.0, guidance_scale_2=2.0)),
    ],
)
def test_t2v_matches_diffusers_in_process(wan_dirs, engine, name, ours, theirs):
    path, pipe = wan_dirs[name]
    result = engine.generate(request(path, **ours), lambda e: None)
    got, want = frames_of(result), reference(pipe, **theirs)
    assert got.shape == want.shape == (FRAMES, SIZE, SIZE, 3)
    assert psnr(got, want) >= MIN_PSNR, f"{name} {ours}: PSNR {psnr(got, want):.1f} dB"


def test_mp4_output_and_services_equal_in_process(wan_dirs, engine, stack, tmp_path):
    path, _ = wan_dirs["unipc"]
    local = frames_of(engine.generate(request(path, cfg_scale=4.0), lambda e: None))
    with Client(stack.endpoints["orchestrator"], stack.token) as client:
        remote = client.run(request(path, cfg_scale=4.0)).result
        assert np.array_equal(frames_of(remote), local)
        mp4 = request(path, cfg_scale=4.0)
        mp4.output.video_frames_png = False
        video = client.run(mp4).result
    assert not video.images and video.video[4:8] == b"ftyp"
    pixels, fps = decode_mp4(video.video, "video")
    assert pixels.shape == (3, FRAMES, SIZE, SIZE) and fps == pytest.approx(16.0)
    decoded = ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8)
    assert psnr(decoded, local) > 25.0  # H.264 at CRF 17 on a 32x32 random-model video


def test_cli_writes_mp4_and_png_frames(wan_dirs, tmp_path, capsys):
    from orchestrator.cli import main

    path, pipe = wan_dirs["unipc"]
    common = [
        "generate", "--local", "--model", str(path), "--prompt", PROMPT, "--seed", "11", "--steps", str(STEPS),
        "--width", str(SIZE), "--height", str(SIZE), "--num-frames", str(FRAMES), "--cfg-scale", "4", "--quiet",
    ]  # fmt: skip
    assert main([*common, "--out", f"{tmp_path}/frames/"]) == 0
    files = sorted((tmp_path / "frames").glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(FRAMES)]
    got = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert psnr(got, reference(pipe, guidance_scale=4.0)) >= MIN_PSNR
    assert main([*common, "--fps", "8", "--out", str(tmp_path / "v.mp4")]) == 0
    _, fps = decode_mp4((tmp_path / "v.mp4").read_bytes(), "v.mp4")
    assert fps == pytest.approx(8.0)
    assert main([*common[:-3], "--num-frames", "6", "--quiet", "--out", str(tmp_path / "bad.mp4")]) == 1
    assert "INVALID_ARGUMENT: num_frames=6: Wan takes 4k+1 frames" in capsys.readouterr().err


# -- image-to-video, first-last-frame, TI2V and video-to-video -------------------------------------------


def still(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random picture, not at the output size (the engine resizes it as diffusers does)."""
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(5, 5, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def png_media(img: Image.Image):
    from protos import common_pb2

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return common_pb2.Media(data=buf.getvalue(), mime_type="image/png")


@pytest.fixture(scope="module")
def wan_image_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    from tiny_wan_pipeline import make_tiny_wan_i2v, make_tiny_wan_ti2v, make_tiny_wan_v2v

    root = tmp_path_factory.mktemp("wan-image")
    return {
        "i2v": (root / "i2v", make_tiny_wan_i2v(root / "i2v")),
        "flf2v": (root / "flf2v", make_tiny_wan_i2v(root / "flf2v", last_frame=True)),
        "ti2v": (root / "ti2v", make_tiny_wan_ti2v(root / "ti2v")),
        "v2v": (root / "v2v", make_tiny_wan_v2v(root / "v2v")),
    }


def test_i2v_and_flf2v_match_diffusers(wan_image_dirs, engine):
    first, last = still(1), still(2)
    for task in ("i2v", "flf2v"):
        path, pipe = wan_image_dirs[task]
        req = request(path, cfg_scale=4.0)
        req.input_images.append(png_media(first))
        extra = {}
        if task == "flf2v":
            req.last_image.CopyFrom(png_media(last))
            extra["last_image"] = last
        result = engine.generate(req, lambda e: None)
        assert json.loads(result.parameters)["task"] == task
        want = reference(pipe, image=first, guidance_scale=4.0, **extra)
        got = frames_of(result)
        assert psnr(got, want) >= MIN_PSNR, f"{task}: PSNR {psnr(got, want):.1f} dB"


def test_ti2v_text_and_image_to_video_match_diffusers(wan_image_dirs, engine):
    from diffusers import WanPipeline

    path, pipe = wan_image_dirs["ti2v"]
    req = request(path, cfg_scale=4.0)
    req.input_images.append(png_media(still(3)))
    result = engine.generate(req, lambda e: None)
    assert json.loads(result.parameters)["task"] == "ti2v"
    want = reference(pipe, image=still(3), guidance_scale=4.0)
    assert psnr(frames_of(result), want) >= MIN_PSNR
    text_only = WanPipeline(**{k: v for k, v in pipe.components.items() if k in WAN_T2V_COMPONENTS})
    text_only.register_to_config(expand_timesteps=True)
    got = frames_of(engine.generate(request(path, cfg_scale=4.0), lambda e: None))
    assert psnr(got, reference(text_only, guidance_scale=4.0)) >= MIN_PSNR


WAN_T2V_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2")


def test_v2v_matches_diffusers(wan_image_dirs, engine):
    from protos import common_pb2
    from services.vae.video import encode_mp4

    path, pipe = wan_image_dirs["v2v"]
    g = torch.Generator().manual_seed(4)
    coarse = torch.rand(3, FRAMES, 4, 4, generator=g) * 2 - 1
    video = torch.nn.functional.interpolate(coarse[None], size=(FRAMES, SIZE, SIZE), mode="trilinear")[0]
    mp4 = encode_mp4(video, fps=16)
    frames, _ = decode_mp4(mp4, "video")  # what both engines read from the file
    pil = [Image.fromarray(f) for f in ((frames.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()]
    req = request(path, cfg_scale=4.0, strength=0.7)
    req.ClearField("num_frames")  # counted from the video
    req.input_video.CopyFrom(common_pb2.Media(data=mp4, mime_type="video/mp4"))
    result = engine.generate(req, lambda e: None)
    params = json.loads(result.parameters)
    assert (params["task"], params["num_frames"]) == ("v2v", FRAMES)
    assert params["strength"] == pytest.approx(0.7)
    want = reference(pipe, video=pil, guidance_scale=4.0, strength=0.7)
    assert psnr(frames_of(result), want) >= MIN_PSNR


def test_flf2v_through_the_services_by_the_cli(wan_image_dirs, engine, stack, tmp_path):
    """The CLI's --input-image / --last-image through `diffmesh up` (CLIP over gRPC, the condition video built by
    the VAE service) gives the in-process frames."""
    from orchestrator.cli import main

    path, _ = wan_image_dirs["flf2v"]
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    still(1).save(first)
    still(2).save(last)
    req = request(path, cfg_scale=4.0)
    req.input_images.append(png_media(still(1)))
    req.last_image.CopyFrom(png_media(still(2)))
    local = frames_of(engine.generate(req, lambda e: None))
    args = [
        "--state-dir", str(stack.path.parent), "generate", "--model", str(path), "--prompt", PROMPT,
        "--seed", "11", "--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE),
        "--num-frames", str(FRAMES), "--cfg-scale", "4", "--input-image", str(first), "--last-image", str(last),
        "--quiet", "--out", f"{tmp_path}/out/",
    ]  # fmt: skip
    assert main(args) == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    remote = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert np.array_equal(remote, local)
