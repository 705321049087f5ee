"""Our search and evaluation steps against the published PyTorch code's, same run.

Issue 15 measures us against the published ISTA-NAS code (github.com/iboing/ISTA-NAS,
PyTorch). This runs both on this machine's CPU in alternating fresh processes, at batch
64 of random 32x32 images, C = 16, 8 cells, 10 classes:

- ``search``: our sparse search step as ``search_benchmark.py`` builds and times it
  (worker ``ista``), and the published super-net
  (``ista_nas.search.models.model_search.NetWork``) on the support ours recovered,
  driven through the published search step: ``OuterTrainer.step`` (Adam on the
  architecture code, its module imported as is), then the weight step of
  ``InnerTrainer.train_epoch`` (SGD, momentum 0.9, weight decay 3e-4, gradients clipped
  at norm 5). The projection matrices are made as ``Trainer.sample_and_proj`` makes
  them: the columns off the support zeroed, so the published ``MixedOp`` runs exactly
  the supported ops. Settings: the published ``tools/train_search.py`` defaults
  (projection dimension 7).
- ``evaluation``: our evaluation-network step as ``train_step_benchmark.py`` builds it
  (worker ``graph``: ISTA_twostage, auxiliary head weight 0.4, drop path 0.2), and the
  published ``ista_nas.search.models.model.NetworkCIFAR`` of the same genotype through
  the training step of the published ``tools/evaluation.py`` (SGD 0.025, momentum 0.9,
  weight decay 3e-4, auxiliary loss 0.4, clipping at 5, ``drop_path_prob`` 0.2). Its
  ``ista_nas/utils.py`` imports torchvision and draws drop-path masks with
  ``torch.cuda.FloatTensor``; the benchmark gives the model its ``drop_path`` with the
  mask on the CPU instead (the same two in-place operations).

Nothing of the published code is in this repository: give a checkout of it.

Command (from the repository root, on an otherwise idle machine; ~4 minutes per round):

    git clone https://github.com/iboing/ISTA-NAS /tmp/ISTA-NAS
    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
    python benchmarks/published_benchmark.py --published_repo /tmp/ISTA-NAS \\
        --torch_python /tmp/torch/bin/python --rounds 3

Reading the output: per configuration and code, the medians over rounds of the step's
median time (``s/step``, after 3 warm-up steps for the published code, 2 for ours), the
first step, the build (network and optimizers), the process's peak RSS and, of it, the
pages of mapped files (``RssFile`` at the end: the libraries' code, which stays mapped;
the rest is the process's own memory), then ours / published per number, and the load
average before and after each process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types

import harness  # benchmarks/harness.py, beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "PUBLISHED_BENCHMARK_RESULT "
# configuration: (our worker script, its worker name, its result prefix, its extra flags)
OURS = {
    "search": ("search_benchmark.py", "ista", "SEARCH_BENCHMARK_RESULT ", []),
    "evaluation": (
        "train_step_benchmark.py",
        "graph",
        "TRAIN_STEP_BENCHMARK_RESULT ",
        ["--drop_path", "0.2"],
    ),
}
PUBLISHED_MODULES = ("ista_nas", "ista_nas.search", "ista_nas.search.models")
NUMBERS = (
    ("median_s", "s/step"),
    ("first_step_s", "first step s"),
    ("build_s", "build s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("rss_file_mb", "of it mapped files MB"),
)
FORMATS = {"median_s": ".3f"}
WARMUP_STEPS = 3
# The published tools/train_search.py defaults.
PROJ_DIMS, LR, MOMENTUM, WEIGHT_DECAY, GRAD_CLIP = 7, 0.025, 0.9, 3e-4, 5.0
ARCH_LR, ARCH_WEIGHT_DECAY = 3e-4, 1e-3
# The published tools/evaluation.py's auxiliary weight; drop path as ours is benchmarked.
AUXILIARY_WEIGHT, DROP_PATH = 0.4, 0.2


def import_published(repo: str, module: str):
    """``module`` of the published checkout at ``repo``, without running the packages'
    ``__init__`` files (they import torchvision and the MOSEK solver, which the step
    does not use). Raises ValueError when ``repo`` is not such a checkout."""
    import importlib

    package_dirs = [os.path.join(repo, *name.split(".")) for name in PUBLISHED_MODULES]
    if not all(os.path.isdir(d) for d in package_dirs):
        raise ValueError(
            f"--published_repo={repo!r} is not a checkout of the published ISTA-NAS code "
            "(expected ista_nas/search/models/ in it)"
        )
    for name, directory in zip(PUBLISHED_MODULES, package_dirs):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [directory]
            sys.modules[name] = package
    return importlib.import_module(module)


def support_projections(base_matrices, supports, num_ops: int):
    """Per node, the projection matrix and bias of ``Trainer.sample_and_proj`` for a
    support given as flat indices (edge * num_ops + op), z = 1 on it.

    Off the support, A's columns and the bias are zero, so every unsupported op's weight
    is exactly 0 whatever the architecture code (the published ``MixedOp`` then skips
    it). Returns float32 numpy arrays: the matrices, and the biases stacked as
    ``[edges, num_ops]``.
    """
    import numpy as np

    matrices, biases = [], []
    for base, support in zip(base_matrices, supports):
        matrix = np.array(base, dtype=np.float64)
        gram = matrix.T @ matrix - np.eye(matrix.shape[1])
        z = np.zeros(matrix.shape[1])
        z[list(support)] = 1.0
        off = np.setdiff1d(np.arange(matrix.shape[1]), list(support))
        matrix[:, off] = 0.0
        gram[:, off] = 0.0
        matrices.append(matrix.astype(np.float32))
        biases.append((gram.T @ z).reshape(-1, num_ops).astype(np.float32))
    return matrices, np.concatenate(biases)


def _random_batches(torch, args: argparse.Namespace, count: int):
    """``count`` batches of N(0, 1) images (NCHW) and uniform labels, from the seed."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return [
        (
            torch.randn(shape, generator=generator),
            torch.randint(0, args.num_classes, (args.batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


def _timed(torch, step, build_s: float, steps: int) -> dict:
    """Warm-up and timed calls of ``step`` (which returns its loss); the result line."""
    times = []
    for _ in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise RuntimeError(f"published step: non-finite loss {loss}")
    return {
        "code": f"published (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "build_s": build_s,
        "first_step_s": times[0],
        "median_s": statistics.median(times[WARMUP_STEPS:]),
        "step_times_s": times[WARMUP_STEPS:],
        "peak_rss_mb": harness.peak_rss_mb(),
        "rss_file_mb": harness.proc_status_mb("RssFile"),
    }


def _published_search(args: argparse.Namespace) -> dict:
    """The published super-net's search step (see the module docstring), timed."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    model_search = import_published(args.published_repo, "ista_nas.search.models.model_search")
    outer = import_published(args.published_repo, "ista_nas.search.outer_trainer")
    genotypes = import_published(args.published_repo, "ista_nas.search.genotypes")
    supports = json.loads(args.supports)
    num_ops = len(genotypes.PRIMITIVES)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    build_start = time.perf_counter()
    model = model_search.NetWork(args.channels, args.num_classes, args.layers, proj_dims=PROJ_DIMS)
    projections = {}
    for cell_type in ("normal", "reduce"):
        bases = [
            rng.random((PROJ_DIMS, (i + 2) * num_ops)) for i in range(len(supports[cell_type]))
        ]
        matrices, bias = support_projections(bases, supports[cell_type], num_ops)
        projections[cell_type] = ([torch.from_numpy(m) for m in matrices], torch.from_numpy(bias))
    model.init_proj_mat(projections["normal"][0], projections["reduce"][0])
    model.init_bias(projections["normal"][1], projections["reduce"][1])
    weights = [p for name, p in model.named_parameters() if "alpha" not in name]
    optimizer = torch.optim.SGD(weights, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    outer_trainer = outer.OuterTrainer(
        model,
        types.SimpleNamespace(arch_learning_rate=ARCH_LR, arch_weight_decay=ARCH_WEIGHT_DECAY),
    )
    build_s = time.perf_counter() - build_start
    (x_weights, y_weights), (x_arch, y_arch) = _random_batches(torch, args, 2)
    model.train()

    def step() -> float:
        """OuterTrainer.step, then the weight step of InnerTrainer.train_epoch."""
        outer_trainer.step(x_arch, y_arch)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_weights), y_weights)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss.item()

    return _timed(torch, step, build_s, args.steps)


def _cpu_drop_path(torch):
    """The published ``ista_nas.utils.drop_path`` with its mask drawn on the CPU (the
    published one asks for ``torch.cuda.FloatTensor``)."""

    def drop_path(x, drop_prob):
        if drop_prob > 0.0:
            keep_prob = 1.0 - drop_prob
            mask = torch.empty(x.size(0), 1, 1, 1).bernoulli_(keep_prob).requires_grad_(True)
            x.div_(keep_prob)
            x.mul_(mask)
        return x

    return drop_path


def _published_evaluation(args: argparse.Namespace) -> dict:
    """The published evaluation network's training step (see the module docstring)."""
    import torch
    from torch import nn

    genotypes = import_published(args.published_repo, "ista_nas.search.genotypes")
    # ista_nas/utils.py imports torchvision and needs CUDA for drop path: model.py gets
    # the CPU drop path in its place.
    sys.modules["ista_nas.utils"] = types.SimpleNamespace(drop_path=_cpu_drop_path(torch))
    model_module = import_published(args.published_repo, "ista_nas.search.models.model")
    cells = json.loads(args.genotype)
    genotype = genotypes.Genotype(
        normal=[tuple(pair) for pair in cells["normal"]],
        normal_concat=range(2, 6),
        reduce=[tuple(pair) for pair in cells["reduce"]],
        reduce_concat=range(2, 6),
    )
    torch.manual_seed(args.seed)

    build_start = time.perf_counter()
    model = model_module.NetworkCIFAR(args.channels, args.num_classes, args.layers, True, genotype)
    model.drop_path_prob = DROP_PATH
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    build_s = time.perf_counter() - build_start
    [(images, labels)] = _random_batches(torch, args, 1)
    model.train()

    def step() -> float:
        """The body of the published tools/evaluation.py's train() loop."""
        optimizer.zero_grad()
        logits, logits_aux = model(images)
        loss = criterion(logits, labels)
        loss += AUXILIARY_WEIGHT * criterion(logits_aux, labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss.item()

    return _timed(torch, step, build_s, args.steps)


def _run(config: str, code: str, args: argparse.Namespace, details: dict) -> dict:
    """One fresh process of ``code`` ("ours" or "published") for ``config``; its result."""
    if code == "ours":
        script, worker, prefix, extra = OURS[config]
        script, python = os.path.join(HERE, script), None
    else:
        script, worker, prefix = os.path.abspath(__file__), config, PREFIX
        python = args.torch_python
        extra = ["--published_repo", args.published_repo]
        extra += ["--supports", json.dumps(details.get("supports"))]
        extra += ["--genotype", json.dumps(details.get("genotype"))]
    extra = [*extra, "--steps", str(args.steps)]
    return harness.run_configuration(
        f"{config} / {code}", script, worker, args, extra, prefix, python=python
    )


_median = harness.median


def _print_report(results: dict, args: argparse.Namespace) -> None:
    codes = {r["code"] for c in results["configs"].values() for r in c["published"]}
    print(
        f"\nBatch {args.batch_size}, {args.image_size}x{args.image_size}, C = {args.channels}, "
        f"{args.layers} cells; {os.cpu_count()} CPUs; medians over {args.rounds} round(s), "
        f"each in a fresh process; ours: {harness.cpu_kernels()}; {', '.join(sorted(codes))}; "
        f"search support {json.dumps(results['supports'])}\n"
    )
    header = " | ".join(label for _, label in NUMBERS)
    print(f"| configuration | code | {header} | load avg before/after |")
    print("| --- | --- |" + " ---: |" * (len(NUMBERS) + 1))
    for config, by_code in results["configs"].items():
        for code in ("ours", "published"):
            cells = []
            for key, _ in NUMBERS:
                value = _median(by_code[code], key)
                cells.append("-" if value is None else format(value, FORMATS.get(key, ".1f")))
            loads = ", ".join(
                f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in by_code[code]
            )
            print(f"| {config} | {code} | {' | '.join(cells)} | {loads} |")
        ratios = []
        for key, _ in NUMBERS:
            ours, theirs = _median(by_code["ours"], key), _median(by_code["published"], key)
            ratios.append("-" if not theirs or ours is None else f"{ours / theirs:.2f}")
        print(f"| {config} | ours / published | {' | '.join(ratios)} | |")
    harness.save_results(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_network_arguments(parser)
    parser.add_argument("--published_repo", required=True, help="a checkout of iboing/ISTA-NAS")
    parser.add_argument(
        "--torch_python",
        default=sys.executable,
        help="a Python with torch and numpy for the published code (default: this one)",
    )
    parser.add_argument("--configs", default="search,evaluation", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=12, help="timed steps after the warm-up")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--supports", default="null", help=argparse.SUPPRESS)
    parser.add_argument("--genotype", default="null", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"search": _published_search, "evaluation": _published_evaluation}[args.worker]
        print(PREFIX + json.dumps(worker(args)), flush=True)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in OURS]
    if unknown or not configs:
        parser.error(f"--configs: unknown {unknown or configs}; valid: {', '.join(OURS)}")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    try:
        import_published(args.published_repo, "ista_nas.search")
    except ValueError as error:
        parser.error(str(error))
    if not os.access(args.torch_python, os.X_OK):
        parser.error(f"--torch_python={args.torch_python!r} is not an executable")
    from istanas_tf import genotypes  # the evaluation network's genotype, for both codes

    twostage = genotypes.GENOTYPES["ISTA_twostage"]
    details = {"genotype": {"normal": twostage.normal, "reduce": twostage.reduce}}
    results = {"configs": {c: {"ours": [], "published": []} for c in configs}, "supports": None}
    for _ in range(args.rounds):
        for config in configs:
            ours = _run(config, "ours", args, details)
            results["configs"][config]["ours"].append(ours)
            if config == "search":
                # Every round of ours recovers the same support (fixed seed); the published
                # step runs the one the first round recovered.
                details.setdefault("supports", ours["supports"])
                results["supports"] = details["supports"]
            results["configs"][config]["published"].append(_run(config, "published", args, details))
    _print_report(results, args)


if __name__ == "__main__":
    main()
