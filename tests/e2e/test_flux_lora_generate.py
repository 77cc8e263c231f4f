"""LoRA through the whole engine: a peft LoRA saved in the diffusers format, and the same weights as kohya keys,
both give diffusers' `load_lora_weights` image; hot and fused agree; the base image comes back exactly after;
two concurrent requests with different LoRAs each get their own result; a cancelled call is CANCELLED."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from tiny_flux import TRANSFORMER, psnr, to_uint8

from protos import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

PROMPT = "a green triangle on a grey background"
RANK, ALPHA = 4, 8.0
# Double-block attention and MLPs only: diffusers' kohya converter hard-codes FLUX.1's widths for single blocks.
TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
)
KOHYA = {  # BFL module of the double block -> the diffusers modules it fuses
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}


def make_lora(directory: Path, seed: int) -> tuple[Path, Path]:
    """A random peft LoRA of the tiny transformer: (diffusers-format file, the same weights as kohya keys)."""
    model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5 * (1.0 if ".lora_A." in k else 0.5)
        for k, v in sorted(get_peft_model_state_dict(model).items())
    }
    name = f"lora{seed}"
    FluxPipeline.save_lora_weights(directory, transformer_lora_layers=sd, weight_name=f"{name}.safetensors")
    kohya = {}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        for module, parts in KOHYA.items():
            downs = [sd[f"transformer_blocks.{i}.{p}.lora_A.weight"] for p in parts]
            ups = [sd[f"transformer_blocks.{i}.{p}.lora_B.weight"] for p in parts]
            key = f"lora_unet_double_blocks_{i}_{module}"
            kohya[f"{key}.lora_down.weight"] = torch.cat(downs)
            kohya[f"{key}.lora_up.weight"] = torch.block_diag(*ups)
            kohya[f"{key}.alpha"] = torch.tensor(ALPHA * len(parts))  # alpha / rank is preserved
    save_file(kohya, directory / f"{name}_kohya.safetensors")
    return directory / f"{name}.safetensors", directory / f"{name}_kohya.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(directory, 1), "b": make_lora(directory, 2)}


def request(model: Path, loras=(), mode=common_pb2.LORA_MODE_HOT, **kw) -> orchestrator_pb2.GenerateRequest:
    base = dict(model=str(model), prompt=PROMPT, seed=3, steps=3, width=48, height=48, guidance=3.5)
    base.update(kw)
    specs = [common_pb2.LoraSpec(spec=str(p), scale=s) for p, s in loras]
    return orchestrator_pb2.GenerateRequest(**base, loras=specs, lora_mode=mode)


def image(result: orchestrator_pb2.GenerateResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0])).convert("RGB"))


def ours(engine, req) -> np.ndarray:
    return image(engine.generate(req, lambda e: None))


def reference(pipe, lora: Path, scale: float) -> np.ndarray:
    pipe.load_lora_weights(str(lora), adapter_name="test")
    pipe.set_adapters(["test"], [scale])
    try:
        out = pipe(
            prompt=PROMPT,
            num_inference_steps=3,
            width=48,
            height=48,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="np",
        ).images
    finally:
        pipe.unload_lora_weights()
    return to_uint8(out)[0]


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_lora_matches_diffusers_hot_and_fused(flux_dir, engine, loras, layout, scale):
    model, pipe = flux_dir
    diffusers_file, kohya_file = loras["a"]
    file = diffusers_file if layout == "diffusers" else kohya_file
    expected = reference(pipe, file, scale)
    hot = ours(engine, request(model, [(file, scale)]))
    fused = ours(engine, request(model, [(file, scale)], common_pb2.LORA_MODE_FUSED))
    assert psnr(hot, expected) >= 40.0
    assert psnr(fused, expected) >= 40.0
    assert psnr(hot, fused) >= 40.0


def test_unloading_restores_the_base_image_exactly(flux_dir, engine, loras):
    model, _ = flux_dir
    base = ours(engine, request(model))
    with_lora = ours(engine, request(model, [(loras["a"][0], 1.0)], common_pb2.LORA_MODE_FUSED))
    assert not np.array_equal(base, with_lora)
    assert np.array_equal(ours(engine, request(model)), base)
    ours(engine, request(model, [(loras["b"][0], 1.0)]))  # hot
    assert np.array_equal(ours(engine, request(model)), base)


def test_unknown_lora_layout_is_invalid_argument(flux_dir, engine, tmp_path):
    model, _ = flux_dir
    save_file({"some.weird.key": torch.zeros(2, 2)}, tmp_path / "weird.safetensors")
    with pytest.raises(Exception) as err:
        ours(engine, request(model, [(tmp_path / "weird.safetensors", 1.0)]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "some.weird.key" in str(err.value)


def _generate(stack, req) -> orchestrator_pb2.GenerateResult:
    with grpc.insecure_channel(stack.endpoints["orchestrator"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        md = [("authorization", f"Bearer {stack.data['token']}")]
        return list(stub.Generate(req, metadata=md, timeout=120))[-1].result


def test_concurrent_requests_with_different_loras_through_services(flux_dir, engine, loras, stack):
    model, _ = flux_dir
    reqs = {name: request(model, [(loras[name][0], 1.0)], steps=6) for name in ("a", "b")}
    sequential = {name: ours(engine, req) for name, req in reqs.items()}
    results: list[tuple[str, np.ndarray]] = []
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            results.append((name, image(_generate(stack, reqs[name]))))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    for name, got in results:
        assert np.array_equal(got, sequential[name]), name


def test_cancelled_generate_is_cancelled_and_the_stack_keeps_serving(flux_dir, stack):
    model, _ = flux_dir
    with grpc.insecure_channel(stack.endpoints["orchestrator"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        md = [("authorization", f"Bearer {stack.data['token']}")]
        call = stub.Generate(request(model, steps=400, width=256, height=256), metadata=md, timeout=120)
        for event in call:
            if event.HasField("progress"):
                call.cancel()
                break
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    assert len(_generate(stack, request(model)).images) == 1
