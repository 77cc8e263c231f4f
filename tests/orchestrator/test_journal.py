"""The request journal (orchestrator/journal.py) on both object backends: a directory and a real S3 server
(SeaweedFS). Claims, stage records, replays, takeovers of dead owners, waiting on live ones, damaged
records, and a store that is down."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from minio.error import S3Error

from orchestrator.errors import StageError
from orchestrator.journal import DONE, FAILED, RUNNING, Journal, decode_value, encode_value, fingerprint
from orchestrator.objects import Conflict, DirObjects, S3Objects
from protos import orchestrator_pb2, tensor_pb2, vae_pb2

FP = "f" * 64


@pytest.fixture(params=["dir", "s3"])
def objects(request, tmp_path: Path):
    if request.param == "dir":
        return DirObjects(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = f"j-{uuid.uuid4().hex[:12]}"  # made by the first write
    return S3Objects(server.endpoint, bucket, server.access_key, server.secret_key, timeout_s=5, retries=1)


def outputs() -> dict:
    ref = tensor_pb2.TensorRef(uri="s3://b/runs/r/denoise/latents", dtype="F32", shape=[1, 16, 8, 8])
    return {
        "latents": tensor_pb2.Tensor(ref=ref),
        "images": [b"\x89PNG one", b"\x89PNG two"],
        "pixels": vae_pb2.VaeDecodeResponse(images=[b"x"]).images,  # a repeated field: a list of bytes
        "embeds": {"prompt_embeds": tensor_pb2.Tensor(ref=ref)},
        "video": b"",
    }


def test_values_round_trip_through_json():
    value = outputs()
    back = decode_value(json.loads(json.dumps(encode_value(value))))
    assert back == {**value, "pixels": [b"x"]}
    with pytest.raises(TypeError, match="cannot record a set"):
        encode_value({"x": {1, 2}})
    for bad in (
        {"message": "diffmesh.v1.NoSuchType", "b64": ""},
        {"bytes": "%%%"},
        [1],
        {"a": 1, "b": 2, "c": 3},
    ):
        with pytest.raises(ValueError):
            decode_value(bad)


def test_fingerprint_ignores_the_id_and_sees_everything_else():
    a = orchestrator_pb2.GenerateRequest(request_id="one", model="m", prompt="p", seed=1)
    b = orchestrator_pb2.GenerateRequest(request_id="two", model="m", prompt="p", seed=1)
    assert fingerprint(a) == fingerprint(b)
    b.seed = 2
    assert fingerprint(a) != fingerprint(b)
    a.components["vae"], a.components["transformer"] = "x", "y"
    c = orchestrator_pb2.GenerateRequest(request_id="one", model="m", prompt="p", seed=1)
    c.components["transformer"], c.components["vae"] = "y", "x"  # map order does not matter
    assert fingerprint(a) == fingerprint(c)


def test_a_finished_run_is_replayed_from_its_records(objects):
    journal = Journal(objects)
    entry = journal.claim("req-1", FP)
    assert entry.owned and entry.status == RUNNING and entry.stages == {}
    journal.set_seed(entry, 1234)
    journal.stage_done(entry, "denoise", outputs(), 1.5, "127.0.0.1:1")
    journal.finish(entry)

    again = Journal(objects).claim("req-1", FP)  # another orchestrator, later
    assert not again.owned and again.status == DONE and again.seed == 1234
    assert again.stages["denoise"]["endpoint"] == "127.0.0.1:1"
    assert journal.load_stages(again) == {"denoise": {**outputs(), "pixels": [b"x"]}}


def test_the_same_id_for_another_request_is_already_exists(objects):
    journal = Journal(objects)
    journal.claim("req-2", FP)
    with pytest.raises(StageError) as err:
        journal.claim("req-2", "0" * 64)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "req-2" in err.value.message and "different request" in err.value.message


def test_a_failed_run_is_taken_over_with_its_finished_stages(objects):
    first = Journal(objects)
    entry = first.claim("req-3", FP)
    first.stage_done(entry, "encode_prompt", {"positive": {"t5": tensor_pb2.Tensor()}}, 0.1, "te")
    first.finish(entry, StageError(grpc.StatusCode.UNAVAILABLE, "vae down"))
    head = json.loads(objects.read(Journal.head_key("req-3")))
    assert head["status"] == FAILED and head["error"]["code"] == "UNAVAILABLE"

    second = Journal(objects)
    taken = second.claim("req-3", FP)
    assert taken.owned and taken.status == RUNNING and taken.head["owner"] == second.owner
    assert taken.head["error"] is None
    assert second.load_stages(taken) == {"encode_prompt": {"positive": {"t5": tensor_pb2.Tensor()}}}


def test_a_live_owner_is_waited_for_and_a_dead_one_taken_over(objects):
    owner = Journal(objects, lease_s=30)
    entry = owner.claim("req-4", FP)
    other = Journal(objects, lease_s=30, poll_s=0.05)
    waits: list[str] = []
    with pytest.raises(StageError) as err:
        other.claim("req-4", FP, deadline=time.monotonic() + 0.4, on_wait=waits.append)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and owner.owner in err.value.message
    assert waits == [owner.owner]

    # the owner finishes while the other waits: the other gets the finished entry
    threading.Timer(0.3, owner.finish, (entry,)).start()
    got = other.claim("req-4", FP, deadline=time.monotonic() + 10)
    assert got.status == DONE and not got.owned

    # an owner that stopped beating for longer than the lease is dead: taken over at once
    dead = Journal(objects, lease_s=0.2)
    dead.claim("req-5", FP)
    time.sleep(0.3)
    heir = Journal(objects, lease_s=0.2)
    assert heir.claim("req-5", FP, deadline=time.monotonic() + 1).owned


def test_the_heartbeat_keeps_a_long_run_alive(objects):
    owner = Journal(objects, lease_s=0.6)
    entry = owner.claim("req-6", FP)
    other = Journal(objects, lease_s=0.6, poll_s=0.05)
    with owner.heartbeat(entry):
        time.sleep(1.0)  # past the lease: only the heartbeat keeps the entry owned
        with pytest.raises(StageError) as err:
            other.claim("req-6", FP, deadline=time.monotonic() + 0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_damaged_or_lost_stage_record_is_never_used(objects):
    journal = Journal(objects)
    entry = journal.claim("req-7", FP)
    journal.stage_done(entry, "encode_prompt", {"positive": b"aaaa"}, 0.1, "te")
    journal.stage_done(entry, "denoise", {"latents": b"bbbb"}, 0.1, "dn")
    journal.stage_done(entry, "decode", {"images": [b"cccc"]}, 0.1, "vae")
    record = objects.read(Journal.stage_key("req-7", "denoise"))
    objects.write(Journal.stage_key("req-7", "denoise"), record.replace(b"YmJi", b"YmJj"))  # same size
    entry.stages["decode"]["key"] = "runs/req-7/orchestrator/stage-gone.json"
    assert journal.load_stages(entry) == {"encode_prompt": {"positive": b"aaaa"}}


def test_an_unreadable_head_is_data_loss(objects):
    objects.write(Journal.head_key("req-8"), b"{not json")
    with pytest.raises(StageError) as err:
        Journal(objects).claim("req-8", FP)
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "req-8" in err.value.message


def test_a_store_that_is_down_is_unavailable_within_the_deadline():
    objects = S3Objects("127.0.0.1:9", "bucket", "k", "s", timeout_s=1, retries=5)  # nothing listens on 9
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        Journal(objects).claim("req-9", FP, deadline=started + 1.0)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:9" in err.value.message
    assert time.monotonic() - started < 3.0


def test_dir_keys_cannot_leave_the_root(tmp_path: Path):
    with pytest.raises(StageError) as err:
        DirObjects(tmp_path).write("runs/../../etc/x", b"")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_conditional_writes_create_only_if_absent_and_replace_only_the_version_read(objects):
    key = "runs/cas/orchestrator/journal.json"
    first = objects.write(key, b"one", if_absent=True)
    with pytest.raises(Conflict):
        objects.write(key, b"two", if_absent=True)
    data, version = objects.read_versioned(key)
    assert (data, version) == (b"one", first)
    second = objects.write(key, b"three", if_version=version)
    with pytest.raises(Conflict):
        objects.write(key, b"four", if_version=version)  # stale: "three" replaced it
    assert objects.read_versioned(key) == (b"three", second)
    with pytest.raises(Conflict):
        objects.write("runs/cas/orchestrator/none.json", b"x", if_version=version)  # nothing to match
    assert objects.read("runs/cas/orchestrator/none.json") is None


def _race(n: int, claim) -> list:
    """`claim(i)` in n threads released at once; each one's entry or StageError."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = claim(i)
        except StageError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_orchestrators_racing_on_a_new_id_have_one_owner(objects):
    journals = [Journal(objects, lease_s=30, poll_s=0.05) for _ in range(8)]
    results = _race(8, lambda i: journals[i].claim("req-race", FP, deadline=time.monotonic() + 1.5))
    owners = [r for r in results if not isinstance(r, StageError)]
    assert len(owners) == 1 and owners[0].owned, results
    waiting = [r for r in results if isinstance(r, StageError)]
    assert {e.code for e in waiting} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    head = json.loads(objects.read(Journal.head_key("req-race")))
    assert head["owner"] == owners[0].head["owner"]


def test_orchestrators_racing_to_take_over_a_dead_owner_have_one_winner(objects):
    dead = Journal(objects).claim("req-heir", FP)
    dead.head["heartbeat"] = time.time() - 600  # its owner died ten minutes ago
    objects.write(Journal.head_key("req-heir"), json.dumps(dead.head).encode())
    heirs = [Journal(objects, lease_s=30, poll_s=0.05) for _ in range(6)]
    # the losers wait for the winner (fresh heartbeat) until their deadline, well inside the lease
    results = _race(6, lambda i: heirs[i].claim("req-heir", FP, deadline=time.monotonic() + 1.0))
    winners = [r for r in results if not isinstance(r, StageError)]
    assert len(winners) == 1, results
    assert {e.code for e in results if isinstance(e, StageError)} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert json.loads(objects.read(Journal.head_key("req-heir")))["owner"] == winners[0].head["owner"]


def test_an_owner_that_was_taken_over_stops_writing_the_journal(objects):
    slow = Journal(objects, lease_s=0.2)
    lost = slow.claim("req-lost", FP)
    slow.stage_done(lost, "encode_prompt", {"positive": b"aaaa"}, 0.1, "te")
    time.sleep(0.3)  # its heartbeat lapsed (a store down for longer than the lease, say)
    heir = Journal(objects, lease_s=0.2)
    taken = heir.claim("req-lost", FP)
    assert taken.owned and set(taken.stages) == {"encode_prompt"}

    # its next head write finds the entry taken (its record went first, but no head names it) ...
    slow.stage_done(lost, "denoise", {"latents": b"old"}, 0.1, "dn")
    assert not lost.owned
    # ... and from then on it writes nothing
    slow.stage_done(lost, "decode", {"images": [b"old"]}, 0.1, "vae")
    slow.finish(lost)
    head = json.loads(objects.read(Journal.head_key("req-lost")))
    assert head["owner"] == heir.owner and head["status"] == RUNNING
    assert set(head["stages"]) == {"encode_prompt"}
    assert objects.read(Journal.stage_key("req-lost", "decode")) is None

    heir.stage_done(taken, "denoise", {"latents": b"new"}, 0.1, "dn")
    heir.finish(taken)
    again = Journal(objects).claim("req-lost", FP)
    assert again.status == DONE and heir.load_stages(again)["denoise"] == {"latents": b"new"}


def test_a_store_without_conditional_writes_gets_plain_ones(s3_server, monkeypatch):
    # SeaweedFS takes If-None-Match / If-Match; a store that answers them NotImplemented cannot run here, so
    # its answer is faked at the client's single-part PUT (the only fake in this file)
    objects = S3Objects(
        s3_server.endpoint, f"j-{uuid.uuid4().hex[:12]}", s3_server.access_key, s3_server.secret_key
    )
    real = objects._client._put_object
    seen: list[dict] = []

    def put(bucket, key, data, headers=None, query_params=None):
        seen.append(dict(headers or {}))
        if any(k.startswith("If-") for k in headers or {}):
            raise S3Error(None, "NotImplemented", "conditional writes", key, "r", "h")
        return real(bucket, key, data, headers=headers, query_params=query_params)

    monkeypatch.setattr(objects._client, "_put_object", put)
    journal = Journal(objects)
    entry = journal.claim("req-plain", FP)
    journal.finish(entry)
    assert not objects.conditional and Journal(objects).claim("req-plain", FP).status == DONE
    assert "If-None-Match" in seen[0] and not any(k.startswith("If-") for h in seen[1:] for k in h)


def test_a_stage_whose_tensors_are_gone_from_the_store_is_not_resumed(objects):
    key = "runs/req-refs/denoiser/latents"
    if isinstance(objects, S3Objects):
        uri = f"s3://{objects.bucket}/{key}"
    else:
        uri = f"{objects.root.resolve().as_uri()}/{key}"
    assert objects.key_of(uri) == key and objects.key_of("s3://elsewhere/x") is None
    objects.write(key, b"latents")
    journal = Journal(objects)
    entry = journal.claim("req-refs", FP)
    here = tensor_pb2.Tensor(ref=tensor_pb2.TensorRef(uri=uri, dtype="F32", shape=[1]))
    away = tensor_pb2.Tensor(ref=tensor_pb2.TensorRef(uri="s3://elsewhere/x", dtype="F32", shape=[1]))
    journal.stage_done(entry, "denoise", {"latents": here}, 0.1, "dn")
    journal.stage_done(entry, "encode_prompt", {"embeds": {"t5": away}}, 0.1, "te")  # not ours to check
    assert set(journal.load_stages(entry)) == {"denoise", "encode_prompt"}
    assert objects.exists(key)
    if isinstance(objects, S3Objects):
        objects._client.remove_object(objects.bucket, key)
    else:
        (objects.root / key).unlink()
    assert not objects.exists(key)
    assert set(journal.load_stages(entry)) == {"encode_prompt"}
