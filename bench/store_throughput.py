"""TensorStore throughput: put/get of float32 tensors through S3TensorStore and LocalTensorStore.

Baseline, in the same run against the same server: the raw `minio` client's put_object/get_object of the same
bytes, so the S3 figures read as ratios (ours / raw minio): what TensorRefs cost on top of plain S3 (serialising
the tensor, sha256 on write and on every read, the size check, rebuilding the tensor). The local store is also
compared with a plain file write/read of the same bytes.

Starts its own `weed mini` in a temporary directory and stops it by its pid. MB = 2**20 bytes; each figure is
the median of `repeats` timed runs after one untimed warm-up.

    .venv/bin/python -m bench.store_throughput
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import minio
import torch
from minio import Minio

from orchestrator.stack.s3server import start_s3_server
from protos import tensor_pb2
from services.common import wire
from services.common.settings import S3Settings
from services.common.store import LocalTensorStore, S3TensorStore, TensorStore

MB = 1 << 20
ACCESS_KEY = "bench"
SECRET_KEY = "bench-secret"


def _median_mbps(nbytes: int, fn: Callable[[int], object], repeats: int) -> float:
    """Median MB/s of fn(i) over `repeats` timed calls, after one untimed warm-up call (i = -1)."""
    fn(-1)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return nbytes / MB / statistics.median(times)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def _measure(
    size_mb: int,
    s3: S3TensorStore,
    local: LocalTensorStore,
    raw: Minio,
    raw_bucket: str,
    files: Path,
    repeats: int,
) -> dict:
    tensor = torch.randn(size_mb * MB // 4, generator=torch.Generator().manual_seed(size_mb))  # (N,) F32
    _, _, data = wire.to_bytes(tensor)
    nbytes = len(data)
    assert nbytes == size_mb * MB
    prefix = f"runs/bench/{size_mb}mb/"
    refs: dict[tuple[str, int], tensor_pb2.TensorRef] = {}

    def put(store: TensorStore, name: str) -> Callable[[int], object]:
        def go(i: int) -> None:
            refs[name, i] = store.put(f"{prefix}{i + 1}", tensor)

        return go

    def get(store: TensorStore, name: str) -> Callable[[int], object]:
        def go(i: int) -> None:
            assert store.get(refs[name, i]).shape == tensor.shape

        return go

    def raw_put(i: int) -> None:
        raw.put_object(raw_bucket, f"{prefix}{i + 1}", io.BytesIO(data), length=nbytes)

    def raw_get(i: int) -> None:
        resp = raw.get_object(raw_bucket, f"{prefix}{i + 1}")
        try:
            got = resp.read()
        finally:
            resp.close()
            resp.release_conn()
        assert len(got) == nbytes

    def file_put(i: int) -> None:
        (files / f"{size_mb}-{i + 1}").write_bytes(data)

    def file_get(i: int) -> None:
        assert len((files / f"{size_mb}-{i + 1}").read_bytes()) == nbytes

    fig: dict = {
        "s3": {
            "put": _median_mbps(nbytes, put(s3, "s3"), repeats),
            "get": _median_mbps(nbytes, get(s3, "s3"), repeats),
        },
        "raw_minio": {
            "put": _median_mbps(nbytes, raw_put, repeats),
            "get": _median_mbps(nbytes, raw_get, repeats),
        },
        "local": {
            "put": _median_mbps(nbytes, put(local, "local"), repeats),
            "get": _median_mbps(nbytes, get(local, "local"), repeats),
        },
        "raw_file": {
            "put": _median_mbps(nbytes, file_put, repeats),
            "get": _median_mbps(nbytes, file_get, repeats),
        },
        # the parts of our overhead, for reading the ratios
        "sha256": _median_mbps(nbytes, lambda i: wire.sha256_hex(data), repeats),
        "to_bytes": _median_mbps(nbytes, lambda i: wire.to_bytes(tensor), repeats),
    }
    for path in ("s3", "raw_minio", "local", "raw_file"):
        fig[path] = {op: round(v, 1) for op, v in fig[path].items()}
    fig["sha256"] = round(fig["sha256"], 1)
    fig["to_bytes"] = round(fig["to_bytes"], 1)
    fig["ratios"] = {
        f"{a}/{b}": {op: _ratio(fig[a][op], fig[b][op]) for op in ("put", "get")}
        for a, b in (("s3", "raw_minio"), ("local", "raw_minio"), ("local", "raw_file"))
    }

    # keep the temporary directory small between sizes
    s3.delete_prefix(prefix)
    local.delete_prefix(prefix)
    for obj in raw.list_objects(raw_bucket, prefix=prefix, recursive=True):
        raw.remove_object(raw_bucket, obj.object_name)
    for f in files.iterdir():
        f.unlink()
    return fig


def run(sizes_mb: tuple[int, ...] = (1, 64), repeats: int = 5) -> dict:
    """Measure put/get MB/s for each size; returns a JSON-able dict (see the module docstring)."""
    results: dict = {
        "unit": "MB/s (MB = 2**20 bytes), median of repeats",
        "repeats": repeats,
        "dtype": "F32",
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "minio": minio.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="diffmesh-bench-") as tmp:
        root = Path(tmp)
        server = start_s3_server(root / "weed", ACCESS_KEY, SECRET_KEY)
        try:
            results["server"] = f"weed mini at {server.endpoint}"
            s3 = S3TensorStore(
                S3Settings(
                    endpoint=server.endpoint,
                    bucket="bench-store",
                    access_key=ACCESS_KEY,
                    secret_key=SECRET_KEY,
                    timeout_s=60.0,
                    retries=0,
                ),
                inline_limit=0,
            )
            local = LocalTensorStore(root / "local", inline_limit=0)
            raw = Minio(server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
            raw_bucket = "bench-raw"
            if not raw.bucket_exists(raw_bucket):
                raw.make_bucket(raw_bucket)
            files = root / "files"
            files.mkdir()

            for size_mb in sizes_mb:
                results["sizes"][f"{size_mb}MB"] = _measure(
                    size_mb, s3, local, raw, raw_bucket, files, repeats
                )
        finally:
            server.stop()
    return results


def format_table(results: dict) -> str:
    lines = [
        f"TensorStore throughput, {results['unit']}, {results.get('server', '')}",
        f"{'size':>6} {'path':<10} {'put':>9} {'get':>9}   put/raw_minio  get/raw_minio",
    ]
    for size, fig in results["sizes"].items():
        for path in ("s3", "raw_minio", "local", "raw_file"):
            put, get = fig[path]["put"], fig[path]["get"]
            ratio = ""
            if path in ("s3", "local"):
                r = fig["ratios"][f"{path}/raw_minio"]
                ratio = f"   {r['put']:>12.3f}  {r['get']:>13.3f}"
            lines.append(f"{size:>6} {path:<10} {put:>9.1f} {get:>9.1f}{ratio}")
        r = fig["ratios"]["local/raw_file"]
        lines.append(
            f"{size:>6} local/raw_file put {r['put']:.3f} get {r['get']:.3f}; "
            f"sha256 {fig['sha256']:.0f} MB/s, to_bytes {fig['to_bytes']:.0f} MB/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    res = run()
    print(format_table(res))
    print(json.dumps(res, indent=2))
