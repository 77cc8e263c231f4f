"""Memory modes of the denoiser (services.common.memory): `offload` and `sequential` give `resident`'s latents,
from both checkpoint layouts, with and without a LoRA; weight-storage dtypes run and agree with their own
resident result; sequential keeps no block weights between requests and reads each block once per forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from test_flux_adapter import inputs
from tiny_flux import TRANSFORMER

from protos import common_pb2
from services.common.errors import FailedPrecondition
from services.common.memory import MemoryPlan
from services.common.models import find_component
from services.denoiser.registry import DENOISERS

CPU = torch.device("cpu")
NOOP = (lambda s, t: None, lambda: False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny FLUX as a diffusers `transformer/` folder (2 shards) and as one BFL single file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("flux-memory")
    model = FluxTransformer2DModel(
        **{**TRANSFORMER, "num_layers": 2, "num_single_layers": 2}, guidance_embeds=True
    )
    model.save_pretrained(root / "transformer", max_shard_size="40KB")
    hub = load(root / "transformer", MemoryPlan())
    bfl = {f"model.diffusion_model.{k}": v.contiguous() for k, v in hub.model.state_dict().items()}
    save_file(bfl, root / "flux1-tiny.safetensors")
    (root / "flux1-tiny.json").write_text('{"axes_dims_rope": [4, 4, 8]}')
    lora = {}
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        for proj in ("to_q", "to_v", "ff.net.2"):
            name = f"transformer.transformer_blocks.{i}.{'attn.' if proj.startswith('to_') else ''}{proj}"
            out_f, in_f = (32, 128) if proj.startswith("ff") else (32, 32)
            lora[f"{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.3
            lora[f"{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    save_file(lora, root / "lora.safetensors")
    return {
        "hub": root / "transformer",
        "single": root / "flux1-tiny.safetensors",
        "lora": root / "lora.safetensors",
    }


def load(path: Path, plan: MemoryPlan):
    component = find_component(path, ["transformer"])
    return DENOISERS[component.class_name](component, CPU, plan)


def run(adapter, **kw) -> torch.Tensor:
    return adapter.denoise(inputs(**kw), *NOOP)["latents"]


@pytest.mark.parametrize("layout", ["hub", "single"])
@pytest.mark.parametrize("mode", ["offload", "sequential"])
def test_modes_give_the_resident_latents(checkpoints: dict[str, Path], layout: str, mode: str):
    resident = run(load(checkpoints[layout], MemoryPlan()))
    adapter = load(checkpoints[layout], MemoryPlan(mode))
    out = run(adapter)
    torch.testing.assert_close(out, resident, atol=1e-6, rtol=0)
    lora = [(str(checkpoints["lora"]), 0.8)]
    torch.testing.assert_close(
        run(adapter, loras=lora), run(load(checkpoints[layout], MemoryPlan()), loras=lora), atol=1e-6, rtol=0
    )
    assert not torch.allclose(run(adapter, loras=lora), out, atol=1e-3)  # the LoRA did something


def test_sequential_streams_each_block_once_per_forward_and_keeps_none(checkpoints: dict[str, Path]):
    adapter = load(checkpoints["hub"], MemoryPlan("sequential"))
    blocks = [*adapter.model.double_blocks, *adapter.model.single_blocks]
    assert all(p.device.type == "meta" for b in blocks for p in b.parameters())
    run(adapter, steps=3)
    assert adapter.residency.streamer.loads == 3 * len(blocks)
    assert all(
        p.device.type == "meta" for b in blocks for p in b.parameters()
    )  # nothing kept after a request
    assert adapter.model.img_in.weight.device.type == "cpu"  # the non-block weights stay


def test_sequential_refuses_fused_loras(checkpoints: dict[str, Path]):
    adapter = load(checkpoints["single"], MemoryPlan("sequential"))
    with pytest.raises(FailedPrecondition, match="sequential"):
        run(adapter, loras=[(str(checkpoints["lora"]), 1.0)], lora_mode=common_pb2.LORA_MODE_FUSED)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn"])
def test_storage_dtypes(checkpoints: dict[str, Path], dtype: str):
    fp32 = run(load(checkpoints["hub"], MemoryPlan()))
    plan = MemoryPlan.parse("resident", dtype)
    adapter = load(checkpoints["hub"], plan)
    want_compute = torch.float16 if dtype == "float16" else torch.bfloat16
    assert adapter.dtype == want_compute
    assert adapter.model.double_blocks[0].img_attn.qkv.weight.dtype == plan.weight_dtype
    out = run(adapter)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - fp32).abs().max() < (0.3 if dtype.startswith("float8") else 0.1)
    for mode in ("offload", "sequential"):  # every mode agrees with resident in the same storage dtype
        torch.testing.assert_close(
            run(load(checkpoints["hub"], MemoryPlan.parse(mode, dtype))), out, atol=0, rtol=0
        )
    if dtype.startswith("float8"):
        with pytest.raises(FailedPrecondition, match="float8"):
            run(adapter, loras=[(str(checkpoints["lora"]), 1.0)], lora_mode=common_pb2.LORA_MODE_FUSED)
        run(adapter, loras=[(str(checkpoints["lora"]), 1.0)])  # hot LoRAs run in the compute dtype
