"""BN absorption: the one-stage super-net becomes the evaluation network of its genotype.

Every op of the one-stage super-net ends in an affine BN (docs/method.md section 4), so the
architecture weight of a selected op folds into that BN. In inference mode

    alpha * BN(x) = alpha * (gamma * (x - mu) / sqrt(var + eps) + beta)
                  = (alpha * gamma) * (x - mu) / sqrt(var + eps) + (alpha * beta)
                  = BN'(x),   gamma' = alpha * gamma,  beta' = alpha * beta,

with the moving statistics mu, var unchanged. The identity holds for any real alpha,
negative included (BN is affine in gamma and beta). After folding, node j of a cell is
``sum_i op_i'(x_{p_i})``: the evaluation cell of the genotype with a BN after pooling
and identity ops (``bn_after_param_free_ops=True``), with no architecture variables, and
its outputs equal the super-net's in inference mode.
"""

from __future__ import annotations

import keras
import numpy as np

from istanas_tf import genotypes, networks, search_model


def _copy_weights(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    """Copies every variable of ``source`` into the same-structured layer ``target``.

    Both layers were built by the same constructor with the same arguments, so their
    ``weights`` lists correspond one to one (checked by shape and variable name).
    """
    src, dst = source.weights, target.weights
    if len(src) != len(dst):
        raise ValueError(
            f"cannot copy {source.name} ({len(src)} variables) into "
            f"{target.name} ({len(dst)} variables)"
        )
    for s, d in zip(src, dst):
        if tuple(s.shape) != tuple(d.shape) or s.name != d.name:
            raise ValueError(
                f"cannot copy {s.path} {tuple(s.shape)} into {d.path} {tuple(d.shape)}"
            )
        d.assign(s)


def absorb(
    super_net: search_model.SearchNetwork, image_size: int = 32, auxiliary: bool | None = None
) -> networks.NetworkCIFAR | networks.NetworkImageNet:
    """Builds the evaluation network of a one-stage super-net's current genotype.

    Copies the stem (NetworkImageNet's two stems for ``family="imagenet"``), each cell's
    preprocessing, each selected op (node j's flat candidate ``predecessor * 7 + op``
    becomes the evaluation cell's op at the genotype position ``2 * j + i``, picks
    ordered as ``support_tuple()``: by descending |z|), the classifier and the auxiliary
    head, and folds each selected op's alpha into its last BN:
    ``gamma' = alpha * gamma``, ``beta' = alpha * beta`` (see the module docstring;
    docs/method.md section 4).

    Args:
      super_net: a built ``SearchNetwork`` with ``config.one_stage``.
      image_size: input size used to create the evaluation network's weights.
      auxiliary: give the result an auxiliary head; default: when the super-net has one.

    Returns:
      A ``networks.NetworkCIFAR`` (or ``NetworkImageNet``, by the super-net's
      ``config.family``) whose inference logits equal the super-net's.
    """
    config = super_net.config
    if not config.one_stage:
        raise ValueError(
            "absorption needs the one-stage super-net "
            "(SearchNetworkConfig(one_stage=True)): only its ops all end in "
            "an affine BN"
        )
    if auxiliary is None:
        auxiliary = super_net.auxiliary_head is not None
    if auxiliary and super_net.auxiliary_head is None:
        raise ValueError("auxiliary=True, but the super-net has no auxiliary head")
    genotype = super_net.genotype()
    network = networks.build_network(
        networks.FAMILIES[config.family]["kind"],
        genotype,
        config.channels,
        config.layers,
        config.num_classes,
        image_size,
        auxiliary=auxiliary,
        bn_after_param_free_ops=True,
        drop_path_rate=float(keras.ops.convert_to_numpy(super_net.drop_path_rate)),
    )

    for source, target in zip(super_net.stem_layers, network.stem_layers, strict=True):
        _copy_weights(source, target)
    supports = super_net.supports
    alphas = {
        cell_type: [a.numpy() for a in node_alphas]
        for cell_type, node_alphas in super_net.alphas().items()
    }
    for source, target in zip(super_net.cells, network.cells):
        cell_type = genotypes.cell_type(source.reduction)
        _copy_weights(source.preprocess0, target.preprocess0)
        _copy_weights(source.preprocess1, target.preprocess1)
        position = 0
        for node, support in enumerate(supports[cell_type]):
            for i, index in enumerate(support):
                op = target.ops[position]
                _copy_weights(source.candidates[node][index], op)
                last_bn = op.last_bn
                if last_bn is None or not last_bn.scale or not last_bn.center:
                    raise ValueError(f"{op.path} does not end in an affine BN")
                alpha = np.float32(alphas[cell_type][node][i])
                last_bn.gamma.assign(alpha * last_bn.gamma.numpy())
                last_bn.beta.assign(alpha * last_bn.beta.numpy())
                position += 1
    _copy_weights(super_net.classifier, network.classifier)
    if auxiliary:
        _copy_weights(super_net.auxiliary_head, network.auxiliary_head)
    return network
