"""istanas_tf command line: flags in, one library call per mode, a JSON result out.

  python train/main.py --flagfile=train/configs/cifar10_two_stage_cpu.cfg
  python train/main.py --mode=describe --genotype=ISTA_twostage

The flags and the configs they make are in ``train/cli_flags.py``; every default is in the
library's config dataclasses. Install the package first (``pip install -e .``).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN CPU kernels, which TF turns on by itself only on CPUs with AVX-512
# or AMX: on an AVX2 CPU they make the search step ~1.4x and the training step ~1.8x
# faster (WORKSPACE.md). Read once, when TensorFlow starts; TF_ENABLE_ONEDNN_OPTS=0 keeps
# TF's own kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import cli_flags  # noqa: E402  (train/cli_flags.py, beside this file)
from absl import app, logging  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

from istanas_tf import diagram, network_size  # noqa: E402
from istanas_tf.training import config as config_lib  # noqa: E402
from istanas_tf.training import evaluate, one_stage, restore, retrain, state, steps, two_stage  # noqa: E402

_DESCRIBE_DATASETS = {
    "cifar10": ("cifar", 10),
    "cifar100": ("cifar", 100),
    "imagenet2012": ("imagenet", 1000),
    "imagenet": ("imagenet", 1000),
}
EVAL_BATCH_SIZE = 256


def _checked(FLAGS, config):
    """``config`` once its run directory is given and its settings are valid."""
    if not config.model_dir:
        raise ValueError(f"--model_dir is required for --mode={FLAGS.mode} (the run directory)")
    config.validate()
    return config


def run_search(FLAGS):
    config = _checked(FLAGS, cli_flags.search_config(FLAGS))
    one = isinstance(config, config_lib.OneStageConfig)
    run = one_stage.run_one_stage if one else two_stage.run_two_stage
    return run(config, flags_text=cli_flags.flags_text(FLAGS))


def run_train(FLAGS):
    config = _checked(FLAGS, cli_flags.build_config(config_lib.TrainConfig, FLAGS))
    return retrain.run_training(config, flags_text=cli_flags.flags_text(FLAGS))


def run_eval(FLAGS):
    if not FLAGS.model_dir and not FLAGS.saved_model:
        raise ValueError(
            "--mode=eval needs --model_dir (a run directory with a checkpoint) "
            "or --saved_model (an exported SavedModel version directory)"
        )
    batch_size = EVAL_BATCH_SIZE if FLAGS.batch_size is None else FLAGS.batch_size
    return evaluate.evaluate(
        cli_flags.data_config(FLAGS),
        split=FLAGS.split,
        model_dir=FLAGS.model_dir,
        saved_model=FLAGS.saved_model,
        batch_size=batch_size,
    )


def run_export(FLAGS):
    config = cli_flags.build_config(config_lib.TrainConfig, FLAGS)  # export_dir, model_name
    if not config.model_dir:
        raise ValueError(
            "--mode=export needs --model_dir (a --mode=train run, or a "
            "--method=ista_onestage run whose search has ended)"
        )
    return restore.export_run(
        config.model_dir,
        export_dir=config.export_dir,
        model_name=config.model_name,
        version=FLAGS.version,
        overwrite=FLAGS.overwrite,
    )


def run_describe(FLAGS):
    # The network settings of a retraining, with their defaults.
    config = cli_flags.build_config(config_lib.TrainConfig, FLAGS)
    if config.data.dataset not in _DESCRIBE_DATASETS:
        raise ValueError(
            f"--dataset={config.data.dataset!r} is not supported by "
            f"--mode=describe; valid: {', '.join(_DESCRIBE_DATASETS)}"
        )
    family, num_classes = _DESCRIBE_DATASETS[config.data.dataset]
    genotype = config_lib.resolve_genotype(config)
    summary = network_size.describe(
        genotype,
        family,
        num_classes,
        channels=config.channels,
        layers=config.layers,
        auxiliary=config.auxiliary,
        bn_after_param_free_ops=config.bn_after_param_free_ops,
    )
    if FLAGS.diagram:
        diagram.save_genotype_diagram(genotype, FLAGS.diagram, title=config.genotype)
        summary["diagram"] = FLAGS.diagram
    return summary


MODES = {
    "search": run_search,
    "train": run_train,
    "eval": run_eval,
    "export": run_export,
    "describe": run_describe,
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = absl_flags.FLAGS
    try:
        result = MODES[FLAGS.mode](FLAGS)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        steps.NonFiniteLossError,
        state.DivergedError,
    ) as error:
        # Library errors name the flag, file or value: show them without a stack trace.
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    cli_flags.define_flags()
    app.run(main)
