"""LoRA machinery (family-independent): file reading, checks, hot vs fused, exact restore, per-request isolation."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.denoiser.lora import LoraDelta, LoraLayoutError, LoraManager, read_lora_file


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.b(F.gelu(self.a(x))))


def toy(seed: int = 0, dtype: torch.dtype = torch.float32) -> Toy:
    torch.manual_seed(seed)
    return Toy().to(dtype).eval()


def toy_convert(
    state_dict: Mapping[str, Tensor], source: str, metadata: Mapping[str, str] | None = None
) -> list[LoraDelta]:
    """Test layout: `<target>.down` / `.up` / optional `.alpha` and `.rows` (two ints)."""
    targets = sorted({k.rsplit(".", 1)[0] for k in state_dict})
    if any(not k.endswith((".down", ".up", ".alpha", ".rows")) for k in state_dict):
        raise LoraLayoutError(f"{source}: unknown keys {sorted(state_dict)}")
    out = []
    for t in targets:
        down, up = state_dict[f"{t}.down"], state_dict[f"{t}.up"]
        alpha = state_dict.get(f"{t}.alpha")
        rows = state_dict.get(f"{t}.rows")
        out.append(
            LoraDelta(
                t,
                down,
                up,
                1.0 if alpha is None else alpha.item() / down.shape[0],
                None if rows is None else tuple(rows.tolist()),
            )
        )
    return out


def write_lora(path: Path, seed: int, **extra: Tensor) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "a.down": torch.randn(3, 8, generator=g),
        "a.up": torch.randn(12, 3, generator=g),
        "a.alpha": torch.tensor(6.0),  # alpha / rank = 2
        "b.down": torch.randn(2, 12, generator=g),
        "b.up": torch.randn(2, 2, generator=g),
        "b.rows": torch.tensor([1, 3]),  # output rows [1, 3) of b
        **extra,
    }
    save_file(tensors, path, metadata={"note": f"seed {seed}"})
    return path


def expected_weights(model: Toy, loras: list[tuple[Path, float]]) -> dict[str, Tensor]:
    """W + scale * alpha / rank * up @ down, by hand."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for path, scale in loras:
        t = read_lora_file(path).tensors
        sd["a.weight"] += scale * 2.0 * t["a.up"] @ t["a.down"]
        sd["b.weight"][1:3] += scale * t["b.up"] @ t["b.down"]
    return sd


def use(manager: LoraManager, loras: list[tuple[Path, float]], mode: str = "hot", **kwargs) -> None:
    with manager.apply(loras, mode, **kwargs):  # type: ignore[arg-type]
        pass


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(9))


def test_read_lora_file(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "l.safetensors", seed=1)
    tensors, metadata = read_lora_file(path)
    assert set(tensors) == {"a.down", "a.up", "a.alpha", "b.down", "b.up", "b.rows"}
    assert metadata["note"] == "seed 1"
    with pytest.raises(NotFound, match=r"missing\.safetensors not found.*\['l\.safetensors'\]"):
        read_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "l.pt").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidArgument, match=r"only \.safetensors.*'\.pt'"):
        read_lora_file(tmp_path / "l.pt")
    size = path.stat().st_size
    with pytest.raises(InvalidArgument, match=rf"is {size} bytes, over the limit of 100 bytes"):
        read_lora_file(path, max_bytes=100)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidArgument, match=r"bad\.safetensors is not a readable safetensors file"):
        read_lora_file(bad)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(InvalidArgument, match=r"is not a file"):
        read_lora_file(tmp_path / "dir.safetensors")


@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_modes_match_merged_weights_and_restore_exactly(mode: str, tmp_path: Path, x: Tensor) -> None:
    model = toy()
    loras = [
        (write_lora(tmp_path / "1.safetensors", 1), 0.8),
        (write_lora(tmp_path / "2.safetensors", 2), -0.5),
    ]
    reference = toy()
    reference.load_state_dict(expected_weights(model, loras))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(x)
    manager = LoraManager(model, toy_convert)
    with torch.no_grad(), manager.apply(loras, mode=mode):
        got = model(x)
    torch.testing.assert_close(got, reference(x), rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 0.1
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model(x), base)


def test_hot_equals_fused_and_rows_are_respected(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    manager = LoraManager(model, toy_convert)
    loras = [(write_lora(tmp_path / "1.safetensors", 1), 1.0)]
    with torch.inference_mode():  # as the sampling loop runs
        with manager.apply(loras, mode="hot"):
            hot = model(x)
            b_hot = model.b(torch.ones(12))
        with manager.apply(loras, mode="fused"):
            fused = model(x)
            b_fused = model.b(torch.ones(12))
        b_base = model.b(torch.ones(12))
    torch.testing.assert_close(hot, fused, rtol=0, atol=1e-5)
    torch.testing.assert_close(b_hot, b_fused, rtol=0, atol=1e-5)
    changed = (b_hot != b_base).tolist()
    assert changed == [False, True, True, False]  # only rows [1, 3) of b


def test_fused_restore_is_bit_exact_in_bf16(tmp_path: Path, x: Tensor) -> None:
    """Subtracting the delta again would not give back bf16 weights exactly; the saved copy does."""
    model = toy(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = LoraManager(model, toy_convert)
    loras = [(write_lora(tmp_path / "1.safetensors", 1), 0.37)]
    with torch.no_grad():
        with manager.apply(loras, mode="fused"):
            merged = model.a.weight.clone()
            fused = model(x.bfloat16())
        with manager.apply(loras, mode="hot"):
            hot = model(x.bfloat16())
    assert hot.dtype == torch.bfloat16  # the delta is computed in the input's dtype
    assert not torch.equal(merged, before["a.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(hot.float(), fused.float(), rtol=0, atol=0.1)


@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_exception_in_block_still_restores(mode: str, tmp_path: Path, x: Tensor) -> None:
    model = toy()
    base = model(x)
    manager = LoraManager(model, toy_convert)
    with (
        pytest.raises(KeyError, match="boom"),
        manager.apply([(write_lora(tmp_path / "1.safetensors", 1), 1.0)], mode),
    ):
        assert not torch.equal(model(x), base)
        raise KeyError("boom")
    assert torch.equal(model(x), base)


def test_concurrent_hot_requests_see_only_their_own_loras(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    manager = LoraManager(model, toy_convert)
    requests = {
        "one": [(write_lora(tmp_path / "1.safetensors", 1), 1.0)],
        "two": [(write_lora(tmp_path / "2.safetensors", 2), 0.5)],
        "none": [],
    }
    with torch.no_grad():
        alone = {}
        for name, loras in requests.items():
            with manager.apply(loras, mode="hot"):
                alone[name] = model(x)
    assert not torch.equal(alone["one"], alone["two"])

    barrier = threading.Barrier(len(requests))
    results: dict[str, list[Tensor]] = {}
    errors: list[BaseException] = []

    def request(name: str) -> None:
        try:
            with torch.no_grad(), manager.apply(requests[name], mode="hot"):
                outs = []
                for _ in range(3):
                    barrier.wait(timeout=10)  # all three inside their blocks at once
                    outs.append(model(x))
                results[name] = outs
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    for name, outs in results.items():
        assert all(torch.equal(out, alone[name]) for out in outs), name


def test_fused_waits_for_shared_users_and_blocks_them(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    manager = LoraManager(model, toy_convert)
    loras = [(write_lora(tmp_path / "1.safetensors", 1), 1.0)]
    inside, release = threading.Event(), threading.Event()

    def hold(mode: str, lora_list: list) -> None:
        with manager.apply(lora_list, mode=mode):
            inside.set()
            release.wait(timeout=10)

    for holder_mode, holder_loras, other_mode, other_loras in [
        ("hot", [], "fused", loras),  # an empty list still holds the model shared
        ("hot", loras, "fused", loras),
        ("fused", loras, "hot", []),
        ("fused", loras, "fused", loras),
    ]:
        inside.clear()
        release.clear()
        holder = threading.Thread(target=hold, args=(holder_mode, holder_loras))
        holder.start()
        assert inside.wait(timeout=10)
        with pytest.raises(ResourceExhausted, match=r"model busy: waited 0.05 s"):
            use(manager, other_loras, other_mode, timeout=0.05)
        release.set()
        holder.join(timeout=10)
        use(manager, other_loras, other_mode, timeout=5)
    with manager.apply(loras, "hot"), pytest.raises(RuntimeError, match="cannot fuse"):  # would deadlock
        use(manager, loras, "fused")


def test_nested_hot_blocks_add_up(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    manager = LoraManager(model, toy_convert)
    one, two = write_lora(tmp_path / "1.safetensors", 1), write_lora(tmp_path / "2.safetensors", 2)
    with torch.no_grad():
        with manager.apply([(one, 1.0), (two, 0.5)], "hot"):
            both = model(x)
        with manager.apply([(one, 1.0)], "hot"), manager.apply([(two, 0.5)], "hot"):
            nested = model(x)
        with manager.apply([(one, 1.0)], "fused"), manager.apply([(two, 0.5)], "hot"):
            hot_on_fused = model(x)
        with manager.apply([(one, 1.0)], "fused"), pytest.raises(RuntimeError, match="cannot fuse"):
            use(manager, [(two, 0.5)], "fused")
    torch.testing.assert_close(nested, both, rtol=0, atol=1e-6)
    torch.testing.assert_close(hot_on_fused, both, rtol=0, atol=1e-5)


def test_checks_name_module_and_shapes(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    base = model(x)
    manager = LoraManager(model, toy_convert)
    g = torch.Generator().manual_seed(3)
    cases = {
        "missing": ({"c.down": torch.randn(2, 8), "c.up": torch.randn(12, 2)}, r"c: no such module"),
        "norm": (
            {"norm.down": torch.randn(2, 4), "norm.up": torch.randn(4, 2)},
            r"norm: a LayerNorm, not a Linear",
        ),
        "in": (
            {"a.down": torch.randn(2, 9, generator=g), "a.up": torch.randn(12, 2)},
            r"a \(Linear 8 -> 12\): LoRA down \(2, 9\), up \(12, 2\)",
        ),
        "out": (
            {"a.down": torch.randn(2, 8), "a.up": torch.randn(11, 2)},
            r"a \(Linear 8 -> 12\).*up \(11, 2\)",
        ),
        "rows": (
            {"b.down": torch.randn(2, 12), "b.up": torch.randn(3, 2), "b.rows": torch.tensor([2, 5])},
            r"b \(Linear 12 -> 4\).*rows \[2, 5\)",
        ),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        for mode in ("hot", "fused"):
            with pytest.raises(InvalidArgument, match=message):
                use(manager, [(path, 1.0)], mode)
    bad = tmp_path / "bad_layout.safetensors"
    save_file({"weird": torch.zeros(1)}, bad)
    with pytest.raises(InvalidArgument, match=r"bad_layout\.safetensors: unknown keys"):
        use(manager, [(bad, 1)])
    good = write_lora(tmp_path / "good.safetensors", 1)
    with pytest.raises(InvalidArgument, match=r"mode must be one of \['hot', 'fused'\], got 'warm'"):
        use(manager, [(good, 1.0)], "warm")
    with pytest.raises(InvalidArgument, match=r"scale must be a finite number, got nan"):
        use(manager, [(good, float("nan"))])
    with pytest.raises(LoraLayoutError, match=r"rows \(0, 2\) do not match up \(3, 2\)"):
        LoraDelta("b", torch.zeros(2, 12), torch.zeros(3, 2), 1.0, (0, 2))
    assert torch.equal(model(x), base)


def test_converted_files_are_cached_by_path_mtime_and_size(tmp_path: Path) -> None:
    calls = []

    def counting(state_dict, source, metadata=None):
        calls.append(source)
        return toy_convert(state_dict, source, metadata)

    manager = LoraManager(toy(), counting, cache_size=1)
    one, two = write_lora(tmp_path / "1.safetensors", 1), write_lora(tmp_path / "2.safetensors", 2)
    first = manager.load(one)
    assert manager.load(one) is first and len(calls) == 1
    write_lora(one, seed=5, **{"c.down": torch.zeros(1, 8), "c.up": torch.zeros(1, 1)})  # new size, mtime
    with pytest.raises(InvalidArgument, match="c: no such module"):  # the new file was converted
        manager.load(one)
    write_lora(one, seed=5)
    manager.load(one)
    manager.load(two)  # evicts `one` (cache_size=1)
    manager.load(one)
    assert len(calls) == 5


def test_manager_leaves_parameters_alone_and_close_removes_hooks(tmp_path: Path, x: Tensor) -> None:
    model = toy()
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    manager = LoraManager(model, toy_convert)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="Toy already has a LoraManager"):
        LoraManager(model, toy_convert)  # it would add every hot delta twice
    manager.close()
    assert not model.a._forward_hooks
    LoraManager(model, toy_convert)  # dropped without close(): its hooks go when the next one comes
    del manager
    gc.collect()
    LoraManager(model, toy_convert)
    assert len(model.a._forward_hooks) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the registry of managers does not keep models alive
