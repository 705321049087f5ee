"""A two-stage ISTA-NAS search with Keras' ``model.fit``, as a notebook runs it.

Copy the code below into a notebook, or run the file. The environment variables only
shrink it (the defaults read CIFAR-10 through tensorflow-datasets, downloaded on first
use, and take a few minutes on a CPU):

    ISTANAS_DATASET=folder:PATH/TO/cifar10 ISTANAS_EXAMPLES_PER_CLASS=16 \\
        python examples/search_with_fit.py

``fit`` runs the super-net's own ``train_step`` (per batch an architecture step on a
``search_arch`` batch, then a weight step on a ``search_weights`` batch);
``SparseRecovery`` recovers the architecture after each epoch and traces the step again
when the support changed. It runs on one host, under the default strategy or
``MirroredStrategy`` (build and compile the model in ``strategy.scope()``). Keras 3
``fit`` does not run under ``MultiWorkerMirroredStrategy``: search on several machines
with ``train/main.py --strategy=multi_worker``. The last line printed is the genotype
as JSON (``istanas_tf.get_genotype`` reads it back from a file).
"""

import json
import os

import keras

import istanas_tf as ista
from istanas_tf import callbacks, data, genotypes, optimizers, search_data

DATASET = os.environ.get("ISTANAS_DATASET", "cifar10")
EXAMPLES_PER_CLASS = int(os.environ.get("ISTANAS_EXAMPLES_PER_CLASS", "500"))  # 0: all
CHANNELS = int(os.environ.get("ISTANAS_CHANNELS", "8"))  # the paper searches C = 16
LAYERS = int(os.environ.get("ISTANAS_LAYERS", "5"))  # and 8 cells
EPOCHS = int(os.environ.get("ISTANAS_EPOCHS", "2"))
STEPS_PER_EPOCH = int(os.environ.get("ISTANAS_STEPS_PER_EPOCH", "0")) or None  # None: all
LOG_DIR = os.environ.get("ISTANAS_LOG_DIR", "search_logs")

keras.utils.set_random_seed(0)
data_config = ista.DataConfig(dataset=DATASET, max_examples_per_class=EXAMPLES_PER_CLASS)
info = data.get_dataset_info(data_config)

# A small super-net and the paper's optimizers: SGD on the weights (its lr set per
# epoch by the schedule below), Adam on the architecture codes b.
model = ista.SearchNetwork(
    ista.SearchNetworkConfig(num_classes=info.num_classes, channels=CHANNELS, layers=LAYERS)
)
model.build_all(info.image_size[0])  # every candidate op's weights, the first recovery
model.compile(
    optimizers.TorchSGD(0.1, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
    optimizers.TorchAdam(6e-4, beta_1=0.5, beta_2=0.999, l2=1e-3),
)

# Batches of (search_weights, search_arch) pairs; validation on search_arch.
search = search_data.search_datasets(
    data_config, info, batch_size=32, steps_per_epoch=STEPS_PER_EPOCH, eval_steps=2
)
recovery = callbacks.SparseRecovery()
model.fit(
    **search.fit_arguments(),
    epochs=EPOCHS,
    verbose=2,
    callbacks=[
        recovery,  # before the callbacks that record its logs
        callbacks.cosine_learning_rate_schedule(EPOCHS, 0.1, 0.001),
        keras.callbacks.TensorBoard(LOG_DIR),
    ],
)
print(json.dumps(genotypes.to_json_dict(model.genotype())))
