"""The background learning loop (APScheduler) and recovery after a restart, on a tiny model."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml

from agent import LearningAgent
from orchestration.loop import LearningLoop
from orchestration.service import CycleInProgress, RuntimeService
from runtime.store import Store
from tests.test_policy_gate import MEMORISE


def write_config(tmp_path: Path, model_dir: Path, schedule: dict) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"schedule": schedule}))
    path = tmp_path / "runtime.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": "data",
                "model": {"name": str(model_dir)},
                "engine": {"device": "cpu", "num_threads": 1, "max_new_tokens": 8},
                "learning": {"method": "sft", "sft": MEMORISE, "lora": {"r": 4, "alpha": 8}},
                "policy": str(policy),
            }
        )
    )
    return path


def test_tick_learns_only_with_enough_signals_outside_quiet_hours(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_config(tmp_path, tiny_model_dir, {"min_new_signals": 2, "quiet_hours": ["01:00-02:00"]})
    with RuntimeService.from_config(path) as service:
        clock = [datetime(2026, 11, 21, 12, 0)]
        loop = LearningLoop(service, clock=lambda: clock[0])
        service.store.add_signal("demonstration", text="Paris.", messages=[{"role": "user", "content": "Capital?"}])
        first = loop.tick()
        assert first.action == "skipped" and first.reason == "1 new signals, 2 needed"
        service.store.add_signal("demonstration", text="Four.", messages=[{"role": "user", "content": "2+2?"}])
        clock[0] = datetime(2026, 11, 21, 1, 30)
        assert loop.tick().reason == "quiet hours"
        clock[0] = datetime(2026, 11, 21, 2, 30)
        learned = loop.tick()
        assert learned.action == "learned" and learned.status == "activated", learned.reason
        assert service.engine.active_adapter == learned.adapter
        assert loop.tick().reason == "0 new signals, 2 needed"  # the signals were consumed
        assert [o.action for o in loop.history] == ["skipped", "skipped", "learned", "skipped"]


def test_one_cycle_at_a_time(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_config(tmp_path, tiny_model_dir, {"min_new_signals": 1})
    with RuntimeService.from_config(path) as service:
        assert service._cycle_lock.acquire()  # a cycle is running (as the scheduler thread would hold it)
        try:
            try:
                service.learn_now()
                raise AssertionError("a second cycle started")
            except CycleInProgress:
                pass
            service.store.add_signal("demonstration", text="x", messages=[{"role": "user", "content": "y"}])
            assert LearningLoop(service).tick().reason == "a cycle is already running"
        finally:
            service._cycle_lock.release()


def test_scheduler_runs_ticks_in_the_background(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The embedded agent's loop learns from a taught answer by itself (interval 0.5 s)."""
    path = write_config(tmp_path, tiny_model_dir, {"interval_s": 0.5, "min_new_signals": 1})
    agent = LearningAgent.from_config(path, background_learning=True)
    try:
        loop = agent.service.loop
        assert loop is not None and loop.running and loop.next_run_time() is not None
        agent.teach("What is the capital of France?", "Paris is the capital of France.")
        # Waits for the tick that learned, however busy the machine is (the bound only keeps a broken loop from
        # hanging the suite forever).
        assert loop.wait_for(lambda history: any(o.action == "learned" for o in history), timeout=3600)
        learned = [o for o in loop.history if o.action == "learned"]
        assert learned and learned[0].status == "activated", list(loop.history)
        assert agent.engine.active_adapter == learned[0].adapter
    finally:
        agent.close()
    assert agent.service.loop is None  # close() stopped the scheduler


def test_restart_marks_interrupted_runs_failed(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_config(tmp_path, tiny_model_dir, {})
    data = tmp_path / "data"
    with Store(data / "runtime.duckdb") as store:
        run_id = store.create_run("sft")
        store.update_run(run_id, status="running")
        signal = store.add_signal("demonstration", text="x", messages=[{"role": "user", "content": "y"}])
    staging = data / "adapters" / "staging" / run_id
    staging.mkdir(parents=True)
    (staging / "partial.bin").write_bytes(b"half-written")

    with RuntimeService.from_config(path) as service:
        run = service.store.get_run(run_id)
        assert run.status == "failed" and "interrupted" in run.error
        assert not staging.exists()
        assert service.store.get_signal(signal).consumed_by_run is None  # learned again by the next cycle
