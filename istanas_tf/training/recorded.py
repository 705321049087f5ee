"""What a run directory's ``run_config.json`` records of a run's config, and back.

A run directory records its config as a nested dict (:func:`recorded_settings`:
``{"kind": ..., "loop": {...}, "data": {...}, ...}``), so settings of the same name in
two sub-configs (``loop.seed``, ``data.seed``) stay apart. A resumed run must match it
except for the settings in :data:`RESUMABLE`; :func:`from_recorded_settings` rebuilds
the config (``--mode=eval`` and ``--mode=export`` of a run directory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from istanas_tf.training import config as config_lib

# Settings (dotted paths into a config) that may differ when a run resumes: they do not
# change what the run has computed so far (more epochs extend it; a lower learning rate
# continues a run that diverged from its last good checkpoint). run_config.json keeps
# each change in its history.
RESUMABLE = frozenset(
    {
        "loop.epochs",
        "loop.learning_rate",
        "loop.learning_rate_min",
        "arch.learning_rate",
        "loop.strategy",
        "loop.eval_steps",
        "search_epochs",
        "jit_compile",
        "data.data_dir",
        "data.manual_dir",
        "data.skip_corrupt_images",
    }
)
# Settings of the process, not of the run: never recorded or compared.
# The network's family is taken from the data (recorded in dataset.json), like its classes.
TRANSIENT = frozenset(
    {
        "model_dir",
        "loop.verbose",
        "network.num_classes",
        "network.family",
        "export_dir",
        "model_name",
    }
)


def recorded_settings(config: config_lib.RunConfig, **resolved) -> dict[str, Any]:
    """What ``run_config.json`` records of ``config``: ``kind`` and the nested settings.

    Transient settings are left out, tuples become lists (JSON).

    Args:
      config: any mode's config.
      **resolved: values that replace a top-level setting (the genotype a name or path
        resolved to, as its JSON dict).
    """

    def nested(value, prefix):
        if dataclasses.is_dataclass(value):
            return {
                f.name: nested(getattr(value, f.name), f"{prefix}{f.name}.")
                for f in dataclasses.fields(value)
                if f"{prefix}{f.name}" not in TRANSIENT
            }
        return list(value) if isinstance(value, tuple) else value

    return {"kind": config.KIND, **nested(config, ""), **resolved}


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"loop.epochs": 50, ...}``."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key != "genotype":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def from_recorded_settings(model_dir: str, settings: dict[str, Any]) -> config_lib.RunConfig:
    """The config recorded in a run directory's ``run_config.json``."""

    def build(cls, values, prefix):
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue  # transient: the dataclass default
            value = values[field.name]
            if dataclasses.is_dataclass(field.default):
                value = build(type(field.default), value, f"{prefix}{field.name}.")
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs) if prefix else cls(model_dir=model_dir, **kwargs)

    cls = config_lib.KINDS[settings["kind"]]
    values = {k: v for k, v in settings.items() if k != "kind"}
    if cls is config_lib.TrainConfig and isinstance(values.get("genotype"), dict):
        # Recorded as the genotype itself; the network takes its JSON dict.
        genotype = values.pop("genotype")
        return dataclasses.replace(build(cls, values, ""), genotype=genotype)
    return build(cls, values, "")
