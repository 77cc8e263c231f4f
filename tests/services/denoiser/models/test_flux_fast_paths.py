"""The FLUX.1 DiT's inference fast paths equal the plain ones: the oneDNN `Linear`, complex RoPE, float32-score
attention for bf16, one-op modulation for batch 1, against `nn.Linear`, the real rotation, SDPA, and the
autograd path the trainer takes through the same modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.denoiser.models import flux_layers
from services.denoiser.models.flux import Flux, FluxParams
from services.denoiser.models.flux_layers import Linear, apply_rope

PARAMS = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=2,
    axes_dim=(4, 4, 8),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)


def inputs(dtype: torch.dtype = torch.float32, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, 6, 3)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(6)[None, :]
    return dict(
        img=torch.randn(batch, 24, 64, generator=g).to(dtype),
        img_ids=ids.reshape(24, 3),
        txt=torch.randn(batch, 7, 32, generator=g).to(dtype),
        txt_ids=torch.zeros(7, 3),
        timesteps=torch.full((batch,), 0.5),
        y=torch.randn(batch, 32, generator=g).to(dtype),
        guidance=torch.full((batch,), 4.0),
    )


def model(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(PARAMS).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_nn_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ours = Linear(48, 80).to(dtype)
    plain = nn.Linear(48, 80).to(dtype)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 33, 96).to(dtype)[..., ::2]  # not contiguous
    with torch.no_grad():
        got, expected = ours(x), plain(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()


def test_linear_keeps_forward_hooks_and_autograd() -> None:
    layer = Linear(8, 4)
    layer.register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias) + 1)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_complex_rope_matches_real_rotation() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 3 * 8, generator=g)[..., 8:]  # a (B, L, H, Dh) view into a wider tensor
    angle = torch.randn(1, 5, 1, 8, generator=g, dtype=torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    got = apply_rope(x, torch.complex(cos, sin))
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("heads_per_block", "max_scores"), [(2, 1 << 24), (2, 2 * 2 * 40 * 7), (1, 1)])
def test_float32_score_attention_matches_sdpa(
    monkeypatch: pytest.MonkeyPatch, heads_per_block: int, max_scores: int
) -> None:
    """Three heads in blocks of 2 (the last block short) or 1, queries in one block or blocks of 7 or of 1:
    closer to the exact result than SDPA in bf16."""
    monkeypatch.setattr(flux_layers, "HEADS_PER_BLOCK", heads_per_block)
    monkeypatch.setattr(flux_layers, "MAX_SCORES", max_scores)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 3, 16, generator=g) * 2  # (B, Lq, H, Dh)
    k, v = (torch.randn(2, 40, 3, 16, generator=g) * 2 for _ in range(2))

    def sdpa(*qkv: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv)).transpose(1, 2)

    def rel(x: torch.Tensor) -> float:
        return ((x.double() - exact).norm() / exact.norm()).item()

    exact = sdpa(q.double(), k.double(), v.double())
    with torch.no_grad():
        assert flux_layers.cpu_low_precision(v.bfloat16())
        got = flux_layers.attention(q, k, v.bfloat16()).unflatten(-1, (3, 16))
    assert got.dtype == torch.bfloat16 and got.shape == (2, 33, 3, 16)
    assert rel(got) < 5e-3 and rel(got) <= rel(sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16()))
    assert not flux_layers.cpu_low_precision(v)  # float32
    assert not flux_layers.cpu_low_precision(v.bfloat16())  # autograd on: SDPA


def test_batch_of_one_matches_the_batch() -> None:
    """Batch 1 folds the modulation into the LayerNorm: the same as sample 0 of a batch of 2."""
    ours = model(seed=2)
    x = inputs()
    one = {k: (v[:1] if k not in ("img_ids", "txt_ids") else v) for k, v in x.items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**one), ours(**x)[:1], rtol=0, atol=1e-5)


def test_bf16_inference_path_matches_the_autograd_path() -> None:
    """bf16 without autograd (oneDNN linears) vs with it (nn.Linear): both within bf16 rounding of float32."""
    ours = model()
    x32 = inputs()
    with torch.no_grad():
        exact = ours(**x32)
    ours16 = ours.to(torch.bfloat16)
    x16 = inputs(torch.bfloat16)
    with torch.no_grad():
        fast = ours16(**x16).float()
    slow = ours16(**x16).detach().float()
    for got in (fast, slow):
        assert ((got - exact).norm() / exact.norm()).item() < 2e-2
    assert ((fast - slow).norm() / exact.norm()).item() < 2e-2


def test_inference_and_training_paths_agree_in_float32() -> None:
    ours = model(seed=1)
    x = inputs()
    with torch.inference_mode():
        fast = ours(**x)
    out = ours(**x)  # autograd on: nn.Linear and SDPA, as the trainer runs it
    torch.testing.assert_close(out.detach(), fast, rtol=0, atol=1e-5)
    out.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
