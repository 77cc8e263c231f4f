"""FLUX.1 LoRAs in every known layout: our Flux + LoraManager vs diffusers loading the same file (the oracle).

A LoRA is made with peft on a tiny diffusers `FluxTransformer2DModel` and saved by diffusers; the same weights are
written by hand as kohya (sd-scripts) keys, with q/k/v(/mlp) fused the way sd-scripts fuses them, and as BFL
`diffusion_model.*` keys. diffusers then loads each file into the diffusers model and we load it into ours (the
same base weights, converted by `diffusers_to_bfl`); the two forwards must agree in hot and fused modes.

Two work-arounds in the oracle's path, both for diffusers 0.42.1 and both outside the LoRA math:
- its kohya converter hard-codes FLUX.1-dev's widths to split `linear1` (3072 x 3 + 12288); the constant is set to
  the tiny model's before running it, as tests/services/denoiser/models/test_flux_dit.py does for checkpoints;
- that converter emits the top-level modules (`x_embedder`, `proj_out`, ...) without the `transformer.` prefix,
  which its loader then filters out (they would be dropped); the prefix is added back.
It also ignores the `alpha` of the kohya `final_layer` modules, so the kohya / BFL files here give those alpha =
rank, with the scale folded into `up` (sd-scripts and ComfyUI apply alpha there; so do we).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from services.common.errors import InvalidArgument
from services.denoiser.convert.flux import diffusers_to_bfl
from services.denoiser.convert.flux_lora import LoraLayoutError, flux_lora_deltas
from services.denoiser.lora import LoraManager, read_lora_file
from services.denoiser.models.flux import Flux, FluxParams

TOL = 1e-4
HIDDEN, MLP = 32, 128
RANK, ALPHA = 4, 8.0  # peft scaling alpha / r = 2
TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,
)
PARAMS = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=HIDDEN,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 4, 8),
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
# Every Linear of FluxTransformer2DModel (peft matches these as module-name suffixes).
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "proj_mlp",
    "proj_out",
    "norm_out.linear",
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
]
# diffusers module -> BFL module, written out by hand for the test (fused ones: the parts in row order).
DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"norm_(added_)?[qk]\.weight$", name):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def peft_lora(seed: int) -> tuple[dict[str, Tensor], dict]:
    """A peft LoRA on every Linear (diffusers names, no prefix), random non-zero A and B; and its LoraConfig."""
    model = FluxTransformer2DModel(**TINY_CONFIG)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    sd = get_peft_model_state_dict(model)
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5) * (1.0 if ".lora_A." in k else 0.3)
        for k, v in sorted(sd.items())
    }
    return sd, model.peft_config["default"].to_dict()


def fused_pair(sd: dict[str, Tensor], prefix: str, parts: list[str]) -> tuple[Tensor, Tensor, float]:
    """sd-scripts' fused LoRA of several projections: down = the A's stacked, up = the B's block-diagonal;
    alpha grows with the rank so alpha / rank stays ALPHA / RANK."""
    downs = [sd[f"{prefix}{p}.lora_A.weight"] for p in parts]
    ups = [sd[f"{prefix}{p}.lora_B.weight"] for p in parts]
    return torch.cat(downs), torch.block_diag(*ups), ALPHA * len(parts)


def bfl_modules(sd: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The peft LoRA on BFL modules: name -> (down, up, alpha)."""
    out = {}
    for table, bfl_prefix, diffusers_prefix in (
        (DOUBLE, "double_blocks.0.", "transformer_blocks.0."),
        (SINGLE, "single_blocks.0.", "single_transformer_blocks.0."),
    ):
        for name, parts in table.items():
            out[bfl_prefix + name] = fused_pair(sd, diffusers_prefix, parts)
    for name, diffusers_name in TOP.items():
        down, up, alpha = fused_pair(sd, "", [diffusers_name])
        if name.startswith("final_layer."):  # alpha = rank there; see the module docstring
            up, alpha = up * (ALPHA / RANK), float(RANK)
        if name == "final_layer.adaLN_modulation.1":  # diffusers' (scale, shift) -> BFL's (shift, scale)
            scale, shift = up.chunk(2)
            up = torch.cat((shift, scale))
        out[name] = (down, up, alpha)
    return out


def write_files(sd: dict[str, Tensor], config: dict, directory: Path) -> dict[str, Path]:
    directory.mkdir()
    paths = {name: directory / f"{name}.safetensors" for name in ("diffusers", "kohya", "bfl", "bfl_down_up")}
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=config,
        weight_name=paths["diffusers"].name,
    )
    modules = bfl_modules(sd)
    kohya, bfl, bfl_down_up = {}, {}, {}
    for name, (down, up, alpha) in modules.items():
        k = "lora_unet_" + name.replace(".", "_")
        kohya |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
        b = f"diffusion_model.{name}"
        bfl |= {f"{b}.lora_A.weight": down, f"{b}.lora_B.weight": up, f"{b}.alpha": torch.tensor(alpha)}
        bfl_down_up |= {
            f"{b}.lora_down.weight": down,
            f"{b}.lora_up.weight": up,
            f"{b}.alpha": torch.tensor(alpha),
        }
    save_file(kohya, paths["kohya"])
    save_file(bfl, paths["bfl"])
    # diffusers reads BFL-named LoRAs only with lora_down / lora_up (its ComfyUI path): the oracle's copy.
    save_file(bfl_down_up, paths["bfl_down_up"])
    return paths


def patched_kohya_converter():
    src = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    widths = "dims=[3072, 3072, 3072, 12288]"
    if src.count(widths) != 1:
        pytest.fail(f"diffusers' kohya FLUX LoRA converter changed: {widths!r} not found once")
    namespace = dict(vars(lora_conversion_utils))
    exec(src.replace(widths, f"dims=[{HIDDEN}, {HIDDEN}, {HIDDEN}, {MLP}]"), namespace)
    convert = namespace["_convert_kohya_flux_lora_to_diffusers"]

    def convert_and_prefix(state_dict):
        out = convert(state_dict)
        return {
            k if k.startswith(("transformer.", "text_encoder")) else f"transformer.{k}": v
            for k, v in out.items()
        }

    return convert_and_prefix


class Setup:
    def __init__(self, directory: Path):
        self.reference_sd = randomize_(FluxTransformer2DModel(**TINY_CONFIG), seed=0).state_dict()
        with torch.device("meta"):
            ours = Flux(PARAMS)
        ours.load_state_dict(diffusers_to_bfl(self.reference_sd), strict=True, assign=True)
        self.ours = ours.eval()
        self.manager = LoraManager(self.ours, convert=flux_lora_deltas)
        g = torch.Generator().manual_seed(1)
        grid = torch.zeros(3, 4, 3)
        grid[..., 1] = torch.arange(3)[:, None]
        grid[..., 2] = torch.arange(4)[None, :]
        self.x = dict(
            img=torch.randn(2, 12, 64, generator=g),
            img_ids=grid.reshape(12, 3),
            txt=torch.randn(2, 5, 32, generator=g),
            txt_ids=torch.zeros(5, 3),
            timesteps=torch.tensor([0.25, 0.5]),
            y=torch.randn(2, 32, generator=g),
            guidance=torch.tensor([2.0, 4.0]),
        )
        self.peft = {}
        self.files = {}
        for name, seed in (("a", 1), ("b", 2)):
            sd, config = peft_lora(seed)
            self.peft[name] = sd
            self.files[name] = write_files(sd, config, directory / name)
        self._oracle: dict[tuple, Tensor] = {}

    @torch.no_grad()
    def run_ours(self) -> Tensor:
        return self.ours(**self.x)

    @torch.no_grad()
    def run_diffusers(self, model: FluxTransformer2DModel) -> Tensor:
        x = self.x
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
            return_dict=False,
        )[0]

    def oracle(self, loras: tuple[tuple[Path, float], ...]) -> Tensor:
        """diffusers' forward with the LoRA files loaded by FluxPipeline.load_lora_weights, each at its scale."""
        if loras not in self._oracle:
            model = FluxTransformer2DModel(**TINY_CONFIG).eval()
            model.load_state_dict(self.reference_sd)
            pipe = FluxPipeline(None, None, None, None, None, None, model)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", patched_kohya_converter())
                for i, (path, _) in enumerate(loras):
                    if path.name == "bfl.safetensors":
                        path = path.with_name("bfl_down_up.safetensors")
                    pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
            pipe.set_adapters([f"l{i}" for i in range(len(loras))], [s for _, s in loras])
            self._oracle[loras] = self.run_diffusers(model)
        return self._oracle[loras]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("flux_lora"))


def test_base_models_agree(setup: Setup) -> None:
    model = FluxTransformer2DModel(**TINY_CONFIG).eval()
    model.load_state_dict(setup.reference_sd)
    assert (setup.run_ours() - setup.run_diffusers(model)).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "bfl"])
@pytest.mark.parametrize("mode", ["hot", "fused"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_matches_diffusers(setup: Setup, layout: str, mode: str, scale: float) -> None:
    base = setup.run_ours()
    loras = ((setup.files["a"][layout], scale),)
    expected = setup.oracle(loras)
    with setup.manager.apply(list(loras), mode=mode):
        got = setup.run_ours()
    diff = (got - expected).abs().max().item()
    print(
        f"{layout} {mode} scale {scale}: max abs diff {diff:.2e}, LoRA effect {(expected - base).abs().max():.2f}"
    )
    assert (expected - base).abs().max() > 0.5  # the LoRA changes the output a lot
    assert diff <= TOL
    assert torch.equal(setup.run_ours(), base)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_two_loras_at_once(setup: Setup, mode: str) -> None:
    base = setup.run_ours()
    loras = ((setup.files["a"]["diffusers"], 0.8), (setup.files["b"]["kohya"], 0.5))
    expected = setup.oracle(loras)
    with setup.manager.apply(list(loras), mode=mode):
        got = setup.run_ours()
    diff = (got - expected).abs().max().item()
    print(f"two LoRAs {mode}: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert (expected - setup.oracle(loras[:1])).abs().max() > 0.1
    assert torch.equal(setup.run_ours(), base)


def _variants(sd: dict[str, Tensor], bfl_file: Path, kohya_file: Path) -> dict[str, dict[str, Tensor]]:
    alphas = {f"{k.removesuffix('.lora_A.weight')}.alpha": torch.tensor(ALPHA) for k in sd if ".lora_A." in k}
    bfl = load_file(bfl_file)
    kohya = load_file(kohya_file)
    diffusers_kohya = {}  # kohya keys on diffusers names, alpha / rank as in the peft file
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
        "bfl without prefix": {k.removeprefix("diffusion_model."): v for k, v in bfl.items()},
        "bfl lora_down / lora_up": {
            k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in bfl.items()
        },
        "comfyui model.diffusion_model.": {f"model.{k}": v for k, v in bfl.items()},
        "kohya on diffusers names": diffusers_kohya,
        "kohya lora_A / lora_B": {
            k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in kohya.items()
        },
    }


@pytest.mark.parametrize("mode", ["hot", "fused"])
def test_key_variants_match_the_diffusers_file(setup: Setup, mode: str, tmp_path: Path) -> None:
    """Other spellings of the same LoRA give the same output as diffusers on the diffusers file."""
    files = setup.files["a"]
    expected = setup.oracle(((files["diffusers"], 1.0),))
    for name, tensors in _variants(setup.peft["a"], files["bfl"], files["kohya"]).items():
        path = tmp_path / (re.sub(r"\W+", "_", name) + ".safetensors")
        save_file(tensors, path)
        with setup.manager.apply([(path, 1.0)], mode=mode):
            diff = (setup.run_ours() - expected).abs().max().item()
        print(f"{name} {mode}: max abs diff {diff:.2e}")
        assert diff <= TOL, name


def test_fused_parts_land_on_their_rows(setup: Setup) -> None:
    tensors, metadata = read_lora_file(setup.files["a"]["diffusers"])
    deltas = {(d.target, d.rows): d for d in flux_lora_deltas(tensors, "a", metadata)}
    d, m = HIDDEN, MLP
    for rows in [(0, d), (d, 2 * d), (2 * d, 3 * d)]:
        assert ("double_blocks.0.img_attn.qkv", rows) in deltas
        assert ("double_blocks.0.txt_attn.qkv", rows) in deltas
        assert ("single_blocks.0.linear1", rows) in deltas
    assert ("single_blocks.0.linear1", (3 * d, 3 * d + m)) in deltas
    sd = setup.peft["a"]
    final = deltas[("final_layer.adaLN_modulation.1", None)]
    assert torch.equal(final.up, torch.cat(sd["norm_out.linear.lora_B.weight"].chunk(2)[::-1]))
    assert final.alpha_scale == ALPHA / RANK  # from the file's peft metadata
    assert len(deltas) == 30  # one per diffusers Linear
    assert len({target for target, _ in deltas}) == 23  # on our 23 Linears


def test_peft_metadata_patterns_and_rslora() -> None:
    sd, config = peft_lora(3)
    config = dict(config, alpha_pattern={"transformer_blocks.0.attn.to_k": 2.0}, use_rslora=True)
    metadata = {
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}, default=list)
    }
    deltas = {(d.target, d.rows): d for d in flux_lora_deltas(sd, "f", metadata)}
    assert deltas[("double_blocks.0.img_attn.qkv", (HIDDEN, 2 * HIDDEN))].alpha_scale == 2.0 / RANK**0.5
    assert deltas[("single_blocks.0.linear1", (HIDDEN, 2 * HIDDEN))].alpha_scale == ALPHA / RANK**0.5
    assert all(d.alpha_scale == 1.0 for d in flux_lora_deltas(sd, "f"))  # no metadata, no alpha: scale 1


def test_bad_files_are_named(setup: Setup, tmp_path: Path) -> None:
    down, up = torch.zeros(RANK, HIDDEN), torch.zeros(3 * HIDDEN, RANK)
    cases = {
        "unknown": (
            {"encoder.layer.0.weight": down, "encoder.layer.0.bias": up},
            r"unknown\.safetensors: not a FLUX\.1 LoRA in a known layout \(2 keys, e\.g\. "
            r"\[encoder\.layer\.0\.bias, encoder\.layer\.0\.weight\]\)",
        ),
        "untargeted": (
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up[:HIDDEN],
                "transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": down,
                "lora_unet_double_blocks_0_img_attn_norm_query_norm.lora_down.weight": down,
            },
            r"keys that target no FLUX\.1 transformer Linear \[lora_unet_double_blocks_0_img_attn_norm_query_norm"
            r"\.lora_down\.weight, transformer\.transformer_blocks\.0\.attn\.to_zz\.lora_A\.weight\]",
        ),
        "text_encoder": (
            {
                "lora_unet_img_in.lora_down.weight": torch.zeros(RANK, 64),
                "lora_unet_img_in.lora_up.weight": torch.zeros(HIDDEN, RANK),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
            },
            r"1 text-encoder LoRA keys \[lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight\]: "
            r"text-encoder LoRAs are not supported yet",
        ),
        "dora": (
            {"lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.dora_scale": down},
            r"unsupported LoRA variants \[lora_unet_img_in\.dora_scale \(DoRA\)\]",
        ),
        "half": (
            {"diffusion_model.img_in.lora_A.weight": down},
            r"LoRA on diffusion_model\.img_in: no up weight",
        ),
        "twice": (
            {
                "transformer_blocks.0.attn.to_q.lora_A.weight": down,
                "transformer_blocks.0.attn.to_q.lora_A.default.weight": down,
            },
            r"keys given twice",
        ),
        "shapes": (  # a LoRA for a wider model
            {"lora_unet_img_in.lora_down.weight": down[:, :8], "lora_unet_img_in.lora_up.weight": up},
            r"does not fit the model: img_in \(Linear 64 -> 32\): LoRA down \(4, 8\), up \(96, 4\)",
        ),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in tensors.items()}, path)
        with pytest.raises(InvalidArgument, match=message), setup.manager.apply([(path, 1.0)]):
            pytest.fail("applied")
        if name != "shapes":
            with pytest.raises(LoraLayoutError, match=message):
                flux_lora_deltas(load_file(path), str(path))
    te = load_file(tmp_path / "text_encoder.safetensors")
    assert [d.target for d in flux_lora_deltas(te, "te", text_encoder="skip")] == ["img_in"]
