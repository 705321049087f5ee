"""Cell diagrams of a genotype, drawn like the cell figures of the DARTS paper.

One image holds two panels, the normal cell above the reduction cell. In each, the
inputs ``c_{k-2}`` and ``c_{k-1}`` (green) sit on the left, the intermediate nodes 0..3
(blue) in the middle and the output ``c_{k}`` (yellow) on the right. Each pick
``(op_name, input_index)`` is an arrow from its input to its node, labelled with the op;
each concatenated state has an unlabelled grey arrow into ``c_{k}``.

Nodes are placed in columns by their depth in the cell's graph (inputs at depth 0, a
node one deeper than its deepest input). Each edge is a quadratic Bezier curve (the
``arc3`` connection style); its curvature is chosen from a few candidates so that it
misses other nodes and does not run on top of another edge (two picks of one node may
read the same input). Each label is written along its edge, and slid along it, or set
just beside it, until it covers no other label, node, edge or arrow head.

Only the object-oriented matplotlib API is used (``Figure`` with an Agg canvas, never
``pyplot`` or ``matplotlib.use``), so rendering changes no global backend state and may
run in any thread, for example inside a training loop that writes ``tf.summary.image``.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from istanas_tf.genotypes import PICKS_PER_NODE, STEPS, Genotype

# Colours of the DARTS figures (graphviz darkseagreen2, lightblue, palegoldenrod).
_INPUT_COLOUR = "#b4eeb4"
_NODE_COLOUR = "#add8e6"
_OUTPUT_COLOUR = "#eee8aa"

# Geometry in data units; the figure is scaled so that one unit is _INCHES_PER_UNIT.
_COLUMN_STEP = 3.6  # horizontal distance between depth columns
_ROW_STEP = 1.8  # vertical distance between nodes of one column
_RADIUS = 0.38  # node circle radius
_MARGIN = 0.55  # blank border around a panel's nodes
_INCHES_PER_UNIT = 0.6
_TITLE_INCHES = 0.45  # room above each panel for its title
_CAPTION_INCHES = 0.45  # room above the panels for the caller's caption
_GAP_INCHES = 0.3  # blank border of the image

# Candidate curvatures (arc3 ``rad``), tried in order of preference.
_RADS = (0.0, 0.18, -0.18, 0.32, -0.32, 0.46, -0.46, 0.6, -0.6)
# Where along an edge (Bezier parameter t) a label may sit, in order of preference.
_LABEL_TS = (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65, 0.3, 0.7, 0.25, 0.75, 0.2, 0.8)

_OUTPUT = STEPS + 2  # node key of c_{k}; 0..STEPS+1 are the states of the genotype


def _node_name(key: int) -> str:
    if key == 0:
        return r"$c_{k-2}$"
    if key == 1:
        return r"$c_{k-1}$"
    if key == _OUTPUT:
        return r"$c_{k}$"
    return str(key - 2)


def _node_colour(key: int) -> str:
    if key in (0, 1):
        return _INPUT_COLOUR
    return _OUTPUT_COLOUR if key == _OUTPUT else _NODE_COLOUR


@dataclasses.dataclass(frozen=True)
class _Edge:
    source: int  # node key
    target: int  # node key
    label: str | None  # op name; None for the arrows into c_{k}


def _edges(picks: tuple[tuple[str, int], ...], concat: tuple[int, ...]) -> list[_Edge]:
    edges = [
        _Edge(index, 2 + position // PICKS_PER_NODE, op)
        for position, (op, index) in enumerate(picks)
    ]
    edges += [_Edge(state, _OUTPUT, None) for state in concat]
    return edges


def _layout(edges: list[_Edge]) -> dict[int, tuple[float, float]]:
    """Node centres: x from the node's depth, y spread within its column.

    Within a column nodes are ordered by the mean height of their inputs (the
    barycentre heuristic), which keeps most edges from crossing.
    """
    inputs: dict[int, list[int]] = {}
    for edge in edges:
        inputs.setdefault(edge.target, []).append(edge.source)
    depth = {0: 0, 1: 0}
    for key in list(range(2, STEPS + 2)) + [_OUTPUT]:  # inputs precede their readers
        depth[key] = 1 + max(depth[source] for source in inputs[key])
    columns = [
        [key for key in sorted(depth) if depth[key] == column]
        for column in range(max(depth.values()) + 1)
    ]
    tallest = max(len(keys) for keys in columns)
    positions: dict[int, tuple[float, float]] = {}
    for column, keys in enumerate(columns):
        if column == 0:
            # The inputs span the tallest column, so the many edges fanning out of
            # them cross at steep angles and leave room for their labels.
            step = _ROW_STEP * max(tallest - 1, 1.5)
        else:
            step = _ROW_STEP
            keys.sort(key=lambda k: -np.mean([positions[s][1] for s in inputs[k]]))
        for row, key in enumerate(keys):
            positions[key] = (column * _COLUMN_STEP, ((len(keys) - 1) / 2 - row) * step)
    return positions


def _control_point(p0: np.ndarray, p2: np.ndarray, rad: float) -> np.ndarray:
    """The Bezier control point of matplotlib's ``arc3,rad=rad`` between p0 and p2."""
    dx, dy = p2 - p0
    return (p0 + p2) / 2 + rad * np.array([dy, -dx])


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=float)[..., None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2


def _upright_angle(p0, p1, p2, t: float) -> float:
    """The edge's direction at ``t`` in degrees, turned so that text reads upright."""
    dx, dy = 2 * (1 - t) * (p1 - p0) + 2 * t * (p2 - p1)  # Bezier derivative
    angle = np.degrees(np.arctan2(dy, dx))
    if angle > 90:
        angle -= 180
    elif angle <= -90:
        angle += 180
    return float(angle)


def _choose_rads(edges: list[_Edge], positions: dict[int, tuple[float, float]]) -> list[float]:
    """A curvature (arc3 ``rad``) per edge, in data units.

    Each edge takes the first candidate of ``_RADS`` that stays clear of nodes other
    than its ends and of the edges chosen before it; so the second of two picks that
    read the same input bends away from the first instead of covering it.
    """
    t = np.linspace(0.0, 1.0, 41)
    inner = (t > 0.2) & (t < 0.8)
    centres = np.array(list(positions.values()))
    low, high = centres.min(axis=0) - _RADIUS, centres.max(axis=0) + _RADIUS
    chosen: list[np.ndarray] = []  # sampled curves of the edges placed so far
    rads = []
    for edge in edges:
        p0 = np.array(positions[edge.source])
        p2 = np.array(positions[edge.target])
        others = np.array(
            [centre for key, centre in positions.items() if key not in (edge.source, edge.target)]
        )
        best = None
        for preference, rad in enumerate(_RADS):
            curve = _bezier(p0, _control_point(p0, p2, rad), p2, t)
            cost = 0.1 * preference
            if len(others):
                gaps = np.linalg.norm(curve[:, None, :] - others[None, :, :], axis=-1)
                cost += 10.0 * np.sum(gaps.min(axis=0) < _RADIUS + 0.2)
            for other in chosen:
                gaps = np.linalg.norm(curve[inner, None, :] - other[None, :, :], axis=-1)
                # Fraction of this edge's middle that runs on top of the other edge.
                cost += 8.0 * np.mean(gaps.min(axis=1) < 0.2)
            # Bulging far outside the nodes' box widens the panel for one edge.
            excess = np.maximum(low - curve, 0) + np.maximum(curve - high, 0)
            cost += 1.5 * excess.max()
            if best is None or cost < best[0]:
                best = (cost, rad, curve)
        rads.append(best[1])
        chosen.append(best[2])
    return rads


@dataclasses.dataclass(frozen=True)
class _LabelBox:
    """A label's rotated rectangle in display (pixel) coordinates."""

    centre: np.ndarray  # [2]
    angle: float  # degrees
    half_size: np.ndarray  # [2]: half width, half height

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of ``points`` [n, 2] lie inside; returns bool [n]."""
        c, s = np.cos(np.radians(self.angle)), np.sin(np.radians(self.angle))
        d = points - self.centre
        local = np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c], axis=1)
        return np.all(np.abs(local) <= self.half_size, axis=1)

    def grid(self) -> np.ndarray:
        """Points spread over the rectangle, [n, 2]."""
        u, v = np.meshgrid(np.linspace(-1, 1, 25), np.linspace(-1, 1, 5))
        local = np.stack([u.ravel(), v.ravel()], axis=1) * self.half_size
        c, s = np.cos(np.radians(self.angle)), np.sin(np.radians(self.angle))
        return self.centre + local @ np.array([[c, s], [-s, c]])


def _draw_cell(ax, renderer, positions, edges, rads) -> None:
    """Draws one cell's nodes, arrows and op labels on ``ax`` (limits already set).

    Each label goes to the first spot along its edge (see ``_LABEL_TS``) that covers no
    node, no other label and no other edge; failing that, to the least covered spot.
    """
    circles = {}
    for key, (x, y) in positions.items():
        circle = Circle(
            (x, y), _RADIUS, facecolor=_node_colour(key), edgecolor="black", linewidth=1.0, zorder=3
        )
        ax.add_patch(circle)
        circles[key] = circle
        ax.text(x, y, _node_name(key), ha="center", va="center", fontsize=11, zorder=4)

    # Overlap tests happen in pixels, where text sizes are known.
    to_display = ax.transData.transform
    centres = to_display(np.array(list(positions.values())))
    node_radius = (to_display([(_RADIUS, 0)]) - to_display([(0, 0)]))[0, 0]
    controls = []
    curves = []
    for edge, rad in zip(edges, rads):
        p0 = np.array(positions[edge.source])
        p2 = np.array(positions[edge.target])
        controls.append(_control_point(p0, p2, rad))
        curves.append(to_display(_bezier(p0, controls[-1], p2, np.linspace(0, 1, 120))))
    # A label must not hide an arrow head: the stretch of each curve just before its
    # target's circle (its own included).
    heads = np.concatenate(
        [
            curve[
                (np.linalg.norm(curve - curve[-1], axis=1) > node_radius)
                & (np.linalg.norm(curve - curve[-1], axis=1) < node_radius + 18)
            ]
            for curve in curves
        ]
    )
    axes_box = ax.get_window_extent(renderer)
    pad = 4.0  # pixels kept free around each label
    placed: list[_LabelBox] = []

    for number, (edge, rad, control) in enumerate(zip(edges, rads, controls)):
        p0 = np.array(positions[edge.source])
        p2 = np.array(positions[edge.target])
        ax.add_patch(
            FancyArrowPatch(
                tuple(p0),
                tuple(p2),
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=12,
                linewidth=1.1,
                color="black" if edge.label else "0.55",
                patchA=circles[edge.source],
                patchB=circles[edge.target],
                shrinkA=1,
                shrinkB=1,
                zorder=1,
            )
        )
        if edge.label is None:
            continue
        text = ax.text(
            0,
            0,
            edge.label,
            ha="center",
            va="center",
            fontsize=9,
            zorder=2,
            rotation_mode="anchor",
            bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.9),
        )
        extent = text.get_window_extent(renderer)  # unrotated, so width x height
        half_size = np.array([extent.width, extent.height]) / 2 + pad
        other_curves = np.concatenate([curve for k, curve in enumerate(curves) if k != number])
        # On the line first; beside it (still parallel to it) where the line is busy.
        beside = extent.height / 2 + 2
        candidates = [(t, 0) for t in _LABEL_TS] + [
            (t, side) for t in _LABEL_TS for side in (1, -1)
        ]
        best = None
        for preference, (t, side) in enumerate(candidates):
            angle = _upright_angle(p0, control, p2, t)
            normal = np.array([-np.sin(np.radians(angle)), np.cos(np.radians(angle))])
            centre = to_display(_bezier(p0, control, p2, t)) + side * beside * normal
            box = _LabelBox(centre, angle, half_size)
            grid = box.grid()
            gaps = np.linalg.norm(grid[:, None, :] - centres[None, :, :], axis=-1)
            inside_axes = (
                (grid[:, 0] >= axes_box.x0)
                & (grid[:, 0] <= axes_box.x1)
                & (grid[:, 1] >= axes_box.y0)
                & (grid[:, 1] <= axes_box.y1)
            )
            cost = (
                8.0 * np.sum(gaps.min(axis=1) < node_radius)
                + 4.0
                * sum(
                    np.sum(other.contains(grid)) + np.sum(box.contains(other.grid()))
                    for other in placed
                )
                + 2.0 * np.sum(box.contains(other_curves))
                + 8.0 * np.sum(box.contains(heads))
                + 4.0 * np.sum(~inside_axes)
            )
            if best is None or cost + 0.3 * preference < best[0]:
                best = (cost + 0.3 * preference, box)
            if cost == 0:  # the earliest free spot wins
                break
        text.set_position(tuple(ax.transData.inverted().transform(best[1].centre)))
        text.set_rotation(best[1].angle)
        placed.append(best[1])


def _figure(genotype: Genotype, title: str | None, dpi: int) -> Figure:
    """The drawn figure: axes 0 is the normal cell, axes 1 the reduction cell."""
    cells = []
    for name, picks, concat in (
        ("normal cell", genotype.normal, genotype.normal_concat),
        ("reduction cell", genotype.reduce, genotype.reduce_concat),
    ):
        edges = _edges(picks, concat)
        positions = _layout(edges)
        rads = _choose_rads(edges, positions)
        # The panel holds every node and every curve, with room for labels on them.
        points = [np.array(list(positions.values()))]
        for edge, rad in zip(edges, rads):
            p0, p2 = np.array(positions[edge.source]), np.array(positions[edge.target])
            points.append(_bezier(p0, _control_point(p0, p2, rad), p2, np.linspace(0, 1, 21)))
        points = np.concatenate(points)
        low = points.min(axis=0) - _RADIUS - _MARGIN
        high = points.max(axis=0) + _RADIUS + _MARGIN
        limits = (low[0], high[0], low[1], high[1])
        cells.append((name, edges, positions, rads, limits))

    widths = [(cell[-1][1] - cell[-1][0]) * _INCHES_PER_UNIT for cell in cells]
    heights = [(cell[-1][3] - cell[-1][2]) * _INCHES_PER_UNIT for cell in cells]
    caption = _CAPTION_INCHES if title else 0.0
    # Stacked, each panel centred: a reduction cell often needs 5 columns, and two
    # such panels side by side make a strip too wide to read in TensorBoard.
    fig_w = max(widths) + 2 * _GAP_INCHES
    fig_h = caption + sum(_TITLE_INCHES + h for h in heights) + _GAP_INCHES
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    if title:
        fig.suptitle(title, y=1 - 0.1 / fig_h, va="top", fontsize=14)

    top = fig_h - caption  # upper edge of the next panel's title, in inches
    for (name, edges, positions, rads, limits), w, h in zip(cells, widths, heights):
        bottom = top - _TITLE_INCHES - h
        ax = fig.add_axes(((fig_w - w) / 2 / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
        top = bottom
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(name, fontsize=13)
        ax.apply_aspect()  # fix the data-to-pixel transform before measuring labels
        _draw_cell(ax, renderer, positions, edges, rads)
    return fig


def render_genotype(genotype: Genotype, title: str | None = None, dpi: int = 100) -> bytes:
    """The normal cell above the reduction cell of ``genotype``, as PNG bytes.

    Args:
      genotype: the cells to draw.
      title: an optional caption above both panels, e.g. ``"epoch 12"``.
      dpi: pixels per inch. The size in inches follows the cells' depth: 8 to 12.5
        wide and 7.5 to 9 high for the published genotypes.
    """
    buffer = io.BytesIO()
    _figure(genotype, title, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def save_genotype_diagram(
    genotype: Genotype, path: str | os.PathLike, title: str | None = None
) -> None:
    """Writes :func:`render_genotype`'s PNG to ``path`` atomically (temp file, rename)."""
    path = os.fspath(path)
    data = render_genotype(genotype, title)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def render_genotype_array(
    genotype: Genotype, title: str | None = None, dpi: int = 100
) -> np.ndarray:
    """The image of :func:`render_genotype` as pixels, without PNG encoding.

    Returns:
      uint8 RGBA array [H, W, 4]; add a batch axis for ``tf.summary.image``.
    """
    fig = _figure(genotype, title, dpi)
    fig.canvas.draw()
    return np.array(fig.canvas.buffer_rgba(), dtype=np.uint8)
