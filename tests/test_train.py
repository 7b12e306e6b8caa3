"""Tests for pipeline.train on the tiny model: a learnable toy task end to end (both stages,
then the early-exit Scorer), what each stage freezes, the schedules, bad input."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import FastBert, Scorer
from pipeline.tradeoff import TEMPERATURES, all_exits, at_speed, calibrate
from pipeline.text import distillation_views
from pipeline.train import (
    EvalStats,
    TrainConfig,
    batches,
    evaluate,
    fit,
    load_optimizer,
    make_optimizer,
    save_optimizer,
    set_stage,
    train_epoch,
)
from tiny import tiny_model

LABELS = ("neg", "pos")
FILLER = [f"w{i}" for i in range(60)] + ["the", "movie", "was", "fine"]
FAST = dict(lr=3e-3, distill_lr=3e-3, batch_size=16, precision="fp32")  # tiny models need a large rate; exact fp32


def toy_task(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """Random filler words with one keyword at a random place: "good" -> "pos", "bad" -> "neg"."""
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 12))))
        words.insert(int(rng.integers(len(words) + 1)), "good" if y else "bad")
        texts.append(" ".join(words))
        labels.append(LABELS[y])
    return texts, labels


def accuracy(predictions: Iterable[str], labels: Iterable[str]) -> float:
    return float(np.mean(np.array(list(predictions), dtype=object) == np.array(list(labels), dtype=object)))


def recording(batches: Iterable[dict], optimizer: torch.optim.Optimizer, lrs: list[float]) -> Iterator[dict]:
    """Pass batches through, recording the learning rate each batch's step will use."""
    for batch in batches:
        lrs.append(optimizer.param_groups[0]["lr"])
        yield batch


def parts(model) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the state tensors of the backbone, the teacher and the students."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    teacher = f"branches.{model.config.num_layers - 1}."
    return {
        "backbone": {k: v for k, v in state.items() if k.startswith("backbone.")},
        "teacher": {k: v for k, v in state.items() if k.startswith(teacher)},
        "students": {k: v for k, v in state.items() if k.startswith("branches.") and not k.startswith(teacher)},
    }


def unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- the toy task end to end: labels as names, unlabelled distillation text -------------------


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    rng = np.random.default_rng(0)
    train_texts, train_labels = toy_task(rng, 256)
    val_texts, val_labels = toy_task(rng, 128)
    distill_texts, _ = toy_task(rng, 192)  # unlabelled, another size than the training set
    model = tiny_model(labels=LABELS, seed=0)
    config = TrainConfig(epochs=5, distill_epochs=4, seed=0, **FAST)
    lines: list[str] = []
    history = fit(model, train_texts, train_labels, val_texts, val_labels, config,
                  distill_texts=distill_texts, log=lines.append)
    return SimpleNamespace(model=model, history=history, config=config, lines=lines,
                           val_texts=val_texts, val_labels=val_labels, distill_texts=distill_texts)


def test_finetune_learns_the_task(trained):
    finetune = trained.history.finetune
    assert [r["epoch"] for r in finetune] == [1, 2, 3, 4, 5]
    assert finetune[-1]["loss"] < 0.5 * finetune[0]["loss"]
    best = trained.history.best_epoch
    assert finetune[best - 1]["teacher_accuracy"] == max(r["teacher_accuracy"] for r in finetune) >= 0.9
    # the restored best epoch is the teacher the distillation stage saw (frozen there)
    for record in trained.history.distill:
        assert record["teacher_accuracy"] == finetune[best - 1]["teacher_accuracy"]
    stats = evaluate(trained.model, batches(trained.model, trained.val_texts, trained.val_labels))
    assert isinstance(stats, EvalStats) and stats.samples == len(trained.val_texts)
    assert stats.teacher_accuracy >= 0.9
    assert stats.exit_accuracy[-1] == stats.teacher_accuracy and stats.agreement[-1] == 1.0


def test_distillation_makes_the_first_exit_agree_with_the_teacher(trained):
    distill = trained.history.distill
    assert len(distill) == 4
    steps = math.ceil(len(trained.distill_texts) / trained.config.batch_size)  # the unlabelled texts
    assert all(r["steps"] == steps for r in distill)
    assert distill[-1]["loss"] < distill[0]["loss"]
    assert distill[-1]["agreement"][0] >= 0.8
    assert distill[-1]["exit_accuracy"][0] >= 0.8
    for key in ("loss", "teacher_accuracy", "exit_accuracy", "agreement", "seconds", "samples_per_s", "lr"):
        assert key in distill[-1] and key in trained.history.finetune[-1]
    assert any(line.startswith("distill epoch 4/4") for line in trained.lines)
    # stage 2 keeps its epoch of best mean student agreement (the later on ties): the model holds it
    scores = [float(np.mean(r["agreement"][:-1])) for r in distill]
    kept = trained.history.kept["distill"]
    assert kept["epoch"] == max(range(1, 5), key=lambda e: (scores[e - 1], e)) and kept["by"] == "mean_agreement"
    assert kept["value"] == scores[kept["epoch"] - 1] and kept["epochs_run"] == 4 and not kept["stopped_early"]
    stats = evaluate(trained.model, batches(trained.model, trained.val_texts, trained.val_labels))
    assert stats.agreement == distill[kept["epoch"] - 1]["agreement"]
    assert trained.history.kept["finetune"]["epoch"] == trained.history.best_epoch


def test_patience_stops_a_stage_without_strict_improvement():
    """A stage whose score no longer rises stops ``patience`` epochs after its last
    improvement (a rate too small to move any prediction: the agreement stays put)."""
    rng = np.random.default_rng(2)
    texts, labels = toy_task(rng, 64)
    model = tiny_model(labels=LABELS, seed=0)
    lines: list[str] = []
    history = fit(model, texts, labels, texts[:32], labels[:32],
                  TrainConfig(epochs=1, distill_epochs=6, distill_lr=1e-12, patience=2, lr=3e-3, batch_size=16,
                              precision="fp32"),
                  log=lines.append)
    assert [r["epoch"] for r in history.distill] == [1, 2, 3]
    assert history.kept["distill"] == {"epoch": 3, "by": "mean_agreement", "value": history.kept["distill"]["value"],
                                          "epochs_run": 3, "stopped_early": True}
    assert any("stopped after epoch 3" in line for line in lines)
    with pytest.raises(ValueError, match="patience must be a positive integer"):
        TrainConfig(patience=0)


def test_scorer_exits_early_at_nearly_the_same_accuracy(trained):
    full = Scorer(trained.model, precision="fp32", speed=0.0, micro_batch=32, device="cpu")
    fast = Scorer(trained.model, precision="fp32", speed=0.5, micro_batch=32, device="cpu")
    full_predictions = full(trained.val_texts).column("prediction").to_pylist()
    fast_predictions = fast(trained.val_texts).column("prediction").to_pylist()
    # string labels round-trip: the Scorer answers with the names the labels were given as
    assert set(full_predictions) | set(fast_predictions) <= set(LABELS)
    full_accuracy = accuracy(full_predictions, trained.val_labels)
    fast_accuracy = accuracy(fast_predictions, trained.val_labels)
    assert full_accuracy >= 0.9
    assert fast_accuracy >= full_accuracy - 0.05
    assert fast.stats.flops < 0.8 * full.stats.flops
    assert fast.stats.exit_counts[0] > 0


def test_calibration_fits_each_student_to_the_teacher_and_travels_with_the_model(trained, tmp_path):
    """``calibrate`` gives each student the temperature under which it best predicts the
    teacher's answers (a student 4x more confident gets a 4x higher one, to the grid's step),
    the teacher 1, or with labels the one that fits them; exits then read the tempered logits, in the table's pass and in the engine
    alike; the temperatures are saved with the model, and training again drops them."""
    model = tiny_model(labels=LABELS, seed=0)
    model.load_state_dict(trained.model.state_dict())
    rng = np.random.default_rng(5)  # both cue words: rows on which the exits may disagree
    mixed = [" ".join(rng.permutation(["good", "bad", *rng.choice(FILLER, size=int(rng.integers(0, 6)))]))
             for _ in range(128)]
    texts, labels = trained.val_texts + mixed, trained.val_labels + trained.val_labels
    raw = model(**next(iter(batches(model, texts[:16])))).logits  # (L, 16, N)
    first = calibrate(model, texts)
    assert len(first) == 3 and first[-1] == 1.0 and model.config.exit_temperatures == first
    assert 0.05 < first[0] < 20.0  # inside the grid: a fitted value, not a bound
    tempered = model(**next(iter(batches(model, texts[:16])))).logits
    assert torch.allclose(tempered, raw / torch.tensor(first)[:, None, None])
    with torch.no_grad():  # student 1 four times as sure of every answer
        model.branches[0].classifier.weight.mul_(4)
        model.branches[0].classifier.bias.mul_(4)
    again = calibrate(model, texts)
    step = TEMPERATURES[1] / TEMPERATURES[0]
    assert 4 / step <= again[0] / first[0] <= 4 * step and again[1:] == first[1:]

    # with labels the teacher's temperature is fitted to them: the students' stay, no answer changes,
    # and a teacher four times as sure gets four times the temperature
    everything = lambda: next(iter(batches(model, texts, batch_size=len(texts))))  # noqa: E731
    with torch.no_grad():
        answers = model(**everything()).logits.argmax(-1)  # (L, R)
        saved, model.config.exit_temperatures = model.config.exit_temperatures, None
        teacher = model(**everything()).logits[-1]  # (R, N) untempered, in the texts' order
        model.config.exit_temperatures = saved
    target = torch.tensor([model.config.labels.index(label) for label in labels])  # (R,)
    best = TEMPERATURES[int(np.argmin([float(torch.nn.functional.cross_entropy(teacher / t, target))
                                       for t in TEMPERATURES]))]
    for wrong in (labels[:-1], labels + labels[:1]):  # one label short, one too many
        with pytest.raises(ValueError, match="texts but"):
            calibrate(model, texts, wrong)
        with pytest.raises(ValueError, match="texts but"):
            all_exits(model, texts, wrong)
    with_labels = calibrate(model, texts, labels)
    assert with_labels[:-1] == again[:-1] and with_labels[-1] == best and 0.05 < best < 5.0
    with torch.no_grad():
        assert torch.equal(model(**everything()).logits.argmax(-1), answers)
    with torch.no_grad():
        model.branches[-1].classifier.weight.mul_(4)
        model.branches[-1].classifier.bias.mul_(4)
    sharper = calibrate(model, texts, labels)
    assert 4 / step <= sharper[-1] / with_labels[-1] <= 4 * step and sharper[:-1] == again[:-1]
    calibrate(model, texts)  # the teacher back at 1
    with torch.no_grad():
        model.branches[-1].classifier.weight.div_(4)
        model.branches[-1].classifier.bias.div_(4)

    model.save_pretrained(str(tmp_path / "m"))
    loaded = FastBert.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.exit_temperatures == again
    exits = all_exits(loaded, texts, labels, batch_size=16)
    for speed in (0.05, 0.3, 0.7):
        scorer = Scorer(loaded, precision="fp32", speed=speed, micro_batch=7)
        scorer(texts)
        assert scorer.stats.exit_counts == at_speed(exits, loaded, speed).exit_counts
    set_stage(loaded, "distill")
    assert loaded.config.exit_temperatures is None  # fitted to weights that are about to change


def test_each_stage_schedule_reaches_zero_exactly_at_its_end(trained):
    for stage in ("finetune", "distill"):
        lrs = [r["lr"] for r in getattr(trained.history, stage)]
        assert all(lr > 0 for lr in lrs[:-1]), (stage, lrs)
        assert lrs[-1] == 0.0, (stage, lrs)


# -- what each stage trains -------------------------------------------------------------------


def small_batches(model, n: int = 48, seed: int = 0, labelled: bool = True) -> list[dict]:
    texts, labels = toy_task(np.random.default_rng(seed), n)
    return list(batches(model, texts, labels if labelled else None, batch_size=16))


@pytest.mark.parametrize("kl", ["paper", "reverse"])
def test_distill_keeps_backbone_and_teacher_bitwise_unchanged(kl):
    model = tiny_model(labels=LABELS, seed=1)
    data = small_batches(model, labelled=False)
    config = TrainConfig(kl=kl, **FAST)
    before = parts(model)
    params = set_stage(model, "distill")
    optimizer, scheduler = make_optimizer(params, 1e-2, 0.1, total_steps=len(data), warmup=0.0)
    stats = train_epoch(model, data, optimizer, scheduler, "distill", config)
    assert stats.steps == len(data) and stats.samples == 48 and math.isfinite(stats.loss)
    after = parts(model)
    assert unchanged(before["backbone"], after["backbone"])
    assert unchanged(before["teacher"], after["teacher"])
    assert not unchanged(before["students"], after["students"])
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.branches[-1].parameters())


def test_saved_optimizer_state_resumes_exactly_where_training_stopped(tmp_path):
    """Epoch 2 after a save/load of the optimizer equals epoch 2 of an uninterrupted run
    (AdamW's moments and the schedule's position both matter: fresh ones give other weights)."""
    data = small_batches(tiny_model(labels=LABELS, seed=1))

    def fresh(state=None):
        model = tiny_model(labels=LABELS, seed=1)
        if state is not None:
            model.load_state_dict(state)
        params = set_stage(model, "finetune")
        optimizer, scheduler = make_optimizer(params, 1e-2, 0.1, total_steps=2 * len(data), warmup=0.2,
                                              head_params=model.branches[-1].parameters(), head_lr=3e-2)
        return model, optimizer, scheduler

    def second_epoch(model, optimizer, scheduler):
        torch.manual_seed(5)  # the same dropout masks
        train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig(**FAST))
        return {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = fresh()
    train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig(**FAST))
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    save_optimizer(optimizer, scheduler, str(tmp_path))
    lr_after_one = scheduler.get_last_lr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    uninterrupted = second_epoch(model, optimizer, scheduler)

    resumed = fresh(after_one)
    assert load_optimizer(resumed[1], resumed[2], str(tmp_path))
    assert resumed[2].get_last_lr() == lr_after_one
    assert all(torch.equal(uninterrupted[k], v) for k, v in second_epoch(*resumed).items())

    restarted = fresh(after_one)  # same weights, but fresh moments and schedule: not the same
    assert not all(torch.equal(uninterrupted[k], v) for k, v in second_epoch(*restarted).items())
    assert not load_optimizer(restarted[1], restarted[2], str(tmp_path / "nothing"))


def test_optimizer_state_for_other_parameters_is_refused(tmp_path):
    model = tiny_model(labels=LABELS, seed=1)
    optimizer, scheduler = make_optimizer(set_stage(model, "finetune"), 1e-2, 0.1, total_steps=4, warmup=0.0)
    save_optimizer(optimizer, scheduler, str(tmp_path))
    other, other_scheduler = make_optimizer(set_stage(model, "distill"), 1e-2, 0.1, total_steps=4, warmup=0.0)
    with pytest.raises(ValueError, match="other parameters"):
        load_optimizer(other, other_scheduler, str(tmp_path))


def test_finetune_leaves_the_students_unchanged():
    model = tiny_model(labels=LABELS, seed=1)
    data = small_batches(model)
    before = parts(model)
    params = set_stage(model, "finetune")
    optimizer, scheduler = make_optimizer(params, 1e-2, 0.1, total_steps=len(data), warmup=0.0)
    train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig(**FAST))
    after = parts(model)
    assert unchanged(before["students"], after["students"])
    assert not unchanged(before["backbone"], after["backbone"])
    assert not unchanged(before["teacher"], after["teacher"])


def test_set_stage_modes_and_parameters():
    model = tiny_model(labels=LABELS, seed=1)
    student_params = {id(p) for b in model.branches[:-1] for p in b.parameters()}
    params = set_stage(model, "distill")
    assert {id(p) for p in params} == student_params
    assert not model.backbone.training and not model.branches[-1].training
    assert all(b.training for b in model.branches[:-1])
    params = set_stage(model, "finetune")
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} - student_params
    assert model.backbone.training and model.branches[-1].training
    with pytest.raises(ValueError, match="stage must be one of"):
        set_stage(model, "pretrain")


def test_label_trained_students_learn_the_labels_on_a_frozen_backbone():
    """The ablation's baseline (c), benchmarks.baselines.train_label_students: the students
    learn the labels themselves, the backbone and teacher stay as they were."""
    from benchmarks.baselines import train_label_students

    rng = np.random.default_rng(2)
    train_texts, train_labels = toy_task(rng, 256)
    val_texts, val_labels = toy_task(rng, 128)
    as_ints = lambda labels: [LABELS.index(label) for label in labels]  # noqa: E731  labels as indices
    model = tiny_model(labels=LABELS, seed=2)
    before = parts(model)
    train_label_students(model, train_texts, as_ints(train_labels), epochs=6, lr=FAST["distill_lr"], batch_size=16,
                         seed=2)
    stats = evaluate(model, batches(model, val_texts, as_ints(val_labels)))
    assert stats.exit_accuracy[0] >= 0.85  # students learnt the labels ...
    after = parts(model)
    assert unchanged(before["backbone"], after["backbone"])  # ... on a frozen random backbone
    assert unchanged(before["teacher"], after["teacher"])


# -- the distillation schedule ----------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0.0, 0.1])
def test_distill_learning_rate_is_positive_until_the_last_step_and_zero_after(warmup):
    model = tiny_model(labels=LABELS, seed=3)
    data = small_batches(model, n=64, labelled=False)  # 4 batches
    epochs = 3
    params = set_stage(model, "distill")
    optimizer, scheduler = make_optimizer(params, 2e-4, 0.01, total_steps=epochs * len(data), warmup=warmup)
    lrs: list[float] = []
    for _ in range(epochs):
        train_epoch(model, recording(data, optimizer, lrs), optimizer, scheduler, "distill", TrainConfig())
    assert len(lrs) == 12
    warm = int(warmup * 12)  # the transformers schedule spends its first warm-up step at lr 0
    assert all(lr == 0.0 for lr in lrs[:warm]) and all(lr > 0 for lr in lrs[warm:]), lrs
    assert max(lrs) == pytest.approx(2e-4)
    assert lrs[-1] > 0 and optimizer.param_groups[0]["lr"] == 0.0  # zero exactly after the last step
    decay = lrs[warm:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # linear decay, never flat at 0 early


def test_weight_decay_skips_biases_and_layer_norms():
    model = tiny_model(labels=LABELS)
    optimizer, _ = make_optimizer(set_stage(model, "finetune"), 1e-3, 0.05, total_steps=10, warmup=0.1)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(model.backbone.embeddings.LayerNorm.weight)] == 0.0
    assert decays[id(model.branches[-1].classifier.bias)] == 0.0
    assert decays[id(model.branches[-1].classifier.weight)] == 0.05
    assert decays[id(model.backbone.embeddings.word_embeddings.weight)] == 0.05


# -- helpers: batches, evaluate, autocast ----------------------------------------------


def test_batches_pad_to_the_longest_and_truncate():
    model = tiny_model(labels=LABELS, max_length=5)
    batch = next(batches(model, ["good", "bad w1 w2 w3 w4 w5 w6"], labels=["pos", 0]))
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 3:].tolist() == [model.tokenizer.pad_token_id] * 2  # padded on the right
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64
    assert "labels" not in next(batches(model, ["good"]))
    with pytest.raises(TypeError, match=r"texts\[1\] is not a string"):
        batches(model, ["good", None])


def test_batches_are_seeded_and_cover_every_row():
    model = tiny_model(labels=LABELS)
    texts = [f"w{i}" for i in range(10)]
    labels = [i % 2 for i in range(10)]
    first = [b["labels"].tolist() for b in batches(model, texts, labels, batch_size=4, shuffle=True, seed=5)]
    again = [b["labels"].tolist() for b in batches(model, texts, labels, batch_size=4, shuffle=True, seed=5)]
    assert first == again and [len(b) for b in first] == [4, 4, 2]
    ids = torch.cat([b["input_ids"][:, 1] for b in batches(model, texts, batch_size=4, shuffle=True, seed=5)])
    assert sorted(ids.tolist()) == sorted(model.tokenizer.convert_tokens_to_ids(texts))
    in_order = torch.cat([b["input_ids"][:, 1] for b in batches(model, texts, batch_size=4)])
    assert in_order.tolist() == model.tokenizer.convert_tokens_to_ids(texts)


def test_evaluate_restores_the_training_flags():
    model = tiny_model(labels=LABELS)
    set_stage(model, "distill")
    flags = [m.training for m in model.modules()]
    stats = evaluate(model, small_batches(model, n=20))
    assert [m.training for m in model.modules()] == flags
    assert stats.samples == 20 and len(stats.exit_accuracy) == len(stats.agreement) == 3
    unlabelled = evaluate(model, small_batches(model, n=20, labelled=False))
    assert math.isnan(unlabelled.teacher_accuracy) and unlabelled.agreement[-1] == 1.0


def test_train_epoch_in_bfloat16_autocast_and_logging():
    model = tiny_model(labels=LABELS, seed=4)
    data = small_batches(model)
    optimizer, scheduler = make_optimizer(set_stage(model, "finetune"), 1e-3, 0.01, len(data), 0.0)
    logged: list[tuple[int, float, float]] = []
    stats = train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig(log_every=1),
                        precision="bf16", log=lambda *args: logged.append(args))
    assert math.isfinite(stats.loss) and stats.samples_per_s > 0
    assert [step for step, _, _ in logged] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss, _ in logged)


# -- bad input --------------------------------------------------------------------------------


def test_unknown_label_names_it_and_lists_the_known_ones():
    model = tiny_model(labels=LABELS)
    with pytest.raises(ValueError, match=r"unknown label 'positive'.*\['neg', 'pos'\]"):
        batches(model, ["good", "bad"], ["positive", "neg"])  # checked before the first batch
    with pytest.raises(ValueError, match=r"unknown label 'positive'.*\['neg', 'pos'\]"):
        fit(model, ["good"], ["positive"], ["bad"], ["neg"], TrainConfig(), log=None)
    with pytest.raises(ValueError, match="label index 2"):
        batches(model, ["good"], [2])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        batches(model, ["good", "bad"], ["pos"])


def test_finetuning_without_labels_is_a_clear_error():
    model = tiny_model(labels=LABELS)
    data = small_batches(model, n=16, labelled=False)
    optimizer, scheduler = make_optimizer(set_stage(model, "finetune"), 1e-3, 0.01, 1, 0.0)
    with pytest.raises(ValueError, match="finetune stage needs batches with 'labels'"):
        train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig())
    with pytest.raises(ValueError, match="fit needs validation texts"):
        fit(model, ["good"], ["pos"], [], [], TrainConfig(), log=None)


def test_stage_two_without_unlabelled_texts_distils_on_views_of_the_training_texts():
    texts, labels = toy_task(np.random.default_rng(3), 48)
    for views in (1, 3):
        model = tiny_model()
        result = fit(model, texts, labels, texts[:16], labels[:16],
                     TrainConfig(epochs=1, distill_epochs=1, distill_views=views, **FAST), log=None)
        expected = distillation_views(model.tokenizer, texts, views, model.config.max_length)
        assert result.distill[0]["samples"] == len(expected) and result.finetune[0]["samples"] == len(texts)
    assert len(expected) > 2 * len(texts)  # the toy texts have 3-13 words: most get two spans


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": -1}, "epochs and distill_epochs must be >= 0"),
        ({"batch_size": 0}, "batch_size, log_every and distill_views must be >= 1"),
        ({"distill_views": 0}, "batch_size, log_every and distill_views must be >= 1"),
        ({"lr": 0.0}, "lr and distill_lr must be > 0"),
        ({"warmup": 1.0}, r"warmup is a fraction .* \[0, 1\)"),
        ({"kl": "forward"}, "TrainConfig.kl must be one of 'paper', 'reverse', got 'forward'"),
        ({"lr": "1e-4"}, "TrainConfig.lr must be a number, got '1e-4'"),
        ({"patience": 0}, "patience must be a positive integer or None"),
        ({"epochs": 1.5}, "TrainConfig.epochs must be an integer"),
        ({"max_grad_norm": -1.0}, "weight_decay and max_grad_norm must be >= 0"),
    ],
)
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_head_lr_applies_to_the_teacher_only():
    model = tiny_model()
    params = set_stage(model, "finetune")
    optimizer, _ = make_optimizer(params, 1e-4, 0.01, 10, 0.0, head_params=model.branches[-1].parameters(),
                                  head_lr=1e-3)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {lr_of[id(p)] for p in model.branches[-1].parameters()} == {1e-3}
    assert {lr_of[id(p)] for p in model.backbone.parameters()} == {1e-4}
    assert len(lr_of) == len(params)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_weights(precision):
    """bf16/fp16 autocast: the forward runs in reduced precision, the weights, their updates
    and the loss stay fp32 (fp16 with loss scaling, a no-op where the scaler is off), and
    fine-tuning learns the toy task as in fp32."""
    model = tiny_model(labels=LABELS, seed=1)
    data = small_batches(model, n=96)
    params = set_stage(model, "finetune")
    optimizer, scheduler = make_optimizer(params, 1e-2, 0.1, total_steps=6 * len(data), warmup=0.0,
                                          head_params=model.branches[-1].parameters(), head_lr=3e-2)
    losses = [train_epoch(model, data, optimizer, scheduler, "finetune", TrainConfig(**FAST), precision=precision).loss
              for _ in range(6)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
