"""train/cli_flags.py: flags -> configs, with every default taken from the dataclasses."""

import importlib.util
import sys

import pytest
from absl import flags
from main_runner import REPO

from istanas_tf.training import config as config_lib


@pytest.fixture(scope="module")
def cli():
    """The flags module of the command line, its flags defined on a private FlagValues."""
    spec = importlib.util.spec_from_file_location("cli_flags", REPO / "train" / "cli_flags.py")
    module = importlib.util.module_from_spec(spec)
    # As an import would: absl records each flag's defining module from sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    values = flags.FlagValues()
    module.define_flags(values)
    return module, values


def _parse(cli, *args):
    module, values = cli
    values.unparse_flags()
    values(["main.py", *args])
    return module, values


def test_unset_flags_leave_every_dataclass_default(cli):
    module, values = _parse(cli, "--model_dir=/tmp/x")
    assert module.build_config(config_lib.TwoStageConfig, values) == config_lib.TwoStageConfig(
        model_dir="/tmp/x"
    )
    assert module.build_config(config_lib.OneStageConfig, values) == config_lib.OneStageConfig(
        model_dir="/tmp/x"
    )
    assert module.build_config(config_lib.TrainConfig, values) == config_lib.TrainConfig(
        model_dir="/tmp/x"
    )


def test_given_flags_reach_every_field_they_name(cli):
    module, values = _parse(
        cli,
        "--model_dir=/tmp/x",
        "--seed=7",
        "--deterministic",
        "--init_channels=0",
        "--epochs=3",
        "--arch_learning_rate=1e-4",
        "--mean=0.5,0.5,0.5",
        "--std=0.2,0.2,0.2",
        "--progress=false",
    )
    config = module.build_config(config_lib.OneStageConfig, values)
    assert (config.loop.seed, config.data.seed, config.network.seed) == (7, 7, 7)
    assert config.loop.deterministic and config.data.deterministic
    assert config.network.channels == 0  # not swallowed by an `or` default...
    with pytest.raises(ValueError, match="--init_channels"):
        config.validate()  # ...but refused, naming the flag
    assert (config.loop.epochs, config.arch.learning_rate) == (3, 1e-4)
    assert config.data.mean == (0.5, 0.5, 0.5) and not config.loop.verbose
    # What a flag does not name keeps the mode's own default.
    assert config.loop.batch_size == config_lib.OneStageConfig(model_dir="").loop.batch_size


def test_search_config_follows_the_method(cli):
    module, values = _parse(cli, "--model_dir=/tmp/x", "--method=darts")
    assert module.search_config(values).network.method == "darts"
    module, values = _parse(cli, "--model_dir=/tmp/x", "--method=ista_onestage")
    config = module.search_config(values)
    assert isinstance(config, config_lib.OneStageConfig) and config.network.one_stage


def test_recovery_solver_flags_reach_both_searches_and_a_bad_solver_is_named(cli):
    module, values = _parse(
        cli, "--model_dir=/tmp/x", "--recovery_solver=fista", "--recovery_iterations=500"
    )
    for cls in (config_lib.TwoStageConfig, config_lib.OneStageConfig):
        network = module.build_config(cls, values).network
        assert (network.recovery_solver, network.recovery_iterations) == ("fista", 500)
    assert "(default: 'homotopy')" in values["recovery_solver"].help
    module, values = _parse(cli, "--model_dir=/tmp/x", "--recovery_solver=lars")
    with pytest.raises(ValueError, match="--recovery_solver='lars'.*homotopy, fista, ista"):
        module.build_config(config_lib.TwoStageConfig, values).validate()


def test_help_shows_the_dataclass_defaults_per_mode(cli):
    _, values = cli
    assert "train 600, one-stage 600, two-stage 50" in values["epochs"].help
    assert "train 96, one-stage 96, two-stage 256" in values["batch_size"].help
    assert "(default: 0.9)" in values["momentum"].help
    # The help itself is the dataclass's documentation of the field.
    assert values["momentum"].help.startswith("weight SGD (L2 added to the gradient")
    assert values["mean"].help.startswith("per-channel normalisation mean")


def test_every_setting_has_a_flag_with_help_and_a_type(cli):
    module, values = cli
    for flag, (_, help_text) in module.setting_flags().items():
        assert help_text, f"--{flag}: its field has no docstring entry"
        assert values[flag].default is None, flag  # the dataclasses hold the defaults
    assert values["seed"].flag_type() == "int"
    assert "list" in values["mean"].flag_type()
    assert values["deterministic"].boolean


# Every integer setting a mode uses, with a value it must refuse.
_BAD_INTEGERS = {
    config_lib.TwoStageConfig: {
        "init_channels": 0,
        "layers": 2,
        "proj_dims": 0,
        "sparseness": 0,
        "seed": -1,
        "batch_size": 0,
        "epochs": 0,
        "steps_per_epoch": 0,
        "eval_steps": -1,
        "max_examples_per_class": -1,
        "recovery_iterations": 0,
    },
    config_lib.OneStageConfig: {
        "search_epochs": 0,
        "cutout_length": -1,
        "init_channels": 3,
        "recovery_iterations": 0,
        "max_multiply_adds": 0,
        "warmup_epochs": -1,
    },
    config_lib.TrainConfig: {"init_channels": 0, "layers": 2, "warmup_epochs": -1, "seed": -1},
}


@pytest.mark.parametrize(
    "cls,flag,value",
    [(cls, flag, value) for cls, bad in _BAD_INTEGERS.items() for flag, value in bad.items()],
)
def test_every_integer_flag_is_validated_naming_the_flag(cli, cls, flag, value):
    module, values = _parse(cli, "--model_dir=/tmp/x", f"--{flag}={value}")
    with pytest.raises(ValueError, match=f"--{flag}"):
        module.build_config(cls, values).validate()


def test_flags_text_holds_only_this_projects_flags_that_were_given(cli):
    module, values = _parse(cli, "--model_dir=/tmp/x", "--epochs=3", "--method=darts")
    lines = module.flags_text(values).splitlines()
    # The setting flags given, then mode and method (always recorded), nothing of absl.
    assert lines[:2] == ["--epochs=3", "--model_dir=/tmp/x"]
    assert lines[2:] == ["--mode=search", "--method=darts"]
    assert all(
        line.split("=")[0].lstrip("-").removeprefix("no") in {*module.project_flag_names(values)}
        for line in lines
    )


def test_project_flags_are_those_define_flags_defines(cli):
    """Found from absl's record of each flag's module: every flag define_flags makes
    (the settings and the mode flags), none defined elsewhere (absl's, TF's, a user's)."""
    module, _ = cli
    values = flags.FlagValues()
    flags.DEFINE_string("defined_elsewhere", None, "not this project's", flag_values=values)
    module.define_flags(values)
    names = module.project_flag_names(values)
    assert names[: len(module.setting_flags())] == list(module.setting_flags())
    assert names[len(module.setting_flags()) :][:2] == ["mode", "method"]
    assert {"split", "saved_model", "version", "overwrite", "diagram"} <= set(names)
    assert "defined_elsewhere" not in names and len(names) == len(values) - 1


@pytest.mark.parametrize("flagfile", sorted(p.name for p in (REPO / "train/configs").glob("*.cfg")))
def test_every_shipped_flagfile_makes_a_valid_config(cli, flagfile):
    module, values = _parse(
        cli, f"--flagfile={REPO / 'train/configs' / flagfile}", "--model_dir=/tmp/x"
    )
    config = (
        module.build_config(config_lib.TrainConfig, values)
        if values.mode == "train"
        else module.search_config(values)
    )
    config.validate()
    if flagfile in ("imagenet_train.cfg", "imagenet_one_stage.cfg"):  # 8 GPUs, one machine
        assert config.loop.strategy == "mirrored" and config.loop.batch_size == 1024
        assert (config.lr_schedule, config.label_smoothing) == ("warmup_linear", 0.1)
    if flagfile.startswith("imagenet_one_stage"):  # the mobile setting
        assert config.max_multiply_adds == 600_000_000 and config.network.channels in (48, 8)
