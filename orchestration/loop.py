"""The background learning loop: an APScheduler job in the runtime process.

Each tick (every ``schedule.interval_s`` seconds, or on ``schedule.cron``):

1. the shadow adapter, if any, is reviewed (promoted, retired or kept, by the policy's shadow criteria);
2. nothing more happens in quiet hours, with fewer than ``schedule.min_new_signals`` new signals, or
   when no device is spare (:func:`policies.resources.training_device`);
3. otherwise one cycle runs: dataset -> worker -> gate -> promotion (:meth:`RuntimeService.learn_now`).

One cycle runs at a time (the job has ``max_instances=1`` and the service a cycle lock); missed ticks
coalesce into one. Every tick's outcome is kept in :attr:`LearningLoop.history`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from orchestration.cycle import CycleResult
from policies.schema import Policy
from policies.shadow import ShadowReport
from runtime.config import RuntimeConfig
from runtime.store import Store


class LoopHost(Protocol):
    """What the loop drives (:class:`orchestration.service.RuntimeService` is one)."""

    config: RuntimeConfig
    store: Store
    policy: Policy

    @property
    def cycle_running(self) -> bool: ...

    def review_shadow(self) -> ShadowReport | None: ...

    def learn_now(self, method: str | None = None, *, spare_only: bool = False) -> CycleResult: ...

log = logging.getLogger(__name__)

JOB_ID = "learning-cycle"


@dataclass
class TickOutcome:
    """What one tick of the loop did."""

    at: datetime
    action: str
    """``learned`` (a cycle ran; see ``status``), ``skipped`` or ``error``."""
    reason: str
    status: str | None = None
    """The cycle's status (``activated``, ``vetoed``, ``shadow``, ...) when one ran."""
    run_id: str | None = None
    adapter: str | None = None
    shadow: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "at": self.at.isoformat()}


class LearningLoop:
    """Runs :meth:`tick` on the policy's schedule in a background scheduler thread."""

    def __init__(self, service: LoopHost, *, clock: Callable[[], datetime] = datetime.now) -> None:
        self.service = service
        self.schedule = service.policy.schedule
        self.history: deque[TickOutcome] = deque(maxlen=100)
        self._clock = clock
        self._scheduler: BackgroundScheduler | None = None
        self._ticked = threading.Condition()

    def start(self) -> None:
        """Start the scheduler thread (the first tick comes after one interval)."""
        if self._scheduler is not None:
            return
        trigger = (
            CronTrigger.from_crontab(self.schedule.cron)
            if self.schedule.cron
            else IntervalTrigger(seconds=self.schedule.interval_s or 600.0)
        )
        scheduler = BackgroundScheduler(daemon=True, timezone=UTC)
        scheduler.add_job(
            self.tick, trigger, id=JOB_ID, max_instances=1, coalesce=True, misfire_grace_time=None,
            replace_existing=True,
        )
        scheduler.start()
        self._scheduler = scheduler

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def next_run_time(self) -> datetime | None:
        job = self._scheduler.get_job(JOB_ID) if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with `wait`, let a tick in progress finish first."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None

    def tick(self) -> TickOutcome:
        """One pass: review the shadow, then learn if the policy allows it now."""
        try:
            outcome = self._tick()
        except Exception as exc:  # a failed tick must not kill the scheduler thread
            log.exception("learning loop tick failed")
            outcome = TickOutcome(self._clock(), "error", f"{type(exc).__name__}: {exc}")
        with self._ticked:
            self.history.append(outcome)
            self._ticked.notify_all()
        log.info("learning loop: %s (%s)", outcome.action, outcome.reason)
        return outcome

    def wait_for(self, predicate: Callable[[list[TickOutcome]], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(history)`` holds after a tick (or already holds); ``False`` on `timeout`."""
        with self._ticked:
            return self._ticked.wait_for(lambda: predicate(list(self.history)), timeout)

    def _tick(self) -> TickOutcome:
        now = self._clock()
        service = self.service
        shadow: dict[str, Any] = {}
        report = service.review_shadow()
        if report is not None:
            shadow = {"adapter": report.adapter, "verdict": report.verdict, "reasons": report.reasons}
        if self.schedule.quiet_at(now.time()):
            return TickOutcome(now, "skipped", "quiet hours", shadow=shadow)
        if service.cycle_running:
            return TickOutcome(now, "skipped", "a cycle is already running", shadow=shadow)
        new = self.new_signals()
        if new < self.schedule.min_new_signals:
            return TickOutcome(
                now, "skipped", f"{new} new signals, {self.schedule.min_new_signals} needed", shadow=shadow
            )
        result = service.learn_now(self.schedule.method, spare_only=True)  # skips when no device is spare
        if result.status == "skipped":
            return TickOutcome(now, "skipped", result.message, shadow=shadow)
        adapter = result.adapter.name if result.adapter else None
        return TickOutcome(now, "learned", result.message, result.status, result.run_id, adapter, shadow)

    def new_signals(self) -> int:
        """Unconsumed learning material for the scheduled method: documents for seal, else corrections and
        taught answers (and positive ratings, when the config promotes them)."""
        store = self.service.store
        method = self.schedule.method or self.service.config.learning.method
        if method == "seal":
            return len(store.documents(unconsumed_only=True))
        signals = store.signals(unconsumed_only=True)
        learning = self.service.config.learning

        def counts(s: Any) -> bool:
            if s.kind in ("correction", "demonstration"):
                return True
            positive = s.kind == "rating" and (s.rating or 0) >= learning.min_positive_score
            return learning.promote_positive_ratings and positive

        return sum(counts(s) for s in signals)
