"""The library's layout: imports go one way, modules stay small and documented.

Read from the source with ``ast``, not by importing it:

- every library module has a floor in :data:`FLOORS`, and imports only modules on lower
  floors, at module level (no function-local imports hiding a cycle);
- no module is over :data:`MAX_MODULE_LINES` lines and the median stays under
  :data:`MAX_MEDIAN_LINES`;
- docstrings and comments are at least :data:`MIN_DOC_SHARE` of the non-blank lines;
- no code reaches into Keras' private layer tree, and neither the entry point nor the
  tests edit ``sys.path`` (the package is installed).
"""

import ast
import io
import pathlib
import statistics
import subprocess
import sys
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "istanas_tf"

# Bottom floor first. A module may import only modules listed before it.
FLOORS = [
    "istanas_tf.genotypes",
    "istanas_tf.homotopy",
    "istanas_tf.proximal",
    "istanas_tf.optimality",
    "istanas_tf.lasso",
    "istanas_tf.graph_constants",
    "istanas_tf.optimizers",
    "istanas_tf.batch_norm",
    "istanas_tf.blocks",
    "istanas_tf.operations",
    "istanas_tf.data.config",
    "istanas_tf.data.info",
    "istanas_tf.data.augment",
    "istanas_tf.data.folders",
    "istanas_tf.data.sources",
    "istanas_tf.data.pipeline",
    "istanas_tf.data",
    "istanas_tf.search_data",
    "istanas_tf.sparse_coding",
    "istanas_tf.diagram",
    "istanas_tf.cells",
    "istanas_tf.architecture",
    "istanas_tf.darts",
    "istanas_tf.networks",
    "istanas_tf.network_size",
    "istanas_tf.evaluation_size",
    "istanas_tf.serving",
    "istanas_tf.export",
    "istanas_tf.search_steps",
    "istanas_tf.search_model",
    "istanas_tf.stopping",
    "istanas_tf.absorption",
    "istanas_tf.training.config",
    "istanas_tf.training.recorded",
    "istanas_tf.training.run_dir",
    "istanas_tf.training.run_guard",
    "istanas_tf.training.runtime",
    "istanas_tf.training.summaries",
    "istanas_tf.training.state",
    "istanas_tf.training.host_memory",
    "istanas_tf.training.steps",
    "istanas_tf.training.builders",
    "istanas_tf.training.search_run",
    "istanas_tf.training.restore",
    "istanas_tf.training.evaluate",
    "istanas_tf.training.two_stage",
    "istanas_tf.training.one_stage",
    "istanas_tf.training.retrain",
    "istanas_tf.training",
    "istanas_tf.callbacks",
    "istanas_tf",
]
MAX_MODULE_LINES = 450
MAX_MEDIAN_LINES = 250
MIN_DOC_SHARE = 0.20


def _modules() -> dict[str, pathlib.Path]:
    """Every library module by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, modules: dict[str, pathlib.Path]) -> list[str]:
    """The library modules an import statement loads."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # ``from istanas_tf import genotypes`` loads the module istanas_tf.genotypes;
        # ``from istanas_tf.data import DataConfig`` loads the package istanas_tf.data.
        names = [
            f"{node.module}.{alias.name}"
            if f"{node.module}.{alias.name}" in modules
            else node.module
            for alias in node.names
        ]
    return [name for name in names if name in modules]


def _imports(path: pathlib.Path, modules) -> tuple[set[str], list[str]]:
    """(library modules imported at module level, those imported anywhere else)."""
    tree = ast.parse(path.read_text())
    top = {name for node in tree.body for name in _imported(node, modules)}
    nested = [
        name
        for node in ast.walk(tree)
        if node not in tree.body
        for name in _imported(node, modules)
    ]
    return top, nested


def test_every_module_has_a_floor_and_imports_only_below_it():
    modules = _modules()
    assert sorted(modules) == sorted(FLOORS), (
        "add new modules to FLOORS (and to WORKSPACE.md's map): "
        f"{sorted(set(modules) ^ set(FLOORS))}"
    )
    floor = {name: index for index, name in enumerate(FLOORS)}
    for name, path in modules.items():
        top, nested = _imports(path, modules)
        assert not nested, f"{name}: function-local imports of {nested}"
        upward = sorted(other for other in top if floor[other] >= floor[name])
        assert not upward, f"{name} imports {upward}, which are not on a lower floor"


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
    assert statistics.median(sizes.values()) < MAX_MEDIAN_LINES, sizes


def _doc_lines(text: str) -> tuple[int, int]:
    """(docstring and comment lines, non-blank lines) of a Python source."""
    nonblank = {i + 1 for i, line in enumerate(text.splitlines()) if line.strip()}
    documented = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                documented.update(range(first.lineno, first.end_lineno + 1))
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            documented.add(token.start[0])
    return len(documented & nonblank), len(nonblank)


def test_docstrings_and_comments_share():
    documented, total = map(
        sum, zip(*(_doc_lines(path.read_text()) for path in _modules().values()))
    )
    assert documented / total >= MIN_DOC_SHARE, f"{documented}/{total}"


@pytest.mark.parametrize(
    "pattern, where",
    [("_flatten_layers", ["istanas_tf"]), ("sys.path", ["istanas_tf", "train", "tests"])],
)
def test_no_private_layer_walks_and_no_sys_path_edits(pattern, where):
    offending = [
        str(path.relative_to(REPO))
        for folder in where
        for path in (REPO / folder).rglob("*.py")
        if path.name != "layout_test.py" and pattern in path.read_text()
    ]
    assert not offending, f"{pattern} in {offending}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_lint_and_format_are_clean(command):
    """The tree passes the configured linter and formatter (pyproject.toml)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, (
        f"ruff {' '.join(command)} failed (install it with requirements-test.txt; "
        f"`ruff check --fix` and `ruff format` repair most findings):\n"
        f"{result.stdout[-3000:]}{result.stderr[-2000:]}"
    )


IMPORT_EVERYTHING_THEN_CONFIGURE = """
import pkgutil, importlib, sys
import tensorflow as tf
import istanas_tf
for module in pkgutil.walk_packages(istanas_tf.__path__, "istanas_tf."):
    importlib.import_module(module.name)
sys.path.insert(0, "train")
import cli_flags
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
print("configured", len(tf.config.list_logical_devices("CPU")))
"""


def test_importing_the_package_leaves_tensorflow_unconfigured():
    """No module runs TensorFlow at import: once its runtime starts, logical devices and
    a MultiWorkerMirroredStrategy ("Collective ops must be configured at program
    startup") can no longer be set up, and the command line makes its strategy after
    importing the package (a module-level eager constant once broke every
    multi-worker run)."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING_THEN_CONFIGURE],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0 and "configured 2" in result.stdout, result.stderr[-3000:]
