"""The command line's flags, made from the library's config dataclasses, and the configs
they make.

Every setting is a field of a config in ``istanas_tf.training.config`` (nested configs
included), and one flag sets it: the flag is named after the field (or as
``config.flag_name`` says), its type comes from the field's annotation, its help from
the ``Attributes:`` of the dataclass's docstring, followed by the defaults of each mode.
Setting flags default to None ("not given"): :func:`build_config` replaces exactly the
given settings, so every default lives in the dataclasses only. A flag sets every field
it names, in every nested config (``--seed`` seeds the loop, the data and the
super-net). The few flags that are not settings (the mode, what to evaluate or export)
are defined by hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from absl import flags

from istanas_tf import data
from istanas_tf.training import config as config_lib

MODES = ("search", "train", "eval", "export", "describe")
METHODS = ("ista", "darts", "ista_onestage")
# Each mode's config; the first one that documents a field gives its flag's help.
_MODE_CONFIGS = {
    "train": config_lib.TrainConfig,
    "one-stage": config_lib.OneStageConfig,
    "two-stage": config_lib.TwoStageConfig,
}
# By the annotation of the field, checked in this order ("tuple[float, ...]" is a list).
_DEFINERS = {
    "bool": flags.DEFINE_boolean,
    "tuple": flags.DEFINE_list,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "str": flags.DEFINE_string,
}


def _attribute_docs(cls) -> dict[str, str]:
    """The ``Attributes:`` entries of a dataclass's docstring, by field name (an entry
    ``a, b: text`` documents both fields)."""
    docs, names, section = {}, [], False
    for line in (inspect.getdoc(cls) or "").splitlines():
        if line.strip() == "Attributes:":
            section = True
        elif section and line and not line.startswith(" "):
            break  # the next section
        elif section and (entry := re.match(r"  (\w+(?:, \w+)*): (.*)", line)):
            names = entry.group(1).split(", ")
            docs.update({name: entry.group(2) for name in names})
        elif section and line.startswith("    "):
            docs.update({name: f"{docs[name]} {line.strip()}" for name in names})
    return docs


def _fields(instance, prefix: str = "") -> list[tuple[str, Any, str, Any]]:
    """``(dotted path, annotation, help, default)`` of every field of a config instance,
    nested configs expanded."""
    docs, found = _attribute_docs(type(instance)), []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            found += _fields(value, f"{prefix}{field.name}.")
        else:
            found.append((prefix + field.name, field.type, docs.get(field.name, ""), value))
    return found


def _mode_defaults(flag: str) -> str:
    """ " (default: ...)" for the help of ``flag``, read off the config dataclasses."""
    found = {}
    for mode, cls in _MODE_CONFIGS.items():
        values = {
            repr(default)
            for path, _, _, default in _fields(cls(model_dir=""))
            if config_lib.flag_name(path) == flag
        }
        if len(values) == 1:
            found[mode] = values.pop()
    if len(set(found.values())) == 1:
        return f" (default: {next(iter(found.values()))})"
    return " (default: " + ", ".join(f"{mode} {value}" for mode, value in found.items()) + ")"


def setting_flags() -> dict[str, tuple[str, str]]:
    """``{flag: (kind, help)}`` of every setting a flag sets. A flag that sets several
    fields (``--seed``: the loop's, the data's and the super-net's) joins their docs,
    the loop's first."""
    kinds, docs = {}, {}
    for cls in _MODE_CONFIGS.values():
        fields = _fields(cls(model_dir=""))
        for path, annotation, help_text, _ in sorted(fields, key=lambda f: f[0][:5] != "loop."):
            flag = config_lib.flag_name(path)
            if flag:
                kinds.setdefault(flag, next(k for k in _DEFINERS if k in str(annotation)))
                texts = docs.setdefault(flag, [])
                if help_text and help_text.replace("``", "") not in texts:
                    texts.append(help_text.replace("``", ""))
    return {flag: (kinds[flag], " Also: ".join(docs[flag])) for flag in kinds}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags (in a function so tests can import this module and define them
    on their own ``flag_values``)."""
    for flag, (kind, help_text) in setting_flags().items():
        _DEFINERS[kind](flag, None, help_text + _mode_defaults(flag), flag_values=flag_values)
    define = dict(flag_values=flag_values)
    flags.DEFINE_enum("mode", "search", MODES, "What to run.", **define)
    flags.DEFINE_enum(
        "method",
        "ista",
        METHODS,
        "search: ista (two-stage ISTA-NAS), darts "
        "(dense first-order DARTS) or ista_onestage (search and train the target "
        "network in one run, then absorb and export).",
        **define,
    )
    flags.DEFINE_string(
        "diagram", None, "describe: also write the cells' diagram here (PNG).", **define
    )
    flags.DEFINE_integer(
        "version",
        None,
        "export: the SavedModel version (default: one more than the largest).",
        **define,
    )
    flags.DEFINE_boolean(
        "overwrite", False, "export: replace an existing SavedModel version.", **define
    )
    flags.DEFINE_string(
        "saved_model",
        None,
        "eval: a SavedModel version directory to evaluate instead of --model_dir's checkpoint.",
        **define,
    )
    flags.DEFINE_enum("split", "test", ["test", "train"], "eval: the split to evaluate.", **define)


def project_flag_names(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """The flags :func:`define_flags` defines (not absl's, TF's or tfds' own), in the
    order it defines them: absl records the module that defines each flag, so a flag
    added there is recorded and replayed without being listed anywhere else."""
    return [flag.name for flag in flag_values.get_flags_for_module(__name__)]


def flags_text(FLAGS) -> str:
    """This project's flags that were given, and the mode and method, one
    ``--name=value`` per line: the ``flags.txt`` a run records, which ``--flagfile=``
    replays (a resume)."""
    lines = [
        FLAGS[name].serialize()
        for name in project_flag_names(FLAGS)
        if name in FLAGS
        and (
            name in ("mode", "method")
            or (FLAGS[name].value is not None and FLAGS[name].value != FLAGS[name].default)
        )
    ]
    return "\n".join(lines) + "\n"


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
      cls: ``TwoStageConfig``, ``OneStageConfig`` or ``TrainConfig``.
      FLAGS: the parsed flags.
      **fixed: top-level fields, or a nested config's fields as ``network={...}``.
    """
    config = _replace(cls(model_dir=""), FLAGS, "")
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
