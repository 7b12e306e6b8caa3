"""The scoring job submitted with `ray job submit` to a Ray head started with `ray start --head`
on loopback, the way a cluster user runs it. Ray's token authentication stays on: the head
and the submitting CLI share a token generated for the test."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from test_train import LABELS, toy_task
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback with the dashboard (the job API); yields its job API address and
    the environment (token) the CLI needs."""
    if not os.path.exists(RAY):
        pytest.skip(f"no ray CLI at {RAY}")
    dashboard = _free_port()
    short = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(tmp_path / "head.log", "w") as log:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={short}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:  # `ray start --block` took the whole 10 s it was once given: its processes are killed after 3
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(short, ignore_errors=True)


def test_score_job_submitted_to_a_ray_head(head, tmp_path):
    address, env, process = head
    tiny_model(labels=LABELS, seed=2).save_pretrained(str(tmp_path / "model"))
    texts, _ = toy_task(np.random.default_rng(7), 30)
    pq.write_table(pa.table({"id": list(range(30)), "text": texts}), tmp_path / "in.parquet", row_group_size=10)
    output = tmp_path / "out"
    entrypoint = [sys.executable, "-m", "jobs.score", "--model", str(tmp_path / "model"), "--input",
                  str(tmp_path / "in.parquet"), "--output", str(output), "--speed", "0.5", "--replicas", "1",
                  "--cpus-per-replica", "0.5", "--rows-per-call", "8"]
    deadline = time.monotonic() + 240
    while True:  # the job agent comes up a few seconds after the head
        submit = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                                 *entrypoint], env=env, capture_output=True, text=True, cwd=tmp_path)
        if submit.returncode == 0 or time.monotonic() > deadline:
            break
        assert process.poll() is None, (tmp_path / "head.log").read_text()[-3000:]  # the head died
        time.sleep(2)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-3000:] + (tmp_path / "head.log").read_text()[-2000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert (output / "_SUCCESS").exists()
    table = pa.concat_tables(pq.read_table(f) for f in sorted(pds.dataset(str(output), format="parquet").files))
    assert table.column("id").to_pylist() == list(range(30))

    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env={**no_token, "HOME": str(tmp_path)},
                             capture_output=True, text=True)
    assert refused.returncode != 0  # without the token the cluster refuses: auth was on all along


def test_the_scoring_job_without_a_cluster_starts_its_own_instance_without_a_dashboard():
    """No RAY_ADDRESS: jobs.score's own instance (``init_ray(dashboard=False)``) has CPU slack
    for the Ray Data tasks and no dashboard processes taking CPU from the replicas."""
    code = ("import json, ray; from pipeline.ray_init import init_ray; context = init_ray(dashboard=False); "
            "print(json.dumps({'dashboard': context.dashboard_url, 'cpus': ray.cluster_resources()['CPU']})); "
            "ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_USAGE_STATS_ENABLED": "0"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert not started["dashboard"]
    assert started["cpus"] == max(4, 2 * os.cpu_count())
