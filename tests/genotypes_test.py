"""Genotypes: the published cells, lookup, and the genotype.json round trip."""

import json

import pytest

from istanas_tf import genotypes


def test_primitives_in_method_order_without_none():
    # docs/method.md section 1's order, which fixes the flat index predecessor * 7 + op.
    expected = "max_pool_3x3 avg_pool_3x3 skip_connect sep_conv_3x3 sep_conv_5x5 dil_conv_3x3"
    assert genotypes.PRIMITIVES == (*expected.split(), "dil_conv_5x5")


def test_published_genotypes_transcribed():
    g = genotypes.get_genotype("ISTA_twostage")
    assert g.normal[:3] == (("skip_connect", 0), ("dil_conv_3x3", 1), ("sep_conv_5x5", 0))
    assert g.reduce[-1] == ("sep_conv_5x5", 1)
    assert genotypes.get_genotype("DARTS_V1").reduce[-1] == ("avg_pool_3x3", 0)
    assert genotypes.get_genotype("ISTA_ImageNet").normal[-1] == ("dil_conv_5x5", 4)
    for genotype in genotypes.GENOTYPES.values():
        assert len(genotype.normal) == len(genotype.reduce) == 8
        assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)


@pytest.mark.parametrize("name", list(genotypes.GENOTYPES))
def test_json_round_trip(name, tmp_path):
    genotype = genotypes.get_genotype(name)
    path = tmp_path / f"{name}.json"
    genotypes.save_json(genotype, path)
    assert genotypes.load_json(path) == genotype
    assert genotypes.get_genotype(str(path)) == genotype
    assert json.loads(path.read_text())["normal"][0] == list(genotype.normal[0])


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        genotypes.GenotypeError,
        match="valid names: ISTA_twostage, ISTA_onestage, ISTA_ImageNet, DARTS_V1, DARTS_V2",
    ):
        genotypes.get_genotype("PC_DARTS")


def _write(tmp_path, data):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _valid():
    return genotypes.to_json_dict(genotypes.DARTS_V2)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda d: d["normal"].__setitem__(3, ["conv_7x7", 1]),
            r"normal\[3\].*unknown op 'conv_7x7'",
        ),
        (
            lambda d: d["reduce"].__setitem__(2, ["skip_connect", 3]),
            r"reduce\[2\] \(node 1\): input index 3 out of range; node 1 can read inputs 0..2",
        ),
        (
            lambda d: d["reduce"].__setitem__(0, ["skip_connect", 2]),
            r"reduce\[0\] \(node 0\): input index 2 out of range; node 0 can read inputs 0..1",
        ),
        (lambda d: d["normal"].pop(), r"normal: expected 4 nodes x 2 picks = 8.*got 7"),
        (lambda d: d.pop("reduce"), r"missing field 'reduce'"),
        (lambda d: d.__setitem__("normal", [["sep_conv_3x3"]] * 8), r"field 'normal' must be"),
    ],
)
def test_malformed_json_names_the_field(tmp_path, mutate, message):
    data = _valid()
    mutate(data)
    with pytest.raises(genotypes.GenotypeError, match=message):
        genotypes.load_json(_write(tmp_path, data))


def test_reduce_input_index_at_upper_bound_is_valid(tmp_path):
    data = _valid()
    data["reduce"][2] = ["skip_connect", 2]  # node 1 may read node 0 (input 2)
    assert genotypes.load_json(_write(tmp_path, data)).reduce[2] == ("skip_connect", 2)


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(genotypes.GenotypeError, match="is not valid JSON"):
        genotypes.load_json(_write(tmp_path, "{normal: oops"))
    with pytest.raises(genotypes.GenotypeError, match="does not exist"):
        genotypes.get_genotype(str(tmp_path / "missing.json"))


def test_search_run_file_with_metadata_wrapper(tmp_path):
    data = {"epoch": 3, "genotype": _valid()}
    assert genotypes.load_json(_write(tmp_path, data)) == genotypes.DARTS_V2
