"""Wan LoRAs in every known layout: our WanDiT + LoraManager vs diffusers loading the same file (the oracle).

A LoRA on every Linear of a tiny Wan 2.1 I2V transformer (so the image branch's `k_img` / `v_img` / `img_emb` are
covered) is made with peft and saved by diffusers; the same weights are written by hand in the official /
ComfyUI layout (`diffusion_model.<Wan module>`, `lora_down` / `lora_up` or `lora_A` / `lora_B`, `.alpha` on the
blocks) and as musubi-tuner's kohya keys (`lora_unet_blocks_N_...`, blocks only: diffusers' musubi converter
takes nothing else). diffusers' `WanPipeline.load_lora_weights` loads each file into the diffusers model and we
load it into ours (the same base weights, converted by `diffusers_to_wan`); the forwards must agree in hot and
fused modes.

diffusers refuses `.alpha` keys on the top-level modules of official-layout files, so the files it reads give
those modules no alpha, with `alpha / rank` folded into `up`; the variants test gives them alphas and checks
that we apply them (as ComfyUI does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny_wan import DIM, HEADS, ours_inputs, tiny_wan, tiny_wan_config, tiny_wan_inputs
from torch import Tensor, nn

from services.common.errors import InvalidArgument
from services.denoiser.convert.wan import load_wan_state_dict
from services.denoiser.convert.wan_lora import LoraLayoutError, wan_lora_deltas
from services.denoiser.lora import LoraManager
from services.denoiser.models.wan import WanDiT

TOL = 1e-5
GEOMETRY = "i2v"
RANK, ALPHA = 4, 8.0  # peft scaling alpha / r = 2
# diffusers module -> Wan module, written out by hand for the test.
BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
TARGETS = [*BLOCK, *TOP]  # peft matches these as module-name suffixes


def to_wan(module: str) -> str:
    block = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    return f"blocks.{block[1]}.{BLOCK[block[2]]}" if block else TOP[module]


def peft_lora(seed: int, geometry: str = GEOMETRY) -> tuple[dict[str, Tensor], dict]:
    """A peft LoRA on every Linear (diffusers names, no prefix), random non-zero A and B; and its LoraConfig."""
    model = WanTransformer3DModel(**tiny_wan_config(geometry))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5 * (1.0 if ".lora_A." in k else 0.3)
        for k, v in sorted(get_peft_model_state_dict(model).items())
    }
    return sd, model.peft_config["default"].to_dict()


def wan_modules(sd: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The peft LoRA on Wan module names: name -> (down, up), `alpha / rank` not applied."""
    modules = sorted({k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")})
    return {to_wan(m): (sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"]) for m in modules}


def official(
    sd: dict[str, Tensor], down_key: str, up_key: str, *, top_alpha: bool = False
) -> dict[str, Tensor]:
    """`diffusion_model.<Wan module>` keys, `.alpha` on block modules (and on the top ones with `top_alpha`);
    modules without an alpha key have `alpha / rank` folded into `up`."""
    out = {}
    for name, (down, up) in wan_modules(sd).items():
        key = f"diffusion_model.{name}"
        out[f"{key}.{down_key}.weight"] = down
        if name.startswith("blocks.") or top_alpha:
            out[f"{key}.{up_key}.weight"] = up
            out[f"{key}.alpha"] = torch.tensor(ALPHA)
        else:
            out[f"{key}.{up_key}.weight"] = up * (ALPHA / RANK)
    return out


def kohya(sd: dict[str, Tensor], *, blocks_only: bool = True) -> dict[str, Tensor]:
    """musubi-tuner's keys: `lora_unet_<Wan module, dots as "_">`, `.alpha` on every module."""
    out = {}
    for name, (down, up) in wan_modules(sd).items():
        if blocks_only and not name.startswith("blocks."):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        out |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(ALPHA),
        }
    return out


def write_files(sd: dict[str, Tensor], config: dict, directory: Path) -> dict[str, Path]:
    directory.mkdir()
    paths = {
        name: directory / f"{name}.safetensors" for name in ("diffusers", "official", "official_ab", "kohya")
    }
    WanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=config,
        weight_name=paths["diffusers"].name,
    )
    save_file(official(sd, "lora_down", "lora_up"), paths["official"])
    save_file(official(sd, "lora_A", "lora_B"), paths["official_ab"])
    save_file(kohya(sd), paths["kohya"])
    return paths


class Setup:
    def __init__(self, directory: Path):
        reference = tiny_wan(GEOMETRY, seed=0)
        self.reference_sd = reference.state_dict()
        params, sd = load_wan_state_dict(self.reference_sd, num_heads=HEADS)
        with torch.device("meta"):
            ours = WanDiT(params)
        ours.load_state_dict(sd, strict=True, assign=True)
        self.ours = ours.eval()
        self.manager = LoraManager(self.ours, convert=wan_lora_deltas)
        self.x = tiny_wan_inputs(reference)
        self.peft: dict[str, dict[str, Tensor]] = {}
        self.files: dict[str, dict[str, Path]] = {}
        for name, seed in (("a", 1), ("b", 2)):
            sd, config = peft_lora(seed)
            self.peft[name] = sd
            self.files[name] = write_files(sd, config, directory / name)
        self._oracle: dict[tuple, Tensor] = {}

    @torch.no_grad()
    def run_ours(self) -> Tensor:
        return self.ours(**ours_inputs(self.x))

    @torch.no_grad()
    def run_diffusers(self, model: WanTransformer3DModel) -> Tensor:
        return model(**self.x, return_dict=False)[0]

    def diffusers_model(self) -> WanTransformer3DModel:
        model = WanTransformer3DModel(**tiny_wan_config(GEOMETRY)).eval()
        model.load_state_dict(self.reference_sd)
        return model

    def oracle(self, loras: tuple[tuple[Path, float], ...]) -> Tensor:
        """diffusers' forward with the files loaded by WanPipeline.load_lora_weights, each at its scale."""
        if loras not in self._oracle:
            model = self.diffusers_model()
            pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model)
            for i, (path, _) in enumerate(loras):
                pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
            pipe.set_adapters([f"l{i}" for i in range(len(loras))], [s for _, s in loras])
            self._oracle[loras] = self.run_diffusers(model)
        return self._oracle[loras]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("wan_lora"))


def test_base_models_agree(setup: Setup) -> None:
    assert (setup.run_ours() - setup.run_diffusers(setup.diffusers_model())).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["diffusers", "official", "official_ab", "kohya"])
@pytest.mark.parametrize("mode", ["hot", "fused"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_matches_diffusers(setup: Setup, layout: str, mode: str, scale: float) -> None:
    base = setup.run_ours()
    loras = ((setup.files["a"][layout], scale),)
    expected = setup.oracle(loras)
    with setup.manager.apply(list(loras), mode=mode):
        got = setup.run_ours()
    diff = (got - expected).abs().max().item()
    effect = (expected - base).abs().max().item()
    print(f"{layout} {mode} scale {scale}: max abs diff {diff:.2e}, LoRA effect {effect:.2f}")
    assert effect > 0.3  # the LoRA changes the output a lot
    assert diff <= TOL
    assert torch.equal(setup.run_ours(), base)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_two_loras_at_once(setup: Setup, mode: str) -> None:
    base = setup.run_ours()
    loras = ((setup.files["a"]["diffusers"], 0.8), (setup.files["b"]["official"], 0.5))
    expected = setup.oracle(loras)
    with setup.manager.apply(list(loras), mode=mode):
        got = setup.run_ours()
    diff = (got - expected).abs().max().item()
    print(f"two LoRAs {mode}: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert (expected - setup.oracle(loras[:1])).abs().max() > 0.1
    assert torch.equal(setup.run_ours(), base)


def _variants(sd: dict[str, Tensor], official_file: Path) -> dict[str, dict[str, Tensor]]:
    alphas = {f"{k.removesuffix('.lora_A.weight')}.alpha": torch.tensor(ALPHA) for k in sd if ".lora_A." in k}
    comfy = load_file(official_file)
    diffusers_kohya = {}  # kohya keys on diffusers names
    for k, v in sd.items():
        module, _, param = k.partition(".lora_")
        name = "lora_transformer_" + module.replace(".", "_")
        diffusers_kohya[f"{name}.lora_{'down' if param.startswith('A') else 'up'}.weight"] = v
        diffusers_kohya[f"{name}.alpha"] = torch.tensor(ALPHA)
    return {
        # peft model state dict: `.default` adapter keys, no prefix, alphas as keys instead of metadata
        "peft .default + .alpha": {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
        | alphas,
        "diffusers with prefix + .alpha": {f"transformer.{k}": v for k, v in (sd | alphas).items()},
        "official with top-level alphas": official(sd, "lora_down", "lora_up", top_alpha=True),
        "official without prefix": {k.removeprefix("diffusion_model."): v for k, v in comfy.items()},
        "comfyui model.diffusion_model.": {f"model.{k}": v for k, v in comfy.items()},
        "kohya with top-level modules": kohya(sd, blocks_only=False),
        "kohya on diffusers names": diffusers_kohya,
        "kohya lora_A / lora_B": {
            k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
            for k, v in kohya(sd, blocks_only=False).items()
        },
    }


@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_key_variants_match_the_diffusers_file(setup: Setup, mode: str, tmp_path: Path) -> None:
    """Other spellings of the same LoRA give the same output as diffusers on the diffusers file."""
    files = setup.files["a"]
    expected = setup.oracle(((files["diffusers"], 1.0),))
    for name, tensors in _variants(setup.peft["a"], files["official"]).items():
        path = tmp_path / (re.sub(r"\W+", "_", name) + ".safetensors")
        save_file(tensors, path)
        with setup.manager.apply([(path, 1.0)], mode=mode):
            diff = (setup.run_ours() - expected).abs().max().item()
        print(f"{name} {mode}: max abs diff {diff:.2e}")
        assert diff <= TOL, name


def test_every_linear_is_a_target(setup: Setup) -> None:
    deltas = wan_lora_deltas(
        setup.peft["a"], "a", {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
    )
    linears = {n for n, m in setup.ours.named_modules() if isinstance(m, nn.Linear)}
    assert sorted(d.target for d in deltas) == sorted(linears)
    assert all(d.rows is None and d.alpha_scale == ALPHA / RANK for d in deltas)
    assert {d.target for d in deltas} >= {"blocks.1.cross_attn.k_img", "img_emb.proj.3", "head.head"}


def test_peft_metadata_patterns_and_rslora() -> None:
    sd, config = peft_lora(3, "t2v")
    config = dict(config, alpha_pattern={"blocks.0.attn1.to_k": 2.0}, use_rslora=True)
    metadata = {
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}, default=list)
    }
    deltas = {d.target: d for d in wan_lora_deltas(sd, "f", metadata)}
    assert deltas["blocks.0.self_attn.k"].alpha_scale == 2.0 / RANK**0.5
    assert deltas["blocks.1.self_attn.k"].alpha_scale == ALPHA / RANK**0.5
    assert deltas["time_projection.1"].alpha_scale == ALPHA / RANK**0.5
    assert all(d.alpha_scale == 1.0 for d in wan_lora_deltas(sd, "f"))  # no metadata, no alpha: scale 1


def test_t2v_lora_on_the_i2v_model_and_back(setup: Setup, tmp_path: Path) -> None:
    """A T2V LoRA applies to an I2V model (the image branch untouched, as diffusers' zero expansion); an I2V
    LoRA does not fit a T2V model: its image-branch modules are named."""
    sd, _ = peft_lora(4, "t2v")
    path = tmp_path / "t2v.safetensors"
    save_file(official(sd, "lora_down", "lora_up"), path)
    expected = setup.oracle(((path, 1.0),))
    with setup.manager.apply([(path, 1.0)]):
        assert (setup.run_ours() - expected).abs().max() <= TOL
    params, t2v_sd = load_wan_state_dict(tiny_wan("t2v").state_dict(), num_heads=HEADS)
    with torch.device("meta"):
        t2v = WanDiT(params)
    t2v.load_state_dict(t2v_sd, assign=True)
    manager = LoraManager(t2v, convert=wan_lora_deltas)
    with pytest.raises(InvalidArgument, match=r"blocks\.0\.cross_attn\.k_img: no such module"):
        manager.load(setup.files["a"]["official"])


def test_bad_files_are_named(setup: Setup, tmp_path: Path) -> None:
    down, up = torch.zeros(RANK, DIM), torch.zeros(DIM, RANK)
    cases = {
        "unknown": (
            {"encoder.layer.0.weight": down, "encoder.layer.0.bias": up},
            r"unknown\.safetensors: not a Wan LoRA in a known layout \(2 keys, e\.g\. "
            r"\[encoder\.layer\.0\.bias, encoder\.layer\.0\.weight\]\)",
        ),
        "untargeted": (
            {
                "transformer.blocks.0.attn1.to_q.lora_A.weight": down,
                "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
                "transformer.blocks.0.attn1.norm_q.lora_A.weight": down,
                "lora_unet_blocks_0_norm3.lora_down.weight": down,
            },
            r"keys that target no Wan transformer Linear \[lora_unet_blocks_0_norm3\.lora_down\.weight, "
            r"transformer\.blocks\.0\.attn1\.norm_q\.lora_A\.weight\]",
        ),
        "patch_embedding": (
            {
                "diffusion_model.patch_embedding.lora_down.weight": torch.zeros(RANK, 36, 1, 2, 2),
                "diffusion_model.patch_embedding.lora_up.weight": torch.zeros(DIM, RANK, 1, 1, 1),
            },
            r"keys on patch_embedding, a Conv3d run as a matmul, not a Linear: LoRAs on it are not supported "
            r"\[diffusion_model\.patch_embedding\.lora_down\.weight, diffusion_model\.patch_embedding\.lora_up",
        ),
        "diffs": (
            {
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                "diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(DIM),
                "diffusion_model.blocks.0.norm3.diff": torch.zeros(DIM),
            },
            r"unsupported LoRA variants \[diffusion_model\.blocks\.0\.norm3\.diff \(weight diffs\), "
            r"diffusion_model\.blocks\.0\.self_attn\.q\.diff_b \(bias diffs\)\]",
        ),
        "text_encoder": (
            {
                "lora_unet_blocks_0_ffn_2.lora_down.weight": torch.zeros(RANK, 64),
                "lora_unet_blocks_0_ffn_2.lora_up.weight": up,
                "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": down,
            },
            r"1 text-encoder LoRA keys \[text_encoder\.encoder\.block\.0\.layer\.0\.SelfAttention\.q\.lora_A"
            r"\.weight\]: text-encoder LoRAs are not supported",
        ),
        "half": (
            {"diffusion_model.head.head.lora_A.weight": down},
            r"Wan LoRA on diffusion_model\.head\.head: no up weight",
        ),
        "twice": (
            {
                "blocks.0.attn1.to_q.lora_A.weight": down,
                "blocks.0.attn1.to_q.lora_A.default.weight": down,
            },
            r"keys given twice",
        ),
        "two_names": (
            {
                "diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
                "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(64, RANK),
                "transformer.blocks.0.ffn.net.0.proj.lora_A.weight": down,
                "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": torch.zeros(64, RANK),
            },
            r"modules given twice under different names \[blocks\.0\.ffn\.0 as diffusion_model\.blocks\.0\.ffn\.0 "
            r"and transformer\.blocks\.0\.ffn\.net\.0\.proj\]",
        ),
        "not_a_matrix": (
            {
                "lora_unet_blocks_1_ffn_0.lora_down.weight": down[0],
                "lora_unet_blocks_1_ffn_0.lora_up.weight": up,
            },
            r"LoRA on blocks\.1\.ffn\.0: need down \(r, in\) and up \(out, r\), got down \(32,\) and up \(32, 4\) "
            r"\(keys lora_unet_blocks_1_ffn_0\.\*\)",
        ),
        "shapes": (  # a LoRA for a wider model
            {
                "diffusion_model.blocks.1.self_attn.o.lora_down.weight": torch.zeros(RANK, 2 * DIM),
                "diffusion_model.blocks.1.self_attn.o.lora_up.weight": torch.zeros(2 * DIM, RANK),
            },
            r"does not fit the model: blocks\.1\.self_attn\.o \(Linear 32 -> 32\): LoRA down \(4, 64\), up \(64, 4\)",
        ),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in tensors.items()}, path)
        with pytest.raises(InvalidArgument, match=message), setup.manager.apply([(path, 1.0)]):
            pytest.fail("applied")
        if name != "shapes":
            with pytest.raises(LoraLayoutError, match=message):
                wan_lora_deltas(load_file(path), str(path))
