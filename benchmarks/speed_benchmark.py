"""This commit's steps against another commit's, in the same run: time, start-up, memory.

Issue 15's comparison. Each configuration runs in a fresh process, built and timed by
the workers of ``search_benchmark.py`` (the sparse ISTA-NAS search step: architecture
step + weight step; ``--dense``: also the dense DARTS step) and
``train_step_benchmark.py`` (the evaluation network's SGD step, ISTA_twostage with the
auxiliary head and drop path 0.2), at batch 64, 32x32, C = 16, 8 cells. With
``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add
/tmp/baseline <commit>``) every configuration also runs on that checkout's library,
alternating baseline and current process by process for ``--rounds`` rounds, so both see
the same machine; the report gives the current / baseline ratio of each number.

Command (from the repository root, on an otherwise idle machine; about 4.5 minutes per
round with a baseline, plus ~6 minutes with ``--dense``, which runs the dense step once,
on the current code only):

    git worktree add /tmp/baseline <commit>
    python benchmarks/speed_benchmark.py --baseline /tmp/baseline --rounds 2 --dense

Reading the output: one row per configuration and code (``baseline`` / ``current``),
the medians over rounds of: the step's median time (``s/step``), the first step
(tracing and first run) and its tracing alone (``trace s``), the build (network,
optimizers, first recovery), the process's peak RSS, the traced step's op count
(``traced ops``: exact, and what the first step's cost scales with); then ``current /
baseline`` per number (below 1: this commit is faster or leaner), the sparse / dense
step ratio, and the 1-minute load average before and after each process (above the CPU
count, other work competed and times are inflated).
"""

from __future__ import annotations

import argparse
import json
import os

import harness  # benchmarks/harness.py, beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    # name: (worker script, worker name, extra worker flags)
    "sparse search step": ("search_benchmark.py", "ista", ["--steps", "5"]),
    "evaluation step": ("train_step_benchmark.py", "graph", ["--steps", "8"]),
    "dense search step": ("search_benchmark.py", "darts", ["--steps", "1"]),
}
PREFIXES = {
    "search_benchmark.py": "SEARCH_BENCHMARK_RESULT ",
    "train_step_benchmark.py": "TRAIN_STEP_BENCHMARK_RESULT ",
}
NUMBERS = (
    ("median_s", "s/step"),
    ("first_step_s", "first step s"),
    # Its tracing part: steadier than the whole first step, whose first call (grappler,
    # the first execution) varies by a second or more from process to process.
    ("trace_s", "trace s"),
    ("build_s", "build s"),
    ("peak_rss_mb", "peak RSS MB"),
    # The traced step's op count: no noise, and what tracing and grappler's first-call
    # passes cost scales with (~1 ms per op here).
    ("graph_ops", "traced ops"),
)
FORMATS = {"median_s": ".3f", "graph_ops": ".0f"}


def _run(config: str, code: str, library: str | None, args) -> dict:
    script, worker, extra = CONFIGS[config]
    return harness.run_configuration(
        f"{config} / {code}",
        os.path.join(HERE, script),
        worker,
        args,
        extra,
        PREFIXES[script],
        library=library,
        env_overrides=args.baseline_env if code == "baseline" else None,
    )


_median = harness.median


def _print_report(results: dict, args) -> None:
    print(
        f"\nBatch {args.batch_size}, {args.image_size}x{args.image_size}, C = {args.channels}, "
        f"{args.layers} cells; {os.cpu_count()} CPUs; medians over {args.rounds} round(s), "
        "each configuration in a fresh process; current: "
        f"{harness.cpu_kernels()}"
        + (f"; baseline's environment: {args.baseline_env}" if args.baseline_env else "")
        + "\n"
    )
    header = " | ".join(label for _, label in NUMBERS)
    print(f"| configuration | code | {header} | load avg before/after |")
    print("| --- | --- |" + " ---: |" * (len(NUMBERS) + 1))
    for config, by_code in results.items():
        for code, runs in by_code.items():
            cells = []
            for key, _ in NUMBERS:
                value = _median(runs, key)
                cells.append("-" if value is None else format(value, FORMATS.get(key, ".1f")))
            loads = ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in runs)
            print(f"| {config} | {code} | {' | '.join(cells)} | {loads} |")
        if "baseline" in by_code and "current" in by_code:
            ratios = []
            for key, _ in NUMBERS:
                base, now = _median(by_code["baseline"], key), _median(by_code["current"], key)
                ratios.append("-" if not base or now is None else f"{now / base:.2f}")
            print(f"| {config} | current / baseline | {' | '.join(ratios)} | |")
    for code in ("baseline", "current"):
        sparse = results.get("sparse search step", {}).get(code)
        dense = results.get("dense search step", {}).get(code)
        if sparse and dense:
            ratio = _median(sparse, "median_s") / _median(dense, "median_s")
            print(f"\nsparse / dense step time ({code}): {ratio:.3f}")
    harness.save_results(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_network_arguments(parser)
    parser.add_argument("--baseline", default="", help="a checkout of the commit to compare")
    parser.add_argument(
        "--baseline_env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the baseline's processes only (repeatable), e.g. "
        "TF_ENABLE_ONEDNN_OPTS=0 to run the baseline on TensorFlow's own CPU kernels",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--dense", action="store_true", help="also the dense DARTS step")
    parser.add_argument(
        "--configs", default="sparse search step,evaluation step", help="comma-separated"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.baseline and not os.path.isdir(os.path.join(args.baseline, "istanas_tf")):
        parser.error(f"--baseline={args.baseline!r} is not a checkout (no istanas_tf/ in it)")
    malformed = [item for item in args.baseline_env if "=" not in item.strip("=")]
    if malformed:
        parser.error(f"--baseline_env: expected NAME=VALUE, got {malformed}")
    if args.baseline_env and not args.baseline:
        parser.error("--baseline_env needs --baseline (the checkout it applies to)")
    args.baseline_env = dict(item.split("=", 1) for item in args.baseline_env)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.dense and "dense search step" not in configs:
        configs.append("dense search step")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; valid: {', '.join(CONFIGS)}")
    codes = {"current": None}
    if args.baseline:
        codes = {"baseline": args.baseline, "current": None}
    results = {c: {code: [] for code in codes} for c in configs}
    results.get("dense search step", {}).pop("baseline", None)
    for round_index in range(args.rounds):
        for config in configs:
            for code, library in codes.items():
                # The dense step (minutes per process) runs once, on the current code.
                if config == "dense search step" and (round_index or code != "current"):
                    continue
                results[config][code].append(_run(config, code, library, args))
    _print_report(results, args)
    print(json.dumps({"load_end": harness.load_average()}))


if __name__ == "__main__":
    main()
