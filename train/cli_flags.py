"""The command line's flags, and the typed configs they make.

Every setting's default lives in the library's config dataclasses
(``istanas_tf.training.config``); the flags that set them default to None ("not
given"), their help shows the dataclasses' defaults per mode, and :func:`build_config`
replaces exactly the given settings. A flag sets every field it names, in every nested
config (``--seed`` seeds the loop, the data and the super-net).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from istanas_tf import data
from istanas_tf.training import config as config_lib

MODES = ("search", "train", "eval", "export", "describe")
METHODS = ("ista", "darts", "ista_onestage")
_MODE_CONFIGS = {
    "two-stage": config_lib.TwoStageConfig,
    "one-stage": config_lib.OneStageConfig,
    "train": config_lib.TrainConfig,
}


def _defaults(instance, prefix: str = "") -> dict[str, Any]:
    """``{dotted path: default}`` of a config instance, nested configs expanded."""
    found = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            found.update(_defaults(value, f"{prefix}{field.name}."))
        else:
            found[f"{prefix}{field.name}"] = value
    return found


def _mode_defaults(flag: str) -> str:
    """ " (default: ...)" for the help of ``flag``, read off the config dataclasses."""
    found = {}
    for mode, cls in _MODE_CONFIGS.items():
        values = {
            repr(v)
            for path, v in _defaults(cls(model_dir="")).items()
            if config_lib.flag_name(path) == flag
        }
        if len(values) == 1:
            found[mode] = values.pop()
    if not found:
        return ""
    if len(set(found.values())) == 1:
        return f" (default: {next(iter(found.values()))})"
    return " (default: " + ", ".join(f"{mode} {value}" for mode, value in found.items()) + ")"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags (in a function so tests can import this module and define them
    on their own ``flag_values``)."""

    def setting(kind, name, help_text):
        definer = {
            "int": flags.DEFINE_integer,
            "float": flags.DEFINE_float,
            "bool": flags.DEFINE_boolean,
            "str": flags.DEFINE_string,
            "list": flags.DEFINE_list,
        }[kind]
        definer(name, None, help_text + _mode_defaults(name), flag_values=flag_values)

    flags.DEFINE_enum("mode", "search", MODES, "What to run.", flag_values=flag_values)
    flags.DEFINE_enum(
        "method",
        "ista",
        METHODS,
        "search: ista (two-stage ISTA-NAS), darts (dense first-order DARTS) "
        "or ista_onestage (search and train the target network in one run, "
        "then absorb and export).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "model_dir", None, "Run directory; rerunning the command resumes.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "genotype",
        "ISTA_twostage",
        "train, describe: a named genotype or a genotype .json file.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "diagram",
        None,
        "describe: also write the cells' diagram (PNG) here.",
        flag_values=flag_values,
    )
    # The network.
    setting(
        "int",
        "init_channels",
        "Initial channels C (train and describe: None is the "
        "dataset family's default, 36 CIFAR / 48 ImageNet).",
    )
    setting(
        "int",
        "layers",
        "Cells (train and describe: None is the dataset family's default, 20 CIFAR / 14 ImageNet).",
    )
    setting("bool", "auxiliary", "train: auxiliary head after cell 2*layers//3.")
    setting("float", "auxiliary_weight", "Weight of the auxiliary loss.")
    setting(
        "bool",
        "bn_after_param_free_ops",
        "train, describe: BN after pooling and identity ops (one-stage networks).",
    )
    setting("float", "drop_path_prob", "Drop path rate at the last training epoch.")
    # The architecture and the search.
    setting("int", "proj_dims", "Rows m of each node's random matrix A.")
    setting("int", "sparseness", "Ops kept per node (k).")
    setting("float", "lam", "LASSO penalty of the recovery.")
    setting("bool", "distinct_inputs", "A node's picks must read different predecessors.")
    setting("float", "arch_learning_rate", "Architecture Adam lr.")
    setting("float", "arch_weight_decay", "L2 added to the architecture gradients.")
    setting(
        "int",
        "search_epochs",
        "ista_onestage: the most search epochs (the search ends earlier when every "
        "node has frozen; nodes still searching at the cap are frozen at their last z).",
    )
    setting(
        "int",
        "max_params",
        "ista_onestage: reject a recovered architecture whose evaluation network "
        "(auxiliary head excluded) has this many parameters or more.",
    )
    setting(
        "float",
        "freeze_tolerance",
        "ista_onestage: a node stops searching when its recovered z moves by at most "
        "this (L2) in an epoch.",
    )
    # The training loop.
    setting("int", "epochs", "Epochs (ista_onestage: training epochs after the search).")
    setting("int", "batch_size", "Global batch size over all replicas (eval: 256).")
    setting("float", "learning_rate", "Peak weight lr.")
    setting("float", "learning_rate_min", "Weight lr at the last epoch.")
    setting("float", "momentum", "Weight SGD momentum.")
    setting("float", "weight_decay", "L2 added to the weight gradients.")
    setting("float", "grad_clip", "Global-norm clipping of the weight gradients.")
    setting("str", "lr_schedule", "train: cosine (CIFAR) or warmup_linear (ImageNet).")
    setting("int", "warmup_epochs", "train: warm-up epochs of warmup_linear.")
    setting("float", "label_smoothing", "train: label smoothing (ImageNet 0.1).")
    setting(
        "str",
        "mixed_precision",
        "float16 (every optimizer scales the loss) or bfloat16; unset: float32.",
    )
    setting("bool", "jit_compile", "train: XLA-compile the training step (GPUs, TPUs).")
    setting("str", "strategy", "default | mirrored | multi_worker (reads TF_CONFIG).")
    setting("int", "steps_per_epoch", "Cap on training steps per epoch.")
    setting("int", "eval_steps", "Cap on evaluation steps per epoch (0: no evaluation).")
    setting("bool", "progress", "Progress bar within each epoch.")
    setting("bool", "deterministic", "Reproducible data order and kernels.")
    setting("int", "seed", "Seed of A, b, the weights, the data order and augmentation.")
    # Export and evaluation.
    setting(
        "str",
        "export_dir",
        "train, ista_onestage, export: SavedModel root (unset: MODEL_DIR/export).",
    )
    setting("str", "model_name", "SavedModel name (TF Serving).")
    flags.DEFINE_integer(
        "version",
        None,
        "export: SavedModel version (default: one more than the largest).",
        flag_values=flag_values,
    )
    flags.DEFINE_boolean(
        "overwrite",
        False,
        "export: replace an existing SavedModel version directory.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "saved_model",
        None,
        "eval: a SavedModel version directory to evaluate instead of --model_dir's checkpoint.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "split", "test", ["test", "train"], "eval: the split to evaluate.", flag_values=flag_values
    )
    # Data.
    setting(
        "str",
        "dataset",
        "cifar10 | cifar100 | imagenet2012 | folder:PATH (PATH/<split>/<class>/*.jpg|png).",
    )
    setting("str", "data_dir", "tensorflow-datasets data directory.")
    setting("str", "manual_dir", "Manual download directory (imagenet2012).")
    setting(
        "float",
        "train_portion",
        "Fraction of the training split that trains the "
        "weights in a two-stage search; the rest trains the "
        "architecture.",
    )
    setting("int", "cutout_length", "Cutout square side (0: off).")
    setting("bool", "skip_corrupt_images", "Skip (and count) unreadable images instead of failing.")
    setting("list", "mean", "Per-channel mean override (3 floats, 0-1 scale).")
    setting("list", "std", "Per-channel std override (3 floats, 0-1 scale).")
    setting(
        "int",
        "max_examples_per_class",
        "Folder and CIFAR datasets: keep the first N examples of each class (0: all).",
    )


def _given(FLAGS, flag: str | None):
    """The flag's value if it was given (a flagfile counts), else None."""
    if flag is None or flag not in FLAGS:
        return None
    return FLAGS[flag].value


def _replace(instance, FLAGS, prefix: str):
    """``instance`` with every field whose flag was given set to the flag's value."""
    changes = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            changes[field.name] = _replace(value, FLAGS, f"{path}.")
            continue
        given = _given(FLAGS, config_lib.flag_name(path))
        if given is not None:
            changes[field.name] = tuple(given) if isinstance(given, list) else given
    return dataclasses.replace(instance, **changes)


def build_config(cls, FLAGS, **fixed):
    """The ``cls`` config of the given flags: the dataclass defaults, replaced by every
    flag that was given, then by ``fixed`` (settings the mode fixes, e.g. the method).

    Args:
      cls: ``TwoStageConfig``, ``OneStageConfig``, ``TrainConfig`` or a nested config
        class (``DataConfig``, ...).
      FLAGS: the parsed flags.
      **fixed: top-level fields, or a nested config's fields as ``network={...}``.
    """
    required = {
        f.name: ""
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    config = _replace(cls(**required), FLAGS, "")
    for name, value in fixed.items():
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = dataclasses.replace(current, **value)
        config = dataclasses.replace(config, **{name: value})
    return config


def search_config(FLAGS):
    """``--mode=search``: a two-stage (ista, darts) or a one-stage run's config."""
    if FLAGS.method == "ista_onestage":
        return build_config(config_lib.OneStageConfig, FLAGS)
    return build_config(config_lib.TwoStageConfig, FLAGS, network={"method": FLAGS.method})


def data_config(FLAGS) -> data.DataConfig:
    """The data flags alone (``--mode=eval``)."""
    return _replace(data.DataConfig(), FLAGS, "data.")
