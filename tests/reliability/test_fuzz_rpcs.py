"""Fuzzing every RPC of every service (issue 8): generated requests, random and malformed, never get INTERNAL,
UNKNOWN or DEADLINE_EXCEEDED, and each server still answers known-good requests afterwards.

Per RPC, each kind the same in every run (a fixed sweep; Hypothesis derandomized):
- the sweep: a known-good request with one field at a time set to each value of its pool (fuzz_sweep.py);
- `DIFFMESH_FUZZ_EXAMPLES` messages of the request type (any value of every field, or a known-good request with
  one to three fields replaced): success, or a code that names a bad request (INVALID_ARGUMENT, NOT_FOUND,
  DATA_LOSS, ...);
- `DIFFMESH_FUZZ_EXAMPLES` byte strings that are not such a message, sent with an identity serializer:
  INVALID_ARGUMENT when they do not parse;
- a wrong token (UNAUTHENTICATED, whatever the bytes) and bad `x-request-id` headers.
The counts per RPC and code are in the terminal summary.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fuzz_messages import messages, mutated
from fuzz_stack import EXAMPLES, FLUX, I2V, FuzzClient, Rpc, all_rpcs, good_denoise, good_generate, png, wav
from fuzz_sweep import sweep
from fuzz_wire import garbage
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protos import audio_pb2, common_pb2, orchestrator_pb2, text_encoder_pb2, vae_pb2

# The 12000 x 12000 PNG of the pools: PIL warns on opening it, before the services refuse it.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
RPCS = all_rpcs()
SWEEP_IN_FLIGHT = 4
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@pytest.fixture(scope="module")
def good(fuzz_stack, fuzz_client: FuzzClient, fuzz_pools) -> dict[str, Message]:
    """A known-good request of every RPC: what `mutated` starts from."""
    s = fuzz_stack.seeds
    spec = orchestrator_pb2.TrainSpec(
        name="fuzz",
        family="flux",
        base_model=FLUX,
        dataset=orchestrator_pb2.DatasetSpec(uri=fuzz_pools.dataset),
        output="s3://bucket/out/",
        steps=1,
        lora=orchestrator_pb2.LoraTrainOptions(rank=4),
    )
    submit = orchestrator_pb2.SubmitJobRequest(
        spec=spec, launch=orchestrator_pb2.LaunchOptions(launcher="local")
    )
    job = fuzz_client.unary(
        "orchestrator", "/diffmesh.v1.Orchestrator/SubmitJob", submit, orchestrator_pb2.Job
    )
    requests: dict[str, Message] = {
        "TextEncoder.Encode": text_encoder_pb2.EncodeTextRequest(
            model=FLUX, prompts=["a cat"], max_sequence_length=16
        ),
        "TextEncoder.EncodeImage": text_encoder_pb2.EncodeImageRequest(
            model=I2V, images=[common_pb2.Media(data=png(32, 32))]
        ),
        "Denoiser.Denoise": good_denoise(s),
        "Vae.Encode": vae_pb2.VaeEncodeRequest(model=FLUX, inputs=[common_pb2.Media(data=png(16, 16))]),
        "Vae.Decode": vae_pb2.VaeDecodeRequest(model=FLUX, latents=s["latents"]),
        "Audio.Encode": audio_pb2.AudioEncodeRequest(model=FLUX, input=common_pb2.Media(data=wav())),
        "Audio.Decode": audio_pb2.AudioDecodeRequest(model=FLUX, latents=s["waveform"]),
        "Orchestrator.Generate": good_generate(),
        "Orchestrator.ListModels": orchestrator_pb2.ListModelsRequest(),
        "Orchestrator.SubmitJob": submit,
        "Orchestrator.GetJob": orchestrator_pb2.GetJobRequest(id=job.id),
        "Orchestrator.ListJobs": orchestrator_pb2.ListJobsRequest(),
        "Orchestrator.CancelJob": orchestrator_pb2.CancelJobRequest(id=job.id),
        "Orchestrator.JobLogs": orchestrator_pb2.JobLogsRequest(id=job.id, tail_lines=5),
    }
    missing = {r.name for r in RPCS} - set(requests)
    assert not missing, f"no known-good request for {sorted(missing)}"
    return requests


@pytest.fixture(autouse=True)
def few_jobs(request: pytest.FixtureRequest, fuzz_stack, good) -> Iterator[None]:
    """After a SubmitJob test, forget the jobs it started (each ran `true`) but the known-good one: ListJobs
    reads every job's record, and the later tests should not pay for hundreds."""
    yield
    if "SubmitJob" not in request.node.name:
        return
    keep = good["Orchestrator.GetJob"].id
    for folder in (fuzz_stack.jobs_dir / "jobs").iterdir():
        if folder.name != keep:
            shutil.rmtree(folder)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_every_pooled_value_in_every_field_gets_no_internal_error(
    rpc: Rpc, fuzz_client: FuzzClient, fuzz_pools, good
) -> None:
    """The sweep: the known-good request with one field at a time set to each value of its pool (nested
    messages two deep), deterministic, so every dangerous value is sent to every field whatever Hypothesis
    draws."""

    def send(request: Message) -> str | None:
        try:
            fuzz_client.expect_handled(rpc, request)
        except AssertionError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(
        SWEEP_IN_FLIGHT
    ) as pool:  # a few at once: quicker, and the servers see concurrency
        failures = [f for f in pool.map(send, sweep(good[rpc.name], fuzz_pools)) if f]
    assert not failures, f"{len(failures)} bad answers; the first ones:\n" + "\n\n".join(failures[:5])
    fuzz_client.known_good(rpc.server)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_generated_messages_get_no_internal_error(
    rpc: Rpc, fuzz_client: FuzzClient, fuzz_pools, good
) -> None:
    desc = rpc.request.DESCRIPTOR
    near_good = mutated(good[rpc.name], fuzz_pools)  # two in three: past the first checks
    requests = st.one_of(messages(desc, fuzz_pools), near_good, near_good)

    @FUZZ
    @given(request=requests)
    def fuzz(request: Message) -> None:
        fuzz_client.expect_handled(rpc, request)

    fuzz()
    fuzz_client.known_good(rpc.server)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_undecodable_bytes_are_invalid_argument(rpc: Rpc, fuzz_client: FuzzClient, fuzz_pools, good) -> None:
    sample = st.one_of(messages(rpc.request.DESCRIPTOR, fuzz_pools), st.just(good[rpc.name]))

    @FUZZ
    @given(data=garbage(sample))
    def fuzz(data: bytes) -> None:
        code = fuzz_client.expect_handled(rpc, data)
        try:
            rpc.request.FromString(data)
        except DecodeError:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, data)

    fuzz()
    fuzz_client.known_good(rpc.server)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_without_the_token_anything_is_unauthenticated(rpc: Rpc, fuzz_client: FuzzClient, good) -> None:
    """The token is checked before the request is read: undecodable bytes without it are UNAUTHENTICATED too."""
    for request in (good[rpc.name], b"\x0a\x02\xff\xfe", b"\xff" * 16):
        serialize = (lambda b: b) if isinstance(request, bytes) else rpc.request.SerializeToString
        channel = fuzz_client.stack.channel(rpc)
        make = channel.unary_stream if rpc.streaming else channel.unary_unary
        call = make(rpc.path, request_serializer=serialize, response_deserializer=rpc.response.FromString)
        with pytest.raises(grpc.RpcError) as e:
            result = call(request, timeout=30, metadata=(("authorization", "Bearer wrong"),))
            list(result) if rpc.streaming else None
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc.name, e.value.details())


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_a_bad_request_id_header_is_invalid_argument(rpc: Rpc, fuzz_client: FuzzClient, good) -> None:
    """`x-request-id` names the request's objects in the store: the stages refuse one that is not a plain name
    (the orchestrator takes its id from GenerateRequest.request_id and ignores the header)."""
    for value in ("", "..", "../../etc", "a/b", "a b", "x" * 129, "%2e%2e", "-"):
        code = fuzz_client.expect_handled(rpc, good[rpc.name], (("x-request-id", value),))
        if rpc.server != "orchestrator":
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc.name, value, code)
