"""Session fixtures of the reliability tests: the whole engine on real gRPC servers at port 0 (fuzz_stack.py), the
model root it serves, the pools of values the fuzzer draws from, and the per-RPC status-code counts printed in
the terminal summary.

`DIFFMESH_FUZZ_EXAMPLES` sets the generated requests per RPC and kind (default 200; `make test-reliability`
runs 3000); `DIFFMESH_FUZZ_REPORT=path.json` also writes the counts and one example of each code's details.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fault_stack import STACK_ENV
from fuzz_messages import Pools
from fuzz_stack import FLUX, I2V, FuzzClient, FuzzLog, Stack, png, start_stack, wav
from PIL import Image
from safetensors.torch import save_file
from tiny_flux import make_tiny_flux

from orchestrator.stack.local_stack import down, up

LOG_KEY = pytest.StashKey[FuzzLog]()


def _write_i2v(path: Path) -> None:
    """A model folder with only a tiny CLIP vision `image_encoder/` (+ `image_processor/`), as Wan I2V has."""
    from diffusers import WanImageToVideoPipeline
    from tiny_text_encoders import tiny_clip_vision_model
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        image_processor=processor,
        image_encoder=tiny_clip_vision_model(0, image_size=56, patch_size=14),
    )
    pipe.save_pretrained(str(path))


def _plant_broken(root: Path) -> None:
    """Files a model root may hold that are not models: garbage, empty and foreign safetensors, bad JSON."""
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    save_file({}, root / "empty.safetensors")
    save_file({"foo.weight": torch.zeros(2, 2)}, root / "foreign.safetensors")
    torch.save({"state_dict": {"x": torch.zeros(2)}}, root / "weights.bin")
    (root / "notes.txt").write_text("not a model")
    (root / "broken.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    bad = root / "broken-json"
    (bad / "transformer").mkdir(parents=True)
    (bad / "model_index.json").write_text("{not json")
    (bad / "transformer" / "config.json").write_text("[1, 2]")
    lora_dir = root / "lora-dir"
    lora_dir.mkdir()
    save_file({"lora_unet_foo.lora_down.weight": torch.zeros(2, 4)}, lora_dir / "only.safetensors")


@pytest.fixture(scope="session")
def fuzz_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-models")
    make_tiny_flux(root / FLUX, seed=0)
    _write_i2v(root / I2V)
    _plant_broken(root)
    return root


@pytest.fixture(scope="session")
def faulty(tmp_path_factory: pytest.TempPathFactory):
    """`diffmesh up`'s real processes (S3 + one gRPC server per stage) for the fault tests, and a tiny FLUX.1."""
    root = tmp_path_factory.mktemp("faults")
    make_tiny_flux(root / "flux", seed=0)
    state = up(root / "stack", timeout=120, extra_env=STACK_ENV)
    yield state, root / "flux"
    down(state.path.parent)


@pytest.fixture(scope="session")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory, fuzz_models: Path) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("fuzz-stack"), fuzz_models)
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def fuzz_log(pytestconfig: pytest.Config) -> FuzzLog:
    return pytestconfig.stash.setdefault(LOG_KEY, FuzzLog())


@pytest.fixture(scope="session")
def fuzz_client(fuzz_stack: Stack, fuzz_log: FuzzLog) -> FuzzClient:
    return FuzzClient(fuzz_stack, fuzz_log)


# -- pools ------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one short IDAT: what a decompression bomb looks like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _image(fmt: str, size: tuple[int, int] = (16, 16), **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image16() -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (16, 16), 1000).save(buf, format="PNG")
    return buf.getvalue()


def _wav_header(channels: int, width: int, rate: int, data: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * width, channels * width, 8 * width)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def media_pool() -> list[bytes]:
    from services.vae.video import encode_mp4

    mp4 = encode_mp4(torch.rand(3, 5, 16, 16) * 2 - 1)
    gif = io.BytesIO()
    frames = [Image.new("P", (16, 16), i) for i in range(2)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    good_wav = wav()
    return [
        png(16, 16),
        png(32, 32),
        png(24, 16),
        png(48, 32),
        png(17, 17),
        png(1, 1),
        png(16, 16, "L"),
        png(16, 16, "RGBA"),
        png(16, 16, "P"),
        _image16(),
        png(16, 16, "1"),
        png(16, 16, "LA"),
        png(8200, 8),
        png(8, 8200),
        png_header_only(12000, 12000),
        png_header_only(100_000, 100_000),
        png_header_only(0, 16),
        png_header_only(2**31 - 1, 1),
        png(16, 16)[:40],
        _image("JPEG"),
        _image("BMP"),
        _image("WEBP"),
        _image("TIFF"),
        _image("JPEG", (16, 16), progressive=True)[:100],
        gif.getvalue(),
        good_wav,
        wav(channels=2),
        wav(width=1),
        wav(width=3),
        wav(width=4),
        wav(samples=0),
        good_wav[:-1],
        good_wav[:50],
        _wav_header(0, 2, 16000, bytes(10)),
        _wav_header(2, 2, 0, bytes(3)),
        _wav_header(1, 2, 16000, bytes(1)),
        _wav_header(1, 0, 16000, bytes(8)),
        _wav_header(7, 2, 2**28, bytes(14)),
        b"RIFF\xff\xff\xff\xffWAVE",
        mp4,
        mp4[: len(mp4) // 2],
        b"\x00\x00\x00\x18ftypmp42" + bytes(32),
        b"\x00\x00\x00\x18ftypisom",
        b"",
    ]


@pytest.fixture(scope="session")
def fuzz_pools(fuzz_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Pools:
    root = fuzz_stack.root
    specs = [FLUX, f"{FLUX}/", I2V, f"{I2V}/image_encoder", str(root / FLUX), str(root), "/tmp", "/"]
    specs += [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if "tokenizer" not in p.parts]
    specs += [f"{FLUX}/../{FLUX}", f"{FLUX}/../..", "../" + root.name, f"{FLUX}/" + "a" * 300, "a" * 256]
    specs += ["hf://org/name", "hf://org/name@main", "modelscope://org/name@v1", "s3://bucket/model"]
    dataset = tmp_path_factory.mktemp("fuzz-dataset")
    (dataset / "metadata.csv").write_text("image,prompt\n")
    prefix = fuzz_stack.store.root.as_uri() + "/"
    uris = [prefix + "runs/fuzz-seed/s/image", "s3://diffmesh/runs/x", str(dataset), "s3://bucket/data/"]
    return Pools(
        model_specs=specs,
        uris=uris,
        seeds=fuzz_stack.seeds,
        media=media_pool(),
        store_prefix=prefix,
        dataset=str(dataset),
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    log = config.stash.get(LOG_KEY, None)
    if log is None or not log.codes:
        return
    total = sum(sum(c.values()) for c in log.codes.values())
    terminalreporter.write_sep("-", f"fuzzed requests per RPC and their status codes ({total} in all)")
    for line in log.lines():
        terminalreporter.write_line(line)
    report = os.environ.get("DIFFMESH_FUZZ_REPORT")
    if report:  # the counts and one example of the details of each (RPC, code), as JSON
        details = [{"rpc": r, "code": c, "details": d} for (r, c), d in sorted(log.details.items())]
        counts = {rpc: dict(c) for rpc, c in log.codes.items()}
        Path(report).write_text(json.dumps({"counts": counts, "examples": details}, indent=1))
