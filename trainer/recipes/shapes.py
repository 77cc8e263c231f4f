"""`python -m trainer.recipes.shapes`: train `models/diffmesh-shapes` from nothing, and its diamond LoRA.

Every phase is a command anyone can re-run; the recipe prints each one and its wall time:

1. data      the shapes datasets (trainer/datasets/shapes.py), fixed seeds: base (4 shapes, 6 colours,
             3 backgrounds, seed 0; the VAE and the DiT train on it) and diamond-only (the held-out shape,
             seed 1, for the LoRA);
2. skeleton  the untrained model folder (trainer/recipes/skeleton.py): configs, tokenizers, random frozen
             text encoders;
3. vae       `diffmesh train submit --launcher local` of a `component: vae`, `init: random` spec; wait;
4. dit       the skeleton + the trained vae/ as base; a `mode: FULL`, `init: random`, caption-dropout spec;
5. assemble  skeleton + vae/ + transformer/ -> `--out` (and `diffmesh.json`, the generation defaults);
6. lora      a LoRA (rank 16) of the assembled model on the diamond-only data -> `<out>/lora/diamond.safetensors`.

The held-out concept is a shape, not the colour "pink": the autoencoder trained on the base data decodes
pink as red, so a new colour would need the VAE (and then the DiT) retrained on it; a new shape in known
colours is within what the VAE can draw.

The jobs run through the CLI exactly as a user would submit them (`diffmesh train status` is polled until the
job ends). Specs, datasets, job outputs and logs go under `--work` (default `build/shapes`). The device is
the trainer's (`DIFFMESH_DEVICE`: auto picks CUDA when there is one).

    python -m trainer.recipes.shapes                       # everything, as shipped
    python -m trainer.recipes.shapes --phases lora         # only the LoRA, on the model already at --out
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.recipes.skeleton import Defaults, write_skeleton

PHASES = ("data", "skeleton", "vae", "dit", "assemble", "lora")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
LORA_FILE = "lora/diamond.safetensors"


@dataclass(frozen=True)
class Recipe:
    """What is trained, with how much; the defaults are what shipped."""

    n_base: int = 12000
    n_concept: int = 1500
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 5e-4
    dit_steps: int = 10000
    dit_batch: int = 128
    dit_lr: float = 3e-4
    caption_dropout: float = 0.1
    lora_steps: int = 1200
    lora_batch: int = 32
    lora_lr: float = 1e-3
    lora_rank: int = 16
    seed: int = 0
    defaults: Defaults = field(default_factory=Defaults)


def _run(cmd: list[str]) -> str:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def _diffmesh() -> list[str]:
    """The `diffmesh` CLI beside this Python, else the same as a module (an environment without the script)."""
    exe = Path(sys.executable).with_name("diffmesh")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "orchestrator.cli"]


def submit_and_wait(spec: dict[str, Any], work: Path, poll_s: float = 2.0) -> Path:
    """Write the spec, `diffmesh train submit` it, poll `diffmesh train status` until it ends; its output."""
    path = work / "specs" / f"{spec['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    out = _run([*_diffmesh(), "train", "submit", "--spec", str(path), "--launcher", "local"])
    job = out.strip().split()[-1]
    last = ""
    while True:
        doc = json.loads(
            subprocess.run(
                [*_diffmesh(), "train", "status", job, "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
        state = str(doc.get("state", "")).removeprefix("JOB_STATE_")
        line = (
            f"  {job}: {state} step {doc.get('step', 0)}/{doc.get('totalSteps', '?')} loss {doc.get('loss')}"
        )
        if line != last:
            print(line, flush=True)
            last = line
        if state in TERMINAL:
            break
        time.sleep(poll_s)
    if state != "SUCCEEDED":
        logs = subprocess.run(
            [*_diffmesh(), "train", "logs", job, "--tail", "40"], capture_output=True, text=True
        )
        sys.stderr.write(logs.stdout)
        raise SystemExit(f"job {job} ({spec['name']}) ended {state}")
    return Path(spec["output"])


def _spec(name: str, base: Path, data: Path, out: Path, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "family": "flux",
        "baseModel": str(base.resolve()),
        "dataset": {"uri": str(data.resolve())},
        "resolution": 64,
        "output": str(out.resolve()),
        "mixedPrecision": "no",
        **fields,
    }


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def run(recipe: Recipe, out: Path, work: Path, phases: list[str]) -> dict[str, float]:
    r = recipe
    data_base, data_concept = work / "data" / "base", work / "data" / "diamond"
    skeleton, dit_base = work / "skeleton", work / "dit-base"
    runs = work / "runs"
    times: dict[str, float] = {}
    for phase in phases:
        started = time.perf_counter()
        print(f"== {phase}", flush=True)
        if phase == "data":
            gen = [sys.executable, "-m", "trainer.datasets.shapes", "--resolution", "64"]
            _run([*gen, "--out", str(_fresh(data_base)), "--n", str(r.n_base), "--seed", "0"])
            concept = ["--concept", "diamond", "--only-concept"]
            _run([*gen, "--out", str(_fresh(data_concept)), "--n", str(r.n_concept), "--seed", "1", *concept])
        elif phase == "skeleton":
            write_skeleton(_fresh(skeleton), seed=r.seed, defaults=r.defaults)
        elif phase == "vae":
            spec = _spec(
                "shapes-vae", skeleton, data_base, _fresh(runs / "vae"), component="vae", mode="FULL"
            )
            spec.update(init="random", steps=r.vae_steps, batchSize=r.vae_batch, learningRate=r.vae_lr)
            spec.update(seed=r.seed, checkpointEvery=max(1, r.vae_steps // 4))
            submit_and_wait(spec, work)
        elif phase == "dit":
            _fresh(dit_base)
            shutil.copytree(skeleton, dit_base)
            shutil.rmtree(dit_base / "vae")
            shutil.copytree(runs / "vae" / "vae", dit_base / "vae")
            spec = _spec("shapes-dit", dit_base, data_base, _fresh(runs / "dit"), mode="FULL", init="random")
            spec.update(steps=r.dit_steps, batchSize=r.dit_batch, learningRate=r.dit_lr, seed=r.seed)
            spec.update(captionDropout=r.caption_dropout, checkpointEvery=max(1, r.dit_steps // 4))
            submit_and_wait(spec, work)
        elif phase == "assemble":
            _fresh(out)
            shutil.copytree(dit_base, out, ignore=shutil.ignore_patterns("transformer"))
            shutil.copytree(runs / "dit" / "transformer", out / "transformer")
        elif phase == "lora":
            spec = _spec("shapes-diamond-lora", out, data_concept, _fresh(runs / "diamond"), mode="LORA")
            spec.update(steps=r.lora_steps, batchSize=r.lora_batch, learningRate=r.lora_lr, seed=r.seed)
            spec.update(lora={"rank": r.lora_rank}, checkpointEvery=r.lora_steps)
            submit_and_wait(spec, work)
            (out / LORA_FILE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(runs / "diamond" / "pytorch_lora_weights.safetensors", out / LORA_FILE)
        else:
            raise SystemExit(f"unknown phase {phase!r}; phases: {list(PHASES)}")
        times[phase] = time.perf_counter() - started
        print(f"== {phase}: {times[phase]:.1f} s", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.recipes.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/diffmesh-shapes", help="the model folder (default: %(default)s)")
    p.add_argument(
        "--work", default="build/shapes", help="datasets, specs, job outputs (default: %(default)s)"
    )
    p.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of: " + ",".join(PHASES)
    )
    scale = p.add_argument_group("sizes (defaults: as shipped)")
    for f, default in Recipe.__dataclass_fields__.items():
        if f != "defaults":
            scale.add_argument(
                f"--{f.replace('_', '-')}", type=type(default.default), default=default.default
            )
    args = p.parse_args(argv)
    values = {f: getattr(args, f) for f in Recipe.__dataclass_fields__ if f != "defaults"}
    recipe = Recipe(**values)
    phases = [x for x in args.phases.split(",") if x]
    times = run(recipe, Path(args.out), Path(args.work), phases)
    print("phase times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
