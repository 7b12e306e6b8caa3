"""The jobs on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes
on this machine, each its own raylet and object store, real Ray processes): an autoscaling
replica pool grows onto nodes added mid-job and survives the removal of one, a killed
driver's scoring job is finished with --resume, and training with a worker on each of two
nodes survives the removal of one of them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driver import start_driver
from faults import RemoveNodeWhen, alive_actor_nodes, alive_actor_pids, row_groups_done
from jobs.score import parse_args
from pipeline.distributed import TrainJobConfig
from pipeline.distributed import run as train
from pipeline.scoring import ScoreJobConfig, run
from test_train import LABELS, toy_task
from tiny import tiny_model

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

SPEED = 0.9994  # about half of the tiny model's rows leave at its first exit (see test_scoring)


@pytest.fixture(scope="module")
def cluster():
    """A head of 1 CPU and a worker node of 1 CPU: room for one replica of 1 CPU beside the
    read, tokenise and write tasks. The first test adds two nodes of 2 CPUs; the others keep
    them (and put back what they remove)."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


BIG: list = []  # the nodes of 2 CPUs added (the cluster's own list drops removed nodes at once; the GCS does later)


def big_nodes(cluster, n: int = 2) -> None:
    """Bring the cluster back to ``n`` nodes of 2 CPUs."""
    while sum(1 for node in BIG if node in cluster.worker_nodes) < n:
        BIG.append(cluster.add_node(num_cpus=2))
    cluster.wait_for_nodes()


def write_texts(folder, rows: int, files: int, row_group_size: int, seed: int, words: int = 1):
    """``files`` Parquet files of ``rows`` toy texts in all (each ``words`` toy texts long), ids
    0..rows-1 in file order."""
    folder.mkdir()
    texts, _ = toy_task(np.random.default_rng(seed), rows * words)
    texts = [" ".join(texts[i * words:(i + 1) * words]) for i in range(rows)]
    per = rows // files
    for i in range(files):
        ids = range(per * i, per * (i + 1))
        pq.write_table(pa.table({"id": list(ids), "text": [texts[r] for r in ids]}), folder / f"{i}.parquet",
                       row_group_size=row_group_size)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny FastBERT folder and 1,200 toy texts in 4 Parquet files of 50-row row groups."""
    root = tmp_path_factory.mktemp("multinode")
    tiny_model(labels=LABELS, seed=4).save_pretrained(str(root / "model"))
    write_texts(root / "data", rows=1200, files=4, row_group_size=50, seed=3)
    return root


def score_job(files, output, **changes) -> ScoreJobConfig:
    settings = dict(model=str(files / "model"), input=[str(files / "data")], output=str(output), speed=SPEED,
                    replicas="2", cpus_per_replica=2.0, threads_per_replica=1, rows_per_call=4, micro_batch=2,
                    precision="fp32")
    return ScoreJobConfig(**{**settings, **changes})


def ids(output) -> list[int]:
    return [i for f in sorted(output.glob("part-*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


class InBackground(threading.Thread):
    """Run ``fn`` in a thread (the test's thread adds nodes: Ray starts a node's processes from
    the main thread only); ``result()`` joins it and returns what it returned, or raises what it
    raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the test's thread
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def test_a_pool_grows_onto_added_nodes_and_survives_losing_one(cluster, files, tmp_path):
    """replicas 1-3 on a cluster with room for one replica: two nodes of 2 CPUs join once the
    first replica runs, and the pool grows past one replica (never past three); Ray Data sees
    new nodes at its resource coordinator's next tick (every 20 s), so the job is long enough to
    outlast it. Then a node that holds a replica is removed (all its processes killed, as when a
    machine leaves): the job finishes with every row once."""
    data = write_texts(tmp_path / "data", rows=30000, files=6, row_group_size=500, seed=4, words=6)  # 32 tokens
    output = tmp_path / "out"
    job = InBackground(lambda: run(score_job(files, output, input=[str(data)], replicas="1-3", cpus_per_replica=1.0,
                                             rows_per_call=64, micro_batch=1)))
    seen, before, removed, hosts = [], None, None, []
    try:
        while job.is_alive():
            seen.append(len(alive_actor_pids("Replica")))
            if before is None and seen[-1]:
                before = max(seen)
                big_nodes(cluster, 2)
            if removed is None and seen[-1] > 1:  # grown: remove a worker node that holds a replica
                hosts = alive_actor_nodes("Replica")
                nodes = [n for n in cluster.worker_nodes if n.node_id in hosts]
                if nodes:
                    cluster.remove_node(nodes[0], allow_graceful=False)
                    removed = nodes[0].node_id
            time.sleep(0.1)
        summary = job.result()
    finally:
        job.join()
    assert before == 1, seen
    assert 1 < max(seen) <= 3, seen
    assert removed is not None and len(set(hosts)) > 1, "no replica's node was removed while the pool was grown"
    assert ids(output) == list(range(30000)) and summary["rows_out"] == 30000  # every row once, in order
    print(f"pool sizes seen: {sorted(set(seen))}; node removed; {summary['retried_calls']} calls retried; "
          f"{summary['wall_seconds']:.0f} s")


def test_a_killed_driver_resumes_on_the_cluster(cluster, files, tmp_path):
    """`python -m jobs.score` on the cluster (RAY_ADDRESS) is killed (SIGKILL) after its first
    whole row group; the same command with --resume finishes it."""
    big_nodes(cluster, 2)
    output = tmp_path / "out"
    argv = ["--model", str(files / "model"), "--input", str(files / "data"), "--output", str(output),
            "--speed", str(SPEED), "--rows-per-call", "10", "--micro-batch", "2", "--replicas", "2",
            "--cpus-per-replica", "2", "--threads-per-replica", "1", "--precision", "fp32"]
    driver = start_driver("jobs.score", argv, tmp_path / "driver.log")
    deadline = time.monotonic() + 180
    while not row_groups_done(output, rows=50):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no row group done within 180 s"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (output / "_SUCCESS").exists()
    summary = run(parse_args([*argv, "--resume"]))
    assert 0 < summary["rows_this_run"] < 1200  # what was done before the kill was kept
    assert ids(output) == list(range(1200))  # no duplicate, no missing row


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_model()
    model.backbone.save_pretrained(root / "backbone")
    model.tokenizer.save_pretrained(root / "backbone")
    rng = np.random.default_rng(0)
    for name, n in (("train", 256), ("validation", 128)):
        texts, labels = toy_task(rng, n)
        pq.write_table(pa.table({"text": texts, "label": labels}), root / f"{name}.parquet")
    return root


def train_job(data, output, **changes) -> TrainJobConfig:
    return TrainJobConfig(train=str(data / "train.parquet"), validation=str(data / "validation.parquet"),
                          backbone=str(data / "backbone"), output=str(output), epochs=2, distill_epochs=0, lr=3e-3,
                          head_lr=1e-2, batch_size=16, max_length=32, branch_width=16, precision="fp32",
                          workers=2, cpus_per_worker=2, **changes)


def _epochs_done(run_folder) -> int:
    try:
        return len(json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def test_training_on_two_nodes_survives_a_removed_node(cluster, train_data, tmp_path):
    """Two workers of 2 CPUs, one on each node of 2 CPUs; one node is removed after the first
    checkpoint and a node comes back: Ray Train restarts the workers from that checkpoint
    (FailureConfig): epoch 2 goes on from epoch 1's model (its loss lower than epoch 1's, where
    a restart from the backbone would start over), and the model learns the task as well as the
    undisturbed 2-worker run of tests/test_distributed.py must."""
    big_nodes(cluster, 2)
    output = tmp_path / "out"
    remover = RemoveNodeWhen(cluster, lambda: _epochs_done(output / "_ray" / "finetune") >= 1, actor="RayTrainWorker")
    remover.start()
    job = InBackground(lambda: train(train_job(train_data, output), log=lambda *_: None))
    try:
        while job.is_alive() and remover.is_alive():
            time.sleep(0.1)
        big_nodes(cluster, 2)
        shaken = job.result()
    finally:
        remover.finish()
        job.join()
    assert remover.removed is not None, "the training finished before a node could be removed"
    assert len(set(remover.hosts)) == 2  # a worker on each of two nodes
    assert shaken.finetune[0]["finished_at"] < remover.at < shaken.finetune[-1]["finished_at"]
    assert [e["epoch"] for e in shaken.finetune] == [1, 2]  # resumed from the checkpoint: no epoch twice
    first, second = shaken.finetune
    assert second["loss"] < 0.8 * first["loss"], (first["loss"], second["loss"])
    assert max(first["teacher_accuracy"], second["teacher_accuracy"]) > 0.9  # chance is 0.5
