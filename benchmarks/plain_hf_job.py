"""The baseline users run today: a Ray Data job that maps a plain Hugging Face
``BertForSequenceClassification`` over Parquet, the way Ray's batch-inference docs show it
(a callable class: model and tokenizer loaded in ``__init__``, a padded batch through the
whole model in ``__call__``; ``read_parquet`` -> ``map_batches`` on an actor pool ->
``write_parquet``). Every row runs all layers; there is no early exit and no length sorting.

One change from the docs: Ray 2.60's Parquet reader packs several files into one block, which
would feed a single actor, so the rows are cut into blocks of ``--batch-size`` first
(``repartition``); without it the baseline would use one replica.

    python -m benchmarks.plain_hf_job --model-dir HF_FOLDER --input DIR --output DIR \\
        [--replicas 2] [--threads-per-replica 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


class HuggingFaceClassifier:
    def __init__(self, model_dir: str, threads: int, max_length: int):
        from transformers import AutoTokenizer, BertForSequenceClassification

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = BertForSequenceClassification.from_pretrained(model_dir).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self.tokenizer(list(batch["text"]), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        with torch.inference_mode():
            probabilities = self.model(**inputs).logits.softmax(-1).numpy()  # (B, N)
        batch["prediction"] = np.array([self.labels[i] for i in probabilities.argmax(-1)])
        batch["probabilities"] = list(probabilities)
        return batch


def main(argv: list[str] | None = None) -> dict:
    import ray

    from pipeline.ray_init import init_ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a BertForSequenceClassification folder")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)

    init_ray(dashboard=False)  # as jobs.score starts it
    start = time.perf_counter()
    ds = ray.data.read_parquet(args.input).repartition(target_num_rows_per_block=args.batch_size)
    ds = ds.map_batches(HuggingFaceClassifier, batch_size=args.batch_size, num_cpus=1,
                        fn_constructor_kwargs={"model_dir": args.model_dir, "threads": args.threads_per_replica,
                                               "max_length": args.max_length},
                        compute=ray.data.ActorPoolStrategy(size=args.replicas))
    ds.write_parquet(args.output)
    seconds = time.perf_counter() - start
    rows = ray.data.read_parquet(args.output).count()
    summary = {"rows_out": rows, "wall_seconds": seconds, "rows_per_s": rows / seconds}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
