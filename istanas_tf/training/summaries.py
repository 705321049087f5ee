"""What a run shows in TensorBoard and beside its checkpoints after each epoch.

One function per kind of record, the same for every mode: the epoch's numbers as
scalars, the architecture of a search (genotype text, |z| per node), and the cell
diagrams (``cells.png``, ``cells/epoch_NNN.png`` and the TensorBoard image).
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import numpy as np
import tensorflow as tf

from istanas_tf import diagram, genotypes
from istanas_tf.training import run_dir


def write_epoch(writer, row: dict[str, Any], epoch: int, model=None) -> None:
    """The epoch's metrics row as scalars; with an ISTA-NAS super-net, its architecture.

    Args:
      writer: the run's summary writer (a no-op writer off the chief).
      row: the metrics.jsonl row; every number but ``epoch`` (flags aside) becomes a
        scalar, a ``genotype`` a text summary, a ``frozen`` map its count of frozen
        nodes.
      epoch: the summary step.
      model: a ``SearchNetwork`` whose |z| (histogram per node and image per cell type)
        is logged; None for networks without a sparse code.
    """
    with writer.as_default(step=epoch):
        for key, value in row.items():
            if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                tf.summary.scalar(key, float(value))
        if "frozen" in row:
            tf.summary.scalar("frozen_nodes", sum(sum(flags) for flags in row["frozen"].values()))
        if "genotype" in row:
            tf.summary.text("genotype", json.dumps(row["genotype"]))
        if model is not None and model.config.method == "ista":
            for cell_type in genotypes.CELL_TYPES:
                z_values = model.z_values(cell_type)
                for node, z in enumerate(z_values):
                    tf.summary.histogram(f"abs_z/{cell_type}/node{node}", np.abs(z))
                tf.summary.image(f"abs_z/{cell_type}", z_image(z_values))
        writer.flush()


def z_image(z_values) -> np.ndarray:
    """|z| of the nodes as one grey image [1, nodes, widest, 1], brightest = largest."""
    width = max(len(z) for z in z_values)
    image = np.zeros([len(z_values), width], np.float32)
    for node, z in enumerate(z_values):
        image[node, : len(z)] = np.abs(z)
    image /= max(float(image.max()), 1e-12)
    return image[None, :, :, None]


def write_genotype(model_dir: str, writer, genotype: genotypes.Genotype, epoch: int) -> None:
    """``genotype.json`` and ``genotypes/epoch_NNN.json``, the cell diagrams
    ``cells/epoch_NNN.png`` and ``cells.png`` (latest), and the TensorBoard image."""
    run_dir.write_genotype(model_dir, genotype, epoch)
    cells_dir = run_dir.path(model_dir, run_dir.CELLS_BY_EPOCH)
    tf.io.gfile.makedirs(cells_dir)
    title = f"epoch {epoch}"
    png = diagram.render_genotype(genotype, title)
    run_dir.atomic_write_bytes(run_dir.epoch_file(cells_dir, epoch, "png"), png)
    run_dir.atomic_write_bytes(run_dir.path(model_dir, run_dir.CELLS), png)
    with writer.as_default(step=epoch):
        image = diagram.render_genotype_array(genotype, title=title)
        tf.summary.image("genotype/cells", image[None, ..., :3])
