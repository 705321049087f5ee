"""Input pipeline throughput on a CIFAR-10 image folder (``--folder``).

Measures, on this machine's CPUs:

* the first pass: listing, decoding and validating every image of both splits into
  memory and computing the normalisation statistics (``get_dataset_info``), with an
  empty statistics cache;
* steady-state images/s, after a warm-up, of the training pipelines at the paper's
  settings (two-stage search: batch 256 of the weight half, pad-crop, flip, normalise;
  evaluation training: batch 96, the same plus cutout 16; shuffled, deterministic
  order) and of the evaluation pipeline on the test split.

Command (from the repository root; about 1 minute on 2 cores):

    python benchmarks/data_benchmark.py --folder PATH/TO/cifar10

where ``PATH/TO/cifar10`` holds ``train/<class>/*.png`` and ``test/<class>/*.png``
(JPEG works too).

Options: ``--max_examples_per_class N`` for a subset, ``--batch_size``, ``--steps``.
Prints a markdown table.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from istanas_tf import data  # noqa: E402


def _images_per_second(dataset, steps: int, warmup: int) -> tuple[float, int]:
    """Images/s over ``steps`` batches after ``warmup`` batches (excluded)."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch, _ = next(iterator)
        images += int(batch.shape[0])
    return images / (time.perf_counter() - start), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--folder", required=True, help="CIFAR-10 image folder: train/<class>/, test/<class>/"
    )
    parser.add_argument("--max_examples_per_class", type=int, default=0)
    parser.add_argument(
        "--batch_size", type=int, default=0, help="override every row's batch size (0: the paper's)"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        config = data.DataConfig(
            dataset=f"folder:{args.folder}",
            data_dir=cache_dir,
            seed=0,
            deterministic=True,
            cutout_length=16,
            max_examples_per_class=args.max_examples_per_class,
        )
        start = time.perf_counter()
        info = data.get_dataset_info(config)
        seconds = time.perf_counter() - start
        decoded = info.num_train + info.num_test
        rows.append(
            (
                "first pass: list + decode + validate + statistics (get_dataset_info)",
                "-",
                decoded,
                decoded / seconds,
            )
        )

        # The paper's settings: two-stage search batches of 256 from the weight half
        # (no cutout); evaluation training batches of 96 with cutout 16 (docs/method.md 3-5).
        for name, split, training, batch_size, cutout in (
            ("search_weights: pad-crop, flip, normalise", "search_weights", True, 256, False),
            ("train: pad-crop, flip, normalise, cutout 16", "train", True, 96, True),
            ("train: pad-crop, flip, normalise, cutout 16", "train", True, 256, True),
            ("test: normalise (evaluation order)", "test", False, 256, False),
        ):
            batch_size = args.batch_size or batch_size
            dataset = data.make_dataset(
                config,
                info,
                split,
                training=training,
                batch_size=batch_size,
                cutout=cutout,
                repeat=True,
            )
            rate, images = _images_per_second(dataset, args.steps, args.warmup)
            rows.append((name, batch_size, images, rate))

    print(
        f"\nCIFAR-10 folder {args.folder}: {info.num_train} train / {info.num_test} test "
        f"images, {os.cpu_count()} CPUs\n"
    )
    print("| pipeline | batch | images | images/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, batch, images, rate in rows:
        print(f"| {name} | {batch} | {images} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
