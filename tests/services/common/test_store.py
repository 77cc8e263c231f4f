"""TensorStore, both backends: a local directory and S3 through minio against a real `weed mini` (DESIGN §3, §6).

Every test that takes `store` / `make_store` runs on both backends; S3 tests get a fresh bucket each.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from minio.lifecycleconfig import LifecycleConfig

from orchestrator.stack.s3server import S3Server, free_port, start_s3_server
from protos import tensor_pb2
from services.common import wire
from services.common.errors import (
    DataLoss,
    DiffmeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.settings import S3Settings, Settings
from services.common.store import (
    RUNS_PREFIX,
    LocalTensorStore,
    S3TensorStore,
    TensorStore,
    check_key,
    open_store,
    run_key,
)

ALL_DTYPES = sorted(wire.DTYPES)
MakeStore = Callable[..., TensorStore]


def unique_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def s3_settings(server: S3Server, **overrides: object) -> S3Settings:
    base: dict[str, object] = dict(
        endpoint=server.endpoint,
        bucket=unique_bucket(),
        access_key=server.access_key,
        secret_key=server.secret_key,
        timeout_s=10.0,
        retries=2,
    )
    base.update(overrides)
    return S3Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """A factory: each call gives a new store (S3: a new bucket; local: a new directory)."""
    count = iter(range(1000))

    def make(inline_limit: int = 1 << 20) -> TensorStore:
        if backend == "local":
            return LocalTensorStore(tmp_path / f"store{next(count)}", inline_limit=inline_limit)
        server: S3Server = request.getfixturevalue("s3_server")  # started only when an S3 test runs
        return S3TensorStore(s3_settings(server), inline_limit=inline_limit)

    return make


@pytest.fixture
def store(make_store: MakeStore) -> TensorStore:
    return make_store()


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3TensorStore:
    return S3TensorStore(s3_settings(s3_server))


def sample(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    dtype = wire.DTYPES[name]
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = 1
    for d in shape:
        n *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8)  # every bit pattern
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert bits(a) == bits(b)


def copy_ref(ref: tensor_pb2.TensorRef, **changes: object) -> tensor_pb2.TensorRef:
    out = tensor_pb2.TensorRef()
    out.CopyFrom(ref)
    for k, v in changes.items():
        if k == "shape":
            del out.shape[:]
            out.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(out, k, v)
    return out


# -- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_every_dtype_round_trip(store: TensorStore, name: str) -> None:
    t = sample(name, (2, 3, 5), seed=len(name))
    key = run_key("req-1", "text_encoder", f"t_{name.lower()}")
    ref = store.put(key, t)
    data = bits(t)
    assert ref.uri == store.uri(key)
    assert ref.uri.startswith("s3://" if isinstance(store, S3TensorStore) else "file://")
    assert store.key_of(ref.uri) == key
    assert (ref.dtype, list(ref.shape)) == (name, [2, 3, 5])
    assert ref.byte_size == len(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists(key)
    assert_same(store.get(ref), t)
    # a ref survives serialization, as it does between services
    assert_same(store.get(tensor_pb2.TensorRef.FromString(ref.SerializeToString())), t)


def test_non_contiguous_and_scalar(store: TensorStore) -> None:
    t = torch.randn(4, 6)[:, ::2].t()
    assert not t.is_contiguous()
    assert torch.equal(store.get(store.put("runs/r/s/nc", t)), t)
    s = torch.tensor(3.25, dtype=torch.bfloat16)
    back = store.get(store.put("runs/r/s/scalar", s))
    assert back.shape == () and back.dtype == torch.bfloat16 and back.item() == 3.25


@pytest.mark.parametrize("shape", [(0, 4), (0,)])
def test_empty_tensor(store: TensorStore, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=torch.float32)
    ref = store.put("runs/r/s/empty", t)
    assert ref.byte_size == 0
    assert ref.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.exists("runs/r/s/empty")
    back = store.get(ref)
    assert back.shape == shape and back.dtype == torch.float32


@pytest.mark.timeout(240)
def test_large_tensor_over_100mb(store: TensorStore) -> None:
    """Above 100 MB (multipart on S3); 26.3M float32 = 105.2 MB, one copy in flight each way."""
    t = torch.randn(26_300_000, generator=torch.Generator().manual_seed(0))
    assert t.numel() * 4 > 100_000_000
    key = "runs/big/denoiser/latents"
    ref = store.put(key, t)
    try:
        assert ref.byte_size == t.numel() * 4
        back = store.get(ref)
        assert torch.equal(back, t)
        del back
        # a one-byte tamper in a large object is still caught
        with pytest.raises(DataLoss, match="sha256 mismatch"):
            store.get(copy_ref(ref, sha256="f" * 64))
    finally:
        store.delete(key)


# -- inline vs ref --------------------------------------------------------------------------------------------


def test_put_tensor_inline_vs_ref_by_inline_limit(make_store: MakeStore) -> None:
    store = make_store(inline_limit=64)
    small = torch.arange(16, dtype=torch.float32)  # 64 bytes: at the limit -> inline
    big = torch.arange(17, dtype=torch.float32)  # 68 bytes -> ref

    msg = store.put_tensor("runs/r/s/small", small)
    assert msg.WhichOneof("value") == "inline"
    assert not store.exists("runs/r/s/small")  # nothing written
    assert torch.equal(store.load(msg), small)

    msg = store.put_tensor("runs/r/s/big", big)
    assert msg.WhichOneof("value") == "ref"
    assert msg.ref.uri == store.uri("runs/r/s/big")
    assert store.exists("runs/r/s/big")
    assert torch.equal(store.load(tensor_pb2.Tensor.FromString(msg.SerializeToString())), big)

    # the caller may force either way
    forced = store.put_tensor("runs/r/s/forced_ref", small, inline=False)
    assert forced.WhichOneof("value") == "ref" and store.exists("runs/r/s/forced_ref")
    assert store.put_tensor("runs/r/s/forced_inline", big, inline=True).WhichOneof("value") == "inline"
    assert not store.exists("runs/r/s/forced_inline")

    # bf16 counts bytes, not elements: 32 x 2 bytes = 64 -> inline, 33 -> ref
    assert (
        store.put_tensor("runs/r/s/h", torch.zeros(32, dtype=torch.bfloat16)).WhichOneof("value") == "inline"
    )
    assert store.put_tensor("runs/r/s/h", torch.zeros(33, dtype=torch.bfloat16)).WhichOneof("value") == "ref"


def test_inline_limit_zero_sends_everything_but_empty_to_the_store(make_store: MakeStore) -> None:
    store = make_store(inline_limit=0)
    assert store.put_tensor("runs/r/s/e", torch.empty(0, 4)).WhichOneof("value") == "inline"
    assert store.put_tensor("runs/r/s/one", torch.zeros(1, dtype=torch.bool)).WhichOneof("value") == "ref"


def test_load_empty_message_is_invalid_argument(store: TensorStore) -> None:
    with pytest.raises(InvalidArgument, match="latents: empty Tensor"):
        store.load(tensor_pb2.Tensor(), field="latents")


# -- integrity: size and checksum on every read ---------------------------------------------------------------


def test_tampered_sha256_is_data_loss(store: TensorStore) -> None:
    ref = store.put("runs/r/s/x", torch.arange(10, dtype=torch.int64))
    bad = "0" * 64
    with pytest.raises(DataLoss) as e:
        store.get(copy_ref(ref, sha256=bad))
    msg = str(e.value)
    assert ref.uri in msg and f"expected {bad}" in msg and f"got {ref.sha256}" in msg


def test_corrupt_object_same_size_is_data_loss(store: TensorStore) -> None:
    key = "runs/r/s/x"
    t = torch.arange(10, dtype=torch.float32)
    ref = store.put(key, t)
    data = bytearray(bits(t))
    data[17] ^= 0x01  # one flipped bit, same size
    store.put_bytes(key, bytes(data))
    with pytest.raises(DataLoss) as e:
        store.get(ref)
    msg = str(e.value)
    assert ref.uri in msg and f"expected {ref.sha256}" in msg
    assert f"got {hashlib.sha256(data).hexdigest()}" in msg


@pytest.mark.parametrize("delta", [-1, 1, -40])
def test_object_of_the_wrong_size_is_data_loss(store: TensorStore, delta: int) -> None:
    """The object itself is shorter/longer than its ref says (a truncated upload, a clobbered key)."""
    key = "runs/r/s/x"
    t = torch.arange(10, dtype=torch.float32)  # 40 bytes
    ref = store.put(key, t)
    data = bits(t)
    store.put_bytes(key, data[:delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(DataLoss) as e:
        store.get(ref)
    msg = str(e.value)
    assert ref.uri in msg and "expected 40 bytes" in msg
    assert ("more" if delta > 0 else str(40 + delta)) in msg


@pytest.mark.parametrize("byte_size", [39, 41, 0, 80])
def test_wrong_byte_size_in_ref_is_data_loss(store: TensorStore, byte_size: int) -> None:
    ref = store.put("runs/r/s/x", torch.arange(10, dtype=torch.float32))
    with pytest.raises(DataLoss) as e:
        store.get(copy_ref(ref, byte_size=byte_size))
    msg = str(e.value)
    assert ref.uri in msg and f"byte_size {byte_size} != 40" in msg


def test_shape_or_dtype_inconsistent_with_byte_size_is_data_loss(store: TensorStore) -> None:
    ref = store.put("runs/r/s/x", torch.arange(12, dtype=torch.float32))
    with pytest.raises(DataLoss, match="byte_size 48 != 24"):
        store.get(copy_ref(ref, dtype="F16"))
    with pytest.raises(DataLoss, match=r"byte_size 48 != 52"):
        store.get(copy_ref(ref, shape=[13]))
    # same size, other shape: a reinterpretation the ref asks for explicitly is fine
    assert store.get(copy_ref(ref, shape=[3, 4])).shape == (3, 4)


def test_unknown_dtype_in_ref_is_invalid_argument(store: TensorStore) -> None:
    ref = store.put("runs/r/s/x", torch.arange(4, dtype=torch.float32))
    with pytest.raises(InvalidArgument, match="unknown dtype 'F12'"):
        store.get(copy_ref(ref, dtype="F12"))


def test_missing_key_is_not_found(store: TensorStore) -> None:
    key = "runs/r/s/never-written"
    ref = tensor_pb2.TensorRef(
        uri=store.uri(key), dtype="F32", shape=[2], byte_size=8, sha256=hashlib.sha256(bytes(8)).hexdigest()
    )
    with pytest.raises(NotFound) as e:
        store.get(ref)
    assert store.uri(key) in str(e.value)
    with pytest.raises(NotFound):
        store.get_bytes(key, 8)
    with pytest.raises(NotFound):
        store.load(tensor_pb2.Tensor(ref=ref))
    assert not store.exists(key)


def test_missing_bucket_is_not_found(s3_server: S3Server) -> None:
    store = S3TensorStore(s3_settings(s3_server), ensure_bucket=False)  # never created
    with pytest.raises(NotFound, match=store.bucket):
        store.get_bytes("runs/r/s/x", 4)


# -- keys and uris --------------------------------------------------------------------------------------------


def test_uri_of_another_store_is_invalid_argument(store: TensorStore, tmp_path: Path) -> None:
    ref = store.put("runs/r/s/x", torch.arange(4, dtype=torch.float32))
    if isinstance(store, S3TensorStore):
        others = [
            "s3://other-bucket/runs/r/s/x",
            f"s3://{store.bucket}x/runs/r/s/x",  # a bucket whose name only starts like ours
            f"s3://{store.bucket}",
            (tmp_path / "runs/r/s/x").as_uri(),
            "http://127.0.0.1/runs/r/s/x",
        ]
    else:
        assert isinstance(store, LocalTensorStore)
        others = [
            "s3://diffmesh/runs/r/s/x",
            (tmp_path / "elsewhere" / "runs/r/s/x").as_uri(),
            store.root.as_uri() + "2/runs/r/s/x",  # a sibling directory whose name only starts like ours
            "/" + str(store.root / "runs/r/s/x"),  # a path, not a uri
        ]
    for uri in others:
        with pytest.raises(InvalidArgument, match="not in this store"):
            store.key_of(uri)
        with pytest.raises(InvalidArgument):
            store.get(copy_ref(ref, uri=uri))


BAD_KEYS = [
    "../x",
    "runs/../../etc/passwd",
    "runs/r/../s/x",
    "runs/./x",
    "/etc/passwd",
    "/abs/runs/r/s/x",
    "runs//x",
    "runs/r/s/",
    "",
    ".",
    "..",
    "runs/r/s/x y",
    "runs\\r\\s\\x",
    "runs/r/s/\u00e9",
    "a" * 1002,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
def test_bad_keys_are_invalid_argument(store: TensorStore, key: str) -> None:
    t = torch.zeros(2)
    calls: list[Callable[[], object]] = [
        lambda: check_key(key),
        lambda: store.uri(key),
        lambda: store.put(key, t),
        lambda: store.put_tensor(key, t, inline=False),
        lambda: store.put_bytes(key, b"1234"),
        lambda: store.get_bytes(key, 4),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    prefix = f"s3://{store.bucket}/" if isinstance(store, S3TensorStore) else store.root.as_uri() + "/"
    with pytest.raises(InvalidArgument):
        store.key_of(prefix + key)
    with pytest.raises(InvalidArgument):
        store.get(
            tensor_pb2.TensorRef(uri=prefix + key, dtype="F32", shape=[1], byte_size=4, sha256="0" * 64)
        )


def test_traversal_writes_nothing_outside_the_local_root(tmp_path: Path) -> None:
    store = LocalTensorStore(tmp_path / "root")
    for key in ("../escaped", "runs/../../escaped", str(tmp_path / "escaped")):
        with pytest.raises(InvalidArgument):
            store.put_bytes(key, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_run_key() -> None:
    assert run_key("req-1", "text_encoder", "prompt_embeds") == "runs/req-1/text_encoder/prompt_embeds"
    assert run_key("A" * 128, "v.2", "x_0.f32").startswith(RUNS_PREFIX)
    assert check_key(run_key("0a1b", "vae", "latents")) == "runs/0a1b/vae/latents"


@pytest.mark.parametrize(
    ("label", "parts"),
    [
        ("request_id", ("", "s", "n")),
        ("request_id", ("..", "s", "n")),
        ("request_id", ("a..b", "s", "n")),
        ("request_id", ("a/b", "s", "n")),
        ("request_id", ("/abs", "s", "n")),
        ("request_id", ("A" * 129, "s", "n")),
        ("stage", ("r", ".hidden", "n")),
        ("stage", ("r", "-flag", "n")),
        ("stage", ("r", "s t", "n")),
        ("name", ("r", "s", "../x")),
        ("name", ("r", "s", "caf\u00e9")),
    ],
)
def test_run_key_rejects_bad_parts_naming_them(label: str, parts: tuple[str, str, str]) -> None:
    with pytest.raises(InvalidArgument) as e:
        run_key(*parts)
    assert label in str(e.value)


@pytest.mark.parametrize("call", ["run_key", "check_key"])
def test_trailing_newline_is_not_a_valid_key(call: str) -> None:
    with pytest.raises(InvalidArgument):
        if call == "run_key":
            run_key("r", "s", "x\n")
        else:
            check_key("runs/r/s/x\n")


# -- list / exists / delete -----------------------------------------------------------------------------------


def test_list_exists_delete_and_delete_prefix(store: TensorStore) -> None:
    keys = [
        "runs/r1/text_encoder/prompt_embeds",
        "runs/r1/text_encoder/pooled",
        "runs/r1/denoiser/latents",
        "runs/r2/denoiser/latents",
        "models/cache/x",
    ]
    for i, key in enumerate(keys):
        store.put(key, torch.full((3,), float(i)))
    assert store.list("runs/r1/") == sorted(keys[:3])
    assert store.list("runs/") == sorted(keys[:4])
    assert store.list("") == sorted(keys)
    assert store.list("runs/r1/denoiser/") == ["runs/r1/denoiser/latents"]
    assert store.list("runs/none/") == []
    assert all(store.exists(k) for k in keys)

    store.delete("runs/r1/text_encoder/pooled")
    assert not store.exists("runs/r1/text_encoder/pooled")
    assert store.list("runs/r1/") == ["runs/r1/denoiser/latents", "runs/r1/text_encoder/prompt_embeds"]
    store.delete("runs/r1/text_encoder/pooled")  # deleting a missing key is not an error

    assert store.delete_prefix("runs/r1/") == 2
    assert store.list("runs/r1/") == []
    assert store.list("") == sorted([keys[3], keys[4]])
    assert store.delete_prefix("runs/r1/") == 0
    # what is left still reads back
    assert torch.equal(store.get(store.put("runs/r2/x/y", torch.ones(2))), torch.ones(2))
    assert store.delete_prefix("runs/") == 2
    assert store.list("") == ["models/cache/x"]


def test_hidden_key_parts_are_rejected_or_listed(store: TensorStore, request: pytest.FixtureRequest) -> None:
    """A key the store accepts is a key list() and delete_prefix() see (S3 does; the local store hides '.x')."""
    try:
        store.put_bytes("runs/r/.x", b"1234")
    except InvalidArgument:
        return
    assert store.list("runs/r/") == ["runs/r/.x"]
    assert store.delete_prefix("runs/r/") == 1
    assert not store.exists("runs/r/.x")


def test_key_that_is_also_a_prefix(store: TensorStore, request: pytest.FixtureRequest) -> None:
    """'runs/a' and 'runs/a/b' may both exist on S3; the local store must at least answer with a domain error."""
    store.put_bytes("runs/a/b", b"y")
    with pytest.raises(NotFound):
        store.get_bytes("runs/a", 1)  # a prefix is not an object
    try:
        store.put_bytes("runs/a", b"x")
    except DiffmeshError:
        pass
    else:
        assert store.get_bytes("runs/a", 1) == b"x"
    assert store.get_bytes("runs/a/b", 1) == b"y"


def test_overwrite_replaces_the_object_whole(store: TensorStore) -> None:
    key = "runs/r/s/x"
    store.put(key, torch.zeros(1000))
    ref = store.put(key, torch.ones(10))
    assert torch.equal(store.get(ref), torch.ones(10))
    assert store.list("runs/") == [key]


def test_local_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalTensorStore(tmp_path / "s")
    for i in range(3):
        store.put("runs/r/s/x", torch.full((100,), float(i)))
    assert sorted(p.name for p in (tmp_path / "s/runs/r/s").iterdir()) == ["x"]


# -- S3 only: lifecycle, auth, unreachable store, restart -----------------------------------------------------


def test_bucket_has_the_runs_lifecycle_rule(s3_store: S3TensorStore) -> None:
    config = s3_store.lifecycle()
    assert isinstance(config, LifecycleConfig)
    [rule] = config.rules
    assert rule.status == "Enabled"
    assert rule.rule_id == "expire-runs"
    assert rule.rule_filter is not None and rule.rule_filter.prefix == RUNS_PREFIX
    assert rule.expiration is not None and rule.expiration.days == s3_store.s3.runs_ttl_days == 1


def test_lifecycle_ttl_from_settings_and_ensure_bucket_is_idempotent(s3_server: S3Server) -> None:
    settings = s3_settings(s3_server, runs_ttl_days=7)
    a = S3TensorStore(settings)
    ref = a.put("runs/r/s/x", torch.ones(3))
    b = S3TensorStore(settings)  # same bucket again: no error, nothing lost
    b.ensure_bucket()
    assert torch.equal(b.get(ref), torch.ones(3))
    [rule] = b.lifecycle().rules  # type: ignore[union-attr]
    assert rule.expiration.days == 7


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrong", ["secret_key", "access_key"])
def test_wrong_credentials_are_failed_precondition_not_a_hang(s3_server: S3Server, wrong: str) -> None:
    good = s3_settings(s3_server)
    S3TensorStore(good)  # the bucket exists
    bad = s3_settings(s3_server, bucket=good.bucket, **{wrong: "not-the-" + wrong})
    t0 = time.monotonic()
    with pytest.raises(FailedPrecondition) as e:
        S3TensorStore(bad)
    with pytest.raises(FailedPrecondition):
        S3TensorStore(bad, ensure_bucket=False).get_bytes("runs/r/s/x", 4)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert s3_server.endpoint in msg
    assert "not-the-" not in msg and s3_server.secret_key not in msg  # nothing secret


@pytest.mark.timeout(60)
def test_store_down_is_unavailable_naming_the_endpoint() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = S3Settings(
        endpoint=endpoint, bucket="t-down", access_key="a", secret_key="b", timeout_s=1.0, retries=2
    )
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as e:
        S3TensorStore(settings)  # creating the bucket
    took = time.monotonic() - t0
    assert endpoint in str(e.value) and "3 attempts" in str(e.value)
    assert took < 5, took

    store = S3TensorStore(settings, ensure_bucket=False)
    ref = tensor_pb2.TensorRef(
        uri=store.uri("runs/r/s/x"), dtype="F32", shape=[1], byte_size=4, sha256="0" * 64
    )
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: store.get(ref),
        "put": lambda: store.put("runs/r/s/x", torch.ones(1)),
        "exists": lambda: store.exists("runs/r/s/x"),
        "list": lambda: store.list("runs/"),
        "delete": lambda: store.delete("runs/r/s/x"),
        "lifecycle": store.lifecycle,
    }
    for what, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            call()
        took = time.monotonic() - t0
        assert endpoint in str(e.value), what
        assert took < 5, (what, took)
    print(f"store down (closed port): Unavailable after {took:.2f}s")


class _BadGateway(http.server.BaseHTTPRequestHandler):
    """What an ingress / load balancer in front of MinIO answers while MinIO restarts: 503, text/html."""

    def _answer(self) -> None:
        body = b"<html><body>503 Service Temporarily Unavailable</body></html>"
        self.send_response(503)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bad_gateway() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_proxy_error_page_is_unavailable(bad_gateway: str) -> None:
    settings = S3Settings(
        endpoint=bad_gateway, bucket="t-proxy", access_key="a", secret_key="b", timeout_s=1.0, retries=1
    )
    store = S3TensorStore(settings, ensure_bucket=False)
    with pytest.raises(Unavailable) as e:
        store.get_bytes("runs/r/s/x", 4)
    assert bad_gateway in str(e.value)


@pytest.mark.parametrize("bucket", ["ab", "Under_Score"])
def test_invalid_bucket_name_is_invalid_argument(s3_server: S3Server, bucket: str) -> None:
    with pytest.raises(InvalidArgument, match=bucket):
        S3TensorStore(s3_settings(s3_server, bucket=bucket))


@pytest.mark.timeout(180)
def test_stopped_server_is_unavailable_and_data_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "weed"
    server = start_s3_server(data_dir, "restart-key", "restart-secret")
    servers = [server]
    try:
        port = int(server.endpoint.rsplit(":", 1)[1])
        settings = S3Settings(
            endpoint=server.endpoint,
            bucket="t-restart",
            access_key="restart-key",
            secret_key="restart-secret",
            timeout_s=2.0,
            retries=2,
        )
        store = S3TensorStore(settings)
        t = torch.randn(64, 64, dtype=torch.float32)
        ref = store.put(run_key("durable", "denoiser", "latents"), t)
        assert torch.equal(store.get(ref), t)

        server.stop()
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            store.get(ref)  # the pooled keep-alive connection is dead too
        took = time.monotonic() - t0
        assert server.endpoint in str(e.value)
        # bound: (retries + 1) attempts x (connect + read timeout) + backoff 0.2 + 0.4 s, plus slack
        assert took < 15, took
        print(f"stopped server: Unavailable after {took:.2f}s")

        server = start_s3_server(data_dir, "restart-key", "restart-secret", s3_port=port)
        servers.append(server)
        assert server.endpoint == settings.endpoint
        deadline = time.monotonic() + 30
        while True:  # as the orchestrator does: retry UNAVAILABLE with backoff while the server settles
            try:
                back = store.get(ref)  # the same client, the same ref
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert torch.equal(back, t)
        assert store.list("runs/") == ["runs/durable/denoiser/latents"]
        [rule] = store.lifecycle().rules  # type: ignore[union-attr]
        assert rule.rule_filter.prefix == RUNS_PREFIX
        assert torch.equal(store.get(store.put("runs/after/restart/x", torch.ones(2))), torch.ones(2))
    finally:
        for s in servers:
            s.stop()


# -- open_store -----------------------------------------------------------------------------------------------


def test_open_store_s3_from_env(s3_env: dict[str, str]) -> None:
    store = open_store(Settings.from_env({**s3_env, "DIFFMESH_INLINE_LIMIT_BYTES": "16"}))
    assert isinstance(store, S3TensorStore)
    assert store.bucket == s3_env["DIFFMESH_S3_BUCKET"]
    assert store.inline_limit == 16
    msg = store.put_tensor("runs/r/s/x", torch.arange(8, dtype=torch.float32))
    assert msg.ref.uri == f"s3://{s3_env['DIFFMESH_S3_BUCKET']}/runs/r/s/x"
    assert torch.equal(store.load(msg), torch.arange(8, dtype=torch.float32))


def test_open_store_local(local_store_dir: Path) -> None:
    store = open_store(Settings.from_env({"DIFFMESH_LOCAL_STORE": str(local_store_dir)}))
    assert isinstance(store, LocalTensorStore)
    assert store.root == local_store_dir.resolve() and local_store_dir.is_dir()
    ref = store.put("runs/r/s/x", torch.ones(3))
    assert ref.uri == (local_store_dir / "runs/r/s/x").resolve().as_uri()
    assert torch.equal(store.get(ref), torch.ones(3))
