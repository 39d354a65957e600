"""Training jobs on Ray (``learning.executor: ray``): a real local Ray instance runs real jobs of the tiny model.

The tests marked ``ray`` need the extra (``pip install 'learning-runtime[ray]'``; `make test` and ``.ci/run``
install it) and are skipped without it.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from learners.worker import TrainingFailed, TrainJob, cancelled_by
from orchestration.cycle import run_cycle
from runtime.adapters import adapter_checksum, verify_adapter
from runtime.config import ConfigError, LearningConfig, RuntimeConfig
from runtime.store import Store

EXAMPLES = [{"prompt": [{"role": "user", "content": f"q{i}"}], "demonstration": f"answer {i}"} for i in range(2)]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'learning-runtime[ray]'")
    with pytest.MonkeyPatch.context() as env:
        # fetched adapters and the registry cache stay out of ~/.cache (Ray's workers inherit this environment)
        env.setenv("RUNTIME_CACHE_DIR", str(tmp_path_factory.mktemp("runtime-cache")))
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


def job(model_dir: Path, out: Path, **fields) -> TrainJob:
    return TrainJob(method="sft", base_model_dir=str(model_dir), examples=EXAMPLES, output_dir=str(out),
                    settings={"num_epochs": 1, "learning_rate": 1e-2}, lora={"r": 4, "alpha": 8}, **fields)


@pytest.mark.ray
def test_a_training_job_runs_as_a_ray_task_and_writes_a_loadable_adapter(
    ray_cluster, tmp_path: Path, tiny_model_dir: Path, tiny_engine
) -> None:
    from learners.ray_executor import RayExecutor

    steps: list[int] = []
    out = tmp_path / "staging" / "adapter"
    result = RayExecutor(num_cpus=1).run(job(tiny_model_dir, out), lambda s, t, logs: steps.append(s), None)
    assert result["num_steps"] >= 1 and result["num_examples"] == 2
    assert steps and steps[-1] >= 1  # reported when the task ended
    verify_adapter(out)
    tiny_engine.load_adapter("ray-candidate", str(out))
    try:
        assert tiny_engine.has_adapter("ray-candidate")
    finally:
        tiny_engine.unload_adapter("ray-candidate")


@pytest.mark.ray
def test_a_failing_or_overdue_ray_task_is_training_failed(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    from learners.ray_executor import RayExecutor

    executor = RayExecutor(num_cpus=1)
    with pytest.raises(TrainingFailed, match="failed in its Ray task"):
        executor.run(job(tmp_path / "no-model", tmp_path / "a"), None, None)
    slow = job(tiny_model_dir, tmp_path / "b")
    slow.settings = {"num_epochs": 100000}
    with pytest.raises(TrainingFailed, match="time budget"):
        executor.run(slow, None, 3)
    stopping = threading.Event()
    stopping.set()  # the runtime is stopping (RuntimeService.stop_learning): the task is cancelled, no budget needed
    slow.output_dir = str(tmp_path / "c")
    with cancelled_by(stopping), pytest.raises(TrainingFailed, match="cancelled"):
        executor.run(slow, None, None)


@pytest.mark.ray
def test_learning_cycles_on_ray_with_shared_storage(ray_cluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The registry and the staging area are file:// URLs: the task fetches the parent from the registry URL
    (checksum verified), uploads the candidate to shared staging, and the learner verifies and publishes it."""
    registry_url = (tmp_path / "shared" / "adapters").as_uri()
    staging_url = (tmp_path / "shared" / "ray").as_uri()
    config = RuntimeConfig.model_validate({
        "data_dir": str(tmp_path / "data"), "model": {"name": str(tiny_model_dir)},
        "engine": {"device": "cpu", "num_threads": 1},
        "learning": {
            "executor": "ray", "ray": {"num_cpus": 1, "shared_dir": staging_url}, "adapters_dir": registry_url,
            "lora": {"r": 4, "alpha": 8}, "anchors": {"enabled": False},
            "sft": {"num_epochs": 1, "learning_rate": 1e-2},
        },
    })
    store = Store(tmp_path / "data" / "runtime.duckdb")
    try:
        for round_ in range(2):
            store.add_signal("demonstration", text=f"answer {round_}",
                             messages=[{"role": "user", "content": f"q{round_}"}])
            result = run_cycle(config, store, "sft")
            assert result.status == "activated", result.message
            assert result.adapter.path.startswith(registry_url)
            published = tmp_path / "shared" / "adapters" / result.adapter.name
            assert adapter_checksum(published) == result.adapter.checksum
            assert store.get_run(result.run_id).metrics["history"]
        assert result.adapter.parent is not None
        assert not any((tmp_path / "shared" / "ray" / "staging").iterdir())  # shared staging cleaned up
    finally:
        store.close()


def test_ray_executor_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from learners import ray_executor
    from learners.executors import executor_from_config

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr(ray_executor, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match=r"learning-runtime\[ray\]"):
        executor_from_config(LearningConfig(executor="ray"))
    assert executor_from_config(LearningConfig()).name == "local"
