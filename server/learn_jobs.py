"""Learning cycles started from the admin API: one at a time, each in a background thread.

The cycle itself (`RuntimeService.learn_now`) blocks for the whole training, which runs in the learner's
worker process; the thread only waits for it, so serving goes on. A job's progress (step / total, loss)
is kept when the service reports it.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from learners.registry import LEARNING_METHODS

LEARN_METHODS: tuple[str, ...] = tuple(LEARNING_METHODS)
"""Methods ``POST /admin/learn`` accepts."""


@dataclass
class LearnJob:
    """One learning cycle started by the server."""

    id: str
    method: str | None
    status: str = "running"
    """``running``, ``finished`` (the cycle returned; see ``result.status``) or ``error`` (it raised)."""
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "method": self.method, "status": self.status, "started_at": self.started_at,
            "ended_at": self.ended_at, "progress": dict(self.progress), "result": self.result, "error": self.error,
        }


def cycle_result_dict(result: Any) -> dict[str, Any]:
    """A `orchestration.cycle.CycleResult` (or anything shaped like it) as JSON-ready data."""
    adapter = getattr(result, "adapter", None)
    metrics = {k: v for k, v in (getattr(result, "metrics", None) or {}).items() if k != "history"}
    return {
        "status": getattr(result, "status", None),
        "message": getattr(result, "message", None),
        "run_id": getattr(result, "run_id", None),
        "adapter": None if adapter is None else {"name": adapter.name, "status": adapter.status},
        "counts": dict(getattr(result, "counts", None) or {}),
        "metrics": metrics,
        "attempts": list(getattr(result, "attempts", None) or []),
        "held": getattr(result, "held", 0),
    }


class LearnJobs:
    """Starts `learn_now` cycles in background threads and remembers them (newest last)."""

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, LearnJob] = {}
        self._keep = keep

    def running(self) -> LearnJob | None:
        """The job still running, if any."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.status == "running"), None)

    def get(self, job_id: str) -> LearnJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[LearnJob]:
        """Jobs, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def start(self, learn_now: Any, method: str | None) -> tuple[LearnJob, bool]:
        """Start ``learn_now(method=...)`` unless a job is running; returns ``(job, started)``."""
        with self._lock:
            current = next((j for j in self._jobs.values() if j.status == "running"), None)
            if current is not None:
                return current, False
            job = LearnJob(id=uuid.uuid4().hex[:12], method=method)
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                del self._jobs[next(iter(self._jobs))]
        threading.Thread(target=self._run, args=(job, learn_now), name=f"learn-{job.id}", daemon=True).start()
        return job, True

    def _run(self, job: LearnJob, learn_now: Any) -> None:
        def progress(step: int, total: int, logs: dict[str, float]) -> None:
            job.progress = {**job.progress, "step": step, "total": total,
                            **{k: v for k, v in logs.items() if k == "loss"}}

        def phase(name: str, done: int, total: int) -> None:
            job.progress = {**job.progress, "phase": name, "phase_done": done, "phase_total": total}

        try:
            result = learn_now(method=job.method, progress=progress, phase=phase)
            job.result = cycle_result_dict(result)
            job.status = "finished"
        except Exception as exc:  # noqa: BLE001 - reported through the job
            job.error = f"{type(exc).__name__}: {exc}"
            job.status = "error"
        finally:
            job.ended_at = time.time()
