"""What a run shows in TensorBoard and beside its checkpoints after each epoch.

TensorBoard is laid out as Keras' ``TensorBoard`` callback lays it out, the same in
every mode: one run per data split under ``<model_dir>/tensorboard`` (``train/``,
``validation/`` for the two-stage search's held-out half, ``test/``) with the same tag
in each (``epoch_loss``, ``epoch_accuracy``, ``epoch_top5_accuracy``), so the curves of
the splits overlay; ``epoch_learning_rate`` and the run's own numbers (step and
recovery times, ...) in ``train/``, with the recovery report's largest KKT violation
and count of certified nodes as ``recovery/kkt_violation_max`` and
``recovery/certified_nodes``. A search adds its architecture to ``train/``: a heatmap
per cell type (ops by edges, each candidate's share of its node on a fixed 0-1 colour
scale: |z| / sum |z| for ISTA-NAS, the softmax for DARTS), the same shares as scalars,
the genotype as text and as a diagram. The run's settings go to the HParams dashboard.
Beside the checkpoints: ``cells.png``, ``cells/epoch_NNN.png``.
"""

from __future__ import annotations

import io
import json
import numbers
import os
from typing import Any

import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.plugins.hparams import api as hparams_api

from istanas_tf import diagram, genotypes
from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded, run_dir

TRAIN, VALIDATION, TEST = "train", "validation", "test"
# Row key prefixes of held-out splits, and the TensorBoard run each goes to.
_HELD_OUT = {"val_": VALIDATION, "test_": TEST}
# Row names -> the tags Keras uses, so curves of every mode and split share a tag.
_TAGS = {
    "loss": "epoch_loss",
    "accuracy": "epoch_accuracy",
    "top1": "epoch_accuracy",
    "top5": "epoch_top5_accuracy",
    "lr": "epoch_learning_rate",
    # The recovery report's summary (architecture.recovery_report), grouped in one card.
    "kkt_violation_max": "recovery/kkt_violation_max",
    "certified_nodes": "recovery/certified_nodes",
}


class Writers:
    """The run's summary writers, one per TensorBoard run (``train``, ``validation``,
    ``test``), each made on first use; no-op writers off the chief."""

    def __init__(self, logdir: str, chief: bool):
        self.logdir, self.chief = logdir, chief
        self._writers: dict[str, Any] = {}

    def get(self, run: str):
        if run not in self._writers:
            self._writers[run] = (
                tf.summary.create_file_writer(os.path.join(self.logdir, run))
                if self.chief
                else tf.summary.create_noop_writer()
            )
        return self._writers[run]

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()


def scalars_by_run(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The numbers of a metrics row as ``{run: {tag: value}}`` (``epoch`` and booleans
    aside): ``val_loss`` -> ``validation/epoch_loss``, ``loss`` -> ``train/epoch_loss``."""
    runs: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        run, name = TRAIN, key
        for prefix, held_out in _HELD_OUT.items():
            if key.startswith(prefix):
                run, name = held_out, key[len(prefix) :]
        runs.setdefault(run, {})[_TAGS.get(name, name)] = float(value)
    return runs


def candidate_shares(model, cell_type: str) -> list[np.ndarray]:
    """Per node of ``cell_type``, each candidate's share of the node, [n_j] in [0, 1]:
    |z| / sum |z| (ISTA-NAS) or the per-edge softmax (DARTS); flat ``edge * ops + op``."""
    if model.config.method == "darts":
        return [a.numpy() for a in model.architectures[cell_type].alphas()]
    return [np.abs(z) / max(float(np.abs(z).sum()), 1e-30) for z in model.z_values(cell_type)]


def _edge_names() -> list[str]:
    """Row labels of the heatmap: node j's inputs, in candidate order."""
    inputs = ["c_{k-2}", "c_{k-1}", *(f"node {i}" for i in range(genotypes.STEPS))]
    return [f"node {j} <- {inputs[i]}" for j in range(genotypes.STEPS) for i in range(j + 2)]


def architecture_heatmap(shares: list[np.ndarray], title: str) -> np.ndarray:
    """The shares of one cell type as an RGB image [1, H, W, 3] uint8: edges down, ops
    across, a fixed 0-1 colour scale (the same colour means the same share every epoch)."""
    matrix = np.concatenate([s.reshape(-1, genotypes.NUM_OPS) for s in shares], axis=0)
    edges = _edge_names()
    figure = Figure(figsize=(6.5, 0.32 * len(edges) + 1.6), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xticks(range(genotypes.NUM_OPS), genotypes.PRIMITIVES, rotation=40, ha="right")
    axes.set_yticks(range(len(edges)), edges)
    axes.set_title(title)
    figure.colorbar(shown, ax=axes, label="share of the node")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="raw")
    width, height = figure.canvas.get_width_height()
    image = np.frombuffer(buffer.getvalue(), np.uint8).reshape(height, width, 4)
    return image[None, ..., :3]


def write_epoch(writers: Writers, row: dict[str, Any], epoch: int, model=None) -> None:
    """The epoch's metrics row as scalars by run; with a super-net, its architecture.

    Args:
      writers: the run's :class:`Writers`.
      row: the metrics.jsonl row (see :func:`scalars_by_run`); a ``genotype`` becomes a
        text summary, a ``frozen`` map its count of frozen nodes.
      epoch: the summary step.
      model: a ``SearchNetwork`` (its candidates' shares: heatmap and scalars per cell
        type; ISTA-NAS: |z| histograms per node), or None.
    """
    for run, values in scalars_by_run(row).items():
        with writers.get(run).as_default(step=epoch):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)
    with writers.get(TRAIN).as_default(step=epoch):
        if "frozen" in row:
            tf.summary.scalar("frozen_nodes", sum(sum(flags) for flags in row["frozen"].values()))
        if "genotype" in row:
            tf.summary.text("genotype", json.dumps(row["genotype"]))
        if model is not None:
            _write_architecture(model, epoch)
    writers.flush()


def _write_architecture(model, epoch: int) -> None:
    edges = _edge_names()
    for cell_type in genotypes.CELL_TYPES:
        shares = candidate_shares(model, cell_type)
        title = f"{cell_type} cell, epoch {epoch}"
        tf.summary.image(f"architecture/{cell_type}", architecture_heatmap(shares, title))
        flat = np.concatenate(shares)
        for index, share in enumerate(flat):
            edge, op = divmod(index, genotypes.NUM_OPS)
            name = edges[edge].replace(" <- ", "/").replace(" ", "")
            tf.summary.scalar(f"architecture/{cell_type}/{name}/{genotypes.PRIMITIVES[op]}", share)
        if model.config.method == "ista":
            for node, z in enumerate(model.z_values(cell_type)):
                tf.summary.histogram(f"abs_z/{cell_type}/node{node}", np.abs(z))


def write_hparams(writers: Writers, settings: dict[str, Any]) -> None:
    """The run's recorded settings (``run_config.json``) in the HParams dashboard,
    named by their flags."""
    values = {}
    for key, value in recorded.flatten(settings).items():
        name = config_lib.flag_name(key) or key
        if isinstance(value, bool | int | float | str):
            values[name] = value
        elif value is not None:
            values[name] = json.dumps(value)
    with writers.get(TRAIN).as_default(step=0):
        hparams_api.hparams(values)


def write_genotype(
    model_dir: str, writers: Writers, genotype: genotypes.Genotype, epoch: int
) -> None:
    """``genotype.json`` and ``genotypes/epoch_NNN.json``, the cell diagrams
    ``cells/epoch_NNN.png`` and ``cells.png`` (latest), and the TensorBoard image."""
    run_dir.write_genotype(model_dir, genotype, epoch)
    cells_dir = run_dir.path(model_dir, run_dir.CELLS_BY_EPOCH)
    tf.io.gfile.makedirs(cells_dir)
    title = f"epoch {epoch}"
    png = diagram.render_genotype(genotype, title)
    run_dir.atomic_write_bytes(run_dir.epoch_file(cells_dir, epoch, "png"), png)
    run_dir.atomic_write_bytes(run_dir.path(model_dir, run_dir.CELLS), png)
    with writers.get(TRAIN).as_default(step=epoch):
        # The PNG above decoded: the same pixels as drawing the figure again (which took
        # a second per epoch), see tests/diagram_test.py.
        tf.summary.image("genotype/cells", tf.io.decode_png(png, channels=3)[None])
