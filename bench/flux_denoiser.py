"""FLUX.1 denoiser step time: our `Flux` vs diffusers' `FluxTransformer2DModel` with the same weights, side by
side in one process, and one whole request through `diffmesh up`'s services vs the same graph in-process.

- `step`: one forward (a denoising step without CFG) per config and dtype; the median of `repeats` timed calls
  after a warm-up, ours and diffusers' alternating; `ratio` = ours / diffusers (below 1 = we are faster).
- `stack`: wall time of one Generate request on a tiny FLUX.1 model directory through the services (S3 store,
  gRPC) vs in-process (local store); `ratio` = services / in-process. Median of `repeats` requests.

    .venv/bin/python -m bench.flux_denoiser
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from diffusers import FluxTransformer2DModel

from services.denoiser.convert.flux import load_flux_state_dict
from services.denoiser.models.flux import Flux

CONFIGS = {
    "tiny": dict(hidden=32, heads=2, double=1, single=1, axes=(4, 4, 8), img=256, txt=128),
    "hidden1024": dict(hidden=1024, heads=8, double=2, single=2, axes=(16, 56, 56), img=256, txt=128),
}


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of a() and b(), timed alternately so machine noise hits both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _pair(cfg: dict, dtype: torch.dtype) -> tuple[FluxTransformer2DModel, Flux]:
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=cfg["double"],
        num_single_layers=cfg["single"],
        attention_head_dim=cfg["hidden"] // cfg["heads"],
        num_attention_heads=cfg["heads"],
        joint_attention_dim=cfg["hidden"],
        pooled_projection_dim=cfg["hidden"],
        axes_dims_rope=list(cfg["axes"]),
        guidance_embeds=True,
    ).eval()
    params, sd = load_flux_state_dict(ref.state_dict(), axes_dim=cfg["axes"])
    with torch.device("meta"):
        ours = Flux(params)
    ours.load_state_dict(sd, assign=True)
    return ref.to(dtype), ours.eval().to(dtype)


def _time_pair(name: str, cfg: dict, dtype: torch.dtype, repeats: int) -> dict:
    ref, ours = _pair(cfg, dtype)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, cfg["img"], 64, generator=g).to(dtype)
    txt = torch.randn(1, cfg["txt"], cfg["hidden"], generator=g).to(dtype)
    vec = torch.randn(1, cfg["hidden"], generator=g).to(dtype)
    side = int(cfg["img"] ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(cfg["txt"], 3)
    t = torch.full((1,), 0.5, dtype=dtype)
    guidance = torch.full((1,), 3.5)

    def reference() -> torch.Tensor:
        return ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=vec,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
        ).sample

    with torch.inference_mode():
        ref_s, ours_s = _interleaved(
            reference, lambda: ours(img, img_ids, txt, txt_ids, t, vec, guidance), repeats
        )
    return {
        "config": name,
        "dtype": str(dtype).removeprefix("torch."),
        "ours_ms": round(ours_s * 1000, 2),
        "diffusers_ms": round(ref_s * 1000, 2),
        "ratio": round(ours_s / ref_s, 3),
    }


def step_times(repeats: int = 5) -> list[dict]:
    return [
        _time_pair(name, cfg, dtype, repeats)
        for name, cfg in CONFIGS.items()
        for dtype in (torch.float32, torch.bfloat16)
    ]


def stack_ratio(repeats: int = 3, steps: int = 8, size: int = 128) -> dict:
    """One request through the local stack (S3 + gRPC) vs in-process, on a tiny FLUX.1 directory."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_flux import make_tiny_flux  # the test suite's tiny pipeline builder

    from orchestrator.local import in_process_orchestrator
    from orchestrator.stack.local_stack import down, up
    from protos import orchestrator_pb2, orchestrator_pb2_grpc
    from services.common.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "flux"
        make_tiny_flux(model)
        req = orchestrator_pb2.GenerateRequest(
            model=str(model), prompt="a red circle", seed=1, steps=steps, width=size, height=size
        )
        settings = Settings.from_env({"DIFFMESH_STORE": "local", "DIFFMESH_LOCAL_STORE": f"{tmp}/store"})
        engine = in_process_orchestrator(settings)
        local_s = _median_s(lambda: engine.generate(req, lambda e: None), repeats)
        state = up(Path(tmp) / "stack")
        try:
            with grpc.insecure_channel(state.endpoints["orchestrator"]) as ch:
                stub = orchestrator_pb2_grpc.OrchestratorStub(ch)
                md = [("authorization", f"Bearer {state.data['token']}")]
                remote_s = _median_s(lambda: list(stub.Generate(req, metadata=md, timeout=300)), repeats)
        finally:
            down(state.path.parent)
    return {
        "request": f"{size}x{size}, {steps} steps, tiny FLUX.1",
        "in_process_s": round(local_s, 3),
        "services_s": round(remote_s, 3),
        "ratio": round(remote_s / local_s, 3),
    }


def run() -> dict:
    return {"step": step_times(), "stack": stack_ratio()}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
