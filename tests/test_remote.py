"""The training job on remote storage: inputs, Ray checkpoints and the model on S3, served
by a real S3 API server (moto) on loopback, with a real local Ray whose workers reach it too
(``memory://`` cannot be used: it is per process). Also what an unreachable URI gives."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import FastBert, Scorer
from pipeline.distributed import TrainJobConfig, check_inputs, run
from test_train import LABELS, toy_task
from tiny import tiny_model

ray = pytest.importorskip("ray")
pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the test extra)")
s3fs = pytest.importorskip("s3fs")

BUCKET = "fastbert"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback with an empty bucket; the AWS variables point this process
    and the Ray workers (started after them) at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        s3fs.S3FileSystem().mkdir(BUCKET)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        try:
            yield endpoint
        finally:
            ray.shutdown()
            server.terminate()
            server.wait()
            log.close()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone")
    model = tiny_model()
    model.backbone.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return str(folder)


def put_parquet(uri: str, table: pa.Table) -> str:
    with s3fs.S3FileSystem().open(uri, "wb") as f:
        pq.write_table(table, f)
    return uri


def test_train_from_s3_to_s3(s3, backbone):
    rng = np.random.default_rng(0)
    uris = {}
    for name, n in (("train", 256), ("validation", 64)):
        texts, labels = toy_task(rng, n)
        uris[name] = put_parquet(f"s3://{BUCKET}/data/{name}.parquet", pa.table({"text": texts, "label": labels}))
    output = f"s3://{BUCKET}/runs/model"
    metrics = run(TrainJobConfig(train=uris["train"], validation=uris["validation"], output=output, backbone=backbone,
                                 epochs=1, distill_epochs=0, lr=3e-3, batch_size=16, max_length=32,
                                 cache="off"))  # streamed from the bucket every epoch
    assert [e["epoch"] for e in metrics.finetune] == [1] and metrics.distill == []
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{output}/metrics.json") and not fs.exists(f"{output}/state.json")
    # every epoch's checkpoint (model, optimizer state, state.json) went to the bucket
    assert len(fs.glob(f"{output}/_ray/finetune/checkpoint_*/optimizer.safetensors")) == 1
    assert len(fs.glob(f"{output}/_ray/finetune/checkpoint_*/state.json")) == 1
    model = FastBert.from_pretrained(output)  # the published model, straight from the bucket
    assert model.config.labels == list(LABELS)
    assert set(Scorer(model, precision="fp32", speed=0.0)(toy_task(rng, 16)[0]).column("prediction").to_pylist()) <= set(LABELS)


def test_missing_object_and_unreachable_endpoint_are_clear_errors(s3, monkeypatch, tmp_path):
    local = str(tmp_path / "val.parquet")
    pq.write_table(pa.table({"text": ["good"], "label": ["pos"]}), local)
    missing = TrainJobConfig(train=f"s3://{BUCKET}/nothing/train.parquet", validation=local, output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=f"s3://{BUCKET}/nothing/train.parquet: no such file or folder"):
        check_inputs(missing)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    unreachable = TrainJobConfig(train=f"s3://{BUCKET}/data/train.parquet", validation=local,
                                 output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=rf"s3://{BUCKET}/data/train.parquet: cannot be reached \(EndpointConnection"):
        run(unreachable)
    assert not (tmp_path / "o").exists()
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ValueError, match="nosuchproto://x/train.parquet: cannot be reached"):
        check_inputs(TrainJobConfig(train="nosuchproto://x/train.parquet", validation=local, output=str(tmp_path / "o")))


def test_score_from_s3_to_s3(s3):
    """The scoring job with its model, inputs and output all in the bucket."""
    from pipeline.scoring import ScoreJobConfig
    from pipeline.scoring import run as score

    model = f"s3://{BUCKET}/models/tiny"
    tiny_model(labels=LABELS, seed=2).save_pretrained(model)
    texts, _ = toy_task(np.random.default_rng(3), 40)
    for i in range(2):
        put_parquet(f"s3://{BUCKET}/texts/part-{i}.parquet",
                    pa.table({"id": list(range(20 * i, 20 * i + 20)), "text": texts[20 * i: 20 * i + 20]}))
    output = f"s3://{BUCKET}/scored"
    summary = score(ScoreJobConfig(model=model, input=[f"s3://{BUCKET}/texts/*.parquet"], output=output, speed=0.5,
                                   rows_per_call=8, micro_batch=4, cpus_per_replica=0.5, precision="fp32"))
    assert summary["rows_in"] == summary["rows_out"] == 40 and summary["files"] == 2
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{output}/_SUCCESS") and fs.exists(f"{output}/_summary.json")
    files = sorted(p for p in fs.glob(f"{output}/part-*.parquet"))
    table = pa.concat_tables(pq.read_table(fs.open(p, "rb")) for p in files)
    assert table.column("id").to_pylist() == list(range(40))
    expected = Scorer(tiny_model(labels=LABELS, seed=2), precision="fp32", speed=0.5)(texts)
    assert table.column("prediction").to_pylist() == expected.column("prediction").to_pylist()

    # the same job again: already complete, nothing rewritten
    before = {p: fs.cat(p) for p in fs.find(output)}
    again = score(ScoreJobConfig(model=model, input=[f"s3://{BUCKET}/texts/*.parquet"], output=output, speed=0.5,
                                 rows_per_call=8, micro_batch=4, cpus_per_replica=0.5, precision="fp32"))
    assert again["rows_out"] == 40 and {p: fs.cat(p) for p in fs.find(output)} == before


def test_unsafe_outputs_and_overwrite_on_s3_keep_the_users_objects(s3):
    """Section 1 of the safety rules on S3: an output that is, holds or lies inside an input is
    refused; --overwrite removes an earlier run's own objects and nothing else."""
    from pipeline.outputs import Manifest, UserError, claim_output
    from pipeline.scoring import ScoreJobConfig
    from pipeline.scoring import run as score

    fs = s3fs.S3FileSystem()
    model = f"s3://{BUCKET}/safety/model"
    tiny_model(labels=LABELS, seed=2).save_pretrained(model)
    texts, _ = toy_task(np.random.default_rng(4), 12)
    data = f"s3://{BUCKET}/safety/data"
    put_parquet(f"{data}/part-0.parquet", pa.table({"text": texts}))
    fs.pipe(f"{data}/notes.txt", b"the user's notes")
    users = {p: fs.cat(p) for p in fs.find(data)}
    for inputs, output, message in (
            ([f"{data}/part-0.parquet"], data, "holds the input --input"),
            ([f"{data}/part-0.parquet"], f"s3://{BUCKET}/safety", "holds the input --input"),
            ([data], f"{data}/scored", "lies inside the input folder --input"),
            ([f"{data}/part-0.parquet"], f"{data}/notes.txt", "is an existing file")):
        with pytest.raises(UserError, match=message):
            score(ScoreJobConfig(model=model, input=inputs, output=output, overwrite=True))
    assert {p: fs.cat(p) for p in fs.find(data)} == users  # byte for byte

    put_parquet(f"{data}/labelled.parquet", pa.table({"text": texts, "label": [LABELS[i % 2] for i in range(12)]}))
    users = {p: fs.cat(p) for p in fs.find(data)}
    with pytest.raises(UserError, match="holds the input --train"):  # training into the folder of its data
        check_inputs(TrainJobConfig(train=f"{data}/labelled.parquet", validation=f"{data}/labelled.parquet",
                                    output=data, overwrite=True))
    assert {p: fs.cat(p) for p in fs.find(data)} == users

    folder = f"s3://{BUCKET}/safety/out"
    manifest = Manifest("jobs.score", ["part-*.parquet", "_SUCCESS"])
    assert claim_output(folder, manifest, overwrite=False) is None
    fs.pipe(f"{folder}/part-0.parquet", b"ours")
    fs.pipe(f"{folder}/_SUCCESS", b"")
    assert claim_output(folder, manifest, overwrite=False).job == "jobs.score"  # the earlier run's manifest
    assert claim_output(folder, manifest, overwrite=True) is None  # its files removed
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(folder)) == ["_manifest.json"]
    fs.pipe(f"{folder}/part-0.parquet", b"ours")
    fs.pipe(f"{folder}/mine.csv", b"the user's")
    with pytest.raises(UserError, match=r"did not write \(mine.csv\); nothing was deleted"):
        claim_output(folder, manifest, overwrite=True)
    assert fs.cat(f"{folder}/mine.csv") == b"the user's" and fs.cat(f"{folder}/part-0.parquet") == b"ours"
