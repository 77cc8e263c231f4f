"""settings: parsed once from the environment; secrets from env or `_FILE`, never in a repr (DESIGN §3)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.settings import MIB, S3Settings, Settings

SECRET_A = "AKIA-very-secret-access"
SECRET_S = "wJalr-super-secret-key-0123"
TOKEN = "tok-3f9a1c-never-print-me"


def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.store == "local"
    assert s.s3 == S3Settings()
    assert s.s3.endpoint == "127.0.0.1:8333"
    assert s.s3.bucket == "diffmesh"
    assert s.s3.access_key is None and s.s3.secret_key is None
    assert s.s3.secure is False and s.s3.region is None
    assert s.s3.runs_ttl_days == 1
    assert s.s3.timeout_s == 10.0 and s.s3.retries == 3
    assert s.local_store_dir == Path(".diffmesh/store")
    assert s.token is None
    assert s.model_roots == ()
    assert s.cache_dir == Path.home() / ".cache" / "diffmesh"
    assert s.model_cache_size == 2
    assert s.max_message_bytes == 64 * MIB
    assert s.inline_limit == MIB
    assert s.max_concurrency == 4
    assert s.device == "auto"


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMESH_STORE", "s3")
    monkeypatch.setenv("DIFFMESH_S3_BUCKET", "from-os-environ")
    s = Settings.from_env()
    assert s.store == "s3" and s.s3.bucket == "from-os-environ"


def test_empty_values_mean_default() -> None:
    env = {
        "DIFFMESH_S3_SECURE": "",
        "DIFFMESH_S3_REGION": "",
        "DIFFMESH_S3_RETRIES": "",
        "DIFFMESH_INLINE_LIMIT_BYTES": "",
        "DIFFMESH_S3_ACCESS_KEY": "",
        "DIFFMESH_TOKEN": "",
        "DIFFMESH_MODEL_ROOTS": "",
    }
    assert Settings.from_env(env) == Settings()


def test_s3_fields() -> None:
    env = {
        "DIFFMESH_STORE": " S3 ",
        "DIFFMESH_S3_ENDPOINT": "minio.store.svc:9000",
        "DIFFMESH_S3_BUCKET": "diffmesh-prod",
        "DIFFMESH_S3_ACCESS_KEY": SECRET_A,
        "DIFFMESH_S3_SECRET_KEY": SECRET_S,
        "DIFFMESH_S3_SECURE": "true",
        "DIFFMESH_S3_REGION": "eu-west-1",
        "DIFFMESH_RUNS_TTL_DAYS": "7",
        "DIFFMESH_S3_TIMEOUT_S": "2.5",
        "DIFFMESH_S3_RETRIES": "0",
    }
    s = Settings.from_env(env)
    assert s.store == "s3"
    assert s.s3 == S3Settings(
        endpoint="minio.store.svc:9000",
        bucket="diffmesh-prod",
        access_key=SECRET_A,
        secret_key=SECRET_S,
        secure=True,
        region="eu-west-1",
        runs_ttl_days=7,
        timeout_s=2.5,
        retries=0,
    )


def test_other_fields(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    env = {
        "DIFFMESH_LOCAL_STORE": str(tmp_path / "store"),
        "DIFFMESH_MODEL_ROOTS": os.pathsep.join([str(roots[0]), "", str(roots[1])]),
        "DIFFMESH_CACHE_DIR": "~/diffmesh-cache",
        "DIFFMESH_MODEL_CACHE_SIZE": "5",
        "DIFFMESH_MAX_MESSAGE_MB": "16",
        "DIFFMESH_INLINE_LIMIT_BYTES": "0",
        "DIFFMESH_MAX_CONCURRENCY": "1",
        "DIFFMESH_DEVICE": "cuda:1",
    }
    s = Settings.from_env(env)
    assert s.local_store_dir == tmp_path / "store"
    assert s.model_roots == tuple(roots)
    assert s.cache_dir == Path.home() / "diffmesh-cache"  # expanded
    assert s.model_cache_size == 5
    assert s.max_message_bytes == 16 * MIB
    assert s.inline_limit == 0
    assert s.max_concurrency == 1
    assert s.device == "cuda:1"


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("yes", True), ("ON", True), (" True ", True), ("0", False), ("no", False), ("off", False)],
)
def test_booleans(raw: str, value: bool) -> None:
    assert Settings.from_env({"DIFFMESH_S3_SECURE": raw}).s3.secure is value


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.store = "s3"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.s3.bucket = "other"  # type: ignore[misc]


def test_secrets_from_files(tmp_path: Path) -> None:
    files = {}
    for name, value in (
        ("DIFFMESH_S3_ACCESS_KEY", SECRET_A),
        ("DIFFMESH_S3_SECRET_KEY", SECRET_S),
        ("DIFFMESH_TOKEN", TOKEN),
    ):
        f = tmp_path / name.lower()
        f.write_text(value + "\n")  # a mounted Secret often ends in a newline
        files[f"{name}_FILE"] = str(f)
    s = Settings.from_env(files)
    assert s.s3.access_key == SECRET_A
    assert s.s3.secret_key == SECRET_S
    assert s.token == TOKEN


def test_secret_file_wins_over_the_variable(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN)
    s = Settings.from_env({"DIFFMESH_TOKEN": "from-env", "DIFFMESH_TOKEN_FILE": str(f)})
    assert s.token == TOKEN


def test_empty_secret_file_is_no_secret(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  \n")
    assert Settings.from_env({"DIFFMESH_TOKEN_FILE": str(f)}).token is None


def test_unreadable_secret_file_is_invalid_argument_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "secret"
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({"DIFFMESH_S3_SECRET_KEY_FILE": str(missing)})
    assert "DIFFMESH_S3_SECRET_KEY_FILE" in str(e.value)
    assert str(missing) in str(e.value)


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(SECRET_S)
    s = Settings.from_env(
        {
            "DIFFMESH_STORE": "s3",
            "DIFFMESH_S3_ACCESS_KEY": SECRET_A,
            "DIFFMESH_S3_SECRET_KEY_FILE": str(f),
            "DIFFMESH_TOKEN": TOKEN,
        }
    )
    assert s.s3.secret_key == SECRET_S and s.token == TOKEN
    for text in (repr(s), str(s), repr(s.s3), str(s.s3), f"{s}", f"{s!r}"):
        for secret in (SECRET_A, SECRET_S, TOKEN):
            assert secret not in text
    assert "s3" in repr(s) and "127.0.0.1:8333" in repr(s.s3)  # the rest is still there


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("DIFFMESH_STORE", "gcs"),
        ("DIFFMESH_S3_SECURE", "maybe"),
        ("DIFFMESH_S3_TIMEOUT_S", "soon"),
        ("DIFFMESH_RUNS_TTL_DAYS", "0"),
        ("DIFFMESH_RUNS_TTL_DAYS", "a week"),
        ("DIFFMESH_S3_RETRIES", "-1"),
        ("DIFFMESH_S3_RETRIES", "3.5"),
        ("DIFFMESH_MODEL_CACHE_SIZE", "0"),
        ("DIFFMESH_MAX_MESSAGE_MB", "64MB"),
        ("DIFFMESH_MAX_MESSAGE_MB", "0"),
        ("DIFFMESH_INLINE_LIMIT_BYTES", "-5"),
        ("DIFFMESH_MAX_CONCURRENCY", "many"),
        ("DIFFMESH_MAX_CONCURRENCY", "0"),
    ],
)
def test_invalid_values_name_the_variable_and_value(var: str, raw: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({var: raw})
    msg = str(e.value)
    assert var in msg
    assert raw in msg


@pytest.mark.parametrize("raw", ["soon", "1,5", "0", "-2.5", "nan", "inf"])
def test_invalid_timeout_names_the_variable_and_value(raw: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        Settings.from_env({"DIFFMESH_S3_TIMEOUT_S": raw})
    assert "DIFFMESH_S3_TIMEOUT_S" in str(e.value) and raw in str(e.value)
