"""One training job, from a validated spec to the saved LoRA (or transformer): the steps in order.

1. resolve the base model and check the whole dataset (SpecError before anything heavy is loaded);
2. encode text and latents once into the feature cache, then free the encoders and the VAE;
3. load the denoiser, add the LoRA (or make everything trainable), resume from the latest complete checkpoint;
4. train, checkpointing every `checkpointEvery` steps; save the result; `status.json` tracks it all.

Outputs under the spec's `output` (a folder or `s3://bucket/prefix/`): `status.json`, `checkpoints/`,
`pytorch_lora_weights.safetensors` (LoRA) or `transformer/` (full), and `cache/` when the output is local.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from services.common.errors import DiffmeshError
from services.common.models import find_component, resolve_spec
from services.common.runtime import pick_device
from services.common.settings import Settings
from trainer import checkpoint, data, flux, vae
from trainer.cache import build_cache
from trainer.loop import LoopConfig, StepInfo, TrainLoop
from trainer.lora import TrainableLora, lora_metadata, select_targets, to_diffusers
from trainer.spec import SpecError, TrainSpec, check_implemented, to_json, validate_spec, with_defaults
from trainer.status import StatusWriter
from trainer.storage import Storage, open_storage

log = logging.getLogger("trainer")
LORA_FILE = (
    "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(<output>) finds it
)
TRANSFORMER_FOLDER = "transformer"
VAE_FOLDER = vae.FOLDER
EMPTY_PROMPT = ""  # caption dropout trains on this prompt's features: CFG's unconditional branch
WORK_DIR_ENV = "DIFFMESH_TRAIN_WORK_DIR"
FAMILIES = {flux.NAME: flux}
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # frozen LoRA base


@dataclass(frozen=True)
class Options:
    """Knobs that are not (yet) in the TrainSpec."""

    warmup_steps: int = 0
    hold_after_checkpoint_s: float = 0.0  # tests: a window to kill the process right after a checkpoint


@dataclass(frozen=True)
class Result:
    steps: int
    resumed_from: int | None
    losses: list[float]
    artifacts: list[str]
    seconds_per_step: float  # mean over this run's steps
    step_seconds: list[float]
    checkpoints: list[checkpoint.Written]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(spec: TrainSpec) -> str:
    """What must not change between a checkpoint and the run resuming it (steps and interval may)."""
    s = TrainSpec()
    s.CopyFrom(spec)
    s.steps, s.checkpoint_every = 0, 0
    return _digest(to_json(s))


def work_dir(out: Storage, env: Mapping[str, str]) -> Path:
    """Local scratch for the feature cache and downloaded S3 images: `$DIFFMESH_TRAIN_WORK_DIR` when set (its
    entries are keyed by content, so runs may share it), else `<output>/cache` for a local output, else a
    folder in the system's temporary directory."""
    if env.get(WORK_DIR_ENV):
        return Path(env[WORK_DIR_ENV]).expanduser()
    local = out.local_path("cache")
    if local is not None:
        return local
    return Path(tempfile.gettempdir()) / "diffmesh-train"


def _model_dir(spec: TrainSpec, settings: Settings) -> Path:
    """The base model's local folder, with every component the family needs (SpecError("baseModel") if not)."""
    try:
        path = resolve_spec(
            spec.base_model,
            roots=settings.model_roots,
            cache_dir=settings.cache_dir,
            offline=settings.offline,
        )
        if not path.is_dir():
            raise SpecError(
                "baseModel", f"{path} is not a model folder in the hub layout (model_index.json...)"
            )
        for name in FAMILIES[spec.family].COMPONENTS:
            find_component(path, [name])
    except DiffmeshError as e:
        raise SpecError("baseModel", str(e)) from None
    return path


def train(spec: TrainSpec, env: Mapping[str, str] | None = None, options: Options | None = None) -> Result:
    """Run (or resume) the training a spec describes; SpecError for a spec that cannot be trained."""
    env = os.environ if env is None else env
    options = options or Options()
    spec = with_defaults(spec)
    validate_spec(spec)
    check_implemented(spec)
    out = open_storage(spec.output, env, for_output=True)
    status = StatusWriter(out, spec.steps, fingerprint(spec))
    try:
        return _train(spec, env, options, out, status)
    except SpecError as e:
        status.write("failed", message=str(e), force=True)
        raise
    except BaseException as e:
        status.write("failed", message=f"{type(e).__name__}: {e}", force=True)
        raise


def _dataset(spec: TrainSpec, env: Mapping[str, str], scratch: Path) -> list[data.Item]:
    """Every row of the dataset checked (SpecError naming the first bad image), with its bucket."""
    source = open_storage(spec.dataset.uri, env)
    rows = data.read_metadata(source, spec.dataset.image_column, spec.dataset.caption_column)
    paths = data.fetch_images(source, rows, scratch / "dataset" / _digest(spec.dataset.uri))
    items = data.build_items(source, rows, paths, spec.resolution, spec.bucketing)
    log.info("dataset: %d images, buckets %s", len(items), sorted({it.size for it in items}))
    return items


def _trainable(spec: TrainSpec, model: torch.nn.Module, device: torch.device) -> TrainableLora | None:
    """LoRA mode: freeze the base (in the mixed-precision dtype) and add the LoRA; full mode: all of the model
    trainable in float32 (autocast does the low-precision math). Returns the LoRA, or None in full mode."""
    if spec.mode != TrainSpec.LORA:
        model.float().requires_grad_(True)
        return None
    model.requires_grad_(False).to(WEIGHT_DTYPES[spec.mixed_precision])
    targets = select_targets(model, list(spec.lora.target_modules))
    init = torch.Generator().manual_seed((spec.seed + 1) % 2**64)
    lora = TrainableLora(model, targets, spec.lora.rank, spec.lora.alpha, spec.lora.dropout, init)
    lora.to(device).attach()
    log.info("LoRA rank %d alpha %g on %d Linears", spec.lora.rank, spec.lora.alpha, len(targets))
    return lora


def _save(spec: TrainSpec, lora: TrainableLora | None, denoiser: flux.Denoiser, out: Storage) -> list[str]:
    """The result: the LoRA in the diffusers layout, or the transformer folder; the names written."""
    info = {"family": spec.family, "base_model": spec.base_model, "steps": spec.steps, "seed": spec.seed}
    info["name"] = spec.name
    if lora is not None:
        state = to_diffusers(lora)
        out.write(LORA_FILE, safetensors_bytes(state, metadata=lora_metadata(lora, state, info)))
        return [LORA_FILE]
    FAMILIES[spec.family].save_transformer(denoiser.model, denoiser.component, out, TRANSFORMER_FOLDER)
    out.write(f"{TRANSFORMER_FOLDER}/diffmesh_train.json", json.dumps(info, indent=2).encode())
    return [TRANSFORMER_FOLDER]


@dataclass
class _Setup:
    """What the shared loop needs from a component: the module, what trains, the loss, how to save."""

    model: torch.nn.Module
    lora: TrainableLora | None
    params: list[torch.nn.Parameter]
    compute_loss: Callable[[list[int]], torch.Tensor]
    generator: torch.Generator  # what compute_loss draws from (its state is checkpointed)
    save: Callable[[], list[str]]


def _denoiser_setup(
    spec: TrainSpec,
    items: list[data.Item],
    model_dir: Path,
    scratch: Path,
    device: torch.device,
    out: Storage,
    status: StatusWriter,
) -> _Setup:
    family = FAMILIES[spec.family]
    status.write("running", message="caching text embeddings and latents", force=True)
    started = time.perf_counter()
    cache = build_cache(
        items,
        model_dir,
        scratch / "features",
        device,
        text_components=family.TEXT_COMPONENTS,
        text_outputs=family.TEXT_OUTPUTS,
        vae_component=family.VAE_COMPONENT,
        max_sequence_length=family.max_sequence_length(model_dir),
        extra_captions=[EMPTY_PROMPT] if spec.caption_dropout > 0 else [],
    )
    log.info("feature cache: %.1f MB in %.2f s", cache.nbytes / 1e6, time.perf_counter() - started)
    empty = cache.caption_features(EMPTY_PROMPT) if spec.caption_dropout > 0 else None

    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)  # noise and sigmas
    if spec.init == "random":
        denoiser = family.new_denoiser(model_dir, device, spec.seed)
        log.info("denoiser initialised at random (seed %d): %s", spec.seed, denoiser.model.params)
    else:
        denoiser = family.load_denoiser(model_dir, device)
    model = denoiser.model
    lora = _trainable(spec, model, device)
    params = list(lora.parameters() if lora is not None else model.parameters())

    def compute_loss(indices: list[int]) -> torch.Tensor:
        latents, text = cache.batch(indices)
        if empty is not None:
            text = family.drop_captions(text, empty, spec.caption_dropout, generator)
        return family.training_loss(model, latents.to(device), text, denoiser.scheduler, generator)

    return _Setup(model, lora, params, compute_loss, generator, lambda: _save(spec, lora, denoiser, out))


def _vae_setup(
    spec: TrainSpec, items: list[data.Item], model_dir: Path, device: torch.device, out: Storage
) -> _Setup:
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)  # posterior samples
    started = time.perf_counter()
    images = vae.Images(items)
    log.info("decoded %d images in %.2f s", len(items), time.perf_counter() - started)
    model = vae.build(spec, model_dir).float().requires_grad_(True).to(device)
    info = {"family": spec.family, "base_model": spec.base_model, "steps": spec.steps, "seed": spec.seed}

    def compute_loss(indices: list[int]) -> torch.Tensor:
        return vae.training_loss(model, images.batch(indices, device), generator)

    def save() -> list[str]:
        calibrated = vae.calibrate(model, images, device)
        vae.save(calibrated, out, VAE_FOLDER)
        out.write(
            f"{VAE_FOLDER}/diffmesh_train.json", json.dumps({**info, "name": spec.name}, indent=2).encode()
        )
        return [VAE_FOLDER]

    return _Setup(model, None, list(model.parameters()), compute_loss, generator, save)


def _train(
    spec: TrainSpec, env: Mapping[str, str], options: Options, out: Storage, status: StatusWriter
) -> Result:
    settings = Settings.from_env(env)
    device = pick_device(settings.device)
    model_dir = _model_dir(spec, settings)
    scratch = work_dir(out, env)
    log.info("training %s (%s) from %s to %s on %s", spec.name, spec.family, model_dir, out.root_uri, device)
    status.write("running", message="checking the dataset", force=True)
    items = _dataset(spec, env, scratch)
    if spec.component == "vae":
        setup = _vae_setup(spec, items, model_dir, device, out)
    else:
        setup = _denoiser_setup(spec, items, model_dir, scratch, device, out, status)
    model, lora, params, generator = setup.model, setup.lora, setup.params, setup.generator
    model.train()
    if lora is not None:
        lora.train()
    log.info("trainable parameters: %d", sum(p.numel() for p in params))
    compute_loss = setup.compute_loss

    sampler = data.BucketSampler([it.size for it in items], spec.batch_size, spec.dataset.repeats, spec.seed)
    config = LoopConfig(
        steps=spec.steps,
        learning_rate=spec.learning_rate,
        gradient_accumulation=spec.gradient_accumulation,
        warmup_steps=options.warmup_steps,
        mixed_precision=spec.mixed_precision,
        checkpoint_every=spec.checkpoint_every,
    )
    loop = TrainLoop(params, compute_loss, sampler, generator, config, device)

    resumed = checkpoint.latest(out)
    if resumed is not None:
        if resumed.state.get("fingerprint") != status.fingerprint:
            raise SpecError(
                "output", f"{out.root_uri} holds checkpoints of another spec; use a new output or delete them"
            )
        if lora is not None:
            lora.load_bfl_state_dict(resumed.trainable)
        else:
            model.load_state_dict(resumed.trainable)
        loop.load_state_dict(resumed.state["loop"])
        log.info("resumed from checkpoint step %d", resumed.step)

    losses: list[float] = []
    timings: list[float] = []
    written: list[checkpoint.Written] = []

    def on_step(info: StepInfo) -> None:
        losses.append(info.loss)
        timings.append(info.seconds)
        log.info(
            "step %d/%d loss %.5f lr %.2e %.3f s", info.step, info.total, info.loss, info.lr, info.seconds
        )
        status.write("running", step=info.step, loss=info.loss)

    def on_checkpoint(step: int) -> None:
        weights = lora.bfl_state_dict() if lora is not None else model.state_dict()
        state = {"loop": loop.state_dict(), "fingerprint": status.fingerprint, "spec": to_json(spec)}
        w = checkpoint.save(out, step, dict(weights), state)
        written.append(w)
        where = out.uri(checkpoint.folder(step))
        log.info("checkpoint step %d: %.2f MB in %.3f s -> %s", step, w.bytes / 1e6, w.seconds, where)
        status.write("running", step=step, force=True, message=f"checkpoint step {step}")
        if options.hold_after_checkpoint_s:
            time.sleep(options.hold_after_checkpoint_s)

    status.write("running", step=loop.step, message="training", force=True)
    loop.run(on_step, on_checkpoint)

    artifacts = setup.save()
    last = losses[-1] if losses else None
    status.write("succeeded", step=loop.step, loss=last, message="done", artifacts=artifacts, force=True)
    log.info("saved %s", ", ".join(out.uri(a) for a in artifacts))
    per_step = sum(timings) / len(timings) if timings else 0.0
    return Result(loop.step, resumed.step if resumed else None, losses, artifacts, per_step, timings, written)
