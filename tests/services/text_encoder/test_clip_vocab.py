"""The CLIP tokenizer built from openai-clip's BPE file gives openai's own ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from services.text_encoder.encoders.clip_vocab import bpe_path, clip_bpe, write_clip_tokenizer

TEXTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 8k, highly detailed",
    "Hello, World! It's 2024: naïve café   with   spaces",
]


def openai_tokenizer():
    """openai-clip's SimpleTokenizer, loaded by file path (the `clip` package imports torchvision)."""
    path = bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_path()))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer"))


def test_vocabulary_is_openais(tokenizer: CLIPTokenizer) -> None:
    vocab, merges = clip_bpe()
    ref = openai_tokenizer()
    assert len(vocab) == len(tokenizer) == 49408
    assert len(merges) == 48894
    assert vocab == ref.encoder
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407 and tokenizer.model_max_length == 77


@pytest.mark.parametrize("text", TEXTS)
def test_known_texts_tokenize_to_openai_ids(tokenizer: CLIPTokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert ids == [49406, *openai_tokenizer().encode(text), 49407]


def test_known_word_ids(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_padding_and_truncation_as_flux_asks(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer(
        [TEXTS[0], " ".join(["cat"] * 100)], padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert [len(row) for row in ids] == [77, 77]
    assert ids[0][7:] == [49407] * 70  # padded with <|endoftext|>
    assert ids[1][0] == 49406 and ids[1][-1] == 49407


def test_auto_tokenizer_reads_the_folder(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    assert tok(TEXTS[1]).input_ids == [49406, *openai_tokenizer().encode(TEXTS[1]), 49407]
