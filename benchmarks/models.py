"""The benchmarks' cached models: the demo's recipe (its data sample and settings) trained
in this process with ``pipeline.train.fit``, without Ray."""

from __future__ import annotations

import os

import numpy as np

from jobs.demo import DemoConfig
from pipeline.datasets import load_bundled
from pipeline.model import FastBert
from pipeline.tradeoff import calibrate, tradeoff_table
from pipeline.train import TrainConfig, fit


def train_model(config: DemoConfig, log=print) -> FastBert:
    """Fine-tune and self-distil ``config.backbone`` on the bundled data set's training split;
    saved to ``OUTPUT/model`` and returned."""
    rng = np.random.default_rng(config.seed)
    train = load_bundled(config.dataset, "train")
    order = rng.permutation(train.num_rows)
    texts, labels = train["text"].to_pylist(), train["label"].to_pylist()
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    train_texts, train_labels = pick(order[: config.train_rows])
    val_texts, val_labels = pick(order[config.train_rows : config.train_rows + config.validation_rows])

    model = FastBert.from_backbone(config.backbone, labels=sorted(set(labels)), max_length=config.max_length)
    log(f"training on {len(train_texts)} rows of {config.dataset} ({len(model.config.labels)} labels), "
        f"validating on {len(val_texts)}: {config.epochs} fine-tuning + {config.distill_epochs} distillation epochs")
    train_config = TrainConfig(epochs=config.epochs, lr=config.lr, head_lr=config.head_lr,
                               distill_epochs=config.distill_epochs,
                               distill_lr=config.distill_lr, distill_views=config.distill_views,
                               batch_size=config.batch_size, seed=config.seed,
                               log_every=10)
    fit(model, train_texts, train_labels, val_texts, val_labels, train_config, log=log)
    calibrate(model, val_texts, val_labels)  # as the training job does
    model.tradeoff = tradeoff_table(model, val_texts, val_labels, data=f"{len(val_texts)} {config.dataset} "
                                    "training rows held out for validation")
    model.save_pretrained(os.path.join(config.output, "model"))
    return model
