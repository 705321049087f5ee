"""Cell diagrams: PNG output, layout, legible labels, the atomic save, thread safety."""

import concurrent.futures
import io
import itertools
import os

import numpy as np
import pytest
from matplotlib.path import Path
from PIL import Image

from istanas_tf import diagram, genotypes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Every node reads one input twice: each cell has four pairs of parallel edges.
REPEATED_INPUTS = genotypes.genotype_from_picks(
    [
        ("sep_conv_3x3", 0),
        ("max_pool_3x3", 0),
        ("skip_connect", 1),
        ("dil_conv_5x5", 1),
        ("sep_conv_5x5", 3),
        ("avg_pool_3x3", 3),
        ("dil_conv_3x3", 2),
        ("sep_conv_3x3", 2),
    ],
    [
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("sep_conv_3x3", 3),
        ("sep_conv_3x3", 3),
        ("dil_conv_5x5", 4),
        ("dil_conv_5x5", 4),
    ],
)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _label_outlines(ax, renderer) -> list[tuple[str, Path]]:
    """Each op label's rotated text rectangle, in pixels, as a closed polygon."""
    outlines = []
    for text in ax.texts:
        if text.get_text() not in genotypes.PRIMITIVES:
            continue  # a node name
        angle = text.get_rotation()
        text.set_rotation(0)
        extent = text.get_window_extent(renderer)
        text.set_rotation(angle)
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [
            extent.width / 2,
            extent.height / 2,
        ]
        centre = ax.transData.transform(text.get_position())
        outlines.append((text.get_text(), Path(corners @ np.array([[c, s], [-s, c]]) + centre)))
    return outlines


def test_png_decodes_to_two_stacked_panels():
    png = diagram.render_genotype(genotypes.get_genotype("ISTA_twostage"))
    assert png.startswith(PNG_SIGNATURE)
    image = _decode(png)
    height, width = image.shape[:2]
    # 3.6 units per column x 5 columns plus margins, 0.6 inch per unit, 100 dpi.
    assert 800 <= width <= 1600 and 600 <= height <= 1200
    # Normal cell above the reduction cell: ink in both halves of the image.
    ink = np.any(image[..., :3] < 128, axis=(1, 2))
    assert ink[: height // 2].any() and ink[height // 2 :].any()
    fig = diagram._figure(genotypes.get_genotype("ISTA_twostage"), None, 100)
    normal, reduction = fig.axes
    assert (normal.get_title(), reduction.get_title()) == ("normal cell", "reduction cell")
    assert normal.get_position().y0 >= reduction.get_position().y1


@pytest.mark.parametrize("name", list(genotypes.GENOTYPES))
def test_each_pick_is_one_labelled_arrow(name):
    genotype = genotypes.get_genotype(name)
    fig = diagram._figure(genotype, None, 100)
    for ax, picks, concat in zip(
        fig.axes,
        (genotype.normal, genotype.reduce),
        (genotype.normal_concat, genotype.reduce_concat),
    ):
        labels = [t.get_text() for t in ax.texts if t.get_text() in genotypes.PRIMITIVES]
        assert sorted(labels) == sorted(op for op, _ in picks)
        nodes = [t.get_text() for t in ax.texts if t.get_text() not in labels]
        assert sorted(nodes) == sorted(["0", "1", "2", "3", r"$c_{k-2}$", r"$c_{k-1}$", r"$c_{k}$"])
        # One arrow per pick, plus one per concatenated state into c_{k}.
        assert len(ax.patches) - len(nodes) == len(picks) + len(concat)


@pytest.mark.parametrize("genotype", list(genotypes.GENOTYPES.values()) + [REPEATED_INPUTS])
def test_op_labels_do_not_overlap(genotype):
    fig = diagram._figure(genotype, None, 100)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        outlines = _label_outlines(ax, renderer)
        assert len(outlines) == 8
        for (a, path_a), (b, path_b) in itertools.combinations(outlines, 2):
            assert not path_a.intersects_path(path_b, filled=True), (ax.get_title(), a, b)


def test_repeated_input_edges_bend_apart():
    for picks, concat in (
        (REPEATED_INPUTS.normal, REPEATED_INPUTS.normal_concat),
        (REPEATED_INPUTS.reduce, REPEATED_INPUTS.reduce_concat),
    ):
        edges = diagram._edges(picks, concat)
        rads = diagram._choose_rads(edges, diagram._layout(edges))
        for first in range(0, 8, 2):  # the two picks of one node share their input
            assert edges[first].source == edges[first + 1].source
            assert abs(rads[first] - rads[first + 1]) >= 0.15
    assert _decode(diagram.render_genotype(REPEATED_INPUTS)).shape[2] in (3, 4)


def test_different_genotypes_give_different_images():
    first = diagram.render_genotype(genotypes.get_genotype("DARTS_V1"))
    second = diagram.render_genotype(genotypes.get_genotype("DARTS_V2"))
    assert first != second
    assert first == diagram.render_genotype(genotypes.get_genotype("DARTS_V1"))
    a, b = _decode(first), _decode(second)
    assert a.shape != b.shape or np.any(a != b)


def test_caption_adds_a_line_on_top():
    genotype = genotypes.get_genotype("ISTA_onestage")
    plain = diagram.render_genotype_array(genotype)
    captioned = diagram.render_genotype_array(genotype, title="epoch 12")
    assert captioned.shape[1] == plain.shape[1]
    # _CAPTION_INCHES = 0.45 inch at 100 dpi: 45 rows, give or take rounding.
    assert abs(captioned.shape[0] - plain.shape[0] - 45) <= 1
    fig = diagram._figure(genotype, "epoch 12", 100)
    assert fig.get_suptitle() == "epoch 12"


def test_array_is_uint8_and_matches_png():
    genotype = genotypes.get_genotype("ISTA_ImageNet")
    array = diagram.render_genotype_array(genotype, title="epoch 3")
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] in (3, 4)
    np.testing.assert_array_equal(
        array, _decode(diagram.render_genotype(genotype, title="epoch 3"))
    )
    assert array.min() == 0 and array.max() == 255  # black ink on white


def test_save_writes_atomically(tmp_path):
    genotype = genotypes.get_genotype("ISTA_twostage")
    path = tmp_path / "cells.png"
    path.write_bytes(b"stale")
    diagram.save_genotype_diagram(genotype, path, title="epoch 12")
    assert path.read_bytes() == diagram.render_genotype(genotype, title="epoch 12")
    assert os.listdir(tmp_path) == ["cells.png"]  # replaced in place, no .tmp left
    diagram.save_genotype_diagram(genotype, str(tmp_path / "again.png"))
    assert sorted(os.listdir(tmp_path)) == ["again.png", "cells.png"]


def test_renders_in_threads_like_sequentially():
    names = ["ISTA_twostage", "DARTS_V2"] * 2
    expected = {name: diagram.render_genotype(genotypes.get_genotype(name)) for name in set(names)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(lambda name: diagram.render_genotype(genotypes.get_genotype(name)), names)
        )
    assert results == [expected[name] for name in names]
