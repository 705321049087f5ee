"""What a run is: the typed settings of each mode, one ``LoopConfig`` nested in each.

Config flows one way (docs/design.md decision 8): flags (``train/cli_flags.py``) -> these frozen
dataclasses -> the runs. Every default lives here, in the dataclasses: each mode's
config carries its own default ``LoopConfig`` (50 search epochs at batch 256 for the
two-stage search, 600 at batch 96 for the one-stage run and retraining), and the flag
help is written from them.

What a run directory records of these configs, and which settings a resume may
change, is ``training/recorded.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from istanas_tf import genotypes, networks
from istanas_tf.data import DataConfig
from istanas_tf.search_model import SearchNetworkConfig

STRATEGIES = ("default", "mirrored", "multi_worker")
MIXED_PRECISION = (None, "float16", "bfloat16")
LR_SCHEDULES = ("cosine", "warmup_linear")
# The published code's cap: a larger candidate network "may cause out of memory".
DEFAULT_MAX_PARAMS = 3_700_000

# The command-line flag of each setting whose flag is not named like the field; None:
# no flag sets it (the mode fixes it, or it is taken from the data).
FLAG_NAMES: dict[str, str | None] = {
    "network.channels": "init_channels",
    "channels": "init_channels",
    "arch.learning_rate": "arch_learning_rate",
    "arch.weight_decay": "arch_weight_decay",
    "arch.beta1": None,
    "arch.beta2": None,
    "loop.verbose": "progress",
    "network.method": None,
    "network.one_stage": None,
    "network.num_classes": None,
    "network.sync_batch_norm": None,
    "network.family": None,  # taken from the data
}


def flag_name(path: str) -> str | None:
    """The flag of the setting at dotted ``path`` (``"network.channels"`` ->
    ``"init_channels"``), or None when no flag sets it."""
    return FLAG_NAMES.get(path, path.rsplit(".", 1)[-1])


def _check(checks: list[tuple[bool, str]]) -> None:
    """Raises ValueError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _schedule_checks(config) -> list[tuple[bool, str]]:
    """The checks of the lr schedule and label smoothing that the one-stage run's
    training phase and the retraining share (``lr_schedule``, ``warmup_epochs``,
    ``label_smoothing`` fields)."""
    return [
        (
            config.lr_schedule in LR_SCHEDULES,
            f"--lr_schedule={config.lr_schedule!r} is not valid; valid: {', '.join(LR_SCHEDULES)}",
        ),
        (
            _is_int(config.warmup_epochs) and config.warmup_epochs >= 0,
            f"--warmup_epochs must be >= 0, got {config.warmup_epochs}",
        ),
        (
            0 <= config.label_smoothing < 1,
            f"--label_smoothing must be in [0, 1), got {config.label_smoothing}",
        ),
    ]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop every run shares; each field is the flag of the same name.

    Attributes:
      epochs: epochs to train (one-stage: training epochs after the search).
      batch_size: global batch size over all replicas.
      learning_rate, learning_rate_min: the weight lr's schedule, from peak to last epoch.
      momentum, weight_decay, grad_clip: weight SGD (L2 added to the gradient, PyTorch
        style; global-norm clipping of the all-reduced gradient).
      strategy: ``default`` | ``mirrored`` | ``multi_worker`` (TF_CONFIG).
      steps_per_epoch: cap on training steps per epoch (None: the whole split).
      eval_steps: cap on evaluation steps per epoch (None: the whole split; 0: none).
      deterministic: reproducible data order and kernels (op determinism).
      seed: seeds Python, NumPy and TF (``keras.utils.set_random_seed``) when
        deterministic, and the evaluation network's drop path noise.
      mixed_precision: None, ``float16`` (every optimizer scales the loss) or
        ``bfloat16``.
      verbose: a progress bar within each epoch (flag ``--progress``).
    """

    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 0.1
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    strategy: str = "default"
    steps_per_epoch: int | None = None
    eval_steps: int | None = None
    deterministic: bool = False
    seed: int = 0
    mixed_precision: str | None = None
    verbose: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        _check(
            [
                (
                    _is_int(self.epochs) and self.epochs >= 1,
                    f"--epochs must be >= 1, got {self.epochs!r}",
                ),
                (
                    _is_int(self.batch_size) and self.batch_size >= 1,
                    f"--batch_size must be >= 1, got {self.batch_size!r}",
                ),
                (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
                (
                    _is_int(self.seed) and self.seed >= 0,
                    f"--seed must be an integer >= 0, got {self.seed!r}",
                ),
                (
                    0 <= self.learning_rate_min <= self.learning_rate,
                    f"--learning_rate_min must be in [0, --learning_rate], got "
                    f"{self.learning_rate_min}",
                ),
                (self.grad_clip > 0, f"--grad_clip must be > 0, got {self.grad_clip}"),
                (self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}"),
                (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
                (
                    self.strategy in STRATEGIES,
                    f"--strategy={self.strategy!r} is not valid; valid: {', '.join(STRATEGIES)}",
                ),
                (
                    self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                    f"--steps_per_epoch must be >= 1, got {self.steps_per_epoch}",
                ),
                (
                    self.eval_steps is None or self.eval_steps >= 0,
                    f"--eval_steps must be >= 0, got {self.eval_steps}",
                ),
                (
                    self.mixed_precision in MIXED_PRECISION,
                    f"--mixed_precision={self.mixed_precision!r} is not valid; valid: float16, "
                    "bfloat16 (or unset)",
                ),
            ]
        )


@dataclasses.dataclass(frozen=True)
class ArchitectureOptimizerConfig:
    """Adam on the architecture variables (PyTorch rule, L2 added to the gradient).

    Attributes:
      learning_rate: flag ``--arch_learning_rate``.
      weight_decay: flag ``--arch_weight_decay``.
      beta1, beta2: Adam's moment decays (0.5 and 0.999 in the paper; no flags).
    """

    learning_rate: float = 6e-4
    weight_decay: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999

    def validate(self) -> None:
        _check(
            [
                (
                    self.learning_rate > 0,
                    f"--arch_learning_rate must be > 0, got {self.learning_rate}",
                ),
                (
                    self.weight_decay >= 0,
                    f"--arch_weight_decay must be >= 0, got {self.weight_decay}",
                ),
            ]
        )


class _RunSettings:
    """What the three mode configs share: validation, the loop first, then the mode's own
    checks (``checks()``), then each nested config that the mode has."""

    def checks(self) -> list[tuple[bool, str]]:
        """The mode's own (ok, message) checks."""
        return []

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        self.loop.validate()
        _check(self.checks())
        for part in ("arch", "network", "data"):
            if hasattr(self, part):
                getattr(self, part).validate()


@dataclasses.dataclass(frozen=True)
class TwoStageConfig(_RunSettings):
    """A two-stage search (docs/method.md section 3), ISTA-NAS or the DARTS baseline.

    Attributes:
      model_dir: run directory (checkpoints, logs, genotypes); rerun to resume.
      network: the super-net (C = 16, 8 cells; ``method`` ista or darts).
      data: the input settings (the training split cut in two by ``train_portion``).
      loop: 50 epochs, batch 256, weight lr cosine 0.1 -> 0.001.
      arch: Adam on b (6e-4, L2 1e-3, betas 0.5 / 0.999).
    """

    KIND: ClassVar[str] = "two_stage"

    model_dir: str
    network: SearchNetworkConfig = SearchNetworkConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    arch: ArchitectureOptimizerConfig = ArchitectureOptimizerConfig()


@dataclasses.dataclass(frozen=True)
class OneStageConfig(_RunSettings):
    """A one-stage run (docs/method.md section 4): search, then train, absorb and export.

    Attributes:
      model_dir: run directory; rerun the same command to resume (in either phase).
      network: the super-net (``one_stage=True``; the target network, 20 cells, C = 36).
      data: input settings (cutout 16); the whole training split is used.
      loop: training after the search: 600 epochs, batch 96, lr held at 0.025 while
        searching, then cosine 0.025 -> 0.001 (ImageNet: 250 epochs, batch 1024, lr 0.5,
        ``warmup_linear``).
      arch: Adam on b (3e-4, L2 1e-3, betas 0.5 / 0.999).
      search_epochs: the most search epochs. The search normally ends earlier, when
        every node has frozen; nodes still searching at this cap are frozen at their
        last z (reported as forced).
      drop_path_prob: drop path rate reached at the last training epoch (0 in search).
      freeze_tolerance: node j stops searching when ``||z_new - z_last||_2`` is at most
        this (1e-3).
      max_params: a recovered architecture whose evaluation network (this run's C and
        cells, auxiliary head not counted) has this many parameters or more is rejected
        and z_last kept (3.7M; the freeze decisions of that epoch still stand).
      max_multiply_adds: likewise for the evaluation network's multiply-adds for one
        image (convolutions and dense layers, inference; None: no limit; the ImageNet
        mobile setting: under 600M).
      lr_schedule: the training phase's lr: ``cosine`` (CIFAR) or ``warmup_linear``
        (ImageNet; the search then warms up over its first ``warmup_epochs`` and holds).
      warmup_epochs: linear warm-up length of ``warmup_linear``.
      label_smoothing: on the cross-entropy of every step (0.1 for ImageNet).
      export_dir, model_name: the final SavedModel goes to
        ``<export_dir>/<model_name>/<next version>``; default ``<model_dir>/export``.
    """

    KIND: ClassVar[str] = "one_stage"

    model_dir: str
    network: SearchNetworkConfig = SearchNetworkConfig(channels=36, layers=20, one_stage=True)
    data: DataConfig = DataConfig(cutout_length=16)
    loop: LoopConfig = LoopConfig(epochs=600, batch_size=96, learning_rate=0.025)
    arch: ArchitectureOptimizerConfig = ArchitectureOptimizerConfig(learning_rate=3e-4)
    search_epochs: int = 600
    drop_path_prob: float = 0.2
    freeze_tolerance: float = 1e-3
    max_params: int = DEFAULT_MAX_PARAMS
    max_multiply_adds: int | None = None
    lr_schedule: str = "cosine"
    warmup_epochs: int = 5
    label_smoothing: float = 0.0
    export_dir: str | None = None
    model_name: str = "istanas"

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *_schedule_checks(self),
            (self.network.one_stage, "the one-stage run needs SearchNetworkConfig(one_stage=True)"),
            (
                _is_int(self.search_epochs) and self.search_epochs >= 1,
                f"--search_epochs must be >= 1, got {self.search_epochs}",
            ),
            (
                0 <= self.drop_path_prob < 1,
                f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}",
            ),
            (
                self.freeze_tolerance >= 0,
                f"--freeze_tolerance must be >= 0, got {self.freeze_tolerance}",
            ),
            (
                _is_int(self.max_params) and self.max_params >= 1,
                f"--max_params must be >= 1, got {self.max_params}",
            ),
            (
                self.max_multiply_adds is None
                or (_is_int(self.max_multiply_adds) and self.max_multiply_adds >= 1),
                f"--max_multiply_adds must be >= 1 (or unset: no limit), got "
                f"{self.max_multiply_adds}",
            ),
        ]


@dataclasses.dataclass(frozen=True)
class TrainConfig(_RunSettings):
    """Retraining a genotype from scratch (docs/method.md section 5), then exporting it.

    Attributes:
      model_dir: run directory; rerun the same command to resume.
      genotype: a named genotype or a genotype .json path (the run records the genotype
        itself, so a changed file is noticed on resume).
      data: input settings (``cutout_length`` 16 for CIFAR).
      loop: 600 epochs, batch 96, lr 0.025 -> 0 (CIFAR); ImageNet: 250 / 1024 / 0.5.
      channels, layers: C and cells (flags ``--init_channels``, ``--layers``); None: the
        dataset family's default in ``networks.FAMILIES`` (36 / 20 CIFAR, 48 / 14
        ImageNet).
      auxiliary, auxiliary_weight: auxiliary head and its loss weight (0.4).
      drop_path_prob: drop path rate reached at the last epoch (linear ramp from 0).
      bn_after_param_free_ops: the one-stage network's extra BNs.
      lr_schedule: ``cosine`` (CIFAR) or ``warmup_linear`` (ImageNet).
      warmup_epochs: linear warm-up length of ``warmup_linear``.
      label_smoothing: 0.1 for ImageNet.
      jit_compile: XLA-compile the per-replica step.
      export_dir, model_name: where the final SavedModel goes
        (``<export_dir>/<model_name>/<version>``); default ``<model_dir>/export``.
    """

    KIND: ClassVar[str] = "train"

    model_dir: str
    genotype: str = "ISTA_twostage"
    data: DataConfig = DataConfig(cutout_length=16)
    loop: LoopConfig = LoopConfig(
        epochs=600, batch_size=96, learning_rate=0.025, learning_rate_min=0.0
    )
    channels: int | None = None
    layers: int | None = None
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    bn_after_param_free_ops: bool = False
    lr_schedule: str = "cosine"
    warmup_epochs: int = 5
    label_smoothing: float = 0.0
    jit_compile: bool = False
    export_dir: str | None = None
    model_name: str = "istanas"

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *_schedule_checks(self),
            (
                0 <= self.drop_path_prob < 1,
                f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}",
            ),
            (
                self.channels is None or (_is_int(self.channels) and self.channels >= 2),
                f"--init_channels must be >= 2, got {self.channels}",
            ),
            (
                self.layers is None or (_is_int(self.layers) and self.layers >= 3),
                f"--layers must be at least 3 (the reductions sit at cells layers//3 and "
                f"2*layers//3 and must be distinct), got {self.layers}",
            ),
        ]

    def network_settings(self, family: str) -> tuple[int, int]:
        """``(channels, layers)`` for a dataset family: the flags, else its defaults."""
        defaults = networks.FAMILIES[family]
        return (
            defaults["channels"] if self.channels is None else self.channels,
            defaults["layers"] if self.layers is None else self.layers,
        )


RunConfig = TwoStageConfig | OneStageConfig | TrainConfig
KINDS: dict[str, type] = {cls.KIND: cls for cls in (TwoStageConfig, OneStageConfig, TrainConfig)}


def resolve_genotype(config: TrainConfig) -> genotypes.Genotype:
    """The genotype a TrainConfig names: a registered name, a .json path or a JSON dict."""
    if isinstance(config.genotype, dict):
        return genotypes.from_json_dict(config.genotype)
    return genotypes.get_genotype(config.genotype)
