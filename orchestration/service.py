"""`RuntimeService`: the runtime process's learning side, shared by the embedded agent and `runtime serve`.

It owns (or is given) the serving engine and the store, the adapter registry, the learning policy, shadow
mode and the background learning loop, and it keeps the engine in step with the registry: whatever it
promotes, rolls back or puts in shadow is what the engine serves. Typical use::

    service = RuntimeService.from_config("runtime.yaml")
    service.start_background()          # APScheduler loop: learns when the policy's schedule says
    ...
    service.rollback()                  # the previous adapter serves again
    service.close()
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from learners.callbacks import PhaseFn
from learners.config import load_config
from learners.worker import ProgressFn, cancelled_by
from orchestration.cycle import CycleResult, run_cycle
from orchestration.loop import LearningLoop
from policies.decision import Gate, approve_all
from policies.gate import PolicyGate
from policies.loading import load_policy
from policies.resources import training_device
from policies.schema import Policy
from policies.shadow import ShadowMirror, ShadowReport, ShadowSwitch, shadow_report
from runtime.adapters import AdapterRegistry, AdapterVerificationError
from runtime.config import RuntimeConfig
from runtime.engines import AdapterLoadError, Engine, follower_refusal
from runtime.factory import create_engine, open_store
from runtime.store import AdapterRecord, Store

log = logging.getLogger(__name__)


class CycleInProgress(RuntimeError):
    """A learning cycle is already running in this process; one runs at a time."""


class RuntimeService:
    """Learning, promotion, rollback and shadow mode around one serving `engine` and `store`.

    Args:
        config: the runtime configuration.
        engine, store: the serving engine and the interaction log.
        policy: the learning policy; ``None`` approves every verified candidate and promotes directly.
    """

    def __init__(self, config: RuntimeConfig, engine: Engine, store: Store, policy: Policy | None = None) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self.has_policy = policy is not None
        self.policy = policy or Policy()
        self.registry = AdapterRegistry(config.adapters_dir, store)
        self.shadow = ShadowSwitch()
        self._cycle_lock = threading.Lock()
        self._stopping = threading.Event()  # set by stop_learning(): cancels the running cycle's training
        self._swap_lock = threading.RLock()
        self._loop: Any = None
        self._gate: Gate | None = None
        self._owned = ExitStack()
        self.last_cycle: CycleResult | None = None
        self.integrity_failures: list[str] = []
        """Adapters refused because their files failed verification or did not load (name: reason)."""

    @classmethod
    def from_config(
        cls,
        config: RuntimeConfig | str | Path | None = None,
        *,
        engine: Engine | None = None,
        store: Store | None = None,
        policy: Policy | str | Path | None = None,
    ) -> RuntimeService:
        """Build the service from a config (a `RuntimeConfig`, a YAML path, or the defaults).

        The engine and store are created unless given (and then closed by :meth:`close`); the policy is
        the given one, else the config's ``policy`` file. Runs left ``running`` by a stopped process are
        marked failed, and the registry's active and shadow adapters are loaded into the engine.
        """
        if not isinstance(config, RuntimeConfig):
            config = load_config(config)
        if policy is None and config.policy is not None:
            policy = config.policy
        if policy is not None and not isinstance(policy, Policy):
            policy = load_policy(policy)
        with ExitStack() as owned:  # what this call creates is closed again if anything below fails
            if store is None:
                store = owned.enter_context(open_store(config))
            if engine is None:
                engine = owned.enter_context(create_engine(config))
            service = cls(config, engine, store, policy)
            service.recover_interrupted_runs()
            service.sync_engine()
            service._owned = owned.pop_all()
        return service

    # --- serving --------------------------------------------------------------------------------------

    def sync_engine(self) -> None:
        """Make the engine serve the registry's active adapter and mirror to its shadow adapter.

        An active adapter whose files no longer match their checksum (or no longer load) is not served: its nearest
        good ancestor serves instead, or the base model, and the registry records the rollback with the reason
        (see :attr:`integrity_failures`).
        """
        if self.engine.follower:  # the fleet's learner sets what the replicas serve
            return
        with self._swap_lock:
            active = self.registry.active()
            while active is not None:
                try:
                    self._ensure_loaded(active)
                    break
                except (AdapterVerificationError, AdapterLoadError) as exc:
                    active = self._refuse(active, exc)
            self.engine.set_active_adapter(active.name if active else None)
            shadow = self.registry.current_shadow()
            if shadow is not None:
                self._start_shadow(shadow)
            else:
                self.shadow.attach(None)

    # --- learning -------------------------------------------------------------------------------------

    def gate(self) -> Gate:
        """The policy gate on this engine (approve-all without a policy). One gate serves every cycle, so the
        active adapter's retention scores are computed once, not once per candidate."""
        if not self.has_policy:
            return approve_all
        if self._gate is None:
            self._gate = PolicyGate(
                self.policy, self.engine, repair_prompts_per_check=self.config.learning.repair.max_prompts_per_check,
                load=self.registry.load_into,
            )
        return self._gate

    def learn_now(
        self,
        method: str | None = None,
        *,
        progress: ProgressFn | None = None,
        timeout_s: float | None = None,
        spare_only: bool = False,
        phase: PhaseFn | None = None,
    ) -> CycleResult:
        """Run one learning cycle now (dataset -> worker -> gate -> promotion) and apply its outcome to the
        engine. Raises :class:`CycleInProgress` if one is already running. ``progress`` follows the training
        steps, ``phase`` the cycle's phases (:data:`learners.callbacks.PhaseFn`).

        The policy's spare-device thresholds apply only with `spare_only` (the background loop checks them
        before it calls this); a cycle asked for by hand runs on the best device available.
        """
        self._require_learner("run a learning cycle")
        if not self._cycle_lock.acquire(blocking=False):
            raise CycleInProgress("a learning cycle is already running; wait for it to finish")
        try:
            device, why = training_device(self.policy.resources, self._serving_device(), spare_only=spare_only)
            if device is None:
                return CycleResult("skipped", why)
            with self._swap_lock:
                self._prune()
            with cancelled_by(self._stopping):  # stop_learning() kills its training process
                result = run_cycle(
                    self.config,
                    self.store,
                    method or self.policy.schedule.method,
                    gate=self.gate(),
                    promotion=self.policy.promotion.mode,
                    progress=progress,
                    device=device,
                    num_threads=self.policy.resources.cpu_threads,
                    timeout_s=timeout_s if timeout_s is not None else self.policy.schedule.timeout_s,
                    protected_prompts=[b.conversation() for b in self.policy.protected],
                    max_signals_per_principal=self.policy.signals.max_per_principal_per_update,
                    phase=phase,
                    engine=self.engine,
                )
            self._apply(result)
            self.last_cycle = result
            return result
        finally:
            self._cycle_lock.release()

    @property
    def cycle_running(self) -> bool:
        return self._cycle_lock.locked()

    def recover_interrupted_runs(self) -> list[str]:
        """Mark runs left ``pending``/``running`` by a process that stopped as failed; returns their ids.

        Only one process writes a store, so a run in that state here was cut off by a restart. Its signals
        were not consumed (that happens on success), so the next cycle learns them again.
        """
        ids = []
        for status in ("pending", "running"):
            for run in self.store.runs(status=status):  # type: ignore[arg-type]
                self.store.update_run(
                    run.id, status="failed",
                    error="interrupted: the runtime stopped while this run was in progress; its signals will be "
                    "learned by the next cycle",
                )
                self.registry.discard_staging(run.id)
                ids.append(run.id)
        return ids

    # --- promotion ------------------------------------------------------------------------------------

    def promote(self, name: str, *, reason: str = "promoted by operator", force: bool = False,
                by: str | None = None) -> AdapterRecord:
        """Make `name` serve: loaded first (a broken adapter changes nothing), then recorded active, then
        switched in the engine; requests in flight finish on the adapter they started with. The switch does
        not wait for them: adapters no longer needed are unloaded by the next learning cycle.

        An adapter the gate ever vetoed needs ``force=True``, every time (also after it was forced once and
        rolled back); the promotion is then recorded as forced, with `by` (who) and `reason` (why).
        """
        self._require_learner(f"promote {name!r}")
        with self._swap_lock:
            record = self.store.get_adapter(name)
            if record is None:
                raise KeyError(f"no adapter named {name!r}; see `runtime adapters list`")
            vetoed = record.status == "rejected" or bool(self.store.decisions(adapter=name, decision="veto", limit=1))
            if vetoed and not force:
                raise ValueError(
                    f"{name!r} was vetoed by the gate (see `runtime decisions --adapter {name}`); pass force to "
                    "promote it anyway"
                )
            if record.role != "serving":
                raise ValueError(f"{name!r} is a {record.method} {record.role} adapter, not a serving adapter")
            self._ensure_loaded(record)
            if vetoed:
                reason = f"forced past the gate's veto by {by or 'an operator'}: {reason}"
            elif by:
                reason = f"{reason} (by {by})"
            active = self.registry.activate(name, reason=reason)
            self.engine.set_active_adapter(name)
            if self.shadow.mirror is not None and self.shadow.mirror.adapter == name:
                self.shadow.attach(None)
            return active

    def rollback(self, *, reason: str = "rolled back by operator") -> AdapterRecord | None:
        """Serve the adapter that was active before the current one again (``None``: the base model)."""
        self._require_learner("roll back")
        with self._swap_lock:
            _current, previous = self.registry.previous_active()
            if previous is not None:
                record = self.store.get_adapter(previous)
                if record is not None:
                    self._ensure_loaded(record)
            restored = self.registry.rollback(reason=reason)
            self.engine.set_active_adapter(restored.name if restored else None)
            return restored

    def retire_shadow(self, *, reason: str, checks: Any = None) -> AdapterRecord | None:
        """Stop shadow mode and retire the shadow adapter; returns it (``None`` if there was none)."""
        with self._swap_lock:
            shadow = self.registry.current_shadow()
            self.shadow.attach(None)
            if shadow is None:
                return None
            return self.registry.retire(shadow.name, reason=reason, checks=checks)

    def shadow_report(self, adapter: str | None = None) -> ShadowReport:
        """Live and shadow answers compared, with the policy's verdict."""
        return shadow_report(self.store, self.policy, adapter)

    def review_shadow(self) -> ShadowReport | None:
        """Apply the policy's verdict on the current shadow: promote it, retire it, or keep waiting."""
        if self.registry.current_shadow() is None:
            return None
        report = self.shadow_report()
        if report.verdict == "promote" and report.adapter:
            self.promote(report.adapter, reason="shadow mode: " + "; ".join(report.reasons))
        elif report.verdict == "retire":
            self.retire_shadow(reason="shadow mode: " + "; ".join(report.reasons), checks=_report_checks(report))
        return report

    # --- background loop ------------------------------------------------------------------------------

    def start_background(self) -> Any:
        """Start the APScheduler learning loop in this process (see :class:`orchestration.loop.LearningLoop`)."""
        self._require_learner("start background learning")
        if self._loop is None:
            self._loop = LearningLoop(self)
            self._loop.start()
        return self._loop

    def _require_learner(self, what: str) -> None:
        """A process that follows the fleet's learner (``engine.follow_replicas``) neither learns nor promotes."""
        if self.engine.follower:
            raise follower_refusal(what)

    def stop_learning(self) -> None:
        """Stop learning now: the loop stops and a cycle in progress (scheduled or asked for) is cancelled. Its
        training process is killed, the run is marked failed, nothing is published, and its signals stay pending
        for the next cycle. Returns when no cycle runs. A gate evaluation in progress finishes first."""
        self._stopping.set()
        try:
            self.stop_background()
            with self._cycle_lock:  # a cycle started by hand ends too
                pass
        finally:
            self._stopping.clear()

    def stop_background(self) -> None:
        """Stop the learning loop (a cycle in progress finishes first; :meth:`stop_learning` cancels it)."""
        if self._loop is not None:
            self._loop.shutdown()
            self._loop = None

    @property
    def loop(self) -> Any:
        """The background loop, once started."""
        return self._loop

    def close(self) -> None:
        """Stop the loop and shadow mode, flush the store, and close what :meth:`from_config` created."""
        self.stop_background()
        self.shadow.attach(None)
        if not self.store.closed:
            self.store.flush()
        self._owned.close()

    def __enter__(self) -> RuntimeService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------------

    def _apply(self, result: CycleResult) -> None:
        record = result.adapter
        if record is None:
            return
        if result.status == "activated":
            with self._swap_lock:
                self._ensure_loaded(record)
                self.engine.set_active_adapter(record.name)
                self._prune()
        elif result.status == "shadow":
            with self._swap_lock:
                self._start_shadow(record)
                self._prune()
        elif result.status == "awaiting_promotion":
            with self._swap_lock:
                self._prune()

    def _start_shadow(self, record: AdapterRecord) -> None:
        self._ensure_loaded(record)
        mirror = self.shadow.mirror
        if mirror is None or mirror.adapter != record.name:
            self.shadow.attach(ShadowMirror(self.engine, self.store, record.name, self.policy.shadow))

    def _ensure_loaded(self, record: AdapterRecord) -> None:
        if not self.engine.has_adapter(record.name):
            self.registry.load_into(self.engine, record)

    def _refuse(self, record: AdapterRecord, exc: Exception) -> AdapterRecord | None:
        """The active adapter cannot serve: log it, count it, and fall back (:meth:`AdapterRegistry.fall_back`)."""
        self.integrity_failures.append(f"{record.name}: {exc}")
        restored = self.registry.fall_back(record, f"refused at start-up: {exc}")
        log.error("adapter %s refused (%s); serving %s instead", record.name, exc,
                  restored.name if restored else "the base model")
        return restored

    def _prune(self) -> None:
        """Unload registry adapters that neither serve, shadow, nor would be restored by a rollback.

        Unloading waits for the generation in flight, so only the learning cycle (off the request path and
        away from promotion) does it.
        """
        _current, previous = self.registry.previous_active()
        keep = {self.engine.active_adapter, previous}
        shadow = self.registry.current_shadow()
        if shadow is not None:
            keep.add(shadow.name)
        for name in self.engine.list_adapters():
            if name not in keep and self.store.get_adapter(name) is not None:
                self.engine.unload_adapter(name)

    def _serving_device(self) -> str | None:
        device = getattr(self.engine, "device", None)
        return str(device) if device is not None else self.config.engine.device


def _report_checks(report: ShadowReport) -> dict[str, Any]:
    data = report.to_dict()
    data.pop("examples", None)
    return data
