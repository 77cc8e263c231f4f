"""LoRA in the denoiser: low-rank deltas on the model's `nn.Linear`s, applied per request (DESIGN §4).

A LoRA file is read (safetensors only), converted by a family's converter (e.g.
`services.denoiser.convert.flux_lora.flux_lora_deltas`) into `LoraDelta`s that name OUR modules, checked against
the model, and applied for the duration of a `with LoraManager.apply(...)` block in one of two modes:

- hot: a forward hook on every `nn.Linear` adds `scale * alpha_scale * up @ (down @ x)` to the output rows the
  delta covers. The active deltas live in a `ContextVar`, so each request (one thread each) sees only its own
  LoRAs while other requests run the same model object with other LoRAs or none. Parameters and state-dict keys
  are never renamed or touched.
- fused: `scale * alpha_scale * up @ down` is added into the weights for the block (no per-step cost), and the
  touched rows are restored afterwards from a saved copy, bit for bit. Since that mutates weights every request
  shares, the model is guarded by a readers-writer lock: hot and LoRA-less requests hold it shared, a fused
  request holds it exclusively while it samples.

The model must be run inside the block by the thread (context) that entered it: work handed to another thread sees
the hot LoRAs only if it runs in a copy of this context (`contextvars.copy_context().run`). Requests without
LoRAs enter `apply([])` too, so that a fused request never changes weights under them. One manager per model.

A delta `W' = W + s * up @ down` with `s = scale * alpha / rank` is the kohya / peft / ComfyUI convention
(peft: `lora_B(lora_A(x)) * lora_alpha / r`; kohya: `lora_up(lora_down(x)) * alpha / dim`).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

LoraMode = Literal["hot", "fused"]
MODES: tuple[LoraMode, ...] = ("hot", "fused")
DEFAULT_MAX_LORA_BYTES = 4 << 30  # FLUX.1 LoRAs are up to ~1.3 GB at rank 128 in float32
DEFAULT_CACHE_SIZE = 8


class LoraLayoutError(ValueError):
    """A LoRA file whose keys or tensors are not a layout the converter knows; names the file and the keys."""


@dataclass(frozen=True, eq=False)
class LoraDelta:
    """`W[rows] += alpha_scale * up @ down` on the `nn.Linear` named `target` (a name in OUR model).

    down `(r, in)`, up `(out_rows, r)`; `rows` is the `[start, stop)` slice of the target's output rows the delta
    covers (e.g. a LoRA on diffusers' `to_k` lands on rows `[D, 2D)` of our fused `qkv`), None for all rows.
    """

    target: str
    down: Tensor  # (r, in)
    up: Tensor  # (out_rows, r)
    alpha_scale: float = 1.0
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        down, up = self.down, self.up
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraLayoutError(
                f"LoRA on {self.target}: need down (r, in) and up (out, r), got down {tuple(down.shape)} "
                f"and up {tuple(up.shape)}"
            )
        if not (down.is_floating_point() and up.is_floating_point()):
            raise LoraLayoutError(f"LoRA on {self.target}: weights must be floating point, got {down.dtype}")
        if not math.isfinite(self.alpha_scale):
            raise LoraLayoutError(f"LoRA on {self.target}: alpha / rank is {self.alpha_scale}")
        if self.rows is not None:
            start, stop = self.rows
            if not 0 <= start < stop or stop - start != up.shape[0]:
                raise LoraLayoutError(
                    f"LoRA on {self.target}: rows {self.rows} do not match up {tuple(up.shape)}"
                )

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class LoraConverter(Protocol):
    """A family's LoRA converter: file tensors (and safetensors metadata) -> deltas on the model's module names.
    Raises `LoraLayoutError` for keys it does not know."""

    def __call__(
        self, state_dict: Mapping[str, Tensor], source: str, metadata: Mapping[str, str] | None = None
    ) -> list[LoraDelta]: ...


class LoraFile(NamedTuple):
    tensors: dict[str, Tensor]
    metadata: dict[str, str]  # the safetensors header's `__metadata__` (empty when there is none)


def read_lora_file(path: Path, max_bytes: int = DEFAULT_MAX_LORA_BYTES) -> LoraFile:
    """The tensors and metadata of a `.safetensors` LoRA file (never unpickles anything).

    A missing file is NotFound (naming the LoRA files beside it); another suffix, a file over `max_bytes`, or
    one safetensors cannot parse is InvalidArgument.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgument(
            f"LoRA {path}: only .safetensors files are loaded, got {path.suffix or 'no suffix'!r}"
        )
    try:
        stat = path.stat()
    except FileNotFoundError:
        near = sorted(p.name for p in path.parent.glob("*.safetensors"))[:10] if path.parent.is_dir() else []
        raise NotFound(f"LoRA {path} not found; LoRA files in {path.parent}: {near or 'none'}") from None
    except OSError as exc:
        raise InvalidArgument(f"LoRA {path} cannot be read: {exc.strerror or exc}") from None
    if not path.is_file():
        raise InvalidArgument(f"LoRA {path} is not a file")
    if stat.st_size > max_bytes:
        raise InvalidArgument(f"LoRA {path} is {stat.st_size} bytes, over the limit of {max_bytes} bytes")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError... for a bad file
        raise InvalidArgument(f"LoRA {path} is not a readable safetensors file: {exc}") from None
    if not tensors:
        raise InvalidArgument(f"LoRA {path} holds no tensors")
    return LoraFile(tensors, metadata)


class ReadWriteLock:
    """Many holders of `shared()` or one of `exclusive()`. A waiting writer keeps new readers out, so a fused
    request is not starved by a stream of hot ones. `shared()` nests inside either kind held by the same
    thread; `exclusive()` inside either would deadlock (or fuse twice) and raises RuntimeError instead."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _wait(self, ready, timeout: float | None, what: str) -> None:
        if not self._cond.wait_for(ready, timeout):
            raise ResourceExhausted(f"model busy: waited {timeout} s for {what}")

    @contextmanager
    def shared(self, timeout: float | None = None) -> Iterator[None]:
        depth = self._depth()
        if depth == 0:
            with self._cond:
                self._wait(lambda: not self._writer and not self._writers_waiting, timeout, "shared use")
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        if self._depth():
            raise RuntimeError(
                "this thread already uses the model (a LoRA block is open): cannot fuse LoRAs here"
            )
        with self._cond:
            self._writers_waiting += 1
            try:
                self._wait(
                    lambda: not self._writer and not self._readers, timeout, "exclusive use (fused LoRA)"
                )
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()  # readers held back by this writer may go if it gave up
            self._writer = True
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Part(NamedTuple):
    """`out[..., start:stop] += h[..., r0:r1] @ up.T`, scale * alpha / rank folded into `up`."""

    start: int
    stop: int
    r0: int
    r1: int
    up: Tensor  # (stop - start, r1 - r0)


class _Plan(NamedTuple):
    """The deltas on one Linear: `h = x @ down.T` once (all ranks stacked), then one `up` per row slice."""

    down: Tensor  # (R, in)
    parts: tuple[_Part, ...]


# Module -> its active plans, for the requests of this context (thread) only.
_ACTIVE: ContextVar[Mapping[nn.Module, tuple[_Plan, ...]]] = ContextVar(
    "diffmesh_active_loras", default=MappingProxyType({})
)


def _add_delta(x: Tensor, output: Tensor, plan: _Plan) -> None:
    """`output += delta(x)` in place, in the input's dtype; `x (..., in)`, `output (..., out)`."""
    down = plan.down if plan.down.dtype == x.dtype and plan.down.device == x.device else plan.down.to(x)
    h = F.linear(x, down).reshape(-1, down.shape[0])  # (N, R): x is read once for all the deltas
    out = output.view(-1, output.shape[-1])  # (N, out), a view: F.linear's output is contiguous
    for p in plan.parts:
        up = p.up if p.up.dtype == x.dtype and p.up.device == x.device else p.up.to(x)
        out[:, p.start : p.stop].addmm_(h[:, p.r0 : p.r1], up.T)  # one GEMM accumulating into the slice


def _hot_hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
    active = _ACTIVE.get()
    if not active:
        return None
    plans = active.get(module)
    if not plans:
        return None
    if not output.is_contiguous():
        output = output.contiguous()
    x = args[0] if args else kwargs["input"]
    for plan in plans:
        _add_delta(x, output, plan)
    return output


def _plan(
    linear: nn.Linear, deltas: Sequence[tuple[LoraDelta, float]], dtype: torch.dtype, device: torch.device
) -> _Plan:
    """Stack the deltas on one Linear (downs along the rank) and group their ups by row slice; on `device`, in
    `dtype`."""
    by_rows: dict[tuple[int, int], list[tuple[LoraDelta, float]]] = {}
    for delta, scale in deltas:
        by_rows.setdefault(delta.rows or (0, linear.out_features), []).append((delta, scale))
    downs, parts, r0 = [], [], 0
    for (start, stop), items in by_rows.items():
        downs += [d.down for d, _ in items]
        up = torch.cat([d.up.to(device, torch.float32) * (s * d.alpha_scale) for d, s in items], dim=1)
        parts.append(_Part(start, stop, r0, r0 + up.shape[1], up.to(dtype)))
        r0 += up.shape[1]
    down = torch.cat([d.to(device, torch.float32) for d in downs]).to(dtype)  # (R, in)
    return _Plan(down, tuple(parts))


class _Registration(NamedTuple):
    manager: weakref.ref  # to the LoraManager: the registry must not keep a model alive through it
    hooks: list[RemovableHandle]


# Model -> its manager: a second one would add every hot delta twice and guard the weights with a lock of its own.
_MANAGERS: weakref.WeakKeyDictionary[nn.Module, _Registration] = weakref.WeakKeyDictionary()


def _names(items: Sequence[str], limit: int = 8) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


class LoraManager:
    """LoRAs for one model object, shared by the requests that run it.

    `convert(state_dict, source, metadata)` turns a file into deltas on the model's module names; converted files
    are cached (at most `cache_size`, keyed by path, mtime and size). Fused mode saves the touched weight rows
    before changing them and copies them back afterwards: by default on the weights' own device (fast: a device
    copy; costs as much memory as the rows the LoRAs touch), or on `backup_device`, e.g. "cpu" where accelerator
    memory is short (pinned memory, asynchronous copies: apply + restore ~3x slower on an H100).
    """

    def __init__(
        self,
        model: nn.Module,
        convert: LoraConverter,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_bytes: int = DEFAULT_MAX_LORA_BYTES,
        backup_device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        fused_refusal: str | None = None,
    ):
        """`compute_dtype` / `device`: where hot deltas run (default: each weight's dtype and device; set them when
        the weights are stored in another dtype or live elsewhere between requests). `fused_refusal`: why fused
        mode is not possible for this model (its requests get FailedPrecondition with that reason)."""
        previous = _MANAGERS.get(model)
        if previous is not None:
            if previous.manager() is not None:
                raise ValueError(f"{type(model).__name__} already has a LoraManager; close() it first")
            for handle in previous.hooks:  # left by a manager dropped without close()
                handle.remove()
        self.model = model
        self._convert = convert
        self._cache_size = cache_size
        self._max_bytes = max_bytes
        self._backup_device = None if backup_device is None else torch.device(backup_device)
        self._compute_dtype = compute_dtype
        self._device = None if device is None else torch.device(device)
        self._fused_refusal = fused_refusal
        self._modules = dict(model.named_modules())
        self._lock = ReadWriteLock()
        self._cache: OrderedDict[tuple[str, int, int], list[LoraDelta]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Hooks go on every Linear now, never later: adding one while another thread runs forward is a race.
        self._hooks = [
            m.register_forward_hook(_hot_hook, with_kwargs=True)
            for m in self._modules.values()
            if isinstance(m, nn.Linear)
        ]
        _MANAGERS[model] = _Registration(weakref.ref(self), self._hooks)

    def close(self) -> None:
        """Remove the hooks; the manager must not be used afterwards."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        registration = _MANAGERS.get(self.model)
        if registration is not None and registration.manager() is self:
            del _MANAGERS[self.model]

    def load(self, path: Path) -> list[LoraDelta]:
        """The deltas of one LoRA file (cached), checked against the model."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError:
            stat = None  # read_lora_file names the problem
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size) if stat else None
        with self._cache_lock:
            deltas = self._cache.get(key) if key else None
            if deltas is not None:
                self._cache.move_to_end(key)
        if deltas is None:
            tensors, metadata = read_lora_file(path, self._max_bytes)
            try:
                deltas = self._convert(tensors, source=str(path), metadata=metadata)
            except LoraLayoutError as exc:
                raise InvalidArgument(str(exc)) from None
            if key is not None:
                with self._cache_lock:
                    self._cache[key] = deltas
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        self.check(deltas, source=str(path))
        return deltas

    def check(self, deltas: Sequence[LoraDelta], source: str) -> None:
        """InvalidArgument naming every delta that targets no Linear of the model or does not fit its shape."""
        problems = []
        for d in deltas:
            module = self._modules.get(d.target)
            if module is None:
                problems.append(f"{d.target}: no such module")
                continue
            if not isinstance(module, nn.Linear):
                problems.append(f"{d.target}: a {type(module).__name__}, not a Linear")
                continue
            start, stop = d.rows or (0, d.up.shape[0])
            fits_rows = stop <= module.out_features if d.rows else stop == module.out_features
            if d.down.shape[1] != module.in_features or not fits_rows:
                where = f" rows [{start}, {stop})" if d.rows else ""
                problems.append(
                    f"{d.target} (Linear {module.in_features} -> {module.out_features}): LoRA down "
                    f"{tuple(d.down.shape)}, up {tuple(d.up.shape)}{where}"
                )
        if problems:
            raise InvalidArgument(f"LoRA {source} does not fit the model: {_names(problems)}")

    def _plans(self, loras: Sequence[tuple[Path, float]], dtype_of_weight: bool) -> dict[nn.Module, _Plan]:
        per_module: dict[str, list[tuple[LoraDelta, float]]] = {}
        for path, scale in loras:
            if not isinstance(scale, int | float) or not math.isfinite(scale):
                raise InvalidArgument(f"LoRA {path}: scale must be a finite number, got {scale!r}")
            for delta in self.load(path):
                per_module.setdefault(delta.target, []).append((delta, float(scale)))
        plan = {}
        for name, deltas in per_module.items():
            linear = self._modules[name]
            dtype = (self._compute_dtype or linear.weight.dtype) if dtype_of_weight else torch.float32
            plan[linear] = _plan(linear, deltas, dtype, self._device or linear.weight.device)
        return plan

    def _backup(self, rows: Tensor) -> tuple[Tensor, bool]:
        """A copy of weight rows on the backup device, and whether copies to and from it may be asynchronous
        (pinned host memory; the caching host allocator keeps it until the copies that use it are done)."""
        device = self._backup_device or rows.device
        if device == rows.device:
            return rows.clone(), False
        pinned = device.type == "cpu" and rows.device.type == "cuda"
        copy = torch.empty(rows.shape, dtype=rows.dtype, device=device, pin_memory=pinned)
        copy.copy_(rows, non_blocking=pinned)  # ordered before the in-place update on the same stream
        return copy, pinned

    @contextmanager
    def apply(
        self, loras: Sequence[tuple[Path, float]], mode: LoraMode = "hot", *, timeout: float | None = None
    ) -> Iterator[None]:
        """Run the block with `loras` (path, scale) applied; undone on exit, exceptions included.

        Every file is read, converted and checked before anything changes. `timeout` bounds the wait for the
        model (fused waits for running requests to finish) and raises ResourceExhausted.
        """
        if mode not in MODES:
            raise InvalidArgument(f"LoRA mode must be one of {list(MODES)}, got {mode!r}")
        if not loras:
            with self._lock.shared(timeout):
                yield
            return
        if mode == "hot":
            plans = self._plans(loras, dtype_of_weight=True)
            active = dict(_ACTIVE.get())
            for module, plan in plans.items():
                active[module] = (*active.get(module, ()), plan)
            with self._lock.shared(timeout):
                token = _ACTIVE.set(active)
                try:
                    yield
                finally:
                    _ACTIVE.reset(token)
            return
        if self._fused_refusal:
            raise FailedPrecondition(f"LoRA mode fused: {self._fused_refusal}")
        plans = self._plans(loras, dtype_of_weight=False)
        with self._lock.exclusive(timeout):
            saved: list[tuple[Tensor, int, int, Tensor, bool]] = []
            try:
                with torch.no_grad():
                    for linear, plan in plans.items():
                        weight = linear.weight
                        start = min(p.start for p in plan.parts)
                        stop = max(p.stop for p in plan.parts)
                        saved.append((weight, start, stop, *self._backup(weight[start:stop])))
                        for p in plan.parts:
                            rows = weight[p.start : p.stop]
                            rows.copy_(torch.addmm(rows.float(), p.up, plan.down[p.r0 : p.r1]))  # in float32
                yield
            finally:
                with torch.no_grad():
                    for weight, start, stop, rows, non_blocking in reversed(saved):
                        weight[start:stop].copy_(rows, non_blocking=non_blocking)
