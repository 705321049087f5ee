"""The runs: a two-stage search, a one-stage search-and-train, retraining a genotype.

Each mode is one module with a ``*Run`` class and a ``run_*`` function taking the mode's
config (:mod:`istanas_tf.training.config`). The modules below them hold what every run
shares, each importing only those above it in this list:

* ``config``: the typed settings (one ``LoopConfig`` nested in each mode's config) and
  what ``run_config.json`` records of them.
* ``run_dir``: every file name of a run directory, and its small files.
* ``runtime``: strategy, chief, precision, seeding, learning rates; ``start`` of a run.
* ``summaries``: TensorBoard and the genotype files and diagrams after each epoch.
* ``state``: checkpoints by variable path, the metrics log, one-stage progress.
* ``steps``: distributed steps, an epoch of training or evaluation steps.
* ``builders``: the networks and optimizers each kind of run builds.
* ``restore``: a run directory's trained network (for evaluation and export).
* ``evaluate``: top-1 / top-5 / per-class accuracy (``--mode=eval``).
* ``two_stage``, ``one_stage``, ``retrain``: the runs.
"""
