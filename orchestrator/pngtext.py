"""Generation parameters in a PNG's text chunks (tEXt), so an image carries how it was made."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"


def with_text(png: bytes, text: dict[str, str]) -> bytes:
    """The same image re-encoded with `text` as tEXt chunks (pixels unchanged: PNG is lossless)."""
    img = Image.open(io.BytesIO(png))
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def read_text(png: bytes) -> dict[str, str]:
    """The text chunks of a PNG."""
    img = Image.open(io.BytesIO(png))
    img.load()
    return dict(getattr(img, "text", {}))
