"""Network sizes (``--mode=describe``): published sizes against an independent count."""

import math

import pytest

from istanas_tf import genotypes, network_size, networks

# ---------------------------------------------------------------------------------------
# Independent oracle: the DARTS PyTorch networks counted by hand, layer by layer.
# Each term is (weights of the layer, multiply-adds = output pixels * weights per pixel).
# ---------------------------------------------------------------------------------------


def _conv(c_in, c_out, k, out_hw, groups=1):
    weights = k * k * (c_in // groups) * c_out
    return weights, out_hw * out_hw * weights


def _bn(c, affine=True):
    return (2 * c if affine else 0), 0


def _op(name, c, stride, in_hw, bn_after_param_free):
    out_hw = math.ceil(in_hw / stride)
    terms = []
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        if bn_after_param_free:
            terms.append(_bn(c))
    elif name == "skip_connect":
        if stride == 2:  # FactorizedReduce
            terms += [_conv(c, c // 2, 1, out_hw), _conv(c, c // 2, 1, out_hw), _bn(c)]
        elif bn_after_param_free:
            terms.append(_bn(c))
    elif name.startswith("sep_conv"):
        k = int(name[-1])
        terms += [
            _conv(c, c, k, out_hw, groups=c),
            _conv(c, c, 1, out_hw),
            _bn(c),
            _conv(c, c, k, out_hw, groups=c),
            _conv(c, c, 1, out_hw),
            _bn(c),
        ]
    elif name.startswith("dil_conv"):
        k = int(name[-1])
        terms += [_conv(c, c, k, out_hw, groups=c), _conv(c, c, 1, out_hw), _bn(c)]
    return terms


def darts_count(genotype, c, layers, num_classes, imagenet, bn_after_param_free=False):
    """(params without aux, aux params, multiply-adds) of the DARTS network."""
    terms, aux_terms = [], []
    if imagenet:
        terms += [
            _conv(3, c // 2, 3, 112),
            _bn(c // 2),
            _conv(c // 2, c, 3, 56),
            _bn(c),
            _conv(c, c, 3, 28),
            _bn(c),
        ]
        hw_pp, hw_p, c_pp, c_p, reduction_prev = 56, 28, c, c, True
    else:
        terms += [_conv(3, 3 * c, 3, 32), _bn(3 * c)]
        hw_pp, hw_p, c_pp, c_p, reduction_prev = 32, 32, 3 * c, 3 * c, False
    c_curr = c
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            c_curr *= 2
        if reduction_prev:
            terms += [
                _conv(c_pp, c_curr // 2, 1, hw_p),
                _conv(c_pp, c_curr // 2, 1, hw_p),
                _bn(c_curr),
            ]
        else:
            terms += [_conv(c_pp, c_curr, 1, hw_pp), _bn(c_curr)]
        terms += [_conv(c_p, c_curr, 1, hw_p), _bn(c_curr)]
        out_hw = hw_p // 2 if reduction else hw_p
        picks = genotype.reduce if reduction else genotype.normal
        for op_name, index in picks:
            stride = 2 if reduction and index < 2 else 1
            # Cell inputs are at the previous resolution, intermediate nodes at the new one.
            in_hw = hw_p if index < 2 else out_hw
            terms += _op(op_name, c_curr, stride, in_hw, bn_after_param_free)
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        hw_pp, hw_p, c_pp, c_p = hw_p, out_hw, c_p, len(concat) * c_curr
        reduction_prev = reduction
        if i == 2 * layers // 3:
            aux_terms += [_conv(c_p, 128, 1, 0), _bn(128), _conv(128, 768, 2, 0)]
            if not imagenet:
                aux_terms.append(_bn(768))
            aux_terms.append((768 * num_classes + num_classes, 0))
    terms.append((c_p * num_classes + num_classes, c_p * num_classes))
    return (sum(t[0] for t in terms), sum(t[0] for t in aux_terms), sum(t[1] for t in terms))


PUBLISHED = [
    # name, kind, C, layers, classes, image size, one-stage BNs, published params
    ("ISTA_twostage", "cifar", 36, 20, 10, 32, False, 3.32e6),
    ("ISTA_onestage", "cifar", 36, 20, 10, 32, True, 3.37e6),
    ("DARTS_V2", "cifar", 36, 20, 10, 32, False, 3.35e6),
    ("ISTA_ImageNet", "imagenet", 48, 14, 1000, 224, False, 5.65e6),
]


@pytest.mark.parametrize(
    "name,kind,c,layers,classes,size,bn_pf,published", PUBLISHED, ids=[p[0] for p in PUBLISHED]
)
def test_published_sizes_match_independent_count(
    name, kind, c, layers, classes, size, bn_pf, published
):
    network = networks.build_network(
        kind, name, c, layers, classes, size, auxiliary=True, bn_after_param_free_ops=bn_pf
    )
    params, aux_params, macs = darts_count(
        genotypes.get_genotype(name), c, layers, classes, kind == "imagenet", bn_pf
    )
    assert network_size.count_parameters(network) == params
    assert network_size.count_parameters(network, include_auxiliary=True) == params + aux_params
    assert network_size.count_multiply_adds(network, size) == macs
    assert round(params / 1e6, 2) == published / 1e6
    if name == "ISTA_ImageNet":
        assert round(macs / 1e6) == 621  # convs + dense; the paper reports 638M


def test_describe_reports_the_published_two_stage_size():
    summary = network_size.describe("ISTA_twostage", "cifar", 10)
    assert (summary["params"], summary["params_with_auxiliary"], summary["multiply_adds"]) == (
        3_316_726,
        3_793_152,
        515_226_240,
    )
    assert (summary["channels"], summary["layers"]) == (36, 20)
