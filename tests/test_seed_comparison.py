"""benchmarks/seed_comparison.py: results of several seeds paired against a baseline, read from result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.seed_comparison import main


def _forgetting(path: Path, seed: int, paraphrases: float, drop: float, probe: int | None = None) -> str:
    result: dict[str, Any] = {"new_acc": 100.0, "paraphrase_acc": paraphrases, "retention_drop": drop,
                              "kl_to_base": 0.5}
    if probe is not None:
        result["probe_failures"] = [f"check-{i}" for i in range(probe)]
    path.write_text(json.dumps({"rewrite": result, "config": {"seed": seed}}))
    return str(path)


def _sequential(path: Path, seed: int | None, paraphrases: list[float], drop: float) -> str:
    overrides = {"rewrite": {"seed": seed}} if seed is not None else {}
    steps = [
        {"step": 1, "status": "activated", "batches": [{"new_acc": 0.0, "paraphrase_acc": 0.0}], "retention_drop": 9},
        {"step": 2, "status": "vetoed"},
        {"step": 3, "status": "activated", "retention_drop": drop,
         "batches": [{"new_acc": 1.0, "paraphrase_acc": p} for p in paraphrases]},
    ]
    path.write_text(json.dumps({"methods": {"rewrite": {"steps": steps}}, "config": {"overrides": overrides}}))
    return str(path)


def test_arms_are_paired_by_seed_against_the_first(tmp_path: Path) -> None:
    base = [_forgetting(tmp_path / f"base_{s}.json", s, p, d, probe)
            for s, p, d, probe in [(0, 75.0, -4.0, 7), (1, 80.0, -2.0, None), (2, 90.0, -6.0, 9)]]
    for s, p, d in [(0, 80.0, -10.0), (1, 80.0, -12.0), (2, 85.0, -8.0)]:
        _forgetting(tmp_path / f"arm_seed{s}.json", s, p, d, probe=8)
    out = tmp_path / "cmp.json"
    result = main(["--benchmark", "forgetting", "--arm", "none=" + ",".join(base),
                   "--arm", f"anchored={tmp_path}/arm_seed*.json", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["baseline"] == "none"
    arm = result["arms"]["anchored"]
    assert arm["seeds"] == [0, 1, 2]
    para = arm["metrics"]["paraphrases"]
    assert para["values"] == [80.0, 80.0, 85.0]
    assert para["paired"]["mean_difference"] == pytest.approx((5 + 0 - 5) / 3)
    assert para["paired"]["standard_error"] == pytest.approx(5 / 3**0.5)
    assert (para["paired"]["better"], para["paired"]["equal"], para["paired"]["worse"]) == (1, 1, 1)
    gain = arm["metrics"]["retention_gain"]["paired"]
    assert gain["mean_difference"] == pytest.approx(6.0) and gain["better"] == 3
    # fewer broken checks is better; a seed whose baseline did not run the probe is left out of the pairs
    probe = arm["metrics"]["probe_broken"]["paired"]
    assert probe["n"] == 2 and probe["mean_difference"] == pytest.approx(0.0)
    assert (probe["better"], probe["worse"]) == (1, 1)
    assert result["arms"]["none"]["metrics"]["probe_broken"]["values"] == [7.0, None, 9.0]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| arm | metric |") and "| anchored | paraphrases (%) | 80.0, 80.0, 85.0 | 81.7 |" in table


def test_sequential_results_compare_the_last_measured_step(tmp_path: Path) -> None:
    base = _sequential(tmp_path / "none.json", None, [0.5, 1.0], 1.7)
    arm = _sequential(tmp_path / "arm.json", 0, [0.75, 1.0], -3.3)
    result = main(["--benchmark", "sequential", "--arm", f"none={base}", "--arm", f"w={arm}",
                   "--out", str(tmp_path / "cmp.json")])
    metrics = result["arms"]["w"]["metrics"]
    assert metrics["paraphrases"]["values"] == [pytest.approx(87.5)]
    assert metrics["paraphrases"]["paired"]["mean_difference"] == pytest.approx(12.5)
    assert metrics["retention_gain"]["paired"]["mean_difference"] == pytest.approx(5.0)  # gain = -drop
    assert metrics["direct"]["values"] == [100.0]
    assert result["arms"]["none"]["seeds"] == [None] and result["arms"]["w"]["seeds"] == [0]


def test_bad_input_is_named(tmp_path: Path) -> None:
    a = _forgetting(tmp_path / "a.json", 0, 75.0, 0.0)
    b = _forgetting(tmp_path / "b.json", 1, 75.0, 0.0)
    out = ["--out", str(tmp_path / "cmp.json")]
    with pytest.raises(SystemExit, match="seed 1 is paired with the baseline's seed 0"):
        main(["--benchmark", "forgetting", "--arm", f"x={a}", "--arm", f"y={b}", *out])
    with pytest.raises(SystemExit, match="matches no file"):
        main(["--benchmark", "forgetting", "--arm", f"x={a}", "--arm", f"y={tmp_path}/nothing*.json", *out])
    with pytest.raises(SystemExit, match="expected NAME=FILE"):
        main(["--benchmark", "forgetting", "--arm", f"x={a}", "--arm", "y", *out])
    with pytest.raises(SystemExit, match="no forgetting result for method 'sft'"):
        main(["--benchmark", "forgetting", "--method", "sft", "--arm", f"x={a}", "--arm", f"y={a}", *out])
    with pytest.raises(SystemExit):  # argparse: two arms named x
        main(["--benchmark", "forgetting", "--arm", f"x={a}", "--arm", f"x={a}", *out])
    (tmp_path / "broken.json").write_text('{"rewrite": ')
    with pytest.raises(SystemExit, match="cannot read a result"):
        main(["--benchmark", "forgetting", "--arm", f"x={a}", "--arm", f"y={tmp_path / 'broken.json'}", *out])
    with pytest.raises(SystemExit, match="no sequential result for method 'rewrite'"):
        main(["--benchmark", "sequential", "--arm", f"x={a}", "--arm", f"y={a}", *out])
    (tmp_path / "failed.json").write_text(json.dumps({"methods": {"rewrite": {"steps": [{"status": "failed"}]}}}))
    with pytest.raises(SystemExit, match="cannot read the sequential metrics .*no step was measured"):
        main(["--benchmark", "sequential", "--arm", f"x={tmp_path / 'failed.json'}", "--arm", f"y={a}", *out])
