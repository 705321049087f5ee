"""istanas_tf: ISTA-NAS (NeurIPS 2020) in TensorFlow 2 / Keras 3.

The public API, for notebooks and scripts (the command line is ``train/main.py``):

* runs: ``run_two_stage``, ``run_one_stage``, ``run_training`` with their configs
  ``TwoStageConfig``, ``OneStageConfig``, ``TrainConfig`` (each nests a ``LoopConfig``,
  a ``DataConfig`` and, for searches, a ``SearchNetworkConfig``); ``evaluate`` and
  ``export_run`` for a finished run directory;
* networks: ``build_network`` (an evaluation network from a ``Genotype``),
  ``SearchNetwork`` (the super-net), ``absorb`` (one-stage super-net -> evaluation
  network), ``describe`` (sizes), ``export_saved_model``, ``load_for_finetuning`` (an
  exported version's network, rebuilt with its weights, ready to train);
* genotypes: ``Genotype``, ``get_genotype`` (a name or a JSON file), ``GENOTYPES``.

The modules, from the bottom floor up: ``genotypes``; ``operations``, ``lasso``,
``optimizers``, ``data``; ``sparse_coding``, ``cells``, ``diagram``; ``architecture``,
``networks``; ``network_size``, ``search_model``, ``export``; ``stopping``,
``absorption``; ``training``. Each imports only from floors below its own.
"""

from istanas_tf.absorption import absorb
from istanas_tf.data import DataConfig
from istanas_tf.export import export_saved_model, load_for_finetuning
from istanas_tf.genotypes import GENOTYPES, Genotype, get_genotype
from istanas_tf.network_size import describe
from istanas_tf.networks import build_network
from istanas_tf.search_model import SearchNetwork, SearchNetworkConfig
from istanas_tf.training.config import LoopConfig, OneStageConfig, TrainConfig, TwoStageConfig
from istanas_tf.training.evaluate import evaluate
from istanas_tf.training.one_stage import run_one_stage
from istanas_tf.training.restore import export_run
from istanas_tf.training.retrain import run_training
from istanas_tf.training.two_stage import run_two_stage

__version__ = "0.2.0"

__all__ = [
    "DataConfig",
    "GENOTYPES",
    "Genotype",
    "LoopConfig",
    "OneStageConfig",
    "SearchNetwork",
    "SearchNetworkConfig",
    "TrainConfig",
    "TwoStageConfig",
    "absorb",
    "build_network",
    "describe",
    "evaluate",
    "export_run",
    "load_for_finetuning",
    "export_saved_model",
    "get_genotype",
    "run_one_stage",
    "run_training",
    "run_two_stage",
]
