"""Training jobs as Ray tasks (``learning.executor: ray``; ``pip install 'learning-runtime[ray]'``).

:class:`RayExecutor` submits a job (train, SEAL or call) as one Ray task that reserves ``num_cpus`` / ``num_gpus``
(and ``memory``) on the cluster, connecting with ``ray.init(address=...)`` unless Ray is already initialised in
this process. The task runs the job through the same :func:`learners.worker.execute_job` as a local child
process; a job with GPUs gets a fresh Ray worker process (``max_calls=1``: its GPU memory is freed when it ends).

Storage: the task reads the base model (``model_dir``, default the learner's own path) and the parent adapter
(a path, or a URL of a registry on shared storage: fetched and checksum-verified on the node). It writes the
candidate either straight into the job's staging path (one machine, or a shared mount on every node) or, with
``shared_dir``, to ``<shared_dir>/staging/<id>/`` from where the learner copies it into its staging path. The
learner then verifies and publishes it as with a local job.

Differences from the local executor: progress arrives in one batch when the task ends (the steps and metrics
are the same, only later); the task is not reniced (the cluster's resources are reserved for it). A timeout
cancels the task (``ray.cancel(force=True)``); a task that raised, a worker or node that died, or a timeout is a
:class:`~learners.worker.TrainingFailed`, and nothing is published.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from learners.worker import (
    CANCELLED_MESSAGE,
    JOB_KINDS,
    CallJob,
    Job,
    ProgressFn,
    TrainingFailed,
    cancel_requested,
    execute_job,
    job_kind,
)
from runtime import shared_storage
from runtime.config import ConfigError, RayConfig

RAY_EXTRA = "pip install 'learning-runtime[ray]'"

OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "train": ("output_dir",), "seal": ("output_dir", "generator_output_dir"), "call": (),
}
"""The directories each job kind writes."""


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    return importlib.util.find_spec("ray") is not None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"learning.executor is `ray` but Ray is not installed ({exc}): {RAY_EXTRA}, or set "
            "learning.executor: local"
        ) from None
    return ray


@dataclasses.dataclass
class RayExecutor:
    """Runs learner jobs as Ray tasks; the fields are those of ``learning.ray`` (:class:`runtime.config.RayConfig`)."""

    address: str | None = None
    namespace: str | None = None
    runtime_env: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gib: float | None = None
    max_retries: int = 0
    model_dir: str | None = None
    shared_dir: str | None = None
    name: str = dataclasses.field(default="ray", init=False)

    @classmethod
    def from_config(cls, config: RayConfig) -> RayExecutor:
        """The executor of ``learning.ray``; a :class:`ConfigError` naming the extra when Ray is not installed."""
        if not ray_available():
            _import_ray()
        return cls(**config.model_dump())

    def connect(self) -> Any:
        """The ``ray`` module, initialised: the Ray already running in this process, else ``ray.init`` with this
        executor's address, namespace and runtime_env."""
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=self.namespace, runtime_env=self.runtime_env,
                     log_to_driver=False)
        return ray

    def run(self, job: Job, progress: ProgressFn | None, timeout_s: float | None) -> Any:
        """Run `job` as a Ray task and return its result; raises :class:`TrainingFailed`."""
        try:
            ray = self.connect()
        except ConfigError:
            raise
        except Exception as exc:  # no cluster at the address, a bad runtime_env, ...
            raise TrainingFailed(
                f"cannot reach the Ray cluster (learning.ray.address: {self.address or '$RAY_ADDRESS or a local Ray'})"
                f": {type(exc).__name__}: {exc}; nothing was trained"
            ) from None
        kind = job_kind(job)
        job = self._for_cluster(job)
        staging = shared_storage.join_url(self.shared_dir, "staging", uuid.uuid4().hex) if self.shared_dir else None
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": self.max_retries,
            "name": f"learner-{job.method}",
        }
        if self.memory_gib is not None:
            options["memory"] = int(self.memory_gib * 2**30)
        # A GPU job gets a fresh worker process, so that its GPU memory is freed when it ends; CPU jobs reuse
        # workers (they skip importing torch and transformers again).
        task = ray.remote(max_calls=1 if self.num_gpus > 0 else 0)(_run_task)
        ref = task.options(**options).remote(kind, dataclasses.asdict(job), staging)
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not ray.wait([ref], timeout=0.5 if deadline is None else
                               max(0.0, min(0.5, deadline - time.monotonic())))[0]:
                if cancel_requested():  # the runtime is stopping (RuntimeService.stop_learning)
                    ray.cancel(ref, force=True)
                    raise TrainingFailed(CANCELLED_MESSAGE)
                if deadline is not None and time.monotonic() >= deadline:
                    ray.cancel(ref, force=True)
                    raise _TimedOut
            result, events = ray.get(ref)
            if staging is not None:
                for name in OUTPUT_FIELDS[kind]:
                    staged = shared_storage.join_url(staging, name)
                    if shared_storage.list_files(staged):
                        shared_storage.download_dir(staged, getattr(job, name))
        except ray.exceptions.RayTaskError as exc:
            raise TrainingFailed(f"{job.method} training failed in its Ray task:\n{exc}") from None
        except ray.exceptions.RayError as exc:  # worker or node died, task cancelled, object lost
            raise TrainingFailed(
                f"the {job.method} Ray task ended before finishing ({type(exc).__name__}: {exc}); nothing was "
                "published"
            ) from None
        except _TimedOut:
            raise TrainingFailed(f"training exceeded its time budget of {timeout_s:.0f}s (the Ray task was "
                                 "cancelled); nothing was published") from None
        except BaseException:  # interrupted here, or the copy of the output failed: the task must not run on
            ray.cancel(ref, force=True)
            raise
        finally:
            if staging is not None:
                shared_storage.remove(staging)
        if progress is not None:
            for step, total, logs in events:
                progress(step, total, logs)
        return result

    def _for_cluster(self, job: Job) -> Job:
        """A copy of `job` set up for a Ray node: its device and threads are the task's reservation, its base model
        ``model_dir`` when set."""
        device = "cuda" if self.num_gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the reserved GPUs
        job = dataclasses.replace(job, device=device, num_threads=max(1, int(self.num_cpus)), niceness=0)
        if self.model_dir is not None:
            if isinstance(job, CallJob):
                job.kwargs = {**job.kwargs, "base_model_dir": self.model_dir}
            else:
                job.base_model_dir = self.model_dir
        return job


class _TimedOut(Exception):
    pass


def _run_task(kind: str, job_dict: dict[str, Any], staging: str | None) -> tuple[Any, list[tuple[Any, ...]]]:
    """The Ray task: run the job here; with `staging`, write its outputs to a temporary directory and upload them
    there. Returns the job's result (paths given as the learner's) and the progress events."""
    job = JOB_KINDS[kind](**job_dict)
    events: list[tuple[Any, ...]] = []
    tmp = Path(tempfile.mkdtemp(prefix="learner-ray-")) if staging is not None else None
    renamed: dict[str, str] = {}
    try:
        if tmp is not None:
            for name in OUTPUT_FIELDS[kind]:
                renamed[str(tmp / name)] = getattr(job, name)
                setattr(job, name, str(tmp / name))
        result = execute_job(job, lambda step, total, logs: events.append((step, total, dict(logs))))
        if tmp is not None and staging is not None:
            for name in OUTPUT_FIELDS[kind]:
                if (tmp / name).is_dir():
                    shared_storage.upload_dir(tmp / name, shared_storage.join_url(staging, name))
            result = _renamed_paths(result, renamed)
        return result, events
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _renamed_paths(value: Any, renamed: dict[str, str]) -> Any:
    """`value` with every string that is (or lies under) a key of `renamed` given the corresponding path."""
    if isinstance(value, str):
        for old, new in renamed.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: _renamed_paths(v, renamed) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_renamed_paths(v, renamed) for v in value)
    return value
