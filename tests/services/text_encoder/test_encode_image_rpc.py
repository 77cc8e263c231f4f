"""EncodeImage over a real gRPC server (port 0): a model's `image_encoder/` gives WanImageToVideoPipeline's
image embeddings through the store; bad requests get INVALID_ARGUMENT / NOT_FOUND naming the field and the
server keeps serving."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from text_encoder_stage import serve
from tiny_text_encoders import tiny_clip_vision_model
from transformers import CLIPImageProcessorPil

from protos import common_pb2, text_encoder_pb2


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(3, 6, 6, generator=g)
    small = Image.fromarray((noise.permute(1, 2, 0) * 255).to(torch.uint8).numpy(), "RGB")
    return small.resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WanImageToVideoPipeline]:
    processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        image_processor=processor,
        image_encoder=tiny_clip_vision_model(0, image_size=56, patch_size=14),
    )
    path = tmp_path_factory.mktemp("wan_i2v") / "model"
    pipe.save_pretrained(str(path))
    return path, pipe


def test_encode_image_equals_the_pipeline(model, tmp_path: Path):
    path, pipe = model
    first, last = picture(1, (80, 60)), picture(2, (64, 64))
    with serve(tmp_path) as stage:
        req = text_encoder_pb2.EncodeImageRequest(
            model=str(path), images=[common_pb2.Media(data=png(first)), common_pb2.Media(data=png(last))]
        )
        resp = stage.stub.EncodeImage(req, timeout=60)
        assert resp.outputs["image_embeds"].WhichOneof("value") == "ref"
        ours = stage.store.load(resp.outputs["image_embeds"], "image_embeds")
        with torch.no_grad():
            ref = pipe.encode_image([first, last], device=torch.device("cpu"))
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-5

        def code(**fields) -> tuple[grpc.StatusCode, str]:
            try:
                stage.stub.EncodeImage(text_encoder_pb2.EncodeImageRequest(**fields), timeout=60)
            except grpc.RpcError as e:
                return e.code(), e.details()
            raise AssertionError(f"EncodeImage({fields}) succeeded")

        none = code(model=str(path))
        assert none[0] == grpc.StatusCode.INVALID_ARGUMENT and "images" in none[1]
        bad = code(model=str(path), images=[common_pb2.Media(data=b"nope")])
        assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "images[0]: not a readable image" in bad[1]
        uri = code(model=str(path), images=[common_pb2.Media(uri="s3://b/k.png")])
        assert uri[0] == grpc.StatusCode.INVALID_ARGUMENT and "images[0]" in uri[1]
        missing = code(model=str(tmp_path), images=[common_pb2.Media(data=png(first))])
        assert missing[0] == grpc.StatusCode.NOT_FOUND and "image_encoder" in missing[1]
        again = stage.stub.EncodeImage(req, timeout=60)  # still serving
        assert again.outputs["image_embeds"].ref.uri.endswith("image.image_embeds")
