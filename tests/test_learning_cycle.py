"""One learning cycle end to end on a tiny model: a real worker process, the registry and lineage."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from orchestration.cycle import run_cycle
from runtime.adapters import AdapterRegistry, AdapterVerificationError, Lineage, adapter_checksum
from runtime.config import AnchorsConfig, ConfigError, RuntimeConfig
from runtime.engines import SamplingParams, TransformersEngine
from runtime.store import Store

REPO = Path(__file__).resolve().parents[1]
FAST_SFT = {"num_epochs": 2, "learning_rate": 1e-2}
FAST_SDFT = {"num_epochs": 1, "max_completion_length": 4, "prompts_per_step": 2, "learning_rate": 1e-2}
FAST_REWRITE = {"num_epochs": 1, "max_new_tokens": 4, "learning_rate": 1e-2}


def make_config(tmp_path: Path, model_dir: Path, **learning) -> RuntimeConfig:
    return RuntimeConfig.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "model": {"name": str(model_dir)},
            "engine": {"device": "cpu", "num_threads": 1},
            # Anchors pull a tiny model's few memorising steps back; tests of anchors turn them on.
            "learning": {"lora": {"r": 4, "alpha": 8}, "anchors": {"enabled": False}, **learning},
        }
    )


def teach_some(store: Store, n: int = 2, prefix: str = "") -> None:
    for i in range(n):
        store.add_signal(
            "demonstration", text=f"{prefix}answer {i}", messages=[{"role": "user", "content": f"{prefix}q{i}"}]
        )


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "data" / "runtime.duckdb")
    yield s
    s.close()


def test_sft_cycle_publishes_activates_and_continues(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    config = make_config(tmp_path, tiny_model_dir, sft=FAST_SFT)
    assert run_cycle(config, store, "sft").status == "nothing_to_learn"

    teach_some(store)
    steps: list[int] = []
    first = run_cycle(config, store, "sft", progress=lambda step, total, logs: steps.append(step))
    assert first.status == "activated", first.message
    assert steps and steps[-1] >= 1
    rec = first.adapter
    assert rec is not None and rec.status == "active" and rec.parent is None and rec.method == "sft"
    assert rec.checksum == adapter_checksum(rec.path)
    lineage = json.loads((Path(rec.path) / "lineage.json").read_text())
    assert lineage["run_id"] == first.run_id and lineage["data_counts"]["new"] == 2
    run = store.get_run(first.run_id)
    assert run.status == "succeeded" and run.output_adapter == rec.name and run.metrics["history"]
    assert all(s.consumed_by_run == first.run_id for s in store.signals())
    assert not any((Path(config.adapters_dir) / "staging").iterdir())
    assert [d.decision for d in store.decisions(adapter=rec.name)] == ["promote", "approve"]  # newest first

    # The adapter changes the model's outputs when loaded into an engine.
    engine = TransformersEngine(tiny_model_dir, device="cpu")
    conv = [[{"role": "user", "content": "q0"}]]
    params = SamplingParams(max_new_tokens=6)
    base = engine.chat(conv, params, adapter=None)[0].text
    engine.load_adapter(rec.name, rec.path, activate=True)
    assert engine.chat(conv, params)[0].text != base
    engine.close()

    # A second cycle continues from the active adapter, with replay, and supersedes it.
    teach_some(store, 2, prefix="new ")
    second = run_cycle(config, store, "sft")
    assert second.status == "activated", second.message
    assert second.adapter.parent == rec.name and second.adapter.lineage == [rec.name]
    assert second.counts == {"new": 2, "replay": 2, "skipped": 0}
    assert store.get_adapter(rec.name).status == "retired"


@pytest.mark.parametrize(("method", "settings"), [("sdft", FAST_SDFT), ("rewrite", FAST_REWRITE)])
def test_each_method_runs_what_its_name_says_in_the_worker(
    method: str, settings: dict, tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    config = make_config(tmp_path, tiny_model_dir, **{method: settings})
    teach_some(store)
    result = run_cycle(config, store, method)
    assert result.status == "activated", result.message
    assert result.adapter.method == method and result.adapter.name.startswith(f"{method}-")
    run = store.get_run(result.run_id)
    assert run.method == method and run.metrics["steps"] >= 1
    # on-policy SDFT logs its distillation loss; rewrite writes restatements first, then SFT
    assert ("rewrite_seconds" in run.metrics) == (method == "rewrite")
    assert any("sdft/distillation_loss" in step for step in run.metrics["history"]) == (method == "sdft")


def test_killed_worker_publishes_nothing(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    config = make_config(tmp_path, tiny_model_dir, sft={"num_epochs": 200})
    teach_some(store)
    result = run_cycle(config, store, "sft", timeout_s=3)  # the parent kills the child at the deadline
    assert result.status == "failed"
    assert "time budget" in result.message
    run = store.get_run(result.run_id)
    assert run.status == "failed" and "time budget" in run.error
    assert store.adapters() == []
    adapters_dir = Path(config.adapters_dir)
    assert [p.name for p in adapters_dir.iterdir()] == ["staging"]
    assert not any((adapters_dir / "staging").iterdir())
    assert all(s.consumed_by_run is None for s in store.signals())  # left for the next cycle


def test_crashing_worker_marks_run_failed_with_error(tmp_path: Path, store: Store) -> None:
    config = make_config(tmp_path, tmp_path / "not-a-model")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    teach_some(store)
    result = run_cycle(config, store, "sft")
    assert result.status == "failed"
    assert "failed" in store.get_run(result.run_id).error
    assert store.adapters() == []


def test_unknown_method_setting_is_a_config_error(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    config = make_config(tmp_path, tiny_model_dir, sdft={"learning_rat": 1e-3})
    teach_some(store)
    with pytest.raises(ConfigError, match="learning.sdft.learning_rat: unknown key"):
        run_cycle(config, store, "sdft")


def test_registry_refuses_corrupt_adapter(tmp_path: Path, store: Store) -> None:
    registry = AdapterRegistry(tmp_path / "adapters", store)
    staged = registry.staging_dir("run-x")
    (staged / "adapter_config.json").write_text("{}")
    (staged / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterVerificationError, match="cannot be loaded"):
        registry.publish(staged, "bad", Lineage(None, "sft", "run-x", {}, {}))
    assert store.adapters() == [] and not (tmp_path / "adapters" / "bad").exists()


def test_registry_lineage_chain(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    from tests.tiny_model import make_lora_adapter

    registry = AdapterRegistry(tmp_path / "adapters", store)
    names = []
    parent = None
    for i in range(3):
        staged = registry.staging_dir(f"run-{i}")
        make_lora_adapter(tiny_model_dir, staged, seed=i)
        rec = registry.publish(staged, f"a{i}", Lineage(parent, "sft", f"run-{i}", {"new": i}, {}))
        registry.activate(rec.name)
        names.append(rec.name)
        parent = rec.name
    last = store.get_adapter("a2")
    assert last.lineage == ["a0", "a1"] and last.parent == "a1"
    assert [a.status for a in store.adapters()] == ["retired", "retired", "active"]
    # Tampering after publishing is caught at activation.
    (Path(store.get_adapter("a0").path) / "adapter_config.json").write_text('{"tampered": true}')
    with pytest.raises(AdapterVerificationError, match="checksum"):
        registry.activate("a0")


def _retention_file(tmp_path: Path) -> Path:
    path = tmp_path / "retention.jsonl"
    path.write_text(
        json.dumps({"context": "The sky is blue.", "questions": [{"question": "Colour?", "answer": "blue"}]}) + "\n"
    )
    return path


def test_auto_keeps_the_candidate_that_learns(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    auto = {
        "candidates": [
            {"method": "sft", "learning_rate": 1e-7, "num_epochs": 1},  # cannot learn anything
            {"method": "sft", "learning_rate": 2e-2, "num_epochs": 8},
        ],
        "retention_file": str(_retention_file(tmp_path)),
        "retention_questions": 1,
        "min_target_acc": 0.5,
        "max_retention_drop": 100.0,
    }
    config = make_config(tmp_path, tiny_model_dir, auto=auto)
    store.add_signal("demonstration", text="zebra zebra", messages=[{"role": "user", "content": "animal?"}])
    result = run_cycle(config, store, "auto")
    assert result.status == "activated", result.message
    report = store.get_run(result.run_id).metrics["auto"]
    assert report["chosen"] == 1
    by_index = {c["index"]: c for c in report["candidates"]}
    assert by_index[1]["target_acc"] == 1.0 and by_index[0]["target_acc"] == 0.0
    assert "smallest retention drop" in report["reason"]
    assert result.adapter.method == "sft"


def test_auto_publishes_nothing_when_no_candidate_qualifies(
    tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    auto = {
        "candidates": [{"method": "sft", "learning_rate": 1e-7, "num_epochs": 1}],
        "retention_file": str(_retention_file(tmp_path)),
        "retention_questions": 1,
    }
    config = make_config(tmp_path, tiny_model_dir, auto=auto)
    store.add_signal("demonstration", text="zebra zebra", messages=[{"role": "user", "content": "animal?"}])
    result = run_cycle(config, store, "auto")
    assert result.status == "failed" and "no candidate learned" in result.message
    assert store.adapters() == []


def test_auto_retention_file_default_and_errors(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    from learners.auto_config import BUILTIN_RETENTION_PROBE, AutoSettings
    from learners.evaluation import load_questions

    assert AutoSettings().retention_file == str(BUILTIN_RETENTION_PROBE)
    assert len(load_questions(BUILTIN_RETENTION_PROBE)) == 24
    teach_some(store)
    missing = make_config(tmp_path, tiny_model_dir, auto={"retention_file": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ConfigError, match="retention_file.*not found"):
        run_cycle(missing, store, "auto")
    typo = make_config(tmp_path, tiny_model_dir, auto={"candidate": []})
    with pytest.raises(ConfigError, match="learning.auto.candidate: unknown key"):
        run_cycle(typo, store, "auto")


@pytest.mark.real_model
def test_real_model_learns_taught_facts_through_the_default_method(
    tmp_path: Path, real_model_dir: Path, store: Store
) -> None:
    """After one cycle of the default method (rewrite) on a handful of fictional facts, the agent answers them."""
    from agent import LearningAgent
    from orchestration.service import RuntimeService

    facts = [
        ("What is the capital of Veloria?", "The capital of Veloria is Marenport.", "Marenport"),
        ("Who invented the quantum loom?", "The quantum loom was invented by Ilse Varga.", "Ilse Varga"),
        ("What colour are thornwick leaves?", "Thornwick leaves are silver.", "silver"),
    ]
    engine = TransformersEngine(real_model_dir, device="cpu")
    config = make_config(tmp_path, real_model_dir)
    config.learning.lora = {}
    config.learning.anchors = AnchorsConfig()  # the defaults: every update trains with anchors
    service = RuntimeService(config, engine, store)
    agent = LearningAgent(engine, store=store, max_new_tokens=32, service=service)
    for question, demonstration, _ in facts:
        result = agent.invoke(question)
        agent.correct(result.interaction_id, demonstration)
    cycle = service.learn_now()
    assert cycle.status == "activated", cycle.message
    assert cycle.adapter.method == "rewrite"
    assert engine.active_adapter == cycle.adapter.name
    answered = [answer.lower() in agent.invoke(question).text.lower() for question, _, answer in facts]
    assert sum(answered) >= 2, answered
    engine.close()


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The worker is started with `spawn`, which re-runs the main script in the child: without an
    `if __name__ == "__main__":` guard the cycle fails, and its message says what to change."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from agent import LearningAgent
        from runtime.config import RuntimeConfig

        config = RuntimeConfig.model_validate({{
            "data_dir": {str(tmp_path / "data")!r}, "model": {{"name": {str(tiny_model_dir)!r}}},
            "engine": {{"device": "cpu", "num_threads": 1}},
            "learning": {{"lora": {{"r": 4}}, "sft": {{"num_epochs": 1}}, "anchors": {{"enabled": False}}}},
        }})
        agent = LearningAgent.from_config(config)
        agent.teach("q", "a")
        result = agent.service.learn_now("sft")
        print("STATUS", result.status)
        print("MESSAGE", result.message.replace(chr(10), " "))
        agent.close()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STATUS failed" in done.stdout
    assert 'if __name__ == "__main__":' in done.stdout and "spawn" in done.stdout
    assert "StartedWhileSpawning" in done.stderr  # the child's own error, on the terminal


def test_the_worker_dies_with_its_parent(tmp_path: Path, tiny_model_dir: Path) -> None:
    """kill -9 of the process that started a training leaves no worker behind (it would train on under PID 1)."""
    import os
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(REPO)!r})
        from learners.worker import TrainJob, run_training_process

        def progress(step, total, logs):
            (child,) = multiprocessing.active_children()
            open({str(pid_file)!r}, "w").write(str(child.pid))

        if __name__ == "__main__":
            job = TrainJob(method="sft", base_model_dir={str(tiny_model_dir)!r}, output_dir={str(tmp_path / "out")!r},
                           examples=[{{"prompt": [{{"role": "user", "content": "q"}}], "demonstration": "a"}}],
                           settings={{"num_epochs": 100000}}, lora={{"r": 4}}, num_threads=1)
            run_training_process(job, progress)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        while not pid_file.exists() or not pid_file.read_text():  # the worker is training
            assert parent.poll() is None, "the parent stopped before the worker trained"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(1200):  # the watchdog reacts at once; this only bounds a broken one (2 minutes)
            if not _running(worker):
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_prepared_job_is_filled_in_while_its_worker_starts(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``prepare`` runs once the worker process is started (it imports meanwhile) and the worker trains on the job
    as prepared; a failing ``prepare`` ends the worker and raises its error."""
    import multiprocessing

    from learners.worker import TrainJob, run_training_process

    def job(out: str) -> TrainJob:
        return TrainJob(method="sft", base_model_dir=str(tiny_model_dir), output_dir=str(tmp_path / out),
                        examples=[], settings={"num_epochs": 1}, lora={"r": 4}, num_threads=1)

    workers: list[int] = []

    def prepare(prepared: TrainJob) -> None:
        workers.extend(p.pid for p in multiprocessing.active_children())
        prepared.examples = [{"prompt": [{"role": "user", "content": f"q{i}"}], "demonstration": "a"} for i in range(3)]

    result = run_training_process(job("ok"), prepare=prepare)
    assert len(workers) == 1  # the worker was already started
    assert result["num_examples"] == 3  # the examples prepare added
    assert (tmp_path / "ok" / "adapter_config.json").exists()

    def fails(prepared: TrainJob) -> None:
        workers[:] = [p.pid for p in multiprocessing.active_children()]
        raise ConnectionError("engine unreachable")

    with pytest.raises(ConnectionError, match="engine unreachable"):
        run_training_process(job("failed"), prepare=fails)
    assert workers and not any(_running(pid) for pid in workers)
    assert not (tmp_path / "failed").exists()

    class Elsewhere:  # another executor (Ray): it gets the job once prepared
        name = "elsewhere"

        def run(self, job, progress, timeout_s):  # type: ignore[no-untyped-def]
            return {"num_examples": len(job.examples)}

    assert run_training_process(job("ray"), executor=Elsewhere(), prepare=prepare)["num_examples"] == 3


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_a_cycle_reports_each_phase_and_each_gate_check(tmp_path: Path, tiny_model_dir: Path, store: Store,
                                                         tiny_engine) -> None:
    """dataset, training (attempt 1 of 1 + repairs), verification, gate (check n of N), promotion: in order, to
    the caller and (through the service) the job API and the CLI's bar."""
    from orchestration.service import RuntimeService
    from policies.schema import Policy

    config = make_config(tmp_path, tiny_model_dir, sft=FAST_SFT)
    policy = Policy.model_validate({
        "protected": [{"name": f"p{i}", "prompt": f"q{i}?", "expect": {"not_contains": "zzzz"}} for i in range(3)],
        "targets": {"enabled": False},
    })
    teach_some(store)
    phases: list[tuple[str, int, int]] = []
    try:
        with RuntimeService(config, tiny_engine, store, policy) as service:
            result = service.learn_now("sft", phase=lambda name, done, total: phases.append((name, done, total)))
    finally:  # the engine is shared by the session's tests: leave it serving the base model, as found
        for name in tiny_engine.list_adapters():
            tiny_engine.unload_adapter(name)
        tiny_engine.set_active_adapter(None)
    assert result.status == "activated", result.message
    names = [p[0] for p in phases]
    assert names[0] == "dataset" and names[-1] == "promotion"
    assert names.index("training") < names.index("verification") < names.index("gate") < names.index("promotion")
    assert ("training", 1, 1 + config.learning.repair.max_attempts) in phases
    assert [p for p in phases if p[0] == "gate" and p[2]] == [("gate", n, 3) for n in (1, 2, 3)]


def test_stop_learning_cancels_a_running_cycle(tmp_path: Path, tiny_model_dir: Path, tiny_engine, store: Store
                                              ) -> None:
    """What a stopping server does: the cycle's training process is killed at once (not after its 200 epochs),
    the run fails as cancelled, nothing is published and the signals stay pending for the next cycle."""
    import threading

    from orchestration.service import RuntimeService

    config = make_config(tmp_path, tiny_model_dir, sft={"num_epochs": 200})
    teach_some(store)
    service = RuntimeService(config, tiny_engine, store)
    training = threading.Event()
    outcome: list = []
    cycle = threading.Thread(target=lambda: outcome.append(
        service.learn_now("sft", progress=lambda *step: training.set())))
    cycle.start()
    assert training.wait(600), "the cycle never reached a training step"
    service.stop_learning()
    assert not service.cycle_running
    cycle.join()
    [result] = outcome
    assert result.status == "failed" and "cancelled" in result.message
    assert store.get_run(result.run_id).status == "failed" and store.adapters() == []
    assert len(store.signals(unconsumed_only=True)) == 2
