"""The run directory: every file name a run writes, and the small files themselves.

Layout of ``--model_dir``::

  run_config.json        the run's kind and settings (compared on resume), the history
                         of the settings changed on resume
  flags.txt              the effective command-line flags (written by train/main.py)
  checkpoints/           tf.train.CheckpointManager checkpoints, one per epoch
  metrics.jsonl          one JSON object per finished epoch
  genotype.json          the latest genotype (the final one when the run is done)
  genotypes/epoch_NNN.json, cells/epoch_NNN.png
  cells.png              diagram of the latest genotype's cells
  tensorboard/           summaries
  dataset.json           image size, normalisation and class names (for export)
  search_summary.json    one-stage: search length and the epoch each node stopped at
  final_metrics.json     retraining and one-stage: final test metrics and the export
  export/<name>/<N>/     SavedModel versions

The names are defined here once; the rest of the library joins them with
:func:`path`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf.data.config import FOLDER_PREFIX
from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded

RUN_CONFIG = "run_config.json"
FLAGS = "flags.txt"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
GENOTYPE = "genotype.json"
GENOTYPES = "genotypes"
CELLS = "cells.png"
CELLS_BY_EPOCH = "cells"
TENSORBOARD = "tensorboard"
DATASET = "dataset.json"
SEARCH_SUMMARY = "search_summary.json"
FINAL_METRICS = "final_metrics.json"
EXPORT = "export"
# run_config.json: the resumable settings changed on each resume, oldest first.
HISTORY = "history"

# What each kind of run holds, for messages about a directory of another kind.
KIND_DESCRIPTIONS = {
    "two_stage": "a two-stage search",
    "one_stage": "a one-stage search and training (--method=ista_onestage)",
    "train": "a retraining of a genotype (--mode=train)",
}


class RunDirError(ValueError):
    """A run directory that cannot be used for this run."""


def path(model_dir: str, *names: str) -> str:
    """A file or folder of the run directory: ``path(model_dir, METRICS)``."""
    return os.path.join(model_dir, *names)  # also "gs://bucket/run" or "ram://run"


def epoch_file(folder: str, epoch: int, extension: str) -> str:
    """``<folder>/epoch_NNN.<extension>`` (per-epoch genotypes and diagrams)."""
    return os.path.join(folder, f"epoch_{epoch:03d}.{extension}")


def atomic_write_bytes(file: str, content: bytes) -> None:
    """Writes ``content`` to ``file`` through a temporary file, so a crash leaves no half
    file (a left ``*.tmp`` is removed by the next start, see ``run_guard``). Any
    ``tf.io.gfile`` filesystem (on object stores the rename is a copy: the file
    appears whole, but not in one step)."""
    tmp = f"{file}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(content)
    tf.io.gfile.rename(tmp, file, overwrite=True)


def atomic_write_text(file: str, text: str) -> None:
    """Writes ``text`` to ``file`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(file, text.encode())


def write_json(file: str, content: Any) -> None:
    """Writes ``content`` as indented JSON, atomically."""
    atomic_write_text(file, json.dumps(content, indent=2) + "\n")


def read_json(file: str) -> Any | None:
    """The JSON content of ``file``, or None if it does not exist."""
    if not tf.io.gfile.exists(file):
        return None
    with tf.io.gfile.GFile(file) as f:
        return json.load(f)


def check_run_config(model_dir: str, settings: dict[str, Any]) -> bool:
    """Records a run's settings in a new run directory, or checks them against an old one.

    Args:
      settings: ``recorded.recorded_settings(...)``: ``{"kind": ..., nested settings}``.
        Only the settings in ``recorded.RESUMABLE`` may differ from a recorded run.

    Returns:
      True when the directory already held a run (a resume).

    Raises:
      RunDirError: the directory holds a run of another kind, or one whose settings
        differ; the message names every differing flag.
    """
    tf.io.gfile.makedirs(model_dir)
    file = path(model_dir, RUN_CONFIG)
    if "data" in settings:
        # Recorded resolved: a resume or an export from another working directory
        # finds the same folder.
        dataset = resolved_dataset(settings["data"].get("dataset"))
        settings = {**settings, "data": {**settings["data"], "dataset": dataset}}
    previous = read_json(file)
    if previous is None:
        write_json(file, settings)
        return False
    kind = run_kind(previous, model_dir)
    if kind != settings["kind"]:
        raise RunDirError(
            f"--model_dir={model_dir} holds {KIND_DESCRIPTIONS[kind]}, not "
            f"{KIND_DESCRIPTIONS[settings['kind']]}: {_what_to_run(kind, model_dir)}, or "
            "pass a new --model_dir for this run"
        )
    history = previous.pop(HISTORY, [])
    # Older records may hold a folder as it was spelled then.
    if "data" in previous:
        previous["data"]["dataset"] = resolved_dataset(previous["data"].get("dataset"))
    old, new = recorded.flatten(previous), recorded.flatten(settings)
    # A setting added to the configs after the run was recorded had its default value.
    defaults = recorded.recorded_settings(
        recorded.from_recorded_settings(model_dir, {**previous, "kind": kind})
    )
    old = {**recorded.flatten(defaults), **old}
    changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    differing = [key for key in changed if key not in recorded.RESUMABLE]
    if differing:
        details = "; ".join(
            f"--{config_lib.flag_name(key) or key}: recorded {old.get(key)!r}, now {new.get(key)!r}"
            for key in differing
        )
        raise RunDirError(
            f"--model_dir={model_dir} holds a run with different settings ({details}). "
            "Use a new --model_dir, or rerun with the recorded values to resume."
        )
    # Settings that may change (more epochs, a lower learning rate after a divergence)
    # are recorded at their latest value, and the change in the run's history.
    if changed:
        history.append(
            {
                "resumed_after_epoch": _latest_checkpoint_epoch(model_dir),
                "changed": {
                    f"--{config_lib.flag_name(key) or key}": [old.get(key), new.get(key)]
                    for key in changed
                },
            }
        )
    write_json(file, {**settings, HISTORY: history} if history else settings)
    return True


def _what_to_run(kind: str, model_dir: str) -> str:
    """What a user can run with a directory of ``kind`` (for a refusal message)."""
    resume = f"resume it with --flagfile={path(model_dir, FLAGS)}"
    if kind == "two_stage":
        return f"{resume}, or retrain its genotype with --genotype={path(model_dir, GENOTYPE)}"
    return f"{resume}, or evaluate or export its network with --mode=eval or --mode=export"


def resolved_dataset(dataset):
    """``--dataset`` with an image folder's path resolved (``folder:../data`` and
    ``folder:/home/me/data`` name the same dataset); other values unchanged."""
    if isinstance(dataset, str) and dataset.startswith(FOLDER_PREFIX):
        return FOLDER_PREFIX + os.path.realpath(dataset.removeprefix(FOLDER_PREFIX))
    return dataset


def _latest_checkpoint_epoch(model_dir: str) -> int:
    """The epoch of the run's latest checkpoint (``ckpt-N`` holds epoch N), 0 if none."""
    latest = tf.train.latest_checkpoint(path(model_dir, CHECKPOINTS))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def read_run_config(model_dir: str) -> dict[str, Any]:
    """The settings recorded in a run directory.

    Raises:
      RunDirError: the directory holds no run (no run_config.json).
    """
    recorded = read_json(path(model_dir, RUN_CONFIG))
    if recorded is None:
        raise RunDirError(
            f"--model_dir={model_dir} holds no checkpoint: no run was "
            f"written there ({RUN_CONFIG} is missing); pass the directory "
            "a search or training wrote"
        )
    run_kind(recorded, model_dir)
    return recorded


def run_kind(settings: dict[str, Any], model_dir: str = "the run directory") -> str:
    """The recorded kind of a run: ``two_stage``, ``one_stage`` or ``train``."""
    kind = settings.get("kind")
    if kind not in KIND_DESCRIPTIONS:
        raise RunDirError(
            f"{model_dir}/{RUN_CONFIG} records no run kind this version of istanas_tf "
            f"knows (kind={kind!r}); it was written by another version. Resume or export "
            "it with that version, or use a new --model_dir"
        )
    return kind


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch, truncated to the checkpoint on resume."""

    def __init__(self, model_dir: str):
        self.path = path(model_dir, METRICS)

    def read(self) -> list[dict[str, Any]]:
        if not tf.io.gfile.exists(self.path):
            return []
        with tf.io.gfile.GFile(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drops lines of epochs after ``epoch`` (written before a crash, not checkpointed)."""
        kept = [row for row in self.read() if row["epoch"] <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        """Adds ``row``, rewriting the file atomically: a crash leaves the old rows or
        the new ones, never half a line (and object stores cannot append)."""
        rows = "".join(json.dumps(old) + "\n" for old in self.read())
        atomic_write_text(self.path, rows + json.dumps(row) + "\n")


def write_genotype(model_dir: str, genotype: genotypes.Genotype, epoch: int) -> None:
    """Writes ``genotype.json`` (latest) and ``genotypes/epoch_NNN.json``."""
    tf.io.gfile.makedirs(path(model_dir, GENOTYPES))
    text = json.dumps(genotypes.to_json_dict(genotype), indent=2) + "\n"
    atomic_write_text(epoch_file(path(model_dir, GENOTYPES), epoch, "json"), text)
    atomic_write_text(path(model_dir, GENOTYPE), text)


@dataclasses.dataclass(frozen=True)
class RecordedDatasetInfo:
    """The part of ``data.DatasetInfo`` a run records for evaluation and export."""

    name: str
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    augmentation: str  # "cifar" or "imagenet": which network family the run built


def write_dataset_info(model_dir: str, info) -> None:
    """Records ``dataset.json`` (size, normalisation, class names; ``info`` is a
    ``data.DatasetInfo``) so that ``--mode=export`` needs no access to the dataset."""
    write_json(
        path(model_dir, DATASET),
        {
            "name": info.name,
            "image_size": list(info.image_size),
            "num_classes": info.num_classes,
            "mean": list(info.mean),
            "std": list(info.std),
            "class_names": list(info.class_names),
            "augmentation": info.augmentation,
        },
    )


def read_dataset_info(model_dir: str) -> RecordedDatasetInfo | None:
    """The run's ``dataset.json``, or None for a run directory without one."""
    content = read_json(path(model_dir, DATASET))
    if content is None:
        return None
    return RecordedDatasetInfo(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in content.items()}
    )
