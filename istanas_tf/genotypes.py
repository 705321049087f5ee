"""The DARTS search space's primitives, the Genotype type and the published genotypes.

A genotype lists, for each of the 4 intermediate nodes of a cell, two picks
``(op_name, input_index)``: input 0 is ``s0`` (the cell before the previous one), 1 is
``s1`` (the previous cell), 2..5 are the intermediate nodes (docs/method.md section 7).
``genotype.json`` files written by searches use the format of :func:`to_json_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

# docs/method.md section 1. The order fixes the flat candidate index predecessor * 7 + op.
# There is deliberately no `none` op in ISTA-NAS.
PRIMITIVES: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

NUM_OPS = len(PRIMITIVES)  # candidate ops per edge
STEPS = 4  # intermediate nodes per cell
PICKS_PER_NODE = 2  # ops kept per node in a genotype (the method's sparseness k)
NUM_CELL_INPUTS = 2  # s0 and s1: node j reads NUM_CELL_INPUTS + j predecessors
CELL_TYPES: tuple[str, ...] = ("normal", "reduce")  # each has its own architecture

Pick = tuple[str, int]


def cell_type(reduction: bool) -> str:
    """The cell type, ``"reduce"`` or ``"normal"``, of a cell that does or does not reduce."""
    return "reduce" if reduction else "normal"


def num_candidates(node: int, num_ops: int = NUM_OPS) -> int:
    """Candidates of intermediate node ``node``: ``num_ops`` ops on each of its predecessors.

    Flat candidate index: ``predecessor * num_ops + op`` (14, 21, 28, 35 for 7 ops).
    """
    return num_ops * (NUM_CELL_INPUTS + node)


class GenotypeError(ValueError):
    """A genotype name, file or structure that is not valid."""


def validate(genotype: Genotype) -> None:
    """Raises GenotypeError naming the first structural problem of ``genotype``."""
    for cell in ("normal", "reduce"):
        picks = getattr(genotype, cell)
        if len(picks) != STEPS * PICKS_PER_NODE:
            raise GenotypeError(
                f"{cell}: expected {STEPS} nodes x {PICKS_PER_NODE} picks = "
                f"{STEPS * PICKS_PER_NODE} (op, input) pairs, got {len(picks)}"
            )
        for position, (op, index) in enumerate(picks):
            node = position // PICKS_PER_NODE
            if op not in PRIMITIVES:
                raise GenotypeError(
                    f"{cell}[{position}] (node {node}): unknown op {op!r}; "
                    f"valid ops: {', '.join(PRIMITIVES)}"
                )
            # Node j (0-based) may read s0, s1 and the nodes before it: inputs 0..j+1.
            if not 0 <= index <= node + 1:
                raise GenotypeError(
                    f"{cell}[{position}] (node {node}): input index {index} out of range; "
                    f"node {node} can read inputs 0..{node + 1}"
                )
        concat = getattr(genotype, f"{cell}_concat")
        if not concat or any(not 0 <= i < STEPS + 2 for i in concat):
            raise GenotypeError(
                f"{cell}_concat: {list(concat)} must be a non-empty list of state "
                f"indices in 0..{STEPS + 1}"
            )


@dataclasses.dataclass(frozen=True)
class Genotype:
    """A searched cell pair.

    Attributes:
      normal: picks of the normal cell, node by node (``PICKS_PER_NODE`` per node).
      normal_concat: indices of the states concatenated into the normal cell's output.
      reduce: picks of the reduction cell.
      reduce_concat: indices concatenated into the reduction cell's output.
    """

    normal: tuple[Pick, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Pick, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self):
        # Normalise lists (from JSON) to tuples so genotypes compare and hash by value.
        for field in ("normal", "reduce"):
            picks = tuple((str(op), int(index)) for op, index in getattr(self, field))
            object.__setattr__(self, field, picks)
        for field in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, field, tuple(int(i) for i in getattr(self, field)))
        validate(self)


def _picks(text: str) -> tuple[Pick, ...]:
    """Parses the ``(op,input) (op,input) ...`` notation of docs/method.md section 7."""
    picks = []
    for item in text.split(")"):
        item = item.strip().lstrip("(")
        if item:
            op, index = item.split(",")
            picks.append((op.strip(), int(index)))
    return tuple(picks)


_CONCAT = (2, 3, 4, 5)


def _genotype(normal: str, reduce: str) -> Genotype:
    return Genotype(_picks(normal), _CONCAT, _picks(reduce), _CONCAT)


# The genotypes published with the paper and its code (docs/method.md section 7).
ISTA_twostage = _genotype(
    "(skip_connect,0) (dil_conv_3x3,1) (sep_conv_5x5,0) (dil_conv_3x3,2) "
    "(dil_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,2) (skip_connect,0)",
    "(avg_pool_3x3,0) (sep_conv_5x5,1) (dil_conv_5x5,2) (max_pool_3x3,1) "
    "(dil_conv_5x5,3) (sep_conv_3x3,1) (dil_conv_5x5,4) (sep_conv_5x5,1)",
)
ISTA_onestage = _genotype(
    "(skip_connect,0) (dil_conv_3x3,1) (sep_conv_3x3,1) (dil_conv_5x5,2) "
    "(avg_pool_3x3,3) (sep_conv_3x3,1) (sep_conv_5x5,1) (sep_conv_3x3,2)",
    "(avg_pool_3x3,0) (max_pool_3x3,1) (skip_connect,0) (max_pool_3x3,1) "
    "(sep_conv_5x5,1) (avg_pool_3x3,0) (max_pool_3x3,0) (dil_conv_5x5,2)",
)
ISTA_ImageNet = _genotype(
    "(sep_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,1) (skip_connect,2) "
    "(sep_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,1) (dil_conv_5x5,4)",
    "(skip_connect,0) (sep_conv_3x3,1) (dil_conv_5x5,2) (sep_conv_3x3,0) "
    "(sep_conv_3x3,0) (skip_connect,2) (sep_conv_3x3,2) (skip_connect,3)",
)
DARTS_V1 = _genotype(
    "(sep_conv_3x3,1) (sep_conv_3x3,0) (skip_connect,0) (sep_conv_3x3,1) "
    "(skip_connect,0) (sep_conv_3x3,1) (sep_conv_3x3,0) (skip_connect,2)",
    "(max_pool_3x3,0) (max_pool_3x3,1) (skip_connect,2) (max_pool_3x3,0) "
    "(max_pool_3x3,0) (skip_connect,2) (skip_connect,2) (avg_pool_3x3,0)",
)
DARTS_V2 = _genotype(
    "(sep_conv_3x3,0) (sep_conv_3x3,1) (sep_conv_3x3,0) (sep_conv_3x3,1) "
    "(sep_conv_3x3,1) (skip_connect,0) (skip_connect,0) (dil_conv_3x3,2)",
    "(max_pool_3x3,0) (max_pool_3x3,1) (skip_connect,2) (max_pool_3x3,1) "
    "(max_pool_3x3,0) (skip_connect,2) (skip_connect,2) (max_pool_3x3,1)",
)

GENOTYPES: dict[str, Genotype] = {
    "ISTA_twostage": ISTA_twostage,
    "ISTA_onestage": ISTA_onestage,
    "ISTA_ImageNet": ISTA_ImageNet,
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
}


def to_json_dict(genotype: Genotype) -> dict[str, Any]:
    """The ``genotype.json`` representation: lists of [op, input] pairs."""
    return {
        "normal": [list(p) for p in genotype.normal],
        "normal_concat": list(genotype.normal_concat),
        "reduce": [list(p) for p in genotype.reduce],
        "reduce_concat": list(genotype.reduce_concat),
    }


def from_json_dict(data: Any, source: str = "genotype") -> Genotype:
    """Builds a Genotype from :func:`to_json_dict` output; errors name the field."""
    if not isinstance(data, dict):
        raise GenotypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {}
    for cell in ("normal", "reduce"):
        if cell not in data:
            raise GenotypeError(f"{source}: missing field {cell!r}")
        picks = data[cell]
        if not isinstance(picks, list) or not all(
            isinstance(p, (list, tuple))
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], int)
            and not isinstance(p[1], bool)
            for p in picks
        ):
            raise GenotypeError(
                f"{source}: field {cell!r} must be a list of [op_name, input_index] pairs, "
                f"got {picks!r}"
            )
        fields[cell] = picks
        concat = data.get(f"{cell}_concat", list(_CONCAT))
        if not isinstance(concat, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in concat
        ):
            raise GenotypeError(f"{source}: field '{cell}_concat' must be a list of ints")
        fields[f"{cell}_concat"] = concat
    try:
        return Genotype(**fields)
    except GenotypeError as error:
        raise GenotypeError(f"{source}: {error}") from None


def save_json(genotype: Genotype, path: str | os.PathLike) -> None:
    """Writes ``genotype`` to ``path`` as JSON, atomically (temp file then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_json_dict(genotype), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str | os.PathLike) -> Genotype:
    """Reads a genotype JSON file; errors name the file and the offending field."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GenotypeError(f"genotype file {path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise GenotypeError(f"genotype file {path!r} is not valid JSON: {error}") from None
    # A search run directory's genotype.json may wrap the genotype with metadata.
    if isinstance(data, dict) and "genotype" in data and "normal" not in data:
        data = data["genotype"]
    return from_json_dict(data, source=f"genotype file {path!r}")


def get_genotype(name_or_path: str) -> Genotype:
    """Looks up a named genotype, or loads a JSON file if the argument is a path."""
    if name_or_path in GENOTYPES:
        return GENOTYPES[name_or_path]
    if (
        name_or_path.endswith(".json")
        or os.path.sep in name_or_path
        or os.path.exists(name_or_path)
    ):
        return load_json(name_or_path)
    raise GenotypeError(
        f"unknown genotype {name_or_path!r}; valid names: {', '.join(GENOTYPES)} "
        "(or the path of a genotype .json file)"
    )


def genotype_from_picks(normal: Sequence[Pick], reduce: Sequence[Pick]) -> Genotype:
    """A genotype with the standard concat 2..5 from per-cell pick lists."""
    return Genotype(tuple(normal), _CONCAT, tuple(reduce), _CONCAT)
