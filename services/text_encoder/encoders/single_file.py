"""One text-encoder weight file (ComfyUI's `clip_l.safetensors`, `t5xxl_fp16.safetensors`, or one under an
original checkpoint's prefix): told CLIP or T5 by named keys, its config inferred from tensor shapes."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.common.errors import InvalidArgument, NotFound
from services.common.models import Component, load_state_dict
from services.text_encoder.encoders import clip, t5
from services.text_encoder.encoders.base import find_tokenizer, has_tokenizer
from services.text_encoder.encoders.clip_vocab import write_clip_tokenizer

if TYPE_CHECKING:  # transformers is imported when a model loads, not with the service
    from transformers import CLIPTextConfig, T5Config, UMT5Config

CLIP_KEY = "embeddings.token_embedding.weight"  # under "text_model." (and a prefix) in most files
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_REL = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
CLIP_VOCAB = 49408
OPENAI_CLIP_WIDTHS = (512, 768)  # OpenAI's CLIP-B/L use quick_gelu; OpenCLIP H / bigG use gelu


def sniff(path: Path, keys: list[str]) -> tuple[str, str]:
    """("clip" | "t5", key prefix) of the one text encoder in a file; InvalidArgument otherwise."""
    found = [("clip", k[: -len(CLIP_KEY)]) for k in keys if k.endswith(CLIP_KEY)]
    found += [("t5", k[: -len(T5_KEY)]) for k in keys if k.endswith(T5_KEY)]
    if len(found) == 1:
        return found[0]
    if found:
        raise InvalidArgument(f"{path} holds several text encoders {found}; give each as its own file")
    raise InvalidArgument(
        f"{path}: not a known text-encoder layout (CLIP '...{CLIP_KEY}' or T5 '...{T5_KEY}'); "
        f"its keys start {sorted(keys)[:5]}"
    )


def _layers(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def clip_config(sd: dict[str, torch.Tensor]) -> CLIPTextConfig:
    """Shapes -> config; heads = hidden / 64 (every released CLIP text tower has 64-wide heads)."""
    from transformers import CLIPTextConfig

    vocab, hidden = sd[CLIP_KEY].shape
    ids = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407) if vocab >= CLIP_VOCAB else {}
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layers(sd, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if hidden in OPENAI_CLIP_WIDTHS else "gelu",
        projection_dim=hidden,
        **ids,
    )


def t5_config(sd: dict[str, torch.Tensor]) -> T5Config | UMT5Config:
    """Shapes -> config; UMT5 when every block has its own relative attention bias."""
    from transformers import T5Config, UMT5Config

    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd[T5_REL.format(0)].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = sd[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    cls = UMT5Config if T5_REL.format(1) in sd else T5Config
    return cls(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=sd[T5_KEY].shape[0] // heads,
        d_ff=d_ff,
        num_layers=_layers(sd, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
    )


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _build(cls: Any, config: Any, sd: dict[str, torch.Tensor], path: Path) -> Any:
    """`cls` from config + state dict (checkpoint dtype, tied embeddings filled); missing keys are an error."""
    with torch.device("meta"):
        expected = set(cls(config).state_dict())
    if not any(k.startswith("text_model.") for k in sd) and any(
        k.startswith("text_model.") for k in expected
    ):
        sd = {f"text_model.{k}": v for k, v in sd.items()}  # transformers < 5 names CLIP keys so
    sd = {k: v for k, v in sd.items() if k in expected}  # drops text_projection, logit_scale, ...
    try:
        model, info = cls.from_pretrained(
            None, config=config, state_dict=sd, dtype="auto", output_loading_info=True
        )
    except (RuntimeError, ValueError) as e:
        raise InvalidArgument(f"{path}: cannot load as {cls.__name__} ({type(e).__name__}: {e})") from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise InvalidArgument(
            f"{path}: not a complete {cls.__name__}; missing {missing[:5]} ({len(missing)})"
        )
    return model


def _clip_tokenizer(path: Path, vocab: int) -> Any:
    for folder in (path.parent / f"{path.stem}.tokenizer", path.parent / "tokenizer"):
        if has_tokenizer(folder) and (folder / "vocab.json").is_file():
            return clip.load_tokenizer(folder)
    if vocab < CLIP_VOCAB:
        raise NotFound(
            f"{path}: CLIP with a {vocab}-token vocabulary needs a {path.stem}.tokenizer/ beside it"
        )
    with tempfile.TemporaryDirectory(prefix="diffmesh-clip-") as tmp:  # read whole by from_pretrained
        return clip.load_tokenizer(write_clip_tokenizer(Path(tmp)))


def _t5_tokenizer(path: Path) -> Any:
    names = (f"{path.stem}.tokenizer", "tokenizer_2", "tokenizer")
    return t5.load_tokenizer(find_tokenizer([path.parent / n for n in names], path))


def _config(kind: str, sd: dict[str, torch.Tensor], path: Path, prefix: str) -> Any:
    try:
        return clip_config(sd) if kind == "clip" else t5_config(sd)
    except KeyError as e:
        raise InvalidArgument(
            f"{path}: a {kind} text encoder without the tensor {prefix}{e.args[0]}"
        ) from None


def load_single_file(component: Component, device: torch.device) -> clip.ClipTextEncoder | t5.T5TextEncoder:
    """A CLIP or T5 / UMT5 text encoder from one weight file (safetensors memory-mapped)."""
    from transformers import CLIPTextModel, T5EncoderModel, UMT5Config, UMT5EncoderModel

    path = Path(component.path)
    sd = load_state_dict(path)
    kind, prefix = sniff(path, list(sd))
    sd = _strip(sd, prefix)
    if kind == "t5" and "shared.weight" not in sd:
        if "encoder.embed_tokens.weight" not in sd:
            raise InvalidArgument(
                f"{path}: T5 without '{prefix}shared.weight' or '{prefix}encoder.embed_tokens.weight'"
            )
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    config = _config(kind, sd, path, prefix)
    if kind == "clip":
        tokenizer = _clip_tokenizer(path, config.vocab_size)
        model = _build(CLIPTextModel, config, sd, path)
        return clip.ClipTextEncoder(model.to(device).eval(), tokenizer, device)
    tokenizer = _t5_tokenizer(path)
    cls = UMT5EncoderModel if isinstance(config, UMT5Config) else T5EncoderModel
    model = _build(cls, config, sd, path)
    return t5.T5TextEncoder(model.to(device).eval(), tokenizer, device)
