"""The trainer against a real S3 server (SeaweedFS): dataset read from an S3 prefix, checkpoints, status and the
LoRA written to another, and a second run with more steps resumes from the checkpoint it finds there."""

from __future__ import annotations

import io
import json
from pathlib import Path

from google.protobuf import json_format
from minio import Minio
from tiny_dataset import spec

from trainer import checkpoint
from trainer.job import LORA_FILE, train
from trainer.spec import TrainSpec
from trainer.storage import open_storage


def upload(client: Minio, bucket: str, prefix: str, folder: Path) -> None:
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        client.put_object(bucket, f"{prefix}{path.name}", io.BytesIO(data), len(data))


def test_dataset_and_checkpoints_on_s3(tiny_model, dataset, work_env, s3_env):
    model, _ = tiny_model
    env = {**work_env, **s3_env}
    bucket = s3_env["DIFFMESH_S3_BUCKET"]
    client = Minio(
        s3_env["DIFFMESH_S3_ENDPOINT"],
        access_key=s3_env["DIFFMESH_S3_ACCESS_KEY"],
        secret_key=s3_env["DIFFMESH_S3_SECRET_KEY"],
        secure=False,
    )
    upload(client, bucket, "datasets/shapes/", dataset)
    output = f"s3://{bucket}/train/run-1/"
    doc = spec(model, f"s3://{bucket}/datasets/shapes/", output, steps=8, checkpointEvery=4)

    first = train(json_format.ParseDict(doc, TrainSpec()), env=env)
    assert first.resumed_from is None and len(first.checkpoints) == 2
    out = open_storage(output, env)
    assert checkpoint.complete_steps(out) == [4, 8]
    manifest = json.loads(out.read(f"{checkpoint.folder(8)}/{checkpoint.MANIFEST}"))
    assert set(manifest["files"]) == {"trainable-00000.safetensors", "state-00000.safetensors", "state.json"}
    status = json.loads(out.read("status.json"))
    assert (status["state"], status["step"], status["total_steps"]) == ("succeeded", 8, 8)
    assert out.size(LORA_FILE)

    more = train(json_format.ParseDict({**doc, "steps": 12}, TrainSpec()), env=env)
    assert more.resumed_from == 8 and len(more.losses) == 4
    assert checkpoint.complete_steps(out) == [8, 12]
