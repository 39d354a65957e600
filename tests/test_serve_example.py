"""examples/serve_and_learn.py runs its whole flow against a real `runtime serve` child process.

On the tiny random model with SFT, so that it stays fast: the test checks that every step happened (answers
with interaction ids, corrections stored, a learning cycle that activated an adapter, the gate's decision,
the answers after learning served by that adapter, a clean shutdown), not that the tiny model learned.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve_and_learn.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_and_learn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_serve_and_learn_runs_every_step(tmp_path: Path, tiny_model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    shot = tmp_path / "shots" / "dashboard.png"
    args = example.parse_args(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"),
                               "--method", "sft", "--max-new-tokens", "8", "--screenshot", str(shot)])
    report = example.run_example(args)
    out = capsys.readouterr().out

    statuses = {s.name: s.status for s in report.steps}
    failed = {s.name: s.detail for s in report.steps if s.status != "ok"}
    assert not failed, f"steps failed: {failed}\n{out[-4000:]}"
    expected = ["start", "ask", "correct", "stream", "learn", "decision", "ask_again", "stop"]
    if example.CHROMIUM.exists():
        expected.insert(-1, "dashboard")
    assert list(statuses) == expected
    assert report.ok

    # Asked, corrected, streamed.
    n = len(example.DEMO_FACTS)
    assert len(report.before) == 2 * n and all(a.interaction_id for a in report.before)
    assert all(a.adapter is None for a in report.before)  # the base model answered before learning
    assert len(report.corrections) == n
    assert report.streamed is not None and report.streamed.interaction_id and report.streamed_chunks >= 3

    # Learning ran through the admin API and the gate's decision was recorded.
    result = report.job["result"]
    assert report.job["status"] == "finished" and result["status"] == "activated"
    assert result["counts"]["new"] == n and result["run_id"]
    adapter = result["adapter"]["name"]
    assert [d["decision"] for d in report.decisions if d["decision"] in ("approve", "veto")] == ["approve"]
    assert all(d["adapter"] == adapter for d in report.decisions)

    # The questions were asked again, and the new adapter answered them.
    assert len(report.after) == 2 * n and {a.adapter for a in report.after} == {adapter}
    assert report.server_exit_code == 0
    if example.CHROMIUM.exists():
        assert report.screenshot == shot and shot.stat().st_size > 10_000
        assert report.dashboard["active"] == adapter

    lines = list(example.summary_lines(report))
    assert lines[-1].strip() == "all steps ok"
    assert any(line.strip().startswith("gate: approve") for line in lines)
    assert (tmp_path / "data" / "runtime.yaml").exists() and (tmp_path / "data" / "server.log").exists()


def test_a_server_that_cannot_start_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    missing = tmp_path / "no-such-model"
    code = example.main(["--model", str(missing), "--data-dir", str(tmp_path / "data"), "--no-screenshot",
                         "--ready-timeout", "300"])
    out = capsys.readouterr().out
    assert code == 1
    assert "start      failed" in out and "ask        skipped" in out and "FAILED: start" in out
    assert "runtime serve exited with" in out
