"""The optimisation loop: AdamW, constant LR with optional linear warmup, gradient accumulation, mixed
precision (autocast; a gradient scaler for fp16), gradient clipping at 1.0, everything seeded.

All the state a resumed run needs is in `state_dict()`: the step, optimizer and LR scheduler, the data position,
and the RNG states (the training generator that draws noise and sigmas, torch's global one used by dropout, and
Python's). An uninterrupted run and one killed and resumed from a checkpoint make the same updates.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainer.data import BucketSampler

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_GRAD_NORM = 1.0
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-4  # diffusers' FLUX LoRA scripts


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    learning_rate: float
    gradient_accumulation: int = 1
    warmup_steps: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16"
    checkpoint_every: int = 0  # 0: no checkpoints


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    seconds: float


def constant_with_warmup(warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear from 0 over `warmup_steps`, then 1 (diffusers' `constant_with_warmup`)."""

    def factor(step: int) -> float:
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0

    return factor


class TrainLoop:
    """Steps `compute_loss(indices)` over `sampler`'s batches, updating `params`."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        compute_loss: Callable[[list[int]], Tensor],
        sampler: BucketSampler,
        generator: torch.Generator,
        config: LoopConfig,
        device: torch.device,
    ) -> None:
        self.params = list(params)
        self.compute_loss = compute_loss
        self.sampler = sampler
        self.generator = generator
        self.config = config
        self.device = device
        self.step = 0
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, constant_with_warmup(config.warmup_steps)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = AUTOCAST.get(self.config.mixed_precision)
        if dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation` batches; the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = self.config.gradient_accumulation
        total = 0.0
        for _ in range(accumulation):
            indices = self.sampler.next()
            with self._autocast():
                loss = self.compute_loss(indices)
            self.scaler.scale(loss / accumulation).backward()
            total += float(loss.detach()) / accumulation
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return total

    def run(
        self,
        on_step: Callable[[StepInfo], None],
        on_checkpoint: Callable[[int], None],
    ) -> None:
        """Train until `config.steps`, calling `on_checkpoint(step)` every `checkpoint_every` steps."""
        every = self.config.checkpoint_every
        while self.step < self.config.steps:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_step()
            on_step(StepInfo(self.step, self.config.steps, loss, lr, time.perf_counter() - started))
            if every and self.step % every == 0:
                on_checkpoint(self.step)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": {
                "generator": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
            },
        }
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["data"])
        rng = state["rng"]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
