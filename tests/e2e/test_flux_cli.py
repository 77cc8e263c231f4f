"""`diffmesh generate` on a tiny FLUX.1 directory: `--local` and through `diffmesh up` write diffusers' image
with the parameters in the PNG; bad flags name the value, from argparse (exit 2) or the server (exit 1)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_flux import psnr, to_uint8

from orchestrator.cli import main
from orchestrator.pngtext import PARAMETERS_KEY, read_text

PROMPT = "a blue square on a black background"


def args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model), "--prompt", PROMPT, "--seed", "5", "--steps", "2",
        "--width", "48", "--height", "32", "--guidance", "4.0", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def expected(pipe) -> np.ndarray:
    images = pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        width=48,
        height=32,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images
    return to_uint8(images)[0]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_local_generate_writes_diffusers_image_with_parameters(flux_dir, tmp_path, capsys):
    model, pipe = flux_dir
    out = tmp_path / "x.png"
    assert main(args(model, out, "--local")) == 0
    assert psnr(pixels(out), expected(pipe)) >= 40.0
    params = json.loads(read_text(out.read_bytes())[PARAMETERS_KEY])
    assert (params["seed"], params["width"], params["height"], params["guidance"]) == (5, 48, 32, 4.0)
    assert str(out) in capsys.readouterr().out


def test_generate_through_the_stack_equals_local(flux_dir, stack, tmp_path):
    model, _ = flux_dir
    local, remote = tmp_path / "local.png", tmp_path / "remote.png"
    assert main(args(model, local, "--local")) == 0
    assert main(["--state-dir", str(stack.path.parent), *args(model, remote)]) == 0
    assert np.array_equal(pixels(local), pixels(remote))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--width", "50"), "width=50"),
        (("--guidance", "500"), "guidance=500"),
        (("--max-sequence-length", "4096"), "max_sequence_length=4096"),
    ],
)
def test_server_side_errors_exit_1_naming_the_value(flux_dir, tmp_path, capsys, extra, needle):
    model, _ = flux_dir
    out = tmp_path / "bad.png"
    code = main([*args(model, out, "--local"), *extra])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "INVALID_ARGUMENT" in err and needle in err
    assert not out.exists()


def test_missing_model_is_not_found(tmp_path, capsys):
    code = main(args(tmp_path / "missing", tmp_path / "x.png", "--local", "--family", "flux"))
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_input_image_is_read_for_img2img(flux_dir, tmp_path):
    model, _ = flux_dir
    init = tmp_path / "init.png"
    Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8)).save(init)
    out = tmp_path / "i2i.png"
    assert main(args(model, out, "--local", "--input-image", str(init), "--strength", "0.5")) == 0
    with Image.open(io.BytesIO(out.read_bytes())) as img:
        assert img.size == (48, 32)
    assert json.loads(read_text(out.read_bytes())[PARAMETERS_KEY])["task"] == "img2img"
