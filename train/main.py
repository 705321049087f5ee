"""istanas_tf command line: flags in, library call out.

  python train/main.py --flagfile=train/configs/cifar10_two_stage_cpu.cfg
  python train/main.py --mode=describe --genotype=ISTA_twostage

Every flag is defined here (and only here); the library takes typed configs.
"""

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

MODES = ("describe",)


def define_flags():
    """Defines the flags (in a function so tests can import this module)."""
    flags.DEFINE_enum("mode", "describe", MODES, "What to run.")
    flags.DEFINE_string("genotype", "ISTA_twostage",
                        "A named genotype or the path of a genotype .json file.")
    flags.DEFINE_string("dataset", "cifar10",
                        "cifar10 | cifar100 | imagenet2012 (alias imagenet).")
    flags.DEFINE_integer("init_channels", None,
                         "Initial channels C (default: 36 CIFAR, 48 ImageNet).")
    flags.DEFINE_integer("layers", None, "Number of cells (default: 20 CIFAR, 14 ImageNet).")
    flags.DEFINE_boolean("auxiliary", False, "Auxiliary head after cell 2*layers//3.")
    flags.DEFINE_boolean("bn_after_param_free_ops", False,
                         "BN after pooling and identity ops (one-stage networks).")


_DESCRIBE_DATASETS = {"cifar10": ("cifar", 10), "cifar100": ("cifar", 100),
                      "imagenet2012": ("imagenet", 1000), "imagenet": ("imagenet", 1000)}


def run_describe(FLAGS):
    from istanas_tf import networks
    if FLAGS.dataset not in _DESCRIBE_DATASETS:
        raise ValueError(f"--dataset={FLAGS.dataset!r} is not supported by --mode=describe; "
                         f"valid: {', '.join(_DESCRIBE_DATASETS)}")
    family, num_classes = _DESCRIBE_DATASETS[FLAGS.dataset]
    summary = networks.describe(
        FLAGS.genotype, family, num_classes, channels=FLAGS.init_channels,
        layers=FLAGS.layers, auxiliary=FLAGS.auxiliary,
        bn_after_param_free_ops=FLAGS.bn_after_param_free_ops)
    print(json.dumps(summary))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    try:
        {"describe": run_describe}[FLAGS.mode](FLAGS)
    except (ValueError, FileNotFoundError) as error:
        # Library errors name the flag, file or value: show them without a stack trace.
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
