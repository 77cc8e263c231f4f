"""Wan's umT5-XXL text encoder: prompt embeddings exactly as diffusers' `WanPipeline._get_t5_prompt_embeds`
(and Wan's own `T5EncoderModel`) compute them: the prompt cleaned (ftfy, HTML entities, whitespace),
tokenized to `max_sequence_length` (512) with its attention mask, encoded with that mask, then every row
cut to the prompt's real tokens and zero-padded back to `max_sequence_length`. FLUX's T5 (t5.py) does
neither the mask nor the cut.

Loaded from a Wan hub layout (`text_encoder/` UMT5EncoderModel + `tokenizer/`, told Wan by the model's
`model_index.json`) or from one safetensors file in either transformers' key names (ComfyUI's
`umt5_xxl_fp16.safetensors`) or Wan's own (`token_embedding`, `blocks.N.attn.q`, ...). Pickled `.pth`
files (Wan's `models_t5_umt5-xxl-enc-bf16.pth`) are refused: convert them to safetensors.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.common.errors import InvalidArgument
from services.common.models import Component, load_state_dict, read_json
from services.text_encoder.encoders import t5
from services.text_encoder.encoders.base import (
    Encoded,
    Tokens,
    find_tokenizer,
    from_pretrained,
    sibling_tokenizer,
)
from services.text_encoder.encoders.single_file import T5_KEY, T5_REL, t5_config

if TYPE_CHECKING:  # transformers is imported when a model loads, not with the service
    from transformers import UMT5EncoderModel

WAN_PIPELINE_PREFIX = "Wan"  # model_index.json `_class_name`: WanPipeline, WanImageToVideoPipeline, ...
WAN_T5_KEYS = ("token_embedding.weight", "blocks.0.attn.q.weight")  # Wan's own names (wan/modules/t5.py)
# Wan's T5Encoder names -> transformers' UMT5EncoderModel names. Wan's gated FFN is fc1(x) * gelu(gate(x)),
# transformers' is wi_1(x) * gelu(wi_0(x)).
_WAN_T5_RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"token_embedding\.weight", "shared.weight"),
        (r"norm\.weight", "encoder.final_layer_norm.weight"),
        (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
        (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
        (
            r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
            r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
        (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
        (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
        (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    )
)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (`basic_clean` + `whitespace_clean`): ftfy's mojibake fixes, HTML entities
    unescaped twice, whitespace runs collapsed to one space, stripped."""
    import ftfy  # a dependency of openai-clip, as for diffusers' and Wan's own cleaning

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class MaskedTokens(Tokens):
    """`Tokens` that also returns the attention mask."""

    def with_mask(
        self, prompts: list[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
        """(ids (B, L) int64, mask (B, L) int64, token counts before truncation, truncated flags)."""
        with self._lock:
            full = self.tokenizer(prompts, truncation=False, padding=False, verbose=False).input_ids
            batch = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
        counts = [len(row) for row in full]
        return batch.input_ids, batch.attention_mask, counts, [n > max_length for n in counts]


class WanT5TextEncoder(t5.T5TextEncoder):
    """`encode(prompts, max_sequence_length=L)` -> "prompt_embeds" (B, L, D), zero past each prompt's tokens."""

    kind = "umt5"
    outputs = ("prompt_embeds",)

    def __init__(self, model: UMT5EncoderModel, tokenizer: Any, device: torch.device) -> None:
        super().__init__(model, tokenizer, device)
        self.tokens = MaskedTokens(tokenizer)

    def encode(self, prompts: list[str], *, max_sequence_length: int | None = None, **_: Any) -> Encoded:
        length = self.max_length(max_sequence_length)
        ids, mask, counts, truncated = self.tokens.with_mask([clean_prompt(p) for p in prompts], length)
        seq_lens = mask.gt(0).sum(dim=1)  # (B,)
        with torch.inference_mode():
            hidden = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            keep = torch.arange(length)[None, :] < seq_lens[:, None]  # (B, L): each row's first seq_len
            embeds = hidden.masked_fill(~keep.to(self.device)[..., None], 0.0)  # (B, L, D)
        return Encoded({"prompt_embeds": embeds}, counts, truncated)


def is_wan_model(model_dir: Path) -> bool:
    """Whether a hub-layout folder is a Wan pipeline (`model_index.json` `_class_name` "Wan...")."""
    index = Path(model_dir) / "model_index.json"
    return index.is_file() and str(read_json(index).get("_class_name", "")).startswith(WAN_PIPELINE_PREFIX)


def load_umt5(component: Component, device: torch.device) -> t5.T5TextEncoder:
    """`text_encoder/` UMT5EncoderModel with the sibling `tokenizer/`: Wan's encoder in a Wan pipeline
    folder, else the plain T5 encoder (t5.py)."""
    from transformers import UMT5EncoderModel

    if not is_wan_model(component.path.parent):
        return t5.load_umt5(component, device)
    tokenizer = t5.load_tokenizer(sibling_tokenizer(component.path))
    return WanT5TextEncoder(from_pretrained(UMT5EncoderModel, component.path, device), tokenizer, device)


def wan_t5_layout(keys: list[str]) -> tuple[str, str] | None:
    """("wan", "") for Wan's own key names, ("transformers", prefix) for a umT5 in transformers' names
    (a relative attention bias in every block), None for anything else."""
    if all(k in keys for k in WAN_T5_KEYS):
        return "wan", ""
    prefixes = [k[: -len(T5_KEY)] for k in keys if k.endswith(T5_KEY)]
    if len(prefixes) == 1 and prefixes[0] + T5_REL.format(1) in keys:
        return "transformers", prefixes[0]
    return None


def is_wan_t5_file(path: Path) -> bool:
    """A safetensors file holding a umT5 encoder (read from the header only); pickles are never opened."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as f:
        return wan_t5_layout(list(f.keys())) is not None


def wan_to_transformers(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Wan's T5Encoder keys -> UMT5EncoderModel keys; a key with no counterpart is an error."""
    if "pos_embedding.embedding.weight" in sd:
        raise InvalidArgument(f"{path}: a T5 with one shared relative position table, not Wan's umT5")
    out, unknown = {}, []
    for key, tensor in sd.items():
        for pattern, replacement in _WAN_T5_RENAMES:
            if pattern.fullmatch(key):
                out[pattern.sub(replacement, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidArgument(
            f"{path}: keys outside Wan's umT5 layout: {sorted(unknown)[:5]} ({len(unknown)})"
        )
    return out


def _build(sd: dict[str, torch.Tensor], path: Path) -> UMT5EncoderModel:
    """A UMT5EncoderModel from a transformers-named state dict (checkpoint dtype); missing keys are an error."""
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        config = t5_config(sd)
    except KeyError as e:
        raise InvalidArgument(f"{path}: a umT5 encoder without the tensor {e.args[0]}") from None
    if not isinstance(config, UMT5Config):
        raise InvalidArgument(f"{path}: a T5 with a shared relative attention bias, not Wan's umT5")
    try:
        model, info = UMT5EncoderModel.from_pretrained(
            None, config=config, state_dict=sd, dtype="auto", output_loading_info=True
        )
    except (RuntimeError, ValueError) as e:
        raise InvalidArgument(f"{path}: cannot load as UMT5EncoderModel ({type(e).__name__}: {e})") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise InvalidArgument(
            f"{path}: not a complete UMT5EncoderModel; missing {missing[:5]} ({len(missing)})"
        )
    return model


def load_wan_t5_file(path: Path, device: torch.device) -> WanT5TextEncoder:
    """Wan's umT5 from one safetensors file (either key layout), with the tokenizer in `<stem>.tokenizer/`
    or `tokenizer/` beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgument(
            f"{path}: Wan's umT5 is read from safetensors only; a {path.suffix} file is a pickle and weights "
            "are never unpickled here (convert it once with safetensors.torch.save_file)"
        )
    sd = load_state_dict(path)
    layout = wan_t5_layout(list(sd))
    if layout is None:
        raise InvalidArgument(
            f"{path}: not a umT5 encoder (Wan's '{WAN_T5_KEYS[1]}' or transformers' '...{T5_KEY}' with a "
            f"relative attention bias per block); its keys start {sorted(sd)[:5]}"
        )
    kind, prefix = layout
    if kind == "wan":
        sd = wan_to_transformers(sd, path)
    else:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    model = _build(sd, path)
    folders = [path.parent / f"{path.stem}.tokenizer", path.parent / "tokenizer"]
    tokenizer = t5.load_tokenizer(find_tokenizer(folders, path))
    return WanT5TextEncoder(model.to(device).eval(), tokenizer, device)
