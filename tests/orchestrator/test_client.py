"""The Python client over gRPC (the real Orchestrator servicer on port 0) and in-process: same events, same
result, same error codes. The family is the test-only `testfam` of conftest.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import pytest
from PIL import Image

from orchestrator.client import (
    Client,
    ClientError,
    Generation,
    build_request,
    lora_spec,
    parse_lora,
)
from orchestrator.pngtext import PARAMETERS_KEY, read_text
from protos import common_pb2, orchestrator_pb2

OPTIONAL_FIELDS = (
    "seed",
    "steps",
    "width",
    "height",
    "num_frames",
    "fps",
    "guidance",
    "cfg_scale",
    "strength",
)


@pytest.fixture(params=["grpc", "inproc"])
def client(request, served, local_settings):
    """The same client API over both transports (the in-process one runs orchestrator.local's engine)."""
    c = (
        Client(served.endpoint, served.token)
        if request.param == "grpc"
        else Client.in_process(local_settings)
    )
    with c:
        yield c


def kinds(events: list[orchestrator_pb2.GenerateEvent]) -> list[str]:
    out = []
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "stage":
            out.append(f"{ev.stage.stage}:{orchestrator_pb2.StageEvent.Kind.Name(ev.stage.kind)}")
        elif kind == "progress":
            out.append(f"step {ev.progress.step}/{ev.progress.total}")
        else:
            out.append(kind)
    return out


def error_of(fn) -> ClientError:
    with pytest.raises(ClientError) as e:
        fn()
    return e.value


def test_events_stream_in_order_and_the_generation_holds_the_image(client, served):
    events: list = []
    gen = client.generate(
        model="tiny", family="testfam", prompt="a cat", steps=3, width=40, height=24, on_event=events.append
    )
    assert kinds(events) == [
        "denoise:STARTED",
        "step 1/3",
        "step 2/3",
        "step 3/3",
        "denoise:FINISHED",
        "result",
    ]
    assert isinstance(gen, Generation)
    assert isinstance(gen.image, Image.Image) and gen.image.size == (40, 24) and len(gen.images) == 1
    assert gen.seed == 1234 and json.loads(gen.parameters)["steps"] == 3
    assert gen.result.images[0] == served.family.pngs[-1]  # the bytes as the family made them
    assert json.loads(read_text(gen.result.images[0])[PARAMETERS_KEY])["prompt"] == "a cat"
    assert [t.stage for t in gen.result.timings] == ["denoise"] and gen.result.total_seconds > 0
    assert len(gen.result.request_id) == 32  # the server chose one


def test_stream_yields_the_result_last(client):
    request = build_request(model="tiny", family="testfam", prompt="x", steps=2, request_id="req-7")
    events = list(client.stream(request))
    assert kinds(events)[-1] == "result" and events[-1].result.request_id == "req-7"


def test_the_family_is_detected_from_model_index_json(client, model_dir):
    gen = client.generate(model=str(model_dir), prompt="a cat", batch_size=2)
    assert [im.size for im in gen.images] == [(32, 16), (32, 16)]


def test_unset_optional_fields_arrive_unset(client, served):
    client.generate(model="tiny", family="testfam", prompt="defaults")
    got = served.family.requests[-1]
    assert [f for f in OPTIONAL_FIELDS if got.HasField(f)] == []
    assert got.negative_prompt == "" and not got.loras and not got.input_images and not got.components
    assert got.lora_mode == common_pb2.LORA_MODE_UNSPECIFIED and got.batch_size == 0


def test_given_fields_arrive_as_given(client, served, tmp_path: Path):
    init = Image.new("RGB", (8, 8), (1, 2, 3))
    client.generate(
        model="tiny",
        family="testfam",
        prompt="p",
        negative_prompt="blurry",
        seed=0,  # zero is a value, not "unset"
        steps=2,
        width=16,
        height=8,
        guidance=3.5,
        cfg_scale=0.0,
        loras=["s3://bucket/style.safetensors:0.8", (tmp_path / "b.safetensors", 0.5)],
        lora_mode="fused",
        input_image=init,
        strength=0.6,
        num_frames=9,
        fps=16.0,
        components={"vae": "hf://org/vae", "text_encoder_2": "/models/t5"},
        request_id="abc.1",
        task="t2i",
    )
    got = served.family.requests[-1]
    assert all(got.HasField(f) for f in OPTIONAL_FIELDS)
    assert (got.seed, got.steps, got.width, got.height, got.num_frames) == (0, 2, 16, 8, 9)
    assert got.guidance == 3.5 and got.cfg_scale == 0.0 and got.fps == 16.0
    assert got.strength == pytest.approx(0.6)
    assert [(lo.spec, lo.scale) for lo in got.loras] == [
        ("s3://bucket/style.safetensors", pytest.approx(0.8)),
        (str(tmp_path / "b.safetensors"), 0.5),
    ]
    assert got.lora_mode == common_pb2.LORA_MODE_FUSED
    assert got.input_images[0].mime_type == "image/png"
    assert Image.open(io.BytesIO(got.input_images[0].data)).getpixel((0, 0)) == (1, 2, 3)
    assert dict(got.components) == {"vae": "hf://org/vae", "text_encoder_2": "/models/t5"}
    assert (got.request_id, got.task, got.negative_prompt) == ("abc.1", "t2i", "blurry")


def test_input_image_from_a_path_or_bytes(tmp_path: Path):
    path = tmp_path / "init.jpg"
    Image.new("RGB", (4, 4)).save(path)
    req = build_request(model="m", prompt="p", input_image=path, strength=0.5)
    assert req.input_images[0].mime_type == "image/jpeg" and req.input_images[0].data == path.read_bytes()
    req = build_request(model="m", prompt="p", input_image=b"\x89PNG...")
    assert req.input_images[0].data == b"\x89PNG..." and req.input_images[0].mime_type == ""


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"family": "testfam", "steps": 99}, grpc.StatusCode.INVALID_ARGUMENT, ["steps=99", "[1, 50]"]),
        ({"family": "nosuchfamily"}, grpc.StatusCode.NOT_FOUND, ["nosuchfamily", "testfam"]),
        ({"family": "testfam", "request_id": "../x"}, grpc.StatusCode.INVALID_ARGUMENT, ["request_id"]),
        ({"family": "testfam", "prompt": "missing"}, grpc.StatusCode.NOT_FOUND, ["nowhere.safetensors"]),
        ({"family": "testfam", "prompt": "crash"}, grpc.StatusCode.INTERNAL, ["RuntimeError"]),
    ],
)
def test_errors_carry_the_code_over_grpc_and_in_process(client, kwargs, code, words):
    err = error_of(lambda: client.generate(**{"model": "tiny", "prompt": "p", **kwargs}))
    assert err.code == code, err
    assert all(w in err.message for w in words), err.message
    assert str(err).startswith(f"{code.name}: ")


def test_an_unknown_model_without_family_is_not_found(client, tmp_path: Path):
    err = error_of(lambda: client.generate(model=str(tmp_path), prompt="p"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "model_index.json" in err.message


def test_the_same_errors_over_both_transports(served, local_settings):
    kwargs = {"model": "tiny", "prompt": "p", "family": "testfam", "steps": 0}
    with Client(served.endpoint, served.token) as remote, Client.in_process(local_settings) as local:
        a, b = error_of(lambda: remote.generate(**kwargs)), error_of(lambda: local.generate(**kwargs))
    assert (a.code, a.message) == (b.code, b.message)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_missing_or_wrong_token_is_unauthenticated(served, token):
    with Client(served.endpoint, token) as c:
        err = error_of(lambda: c.generate(model="tiny", family="testfam", prompt="p"))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong-token" not in err.message and served.family.requests == []


def test_a_request_over_its_deadline_is_deadline_exceeded_and_its_work_stops(client, served):
    client.timeout_s = 0.2
    err = error_of(lambda: client.generate(model="tiny", family="testfam", prompt="block"))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served.family.saw_cancel.wait(10)


def test_leaving_the_stream_early_cancels_the_work(client, served):
    events = client.stream(build_request(model="tiny", family="testfam", prompt="block"))
    first = next(events)
    assert first.stage.kind == orchestrator_pb2.StageEvent.STARTED
    events.close()
    assert served.family.saw_cancel.wait(10)


def test_nobody_listening_is_unavailable():
    from orchestrator.stack.s3server import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    with Client(endpoint, "t", timeout_s=5) as c:
        err = error_of(lambda: c.generate(model="tiny", prompt="p"))
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_in_process_settings_errors_are_client_errors(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFMESH_STORE", "floppy")
    err = error_of(lambda: Client.in_process())
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "floppy" in err.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.75", ("style.safetensors", 0.75)),
        ("/loras/a:b.safetensors:-0.5", ("/loras/a:b.safetensors", -0.5)),
        ("hf://org/repo/x.safetensors", ("hf://org/repo/x.safetensors", 1.0)),
        ("modelscope://org/repo@v1:2", ("modelscope://org/repo@v1", 2.0)),
        ("s3://bucket/l.safetensors:1e-3", ("s3://bucket/l.safetensors", 0.001)),
        ("odd:name", ("odd:name", 1.0)),
        ("weights:nan", ("weights:nan", 1.0)),  # not a finite number: part of the name
    ],
)
def test_parse_lora(text, expected):
    assert parse_lora(text) == expected


@pytest.mark.parametrize(
    ("text", "words"), [("", "empty"), (":0.5", "empty"), ("a.safetensors:0", "scale 0")]
)
def test_parse_lora_rejects(text, words):
    with pytest.raises(ValueError, match=words):
        parse_lora(text)


def test_lora_spec_forms(tmp_path: Path):
    assert lora_spec((tmp_path / "a.safetensors", 2)) == common_pb2.LoraSpec(
        spec=str(tmp_path / "a.safetensors"), scale=2.0
    )
    given = common_pb2.LoraSpec(spec="x", scale=0)
    assert lora_spec(given) is given  # the wire form is taken as it is
    with pytest.raises(ValueError, match="finite"):
        lora_spec(("a", float("inf")))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model": ""}, "model is required"),
        ({"steps": -1}, "steps=-1"),
        ({"seed": 1 << 64}, "seed="),
        ({"width": 1.5}, "width=1.5"),
        ({"guidance": float("nan")}, "guidance=nan"),
        ({"strength": 0.5}, "needs an input_image"),
        ({"lora_mode": "warm"}, "lora_mode='warm'"),
        ({"components": {"unet": "x"}}, "unknown key 'unet'"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_build_request_names_the_bad_argument(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        build_request(**{"model": "m", "prompt": "p", **kwargs})


def test_generation_without_images_says_so():
    gen = Generation.from_result(orchestrator_pb2.GenerateResult(request_id="r", video=b"mp4"))
    assert gen.video == b"mp4"
    with pytest.raises(ValueError, match=r"no images.*video"):
        _ = gen.image
