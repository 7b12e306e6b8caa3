"""Issue 26 §0, "the training job never hangs": every worker takes the same number of steps
in every epoch, whatever the row count, the text lengths and the number of workers.

Measured before the fix: Ray's local shuffle (``iter_batches`` with a shuffle buffer as large
as its batches) hands out short batches mid-stream, so ``bucketed_batches`` cut two equal
shards of 500 rows into 64 and 63 batches, and DDP waited for the 64th step forever. Pure tests
of the cutting and of ``Lockstep`` (two gloo processes), then whole jobs on a real local Ray."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.distributed import Lockstep, TrainJobConfig, batches_per_worker, bucketed_batches, exact_buckets, run
from test_train import FILLER, LABELS
from tiny import tiny_model

FAST = dict(lr=3e-3, head_lr=1e-2, distill_lr=1e-2, max_length=32, log_every=1000, branch_width=16)


# -- the cutting, without Ray -----------------------------------------------------------------


class ChunkedShard:
    """A shard whose ``iter_batches`` yields chunks of the given sizes, as Ray's local
    shuffle did on a 500-row shard of the job's pipeline (1,001 rows, 2 workers, batch 8)."""

    def __init__(self, sizes: list[int], start: int = 0) -> None:
        self.sizes, self.start = sizes, start

    def iter_batches(self, **_):
        first = self.start
        for n in self.sizes:
            ids = np.empty(n, dtype=object)  # (n,) ragged rows, as Ray gives a list column
            ids[:] = [np.arange(1 + (first + i) % 7, dtype=np.int32) + first + i for i in range(n)]
            yield {"input_ids": ids, "labels": np.arange(first, first + n)}  # labels: the row numbers
            first += n


@pytest.mark.parametrize("sizes", [[128, 128, 89, 128, 27], [128, 128, 88, 128, 28], [500], [1] * 500])
def test_equal_shards_give_equal_batch_counts_however_ray_chunks_them(sizes):
    """The first two chunkings are what Ray gave two workers' 500 rows in one epoch: cut as
    they came, 64 and 63 batches of 8. Re-cut, every chunking gives ceil(500 / 8) = 63,
    the steps_per_epoch of the LR schedule, and every row once."""
    batches = list(bucketed_batches(ChunkedShard(sizes), batch_size=8, pad_id=0, seed=0))
    assert len(batches) == batches_per_worker(1001, 2, 8) == 63
    assert sorted(np.concatenate([b["labels"].numpy() for b in batches]).tolist()) == list(range(500))
    assert [len(b["labels"]) for b in batches].count(8) == 62  # one short batch: the shard's last rows


def test_exact_buckets_keep_the_rows_in_order_and_mix_row_layouts():
    ragged = np.empty(3, dtype=object)  # (3,) rows of different lengths
    ragged[:] = [np.array([1]), np.array([2, 3]), np.array([4, 5, 6])]
    square = np.array([[7, 8], [9, 10]])  # (2, 2): what Ray gives when every row has one length
    chunks = [{"input_ids": ragged, "labels": np.array([0, 1, 2])}, {"input_ids": square, "labels": np.array([3, 4])},
              {"input_ids": ragged[:0], "labels": np.array([], dtype=np.int64)}]
    buckets = list(exact_buckets(chunks, size=2))
    assert [b["labels"].tolist() for b in buckets] == [[0, 1], [2, 3], [4]]
    assert [[r.tolist() for r in b["input_ids"]] for b in buckets] == [[[1], [2, 3]], [[4, 5, 6], [7, 8]], [[9, 10]]]
    assert list(exact_buckets([], size=4)) == []


def test_batches_per_worker_counts_the_equal_split():
    assert batches_per_worker(1001, 2, 8) == 63  # 500 rows each, one dropped
    assert batches_per_worker(1001, 3, 4) == 84  # 333 rows each
    assert batches_per_worker(5500, 2, 32) == 86  # the job: "step 50 of 86"
    assert batches_per_worker(3, 2, 8) == 1


# -- Lockstep on two gloo processes, without Ray ----------------------------------------------


SCENARIOS = [(5, 3), (0, 2), (4, 4)]  # batches of rank 0 and rank 1, one epoch each


def _lockstep_worker(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        done = []
        for counts in SCENARIOS:  # one after another on the same group: no flag is left pending
            steps = Lockstep(iter(range(counts[rank])))
            done.append({"taken": list(steps), "steps": steps.steps, "drained": steps.drained})
        torch.distributed.barrier()
        with open(f"{folder}/{rank}.json", "w") as f:
            json.dump(done, f)
    finally:
        torch.distributed.destroy_process_group()


def test_lockstep_stops_every_worker_at_the_shortest_and_drains_the_rest(tmp_path):
    torch.multiprocessing.spawn(_lockstep_worker, args=(str(tmp_path),), nprocs=2)
    done = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for i, counts in enumerate(SCENARIOS):
        fewest = min(counts)
        assert [d[i]["steps"] for d in done] == [fewest, fewest]
        assert [d[i]["taken"] for d in done] == [list(range(fewest))] * 2
        assert [d[i]["drained"] for d in done] == [n - fewest for n in counts]  # read to the end, not trained on


def test_lockstep_alone_passes_every_batch_on():
    steps = Lockstep(["a", "b", "c"])
    assert list(steps) == ["a", "b", "c"] and (steps.steps, steps.drained) == (3, 0)


# -- whole jobs on a real local Ray -----------------------------------------------------------

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    # 6 logical CPUs on 2 cores: 3 workers at 1 CPU each still leave CPUs to the Ray Data tasks
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)  # own instance
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone")
    model = tiny_model()
    model.backbone.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def write(path, texts: list[str], labels: list[str]) -> str:
    pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return str(path)


def short_then_long(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """Half the rows 1-2 words, half 25-29 (near max_length 32), the file sorted by length,
    so that the file's blocks, and shards cut from them unshuffled, differ strongly."""
    texts, labels = [], []
    for i in range(n):
        y = int(rng.integers(2))
        filler = list(rng.choice(FILLER, size=int(rng.integers(0, 2) if i < n // 2 else rng.integers(24, 29))))
        filler.insert(int(rng.integers(len(filler) + 1)), "good" if y else "bad")
        texts.append(" ".join(filler))
        labels.append(LABELS[y])
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [texts[i] for i in order], [labels[i] for i in order]


def check_lockstep(metrics, stage: str, epochs: int, rows: int, val_rows: int, workers: int,
                   batch_size: int) -> None:
    """Every epoch of the stage ran, and every worker took all of its batches (of the global
    ``batch_size`` / ``workers`` rows), as many as every other worker and as the LR schedule
    counted (steps_per_epoch)."""
    history = getattr(metrics, stage)
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    for e in history:
        assert e["workers"] == workers
        assert e["steps_min"] == e["steps_max"] == e["steps"] == batches_per_worker(rows, workers, batch_size // workers), e
        assert e["drained_batches"] == 0, e  # no worker had batches left over: the shards were cut alike
        assert e["samples"] == rows // workers * workers  # Ray's equal split drops rows % workers rows
        assert e["validation_samples"] == val_rows // workers * workers


def test_three_workers_on_uneven_rows_of_short_and_long_texts_sorted_by_length_finish(ray_session, backbone, tmp_path):
    """1,001 rows (not a multiple of 3 workers, or of 2: the job's own pipeline once cut one of two
    workers' 500 rows into 64 batches and the other's into 63, and the job hung; the cutting
    tests above replay Ray's chunks of that run), short and long texts sorted by length, so that
    the shards' blocks differ strongly. Stage 1 only, for time: stage 2 runs the same loop
    (tests/test_distributed.py runs it)."""
    rng = np.random.default_rng(1)
    train = write(tmp_path / "train.parquet", *short_then_long(rng, 1001))
    val = write(tmp_path / "val.parquet", *short_then_long(rng, 151))
    output = tmp_path / "model"
    metrics = run(TrainJobConfig(train=train, validation=val, output=str(output), backbone=str(backbone), workers=3,
                                 cpus_per_worker=1, epochs=1, distill_epochs=0, batch_size=12, **FAST),
                  log=lambda line: None)
    check_lockstep(metrics, "finetune", 1, 1001, 151, 3, 12)
    assert metrics.distill == [] and json.loads((output / "metrics.json").read_text())["finetune"][-1]["epoch"] == 1
    assert (output / "tradeoff.json").exists()
