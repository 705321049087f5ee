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

MODES = ("search", "train", "eval", "export", "describe")


def define_flags():
    """Defines the flags (in a function so tests can import this module)."""
    flags.DEFINE_enum("mode", "search", MODES, "What to run.")
    # Network and genotype.
    flags.DEFINE_string("genotype", "ISTA_twostage",
                        "describe: a named genotype or the path of a genotype .json file.")
    flags.DEFINE_integer("init_channels", None,
                         "Initial channels C (default: search 16; describe 36 CIFAR, "
                         "48 ImageNet).")
    flags.DEFINE_integer("layers", None,
                         "Cells (default: search 8; describe 20 CIFAR, 14 ImageNet).")
    flags.DEFINE_boolean("auxiliary", False, "Auxiliary head after cell 2*layers//3.")
    flags.DEFINE_boolean("bn_after_param_free_ops", False,
                         "BN after pooling and identity ops (one-stage networks).")
    flags.DEFINE_string("diagram", None, "describe: also write the cells' diagram (PNG) here.")
    # Search.
    flags.DEFINE_enum("method", "ista", ["ista", "darts", "ista_onestage"],
                      "search: ista (two-stage ISTA-NAS), darts (dense first-order DARTS) "
                      "or ista_onestage (search and train the target network in one run, "
                      "then absorb and export).")
    flags.DEFINE_integer("search_epochs", 600,
                         "ista_onestage: the most search epochs (the search ends earlier "
                         "when every node has frozen; nodes still searching at the cap are "
                         "frozen at their last z).")
    flags.DEFINE_integer("max_params", 3_700_000,
                         "ista_onestage: reject a recovered architecture whose evaluation "
                         "network (auxiliary head excluded) has this many parameters or "
                         "more, keeping the last one.")
    flags.DEFINE_float("freeze_tolerance", 1e-3,
                       "ista_onestage: a node stops searching when its recovered z moves by "
                       "at most this (L2) in an epoch.")
    flags.DEFINE_string("model_dir", None, "Run directory; rerunning the command resumes.")
    flags.DEFINE_integer("epochs", None, "Epochs (default: search 50, train 600; "
                         "ista_onestage: training epochs after the search, 600).")
    flags.DEFINE_integer("batch_size", None,
                         "Global batch size over all replicas (default: search 256, train "
                         "and ista_onestage 96).")
    flags.DEFINE_float("learning_rate", None,
                       "Peak weight lr (default: search 0.1, train and ista_onestage 0.025).")
    flags.DEFINE_float("learning_rate_min", None,
                       "Weight lr at the last epoch (default: search and ista_onestage "
                       "0.001, train 0).")
    flags.DEFINE_float("momentum", 0.9, "Weight SGD momentum.")
    flags.DEFINE_float("weight_decay", 3e-4, "L2 added to the weight gradients.")
    # Retraining a genotype (--mode=train) and evaluation (--mode=eval).
    flags.DEFINE_float("auxiliary_weight", 0.4, "train: weight of the auxiliary loss.")
    flags.DEFINE_float("drop_path_prob", 0.2, "train: drop path rate at the last epoch.")
    flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "warmup_linear"],
                      "train: cosine (CIFAR) or 5-epoch warm-up then linear decay (ImageNet).")
    flags.DEFINE_integer("warmup_epochs", 5, "train: warm-up epochs of warmup_linear.")
    flags.DEFINE_float("label_smoothing", 0.0, "train: label smoothing (ImageNet 0.1).")
    flags.DEFINE_enum("mixed_precision", None, ["float16", "bfloat16"],
                      "Mixed precision policy (float16 scales the loss of every optimizer).")
    flags.DEFINE_boolean("jit_compile", False, "train: XLA-compile the training step.")
    flags.DEFINE_string("export_dir", None,
                        "train, ista_onestage, export: SavedModel root (default "
                        "MODEL_DIR/export).")
    flags.DEFINE_string("model_name", "istanas", "SavedModel name (TF Serving).")
    flags.DEFINE_integer("version", None,
                         "export: SavedModel version (default: one more than the largest).")
    flags.DEFINE_boolean("overwrite", False,
                         "export: replace an existing SavedModel version directory.")
    flags.DEFINE_string("saved_model", None,
                        "eval: a SavedModel version directory to evaluate instead of "
                        "--model_dir's checkpoint.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "eval: the split to evaluate.")
    flags.DEFINE_float("grad_clip", 5.0, "Global-norm clipping of the weight gradients.")
    flags.DEFINE_float("arch_learning_rate", None,
                       "Architecture Adam lr (default: search 6e-4, ista_onestage 3e-4).")
    flags.DEFINE_float("arch_weight_decay", 1e-3, "L2 added to the architecture gradients.")
    flags.DEFINE_integer("proj_dims", 7, "Rows m of each node's random matrix A.")
    flags.DEFINE_integer("sparseness", 2, "Ops kept per node (k).")
    flags.DEFINE_float("lam", 1e-5, "LASSO penalty of the recovery.")
    flags.DEFINE_boolean("distinct_inputs", False,
                         "A node's picks must read different predecessors.")
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "tf.distribute strategy (multi_worker reads TF_CONFIG).")
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on training steps per epoch.")
    flags.DEFINE_integer("eval_steps", None,
                         "Cap on evaluation steps per epoch (0: no evaluation).")
    flags.DEFINE_boolean("progress", True, "Progress bar within each epoch.")
    # Data.
    flags.DEFINE_string("dataset", "cifar10",
                        "cifar10 | cifar100 | imagenet2012 | folder:PATH "
                        "(PATH/<split>/<class>/*.jpg|png).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
    flags.DEFINE_string("manual_dir", None, "Manual download directory (imagenet2012).")
    flags.DEFINE_float("train_portion", 0.5,
                       "Fraction of the training split that trains the weights; the rest "
                       "trains the architecture.")
    flags.DEFINE_integer("cutout_length", 0, "Cutout square side (0: off).")
    flags.DEFINE_boolean("deterministic", False, "Reproducible data order and kernels.")
    flags.DEFINE_integer("seed", 0, "Seed of A, b, the weights and the data order.")
    flags.DEFINE_boolean("skip_corrupt_images", False,
                         "Skip (and count) unreadable images instead of failing.")
    flags.DEFINE_list("mean", None, "Per-channel mean override (3 floats, 0-1 scale).")
    flags.DEFINE_list("std", None, "Per-channel std override (3 floats, 0-1 scale).")
    flags.DEFINE_integer("max_examples_per_class", 0,
                         "Folder datasets: keep the first N files of each class (0: all).")


def _floats(name, values):
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be 3 comma-separated floats, got {values}") from None


def data_config(FLAGS):
    from istanas_tf import data
    return data.DataConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
        train_portion=FLAGS.train_portion, cutout_length=FLAGS.cutout_length,
        deterministic=FLAGS.deterministic, seed=FLAGS.seed,
        skip_corrupt_images=FLAGS.skip_corrupt_images, mean=_floats("mean", FLAGS.mean),
        std=_floats("std", FLAGS.std), max_examples_per_class=FLAGS.max_examples_per_class)


def _search_network(FLAGS, **settings):
    """The super-net flags shared by both search methods; ``settings`` adds the rest."""
    from istanas_tf import search_model
    return search_model.SearchNetworkConfig(
        proj_dims=FLAGS.proj_dims, sparseness=FLAGS.sparseness, lam=FLAGS.lam,
        distinct_inputs=FLAGS.distinct_inputs, seed=FLAGS.seed, **settings)


def _loop_flags(FLAGS, **defaulted):
    """The flags of every training loop; ``defaulted`` flags are left out when unset
    (None), so the mode's config supplies its own default."""
    return dict(
        model_dir=FLAGS.model_dir, data=data_config(FLAGS), momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, grad_clip=FLAGS.grad_clip, strategy=FLAGS.strategy,
        steps_per_epoch=FLAGS.steps_per_epoch, eval_steps=FLAGS.eval_steps,
        deterministic=FLAGS.deterministic, mixed_precision=FLAGS.mixed_precision,
        verbose=FLAGS.progress,
        **_given(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                 learning_rate=FLAGS.learning_rate, learning_rate_min=FLAGS.learning_rate_min,
                 **defaulted))


def _start_run(FLAGS, config):
    """Checks the config, then records the effective flags in the run directory."""
    config.validate()
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    FLAGS.append_flags_into_file(os.path.join(FLAGS.model_dir, "flags.txt"))


def run_search(FLAGS):
    from istanas_tf import training
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required for --mode=search (the run directory)")
    if FLAGS.method == "ista_onestage":
        return run_one_stage(FLAGS)
    config = training.SearchConfig(
        network=_search_network(FLAGS, channels=FLAGS.init_channels or 16,
                                layers=FLAGS.layers or 8, method=FLAGS.method),
        arch_weight_decay=FLAGS.arch_weight_decay,
        **_loop_flags(FLAGS, arch_learning_rate=FLAGS.arch_learning_rate))
    _start_run(FLAGS, config)
    print(json.dumps(training.run_search(config)))


def run_one_stage(FLAGS):
    from istanas_tf import one_stage
    network = _search_network(
        FLAGS, channels=FLAGS.init_channels or 36, layers=FLAGS.layers or 20,
        method="ista", one_stage=True, auxiliary_weight=FLAGS.auxiliary_weight)
    config = one_stage.OneStageConfig(
        network=network, search_epochs=FLAGS.search_epochs,
        arch_weight_decay=FLAGS.arch_weight_decay, drop_path_prob=FLAGS.drop_path_prob,
        freeze_tolerance=FLAGS.freeze_tolerance, max_params=FLAGS.max_params,
        export_dir=FLAGS.export_dir, model_name=FLAGS.model_name,
        **_loop_flags(FLAGS, arch_learning_rate=FLAGS.arch_learning_rate))
    _start_run(FLAGS, config)
    print(json.dumps(one_stage.run_one_stage(config)))


def run_export(FLAGS):
    from istanas_tf import retraining
    if not FLAGS.model_dir:
        raise ValueError("--mode=export needs --model_dir (a --mode=train run, or a "
                         "--method=ista_onestage run whose search has ended)")
    print(json.dumps(retraining.export_run(
        FLAGS.model_dir, export_dir=FLAGS.export_dir, model_name=FLAGS.model_name,
        version=FLAGS.version, overwrite=FLAGS.overwrite)))


def _given(**values):
    """The flags set on the command line or in a flagfile (None: the mode's default)."""
    return {k: v for k, v in values.items() if v is not None}


def run_train(FLAGS):
    from istanas_tf import retraining
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required for --mode=train (the run directory)")
    config = retraining.TrainConfig(
        genotype=FLAGS.genotype, channels=FLAGS.init_channels, layers=FLAGS.layers,
        auxiliary=FLAGS.auxiliary, auxiliary_weight=FLAGS.auxiliary_weight,
        drop_path_prob=FLAGS.drop_path_prob,
        bn_after_param_free_ops=FLAGS.bn_after_param_free_ops,
        lr_schedule=FLAGS.lr_schedule, warmup_epochs=FLAGS.warmup_epochs,
        label_smoothing=FLAGS.label_smoothing, jit_compile=FLAGS.jit_compile,
        seed=FLAGS.seed, export_dir=FLAGS.export_dir, model_name=FLAGS.model_name,
        **_loop_flags(FLAGS))
    _start_run(FLAGS, config)
    print(json.dumps(retraining.run_training(config)))


def run_eval(FLAGS):
    from istanas_tf import retraining
    if not FLAGS.model_dir and not FLAGS.saved_model:
        raise ValueError("--mode=eval needs --model_dir (a run directory with a checkpoint) "
                         "or --saved_model (an exported SavedModel version directory)")
    result = retraining.evaluate(data_config(FLAGS), split=FLAGS.split,
                                 model_dir=FLAGS.model_dir, saved_model=FLAGS.saved_model,
                                 batch_size=FLAGS.batch_size or 256)
    print(json.dumps(result))


_DESCRIBE_DATASETS = {"cifar10": ("cifar", 10), "cifar100": ("cifar", 100),
                      "imagenet2012": ("imagenet", 1000), "imagenet": ("imagenet", 1000)}


def run_describe(FLAGS):
    from istanas_tf import genotypes, networks
    if FLAGS.dataset not in _DESCRIBE_DATASETS:
        raise ValueError(f"--dataset={FLAGS.dataset!r} is not supported by --mode=describe; "
                         f"valid: {', '.join(_DESCRIBE_DATASETS)}")
    family, num_classes = _DESCRIBE_DATASETS[FLAGS.dataset]
    genotype = genotypes.get_genotype(FLAGS.genotype)
    summary = networks.describe(
        genotype, family, num_classes, channels=FLAGS.init_channels, layers=FLAGS.layers,
        auxiliary=FLAGS.auxiliary, bn_after_param_free_ops=FLAGS.bn_after_param_free_ops)
    if FLAGS.diagram:
        from istanas_tf import diagram
        diagram.save_genotype_diagram(genotype, FLAGS.diagram, title=FLAGS.genotype)
        summary["diagram"] = FLAGS.diagram
    print(json.dumps(summary))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    from istanas_tf.training import NonFiniteLossError
    try:
        {"search": run_search, "train": run_train, "eval": run_eval, "export": run_export,
         "describe": run_describe}[FLAGS.mode](FLAGS)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError) as error:
        # Library errors name the flag, file or value: show them without a stack trace.
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
