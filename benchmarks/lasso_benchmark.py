"""Exact LASSO recovery: our TF homotopy against an independent exact scipy solver.

One recovery of ISTA-NAS solves 8 problems (4 normal + 4 reduce nodes): A_j is 7 x n_j,
n_j = 14, 21, 28, 35, entries Uniform[0, 1); lam = 1e-5; b ~ scale * N(0, 1) in two
regimes, scale 1e-3 (b at its initialisation) and 1 (a b that has trained). For each
regime and seed this script times:

* ``ours``: ``lasso.solve_lasso`` on the 8 problems zero-padded to 7 x 35, one
  batched call, cold start (no warm start), after a first call that traced it: the plain
  graph a search runs, and ``ours XLA`` the XLA-compiled loop (``xla=True``); the first
  calls (trace, and trace + compile) are timed once, in a line above the table;
* ``scipy``: the same 8 problems, one by one, through the LASSO's dual as a
  least-distance problem solved by ``scipy.optimize.nnls`` (Lawson-Hanson, an exact
  active-set method), then the exact KKT solve on the support it finds;

and reports medians over repeats, the relative objective gap (ours - scipy) / scipy
(largest |gap| over the 8 problems), the KKT violation of our solution relative to lam,
and how many nodes get the same top-2 support. A last row times the full recovery
through two ``ArchitectureEncoding`` layers (``solve_jointly``, warm-started from the
last z after a small change of every b), which is what a search runs once per epoch.

Command (from the repository root; about 20 seconds on 2 CPU cores):

    python benchmarks/lasso_benchmark.py

Options: ``--seeds N``, ``--repeats N``. Prints a markdown table.

``--iterative`` compares ISTA and FISTA (``lasso.solve_lasso_iterative``) with the exact
homotopy instead: over ``--problem_sets`` random recoveries per regime (8 nodes each),
how often their top-2 per node equals the homotopy's and how often the certificate of
``optimality`` proves it, at each of ``--iterations`` (default 1000, 10000, 100000),
started cold (z = 0) and warm (from the exact optimum of a b 10 % away, as after an
epoch of architecture steps); and the median time of one 8-node solve, and of a whole
``solve_jointly`` recovery (solve, selection, KKT report and certificate), per solver.
The regimes: b ~ 1e-3 N(0, 1) (initialisation) and b ~ s N(0, 1) with s log-uniform in
[1e-2, 1e-1] per node (a trained b). About 6 minutes on 2 CPU cores:

    python benchmarks/lasso_benchmark.py --iterative
"""

import argparse
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import tensorflow as tf  # noqa: E402

from istanas_tf import architecture, lasso, optimality, sparse_coding  # noqa: E402

# The independent oracle is test code (scipy is a test-only dependency).
sys.path.insert(0, str(REPO_ROOT / "tests"))
from lasso_oracle import kkt_violation, objective, scipy_lasso  # noqa: E402

LAM = 1e-5
NODE_WIDTHS = (14, 21, 28, 35) * 2  # normal then reduce
REGIMES = (("b ~ 1e-3 N(0,1)", 1e-3), ("b ~ N(0,1)", 1.0))


def recovery_problems(scale: float, seed: int):
    """A: [8, 7, 35] (zero-padded), b: [8, 7], float64."""
    rng = np.random.default_rng(seed)
    A = np.zeros((len(NODE_WIDTHS), 7, max(NODE_WIDTHS)))
    for i, n in enumerate(NODE_WIDTHS):
        A[i, :, :n] = rng.uniform(size=(7, n))
    return A, scale * rng.standard_normal((len(NODE_WIDTHS), 7))


def median_ms(fns, repeats: int) -> list[float]:
    """Median wall time of each function in ms, the functions run alternately so that a
    change of load on the machine affects them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [1e3 * float(np.median(record)) for record in times]


def top2(z):
    return set(np.argsort(-np.abs(z), kind="stable")[:2])


def trained_problems(seed: int):
    """A recovery after training: b ~ s N(0, 1), s log-uniform in [1e-2, 1e-1] per node."""
    A, b = recovery_problems(1.0, seed)
    scales = 10.0 ** np.random.default_rng([seed, 1]).uniform(-2.0, -1.0, size=(len(b), 1))
    return A, scales * b


def picks_and_certificates(A, b, z):
    """Per node: the top-2 picks of z (as sets), whether the certificate proves them, and
    the KKT violation in units of lam."""
    lower, upper = optimality.magnitude_bounds(A, b, z, LAM)
    picks, certified = [], []
    for i, n in enumerate(NODE_WIDTHS):
        support = sparse_coding.select_support(z[i, :n], 2)
        picks.append(set(support.numpy()))
        certified.append(
            bool(optimality.support_certified(lower[i, :n], upper[i, :n], support, 7, False))
        )
    return picks, certified, optimality.kkt_violation(A, b, z, LAM).numpy()


def iterative_comparison(args) -> None:
    """The --iterative tables (module docstring)."""
    iterations = [int(i) for i in args.iterations.split(",")]
    print(f"load average before: {open('/proc/loadavg').read().strip()}")
    print(f"{args.problem_sets} problem sets of 8 nodes per regime; lam = {LAM}\n")
    print(
        "| regime | solver | iterations | start | same top-2 as homotopy | certified "
        "| KKT violation / lam, median (max) |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    regimes = (
        ("b ~ 1e-3 N(0,1)", lambda seed: recovery_problems(1e-3, seed)),
        ("b ~ [1e-2, 1e-1] N(0,1)", trained_problems),
    )
    for regime, draw in regimes:
        counts: dict = {}
        for index in range(args.problem_sets):
            A, b = (tf.constant(x) for x in draw(1000 + index))
            exact = lasso.solve_lasso(A, b, LAM)
            exact_picks, exact_certified, kkt = picks_and_certificates(A, b, exact)
            counts.setdefault(("homotopy", "-", "-"), []).append((8, sum(exact_certified), kkt))
            moved = b.numpy() * (1.0 + 0.1 * np.random.default_rng(index).standard_normal(b.shape))
            warm = lasso.solve_lasso(A, moved, LAM)
            for method in ("ista", "fista"):
                for count in iterations:
                    for start, z0 in (("cold", None), ("warm", warm)):
                        z = lasso.solve_lasso_iterative(A, b, LAM, z0, method, count)
                        picks, certified, kkt = picks_and_certificates(A, b, z)
                        same = sum(p == q for p, q in zip(picks, exact_picks))
                        counts.setdefault((method, count, start), []).append(
                            (same, sum(certified), kkt)
                        )
        nodes = 8 * args.problem_sets
        for (method, count, start), rows in counts.items():
            same, certified = np.sum([row[:2] for row in rows], axis=0)
            kkt = np.concatenate([row[2] for row in rows])
            print(
                f"| {regime} | {method} | {count} | {start} | {same}/{nodes} "
                f"({100 * same / nodes:.1f} %) | {certified}/{nodes} "
                f"| {np.median(kkt):.1e} ({kkt.max():.1e}) |"
            )

    # Time per 8-node recovery: the solver alone, then the whole solve_jointly.
    A, b = (tf.constant(x) for x in trained_problems(0))
    solvers = {"homotopy": lambda: lasso.solve_lasso(A, b, LAM).numpy()}
    for method in ("ista", "fista"):
        for count in iterations:
            solvers[f"{method} {count}"] = lambda m=method, c=count: lasso.solve_lasso_iterative(
                A, b, LAM, None, m, c
            ).numpy()
    normal = architecture.ArchitectureEncoding(seed=1, name="normal")
    reduce = architecture.ArchitectureEncoding(seed=2, name="reduce")
    print("\n| solver | solve ms (median) | solve_jointly + report ms (median) |")
    print("| --- | ---: | ---: |")
    for name, solve in solvers.items():
        solver, _, count = name.partition(" ")
        options = dict(solver=solver, iterations=int(count or 1))
        solve()  # compiles
        architecture.solve_jointly([normal, reduce], **options)
        repeats = max(3, min(args.repeats, int(2e5 / int(count or 1000))))
        (solve_ms,) = median_ms([solve], repeats)
        (joint_ms,) = median_ms(
            [lambda o=options: architecture.solve_jointly([normal, reduce], **o)], repeats
        )
        print(f"| {name} | {solve_ms:.2f} | {joint_ms:.2f} |")
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--iterative", action="store_true", help="ISTA / FISTA vs homotopy")
    parser.add_argument("--problem_sets", type=int, default=40)
    parser.add_argument("--iterations", default="1000,10000,100000")
    args = parser.parse_args()
    if args.iterative:
        iterative_comparison(args)
        return

    print(
        f"CPU cores: {os.cpu_count()}, {platform.processor() or platform.machine()}; "
        f"TF {tf.__version__}, scipy {scipy.__version__}; lam = {LAM}\n"
    )
    A, b = (tf.constant(x) for x in recovery_problems(REGIMES[0][1], 0))
    first = {}
    for xla in (False, True):
        start = time.perf_counter()
        lasso.solve_lasso(A, b, LAM, xla=xla).numpy()
        first[xla] = time.perf_counter() - start
    print(f"first call (trace, compile): graph {first[False]:.2f} s, XLA {first[True]:.2f} s\n")
    print(
        "| regime | seed | ours ms | ours XLA ms | scipy ms | speed-up (ours) "
        "| max abs rel. objective gap | max KKT violation / lam | same top-2 |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for regime, scale in REGIMES:
        for seed in range(args.seeds):
            A, b = recovery_problems(scale, seed)
            A_t, b_t = tf.constant(A), tf.constant(b)
            z = lasso.solve_lasso(A_t, b_t, LAM).numpy()  # traces and compiles
            problems = [(A[i, :, :n], b[i]) for i, n in enumerate(NODE_WIDTHS)]
            reference = [scipy_lasso(A_i, b_i) for A_i, b_i in problems]
            ours, ours_xla, theirs = median_ms(
                [
                    lambda: lasso.solve_lasso(A_t, b_t, LAM).numpy(),
                    lambda: lasso.solve_lasso(A_t, b_t, LAM, xla=True).numpy(),
                    lambda: [scipy_lasso(A_i, b_i) for A_i, b_i in problems],
                ],
                args.repeats,
            )
            gaps, kkt, same = [], [], 0
            for i, (A_i, b_i) in enumerate(problems):
                z_i = z[i, : A_i.shape[1]]
                assert np.all(z[i, A_i.shape[1] :] == 0.0), "padding must stay exactly zero"
                f_ref = objective(A_i, b_i, reference[i])
                gaps.append((objective(A_i, b_i, z_i) - f_ref) / f_ref)
                kkt.append(kkt_violation(A_i, b_i, z_i))
                same += top2(z_i) == top2(reference[i])
            worst_gap = max(gaps, key=abs)
            print(
                f"| {regime} | {seed} | {ours:.2f} | {ours_xla:.2f} | {theirs:.2f} "
                f"| {theirs / ours:.1f}x "
                f"| {worst_gap:.1e} | {max(kkt):.1e} | {same}/8 |"
            )
            summary.setdefault(regime, []).append((ours, ours_xla, theirs))

    normal = architecture.ArchitectureEncoding(seed=1, name="normal")
    reduce = architecture.ArchitectureEncoding(seed=2, name="reduce")
    rng = np.random.default_rng(0)
    times = []
    for repeat in range(args.repeats + 1):
        # The change of b over an epoch of architecture steps (not timed), then the joint
        # recovery of the 8 nodes and its commit; the first round traces and compiles.
        for encoding in (normal, reduce):
            for b in encoding.b:
                b.assign_add(1e-4 * rng.standard_normal(b.shape).astype(np.float32))
        start = time.perf_counter()
        for encoding, recovery in zip(
            (normal, reduce), architecture.solve_jointly([normal, reduce])
        ):
            encoding.commit(recovery)
        if repeat:
            times.append(time.perf_counter() - start)
    print(
        f"| encodings (solve_jointly + commit, warm start) | - | "
        f"{1e3 * np.median(times):.2f} | - | - | - | - | - | - |"
    )
    print()
    for regime, rows in summary.items():
        ours, ours_xla, theirs = np.median(np.array(rows), axis=0)
        print(
            f"{regime}: median over seeds {ours:.2f} ms (ours), {ours_xla:.2f} ms (ours XLA), "
            f"{theirs:.2f} ms (scipy)"
        )
    print(f"load average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
