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
* genotypes: ``Genotype``, ``get_genotype`` (a name or a JSON file), ``GENOTYPES``;
* ``model.fit`` on the super-net: ``search_datasets`` (its data, from the command
  line's pipeline), the callbacks ``SparseRecovery`` (two-stage) and
  ``OneStageStopping`` (one-stage) and ``cosine_learning_rate_schedule``
  (module ``istanas_tf.callbacks``; example: ``examples/search_with_fit.py``).

The modules, from the bottom floor up: ``genotypes``; ``operations``, ``lasso``,
``optimizers``, ``data``; ``sparse_coding``, ``cells``, ``diagram``; ``architecture``,
``networks``; ``network_size``, ``search_model``, ``export``; ``stopping``,
``absorption``; ``training``; ``callbacks``. Each imports only from floors below its own
(``search_data`` sits just above ``data``).
"""

from istanas_tf.absorption import absorb
from istanas_tf.callbacks import OneStageStopping, SparseRecovery, cosine_learning_rate_schedule
from istanas_tf.data import DataConfig
from istanas_tf.export import export_saved_model, load_for_finetuning
from istanas_tf.genotypes import GENOTYPES, Genotype, get_genotype
from istanas_tf.network_size import describe
from istanas_tf.networks import build_network
from istanas_tf.search_data import search_datasets
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
    "OneStageStopping",
    "SearchNetwork",
    "SearchNetworkConfig",
    "SparseRecovery",
    "TrainConfig",
    "TwoStageConfig",
    "absorb",
    "build_network",
    "cosine_learning_rate_schedule",
    "describe",
    "evaluate",
    "export_run",
    "load_for_finetuning",
    "export_saved_model",
    "get_genotype",
    "run_one_stage",
    "run_training",
    "run_two_stage",
    "search_datasets",
]
