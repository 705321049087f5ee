"""istanas_tf: ISTA-NAS (NeurIPS 2020) in TensorFlow 2 / Keras 3.

Modules: operations (candidate ops), genotypes, networks (evaluation networks),
sparse_coding (LASSO recovery and the architecture encoding), data (input pipelines),
search_model (sparse super-net), training (the loop), absorption, export.
"""

__version__ = "0.1.0"
