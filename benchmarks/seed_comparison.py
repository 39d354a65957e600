"""Configurations compared over training seeds, paired by seed against a baseline.

One benchmark run is one training seed; seeds move paraphrase accuracy by up to 19 points on the forgetting
benchmark, so "does setting X do worse than Y" is answered here from several runs of each, paired seed by
seed: per configuration the value at each seed and the mean, and against the baseline the mean paired
difference, its standard error and how many seeds came out better, equal and worse.

    python benchmarks/seed_comparison.py --benchmark forgetting \\
        --arm "none=benchmarks/results/forgetting_probe_none_seed*.json" \\
        --arm "default=benchmarks/results/forgetting_probe_large_w05_seed*.json" \\
        --out benchmarks/results/anchors_large_update_forgetting.json

The first ``--arm`` is the baseline. Files are paired by position (list them in seed order, or give a glob,
which is sorted); where a result records its seed, the seeds paired must agree. Reads the JSON that
``forgetting.py`` and ``sequential.py`` write; nothing is rerun. Writes ``--out`` and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name -> (unit, higher is better, how to read it from one method's result)
Metric = tuple[str, bool, Callable[[dict[str, Any]], float | None]]


def _probe_broken(result: dict[str, Any]) -> float | None:
    failures = result.get("probe_failures")
    return None if failures is None else float(len(failures))


FORGETTING_METRICS: dict[str, Metric] = {
    "direct": ("%", True, lambda r: r["new_acc"]),
    "paraphrases": ("%", True, lambda r: r["paraphrase_acc"]),
    "retention_gain": ("points", True, lambda r: -r["retention_drop"]),
    "probe_broken": ("checks", False, _probe_broken),
    "kl_to_base": ("nats/token", False, lambda r: r.get("kl_to_base")),
}


def _last_step(result: dict[str, Any]) -> dict[str, Any]:
    measured = [s for s in result["steps"] if "batches" in s]
    if not measured:
        raise ValueError("no step was measured (every cycle failed?)")
    return measured[-1]


SEQUENTIAL_METRICS: dict[str, Metric] = {
    "direct": ("%", True, lambda r: 100 * statistics.mean(b["new_acc"] for b in _last_step(r)["batches"])),
    "paraphrases": (
        "%", True, lambda r: 100 * statistics.mean(b["paraphrase_acc"] for b in _last_step(r)["batches"])
    ),
    "retention_gain": ("points", True, lambda r: -_last_step(r)["retention_drop"]),
}

BENCHMARKS: dict[str, dict[str, Metric]] = {"forgetting": FORGETTING_METRICS, "sequential": SEQUENTIAL_METRICS}


def recorded_seed(benchmark: str, data: dict[str, Any], method: str) -> int | None:
    """The training seed a result records, if any (sequential results before it recorded its overrides: none)."""
    config = data.get("config", {})
    if benchmark == "forgetting":
        return config.get("seed")
    return config.get("overrides", {}).get(method, {}).get("seed")


def method_result(benchmark: str, data: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    found = data.get(method) if benchmark == "forgetting" else data.get("methods", {}).get(method)
    if not isinstance(found, dict):
        raise SystemExit(
            f"{path}: no {benchmark} result for method {method!r}; check --benchmark, or pick a method it ran with "
            "--method"
        )
    return found


def expand(spec: str) -> tuple[str, list[str]]:
    """``NAME=FILE,FILE,...`` (or globs, each sorted) -> (name, files)."""
    name, sep, files = spec.partition("=")
    if not sep or not name or not files:
        raise SystemExit(f"--arm {spec!r}: expected NAME=FILE[,FILE...]")
    paths: list[str] = []
    for part in files.split(","):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matched:
            raise SystemExit(f"--arm {name}: {part!r} matches no file")
        paths.extend(matched)
    return name, paths


def load_arm(benchmark: str, method: str, paths: list[str]) -> list[tuple[int | None, dict[str, float | None]]]:
    """(recorded seed, metric values) per file."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: cannot read a result ({exc}); rerun the benchmark that writes it") from exc
        result = method_result(benchmark, data, method, path)
        try:
            values = {name: read(result) for name, (_, _, read) in BENCHMARKS[benchmark].items()}
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read the {benchmark} metrics ({exc!r})") from exc
        rows.append((recorded_seed(benchmark, data, method), values))
    return rows


def _summary(values: list[float | None]) -> dict[str, Any]:
    """Values per seed (None where a run did not measure it) and their mean."""
    known = [v for v in values if v is not None]
    return {"values": values, "mean": statistics.mean(known) if known else None}


def compare(benchmark: str, arms: dict[str, list[tuple[int | None, dict[str, float | None]]]]) -> dict[str, Any]:
    """Per arm and metric: values, mean; against the first arm, paired differences (arm minus baseline)."""
    (base_name, base_rows), *_ = arms.items()
    out: dict[str, Any] = {"baseline": base_name, "arms": {}}
    for name, rows in arms.items():
        pairs = list(zip(base_rows, rows, strict=False))
        for (seed_a, _), (seed_b, _) in pairs:
            if seed_a is not None and seed_b is not None and seed_a != seed_b:
                raise SystemExit(
                    f"--arm {name}: seed {seed_b} is paired with the baseline's seed {seed_a}; list both in seed order"
                )
        metrics: dict[str, Any] = {}
        for metric, (unit, higher_better, _) in BENCHMARKS[benchmark].items():
            entry = {"unit": unit, "higher_is_better": higher_better, **_summary([v[metric] for _, v in rows])}
            if name != base_name:
                diffs = [b[metric] - a[metric] for (_, a), (_, b) in pairs
                         if a[metric] is not None and b[metric] is not None]
                sign = 1 if higher_better else -1
                entry["paired"] = {
                    "n": len(diffs),
                    "mean_difference": statistics.mean(diffs) if diffs else None,
                    "standard_error": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                    "better": sum(sign * d > 0 for d in diffs),
                    "equal": sum(d == 0 for d in diffs),
                    "worse": sum(sign * d < 0 for d in diffs),
                }
            metrics[metric] = entry
        out["arms"][name] = {"seeds": [seed for seed, _ in rows], "metrics": metrics}
    return out


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2f}"


def table(comparison: dict[str, Any]) -> str:
    base = comparison["baseline"]
    lines = [
        f"| arm | metric | per seed | mean | paired difference vs {base} (± s.e.) | better / equal / worse seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in comparison["arms"].items():
        for metric, entry in arm["metrics"].items():
            paired = entry.get("paired")
            diff = (
                f"{paired['mean_difference']:+.2f} ± {_number(paired['standard_error'])} (n {paired['n']})"
                if paired and paired["mean_difference"] is not None else ""
            )
            counts = f"{paired['better']} / {paired['equal']} / {paired['worse']}" if paired else ""
            per_seed = ", ".join(_number(v) for v in entry["values"])
            lines.append(f"| {name} | {metric} ({entry['unit']}) | {per_seed} | {_number(entry['mean'])} | {diff} "
                         f"| {counts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), required=True)
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=FILE[,FILE...]",
                        help="a configuration's results, one file per seed; the first is the baseline")
    parser.add_argument("--method", default="rewrite", help="the learning method whose results are compared")
    parser.add_argument("--out", type=Path, default=RESULTS / "seed_comparison.json")
    args = parser.parse_args(argv)
    if len(args.arm) < 2:
        parser.error("give a baseline and at least one more --arm")
    arms = dict(expand(spec) for spec in args.arm)
    if len(arms) != len(args.arm):
        parser.error("two --arm share a name")
    loaded = {name: load_arm(args.benchmark, args.method, paths) for name, paths in arms.items()}
    comparison = {
        "benchmark": args.benchmark,
        "method": args.method,
        "files": arms,
        **compare(args.benchmark, loaded),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(comparison, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(comparison))
    print(table(comparison), end="")
    return comparison


if __name__ == "__main__":
    main()
