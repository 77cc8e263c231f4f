"""Wan LoRAs through the whole engine: a peft LoRA saved in the diffusers format, and the same weights in the
official / ComfyUI layout, give the frames of diffusers' `WanPipeline.load_lora_weights` + `set_adapters` for
the same seed, hot and fused; Wan 2.2 A14B takes the LoRA on both experts (diffusers: loaded into `transformer`
and, with `load_into_transformer_2=True`, into `transformer_2`); the base video comes back exactly after; a file
of no known layout is INVALID_ARGUMENT; the offload and sequential memory modes run hot LoRAs as the resident
model does (sequential refuses fused: its weights are streamed)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from tiny_flux import psnr, to_uint8
from tiny_text_encoders import T5_CONFIG
from tiny_wan import tiny_wan_config
from tiny_wan_pipeline import make_tiny_wan_pipeline

from protos import common_pb2, orchestrator_pb2
from services.common.errors import FailedPrecondition
from services.common.memory import MemoryPlan
from services.common.models import find_component
from services.denoiser.registry import DENOISERS

PROMPT = "a red ball bouncing on a white floor"
MIN_PSNR = 40.0
FRAMES, SIZE, STEPS, SEED, CFG = 5, 32, 3, 11, 4.0
RANK, ALPHA = 4, 8.0
SCALE = 0.8
# Every Linear of the blocks (diffusers names, matched by peft as module-name suffixes) and the head.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"]
WAN_NAMES = {  # diffusers module (inside blocks.N.) -> Wan module, for the official-layout copy
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def to_wan(module: str) -> str:
    if module == "proj_out":
        return "head.head"
    _, index, inner = module.split(".", 2)
    return f"blocks.{index}.{WAN_NAMES[inner]}"


def make_lora(directory: Path, seed: int) -> dict[str, Path]:
    """A random peft LoRA of the tiny T2V transformer: the diffusers-format file, and the same weights in the
    official layout (`diffusion_model.*`, lora_down / lora_up, `.alpha` on the blocks; the head, whose alpha
    diffusers would refuse there, with alpha / rank folded into its up)."""
    model = WanTransformer3DModel(**tiny_wan_config("t2v", text_dim=T5_CONFIG["d_model"]))
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5 * (1.0 if ".lora_A." in k else 0.5)
        for k, v in sorted(get_peft_model_state_dict(model).items())
    }
    name = f"lora{seed}"
    WanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        weight_name=f"{name}.safetensors",
    )
    official = {}
    for module in sorted({k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")}):
        down, up = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
        key = f"diffusion_model.{to_wan(module)}"
        official[f"{key}.lora_down.weight"] = down
        if module == "proj_out":
            official[f"{key}.lora_up.weight"] = up * (ALPHA / RANK)
        else:
            official[f"{key}.lora_up.weight"] = up
            official[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(official, directory / f"{name}_official.safetensors")
    return {
        "diffusers": directory / f"{name}.safetensors",
        "official": directory / f"{name}_official.safetensors",
    }


@pytest.fixture(scope="module")
def wan_lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, WanPipeline]]:
    root = tmp_path_factory.mktemp("wan-lora")
    return {
        "t2v": (root / "t2v", make_tiny_wan_pipeline(root / "t2v")),
        "a14b": (root / "a14b", make_tiny_wan_pipeline(root / "a14b", experts=2)),
    }


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_lora(tmp_path_factory.mktemp("wan-loras"), seed=1)


def request(model: Path, loras=(), mode=common_pb2.LORA_MODE_HOT, **kw) -> orchestrator_pb2.GenerateRequest:
    base = dict(
        model=str(model),
        prompt=PROMPT,
        seed=SEED,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        num_frames=FRAMES,
        cfg_scale=CFG,
    )
    base.update(kw)
    specs = [common_pb2.LoraSpec(spec=str(p), scale=s) for p, s in loras]
    req = orchestrator_pb2.GenerateRequest(**base, loras=specs, lora_mode=mode)
    req.output.video_frames_png = True
    return req


def ours(engine, req: orchestrator_pb2.GenerateRequest) -> np.ndarray:
    result = engine.generate(req, lambda e: None)
    return np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in result.images])


def reference(pipe: WanPipeline, lora: Path, scale: float) -> np.ndarray:
    """diffusers' frames with the LoRA on every transformer of the pipeline (both experts of A14B)."""
    pipe.load_lora_weights(str(lora), adapter_name="test")
    if pipe.transformer_2 is not None:
        pipe.load_lora_weights(str(lora), adapter_name="test", load_into_transformer_2=True)
    pipe.set_adapters(["test"], [scale])
    try:
        with torch.no_grad():
            video = pipe(
                prompt=PROMPT,
                num_frames=FRAMES,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np",
            ).frames[0]
    finally:
        pipe.unload_lora_weights()
    return to_uint8(video)


@pytest.mark.parametrize(
    ("name", "layout"), [("t2v", "diffusers"), ("t2v", "official"), ("a14b", "diffusers")]
)
def test_lora_matches_diffusers_hot_and_fused(wan_lora_dirs, engine, loras, name, layout):
    model, pipe = wan_lora_dirs[name]
    file = loras[layout]
    base = ours(engine, request(model))
    expected = reference(pipe, file, SCALE)
    hot = ours(engine, request(model, [(file, SCALE)]))
    fused = ours(engine, request(model, [(file, SCALE)], common_pb2.LORA_MODE_FUSED))
    print(
        f"{name} {layout}: PSNR hot {psnr(hot, expected):.1f} dB, fused {psnr(fused, expected):.1f} dB, "
        f"base vs LoRA {psnr(base, expected):.1f} dB"
    )
    assert psnr(base, expected) < 30.0  # the LoRA changes the video a lot
    assert psnr(hot, expected) >= MIN_PSNR
    assert psnr(fused, expected) >= MIN_PSNR
    assert np.array_equal(ours(engine, request(model)), base)  # unloaded exactly, both modes


def test_unknown_lora_layout_is_invalid_argument(wan_lora_dirs, engine, tmp_path):
    model, _ = wan_lora_dirs["t2v"]
    save_file({"some.weird.key": torch.zeros(2, 2)}, tmp_path / "weird.safetensors")
    with pytest.raises(Exception) as err:
        ours(engine, request(model, [(tmp_path / "weird.safetensors", 1.0)]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "some.weird.key" in str(err.value)


def load_adapter(model: Path, plan: MemoryPlan):
    component = find_component(model, ["transformer"])
    return DENOISERS[component.class_name](component, torch.device("cpu"), plan)


@torch.no_grad()
def expert_outputs(adapter, loras, mode: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    context = torch.randn(1, 7, T5_CONFIG["d_model"], generator=g)
    with adapter.residency.active(), adapter.lora.apply(loras, mode):
        return [m(x, torch.tensor([700.0]), context) for m in adapter.models]


def test_memory_modes_run_hot_loras_as_resident(wan_lora_dirs, loras):
    model, _ = wan_lora_dirs["a14b"]
    lora = [(loras["official"], SCALE)]
    resident = load_adapter(model, MemoryPlan())
    assert len(resident.lora.managers) == 2  # one per expert
    base, want = expert_outputs(resident, [], "hot"), expert_outputs(resident, lora, "hot")
    assert all((w - b).abs().max() > 0.1 for w, b in zip(want, base, strict=True))
    for mode in ("offload", "sequential"):
        adapter = load_adapter(model, MemoryPlan(mode))
        for got, expected in zip(expert_outputs(adapter, lora, "hot"), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(
        FailedPrecondition, match="memory mode sequential streams the weights: use lora_mode hot"
    ):
        expert_outputs(adapter, lora, "fused")
