"""Tiny random FLUX.1 text encoders (CLIP-L and T5 geometry, real CLIP vocabulary, a tiny trained T5
tokenizer) saved in the hub layout, as `FluxPipeline.save_pretrained` writes them (ENVIRONMENT.md)."""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from services.text_encoder.encoders.clip_vocab import write_clip_tokenizer

CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
T5_CONFIG = dict(
    vocab_size=1000,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
T5_TRAINED_VOCAB = 850  # + 100 <extra_id_*> stays under T5_CONFIG's vocab_size
VOCABULARY = """a an the of on in with and under over near behind photo painting portrait drawing sketch render
cat dog horse astronaut robot dragon castle forest river mountain city street car train boat ship bird fish
flower tree garden house window door table chair lamp book cup bowl apple orange banana bread cheese red green
blue yellow purple black white golden silver wooden glass stone metal old young small large tall bright dark
sunny rainy snowy foggy misty evening morning night sunset sunrise moon stars sky cloud ocean beach sitting
standing running flying riding walking sleeping jumping swimming reading eating holding looking cinematic
lighting highly detailed sharp focus soft bokeh wide angle close up studio trending artstation realistic
illustration watercolor oil digital concept art style vintage modern futuristic"""
WORDS = VOCABULARY.split()
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


def t5_corpus() -> list[str]:
    """A fixed corpus: the words above and seeded pseudo-words, so the trained pieces do not vary."""
    rng = random.Random(0)
    pseudo = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    vocab = WORDS * 8 + pseudo
    return [
        " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 16))) + rng.choice([".", ",", "!", ""])
        for _ in range(3000)
    ]


@lru_cache(maxsize=1)
def t5_pieces() -> tuple[tuple[str, float], ...]:
    """The pieces a Unigram trainer keeps, in a fixed order with scores of our own: the trainer's scores
    (and so their order) change between runs in the 4th decimal, its piece set does not."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_TRAINED_VOCAB, special_tokens=T5_SPECIALS, unk_token="<unk>", show_progress=False
    )
    corpus = t5_corpus()
    tok.train_from_iterator(corpus, trainer)
    pieces = sorted(p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in T5_SPECIALS)
    text = "".join("▁" + w for line in corpus for w in line.split())
    total = math.log(len(text))
    return (
        *((p, 0.0) for p in T5_SPECIALS),
        *((p, round(math.log(text.count(p) + 1) - total, 6)) for p in pieces),
    )


def write_t5_tokenizer(dest: Path) -> T5TokenizerFast:
    """A tiny Unigram T5 tokenizer (<pad>=0, </s>=1, <unk>=2, <extra_id_0..99> appended, 512 tokens max)
    saved at `dest` for `T5TokenizerFast.from_pretrained` / `AutoTokenizer`; returns it."""
    tokenizer = T5TokenizerFast(vocab=list(t5_pieces()), extra_ids=100, model_max_length=512)
    tokenizer.save_pretrained(str(dest))
    return tokenizer


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales ~1 +- 0.2, weights ~N(0, 1/fan_in)), in eval mode."""
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
    return module.eval()


def tiny_clip_text_model(seed: int = 0, **overrides: object) -> CLIPTextModel:
    return randomize_(CLIPTextModel(CLIPTextConfig(**{**CLIP_CONFIG, **overrides})), seed)


def tiny_t5_encoder(seed: int = 0, **overrides: object) -> T5EncoderModel:
    return randomize_(T5EncoderModel(T5Config(**{**T5_CONFIG, **overrides})), seed)


def write_flux_text_encoders(model_dir: Path, seed: int = 0) -> Path:
    """`text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` of a tiny FLUX.1 at `model_dir`."""
    model_dir = Path(model_dir)
    tiny_clip_text_model(seed).save_pretrained(model_dir / "text_encoder")
    write_clip_tokenizer(model_dir / "tokenizer")
    tiny_t5_encoder(seed + 1).save_pretrained(model_dir / "text_encoder_2")
    tokenizer = write_t5_tokenizer(model_dir / "tokenizer_2")
    if len(tokenizer) > T5_CONFIG["vocab_size"]:
        raise ValueError(f"the tiny T5 tokenizer has {len(tokenizer)} tokens, over the model's vocabulary")
    return model_dir


def tiny_umt5_encoder(seed: int = 0, **overrides: object) -> UMT5EncoderModel:
    """A tiny random umT5 encoder (Wan's text encoder architecture: a relative attention bias per block)."""
    return randomize_(UMT5EncoderModel(UMT5Config(**{**T5_CONFIG, **overrides})), seed)


def write_wan_text_encoder(model_dir: Path, seed: int = 0) -> Path:
    """`model_index.json` (WanPipeline), `text_encoder/` (tiny umT5), `tokenizer/` and `scheduler/` at
    `model_dir`, written by diffusers' own `WanPipeline.save_pretrained` (no transformer or VAE)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    model_dir = Path(model_dir)
    tokenizer = write_t5_tokenizer(model_dir / "tokenizer")
    if len(tokenizer) > T5_CONFIG["vocab_size"]:
        raise ValueError(f"the tiny T5 tokenizer has {len(tokenizer)} tokens, over the model's vocabulary")
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_umt5_encoder(seed),
        vae=None,
        scheduler=scheduler,
        transformer=None,
    )
    pipe.save_pretrained(str(model_dir))
    return model_dir


def tiny_clip_vision_model(seed: int = 0, **overrides: object) -> CLIPVisionModel:
    """A tiny random CLIP vision tower (Wan 2.1 I2V's image encoder architecture), 56 px, 14 px patches."""
    config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=56,
        patch_size=14,
        projection_dim=32,
        hidden_act="gelu",
    )
    return randomize_(CLIPVisionModel(CLIPVisionConfig(**{**config, **overrides})), seed)
