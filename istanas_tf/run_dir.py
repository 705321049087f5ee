"""The run directory: the files a run writes besides its checkpoints.

Layout of ``--model_dir``::

  run_config.json        the settings that define the run (compared on resume)
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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

from istanas_tf import genotypes


class RunDirError(ValueError):
    """A run directory that cannot be used for this run."""


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so a crash leaves no half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_run_config(model_dir: str, run_config: dict[str, Any],
                     may_change: Iterable[str] = ()) -> bool:
    """Records ``run_config`` in a new run directory, or checks it against an old one.

    Args:
      run_config: flat mapping of flag name -> value that defines the run.
      may_change: flags allowed to differ on resume (e.g. ``epochs`` to extend a run).

    Returns:
      True when the directory already held a run (a resume).

    Raises:
      RunDirError: naming every flag whose value differs from the recorded run.
    """
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "run_config.json")
    if not os.path.exists(path):
        atomic_write_text(path, json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        return False
    with open(path) as f:
        recorded = json.load(f)
    allowed = set(may_change)
    differing = sorted(
        key for key in set(recorded) | set(run_config)
        if key not in allowed and recorded.get(key) != run_config.get(key))
    if differing:
        details = "; ".join(f"--{key}: recorded {recorded.get(key)!r}, now "
                            f"{run_config.get(key)!r}" for key in differing)
        raise RunDirError(
            f"--model_dir={model_dir} holds a run with different settings ({details}). "
            "Use a new --model_dir, or rerun with the recorded values to resume.")
    # Flags that may change (e.g. more epochs) are recorded at their latest value.
    atomic_write_text(path, json.dumps(run_config, indent=2, sort_keys=True) + "\n")
    return True


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch, truncated to the checkpoint on resume."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, "metrics.jsonl")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drops lines of epochs after ``epoch`` (written before a crash, not checkpointed)."""
        kept = [row for row in self.read() if row["epoch"] <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_genotype(model_dir: str, genotype: genotypes.Genotype, epoch: int) -> None:
    """Writes ``genotype.json`` (latest) and ``genotypes/epoch_NNN.json``."""
    os.makedirs(os.path.join(model_dir, "genotypes"), exist_ok=True)
    genotypes.save_json(genotype, os.path.join(model_dir, "genotypes", f"epoch_{epoch:03d}.json"))
    genotypes.save_json(genotype, os.path.join(model_dir, "genotype.json"))


RUN_CONFIG_FILE = "run_config.json"
DATASET_INFO_FILE = "dataset.json"


def read_run_config(model_dir: str) -> dict[str, Any]:
    """The settings recorded in a run directory.

    Raises:
      RunDirError: the directory holds no run (no run_config.json).
    """
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        raise RunDirError(f"--model_dir={model_dir} holds no checkpoint: no run was "
                          f"written there ({RUN_CONFIG_FILE} is missing); pass the directory "
                          "a search or training wrote")
    with open(path) as f:
        return json.load(f)


def run_kind(settings: dict[str, Any]) -> str:
    """``"one_stage"``, ``"train"`` (retraining a genotype) or ``"two_stage"`` (a
    two-stage or DARTS search) from a run's recorded settings."""
    if settings.get("run") == "one_stage":
        return "one_stage"
    if "genotype" in settings and "auxiliary_weight" in settings:
        return "train"
    if "arch_learning_rate" in settings:
        return "two_stage"
    raise RunDirError(f"unrecognised {RUN_CONFIG_FILE}: not written by a search or training "
                      "of this version of istanas_tf")


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
    content = {"name": info.name, "image_size": list(info.image_size),
               "num_classes": info.num_classes, "mean": list(info.mean),
               "std": list(info.std), "class_names": list(info.class_names),
               "augmentation": info.augmentation}
    atomic_write_text(os.path.join(model_dir, DATASET_INFO_FILE),
                      json.dumps(content, indent=2) + "\n")


def read_dataset_info(model_dir: str) -> RecordedDatasetInfo | None:
    """The run's ``dataset.json``, or None for a run directory without one."""
    path = os.path.join(model_dir, DATASET_INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        content = json.load(f)
    return RecordedDatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in content.items()})
