"""The untrained skeleton of `models/diffmesh-shapes`: a FluxPipeline folder (hub layout) whose text encoders
are complete and whose `vae/` and `transformer/` hold only their config.json, for the trainer to fill.

- Text encoders of the real architectures with RANDOM, FROZEN weights (seeded; never trained): a
  `CLIPTextModel` (the real CLIP vocabulary, 49408 tokens, from `write_clip_tokenizer`) and a
  `T5EncoderModel` with a Unigram T5 tokenizer trained deterministically with `tokenizers` on the shapes
  captions' vocabulary (+ `<extra_id_0..99>`). Random features still name each word apart; the denoiser
  learns to read them.
- `vae/config.json`: an `AutoencoderKL` of the FLUX geometry (16 latent channels, 8x: 4 levels).
- `transformer/config.json`: a `FluxTransformer2DModel` without guidance embedding (schnell-like: true CFG
  with caption dropout instead of distilled guidance).
- `scheduler/`: `FlowMatchEulerDiscreteScheduler`, shift 1, no dynamic shifting (16 image tokens: FLUX's
  dynamic shift would be ~1.6 at this length, extrapolated below its 256-token anchor; 1 keeps training and
  sampling sigmas plain logit-normal / linear).
- `model_index.json` as `FluxPipeline.save_pretrained` writes it, and `diffmesh.json` (generation defaults).

No diffusers here: the configs are written as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from services.text_encoder.encoders.clip_vocab import write_clip_tokenizer
from trainer.datasets.shapes import BACKGROUNDS, PALETTE, SHAPES, TEMPLATES, caption

DIFFUSERS_VERSION = "0.42.1"  # what the configs claim (the version the layout was checked against)
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
T5_EXTRA_IDS = 100


@dataclass(frozen=True)
class Sizes:
    """Every size of the model; the defaults are what `models/diffmesh-shapes` ships."""

    clip: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=64,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    t5: dict[str, Any] = field(
        default_factory=lambda: dict(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    t5_pieces: int = 160  # the Unigram trainer's target; the captions need fewer
    vae_widths: tuple[int, ...] = (32, 64, 64, 64)
    vae_layers_per_block: int = 1
    vae_groups: int = 32
    heads: int = 4
    head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (16, 24, 24)
    double_blocks: int = 2
    single_blocks: int = 2
    resolution: int = 64


@dataclass(frozen=True)
class Defaults:
    """Generation defaults recorded in `diffmesh.json`."""

    steps: int = 20
    cfg_scale: float = 3.0
    max_sequence_length: int = 32

    def doc(self, resolution: int) -> dict[str, Any]:
        return {
            "defaults": {
                "width": resolution,
                "height": resolution,
                "steps": self.steps,
                "cfg_scale": self.cfg_scale,
                "guidance": 0.0,
                "max_sequence_length": self.max_sequence_length,
            }
        }


def caption_corpus() -> list[str]:
    """Every caption the shapes dataset can write (all templates, shapes, colours incl. the held-out one,
    backgrounds), in a fixed order: what the T5 tokenizer is trained on."""
    colours = [c for c in PALETTE if c not in BACKGROUNDS]
    return [
        caption(shape, colour, bg, t)
        for t in range(len(TEMPLATES))
        for shape in SHAPES
        for colour in colours
        for bg in BACKGROUNDS
    ]


def t5_pieces(target: int) -> list[tuple[str, float]]:
    """Unigram pieces trained on `caption_corpus()` plus every word of it as a whole piece, in sorted order
    with scores of our own (log frequency in the corpus): the trainer's piece set is deterministic, its
    scores vary in the last decimals."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=target, special_tokens=T5_SPECIALS, unk_token="<unk>", show_progress=False
    )
    corpus = caption_corpus()
    tok.train_from_iterator(corpus, trainer)
    pieces = {p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in T5_SPECIALS}
    # every word of the corpus is a piece of its own: one token per word keeps colour words apart
    pieces = sorted(pieces | {"▁" + w for line in corpus for w in line.replace(",", " ,").split()})
    text = "".join("▁" + w for line in corpus for w in line.split())
    total = math.log(len(text))
    scored = [(p, round(math.log(text.count(p) + 1) - total, 6)) for p in pieces]
    return [*((p, 0.0) for p in T5_SPECIALS), *scored]


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and fixed by `seed`: norm scales 1 +- 0.2, other vectors N(0, 0.05^2),
    matrices N(0, 1 / fan_in); eval mode, no gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return module.eval().requires_grad_(False)


def vae_config(s: Sizes) -> dict[str, Any]:
    n = len(s.vae_widths)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(s.vae_widths),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": s.vae_layers_per_block,
        "mid_block_add_attention": True,
        "norm_num_groups": s.vae_groups,
        "out_channels": 3,
        "sample_size": s.resolution,
        "scaling_factor": 1.0,  # measured on the dataset by the VAE training
        "shift_factor": 0.0,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


def transformer_config(s: Sizes) -> dict[str, Any]:
    if sum(s.axes_dims_rope) != s.head_dim:
        raise ValueError(f"axes_dims_rope {s.axes_dims_rope} must sum to head_dim {s.head_dim}")
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": s.head_dim,
        "axes_dims_rope": list(s.axes_dims_rope),
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": s.t5["d_model"],
        "num_attention_heads": s.heads,
        "num_layers": s.double_blocks,
        "num_single_layers": s.single_blocks,
        "out_channels": None,
        "patch_size": 1,
        "pooled_projection_dim": s.clip["hidden_size"],
    }


SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def write_skeleton(
    out: Path, seed: int = 0, sizes: Sizes | None = None, defaults: Defaults | None = None
) -> Path:
    """The skeleton folder at `out` (created; existing files overwritten). Text encoders get seeds `seed`
    (CLIP) and `seed + 1` (T5)."""
    s = sizes or Sizes()
    d = defaults or Defaults()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "model_index.json", MODEL_INDEX)
    _write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER)
    _write_json(out / "vae" / "config.json", vae_config(s))
    _write_json(out / "transformer" / "config.json", transformer_config(s))
    _write_json(out / "diffmesh.json", d.doc(s.resolution))

    write_clip_tokenizer(out / "tokenizer")
    randomize_(CLIPTextModel(CLIPTextConfig(**s.clip)), seed).save_pretrained(out / "text_encoder")

    tokenizer = T5TokenizerFast(vocab=t5_pieces(s.t5_pieces), extra_ids=T5_EXTRA_IDS, model_max_length=512)
    tokenizer.save_pretrained(str(out / "tokenizer_2"))
    vocab = -(-len(tokenizer) // 8) * 8  # the embedding covers the tokenizer, rounded up to 8
    t5 = randomize_(T5EncoderModel(T5Config(**{**s.t5, "vocab_size": vocab})), seed + 1)
    t5.save_pretrained(out / "text_encoder_2")
    return out
