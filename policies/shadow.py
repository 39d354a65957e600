"""Shadow mode: a share of live requests is answered again by the shadow adapter, off the request path.

:class:`ShadowMirror` takes a finished live call (``offer``), and with probability ``fraction`` puts it on a
bounded queue that drops rather than blocks; one background thread answers it with the shadow adapter and
logs the answer as a ``shadow`` interaction linked to the live one. :func:`shadow_report` compares the
pairs (agreement, the policy's answer rules on both sides, feedback on the live answers) and
:func:`shadow_verdict` says whether the policy would promote, retire or keep waiting.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from policies.checks import check_answer
from policies.schema import Policy, ShadowCriteria
from runtime.engines import Engine, SamplingParams
from runtime.store import Store
from runtime.textmatch import token_f1

log = logging.getLogger(__name__)

REGRESSION_F1 = 0.5
"""Below this F1 against a positively rated live answer, the shadow answer counts as a regression."""


@dataclass
class MirrorStats:
    offered: int = 0
    queued: int = 0
    dropped: int = 0
    answered: int = 0
    failed: int = 0


class ShadowMirror:
    """Mirrors a `fraction` of live calls to the `adapter` in the background and logs its answers."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        adapter: str,
        criteria: ShadowCriteria,
        *,
        seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.adapter = adapter
        self.criteria = criteria
        self.stats = MirrorStats()
        self._random = random.Random(seed)
        self._queue: queue.Queue[tuple[list[dict[str, Any]], str, SamplingParams] | None] = queue.Queue(
            criteria.queue_size
        )
        self._thread = threading.Thread(target=self._work, name=f"shadow-{adapter}", daemon=True)
        self._closed = False
        self._thread.start()

    def offer(self, conversation: Sequence[dict[str, Any]], live_interaction_id: str, params: SamplingParams) -> bool:
        """Consider one finished live call for mirroring; never blocks. Returns whether it was queued."""
        if self._closed:
            return False
        self.stats.offered += 1
        if self._random.random() >= self.criteria.fraction:
            return False
        if self.criteria.max_new_tokens is not None:
            params = SamplingParams(
                max_new_tokens=min(params.max_new_tokens, self.criteria.max_new_tokens),
                temperature=params.temperature, top_p=params.top_p, stop=params.stop, seed=params.seed,
            )
        try:
            self._queue.put_nowait((list(conversation), live_interaction_id, params))
        except queue.Full:
            self.stats.dropped += 1
            return False
        self.stats.queued += 1
        return True

    def join(self, timeout: float = 60.0) -> None:
        """Wait until every queued request has been answered (tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests; finish the queued ones (up to `timeout`), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                conversation, live_id, params = item
                start = time.perf_counter()
                generation = self.engine.chat([conversation], params, adapter=self.adapter)[0]
                self.store.log_interaction(
                    conversation,
                    generation.text,
                    kind="shadow",
                    shadow_of=live_id,
                    adapter=generation.adapter,
                    model=getattr(self.engine, "model_name", None),
                    latency_ms=(time.perf_counter() - start) * 1000.0,
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=generation.completion_tokens,
                )
                self.stats.answered += 1
            except Exception:  # the shadow must never disturb serving; count and log it
                self.stats.failed += 1
                log.exception("shadow request on %s failed", self.adapter)
            finally:
                self._queue.task_done()


class ShadowSwitch:
    """What chat models hold: forwards live calls to the current :class:`ShadowMirror`, if there is one.

    The runtime swaps mirrors as shadows come and go; chat models keep the same switch.
    """

    def __init__(self) -> None:
        self._mirror: ShadowMirror | None = None
        self._lock = threading.Lock()

    @property
    def mirror(self) -> ShadowMirror | None:
        return self._mirror

    def offer(self, conversation: Sequence[dict[str, Any]], live_interaction_id: str, params: SamplingParams) -> bool:
        mirror = self._mirror
        return mirror.offer(conversation, live_interaction_id, params) if mirror is not None else False

    def attach(self, mirror: ShadowMirror | None) -> None:
        """Mirror to `mirror` from now on (``None``: stop mirroring); the previous mirror is closed."""
        with self._lock:
            old, self._mirror = self._mirror, mirror
        if old is not None and old is not mirror:
            old.close()


@dataclass
class ShadowReport:
    """How the shadow adapter compares with live serving on mirrored traffic."""

    adapter: str | None
    pairs: int
    agreement: float
    """Mean token F1 between the shadow and live answers."""
    live_violations: int
    shadow_violations: int
    """Answers that break the policy's shadow ``checks``."""
    rated_positive: int
    regressions: int
    """Positively rated live answers the shadow answered differently (F1 below 0.5)."""
    corrected: int
    fixes: int
    """Corrected live answers where the shadow's answer already agrees with the correction."""
    verdict: Literal["promote", "retire", "wait"]
    reasons: list[str]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shadow_report(store: Store, policy: Policy, adapter: str | None = None, *, examples: int = 5) -> ShadowReport:
    """Compare live and shadow answers for `adapter` (default: the adapter now in shadow mode)."""
    if adapter is None:
        shadows = store.adapters(status="shadow")
        adapter = shadows[-1].name if shadows else None
    pairs = store.shadow_pairs(adapter=adapter) if adapter is not None else []
    criteria = policy.shadow
    agreements: list[float] = []
    live_bad = shadow_bad = rated = regressions = corrected = fixes = 0
    samples: list[dict[str, Any]] = []
    live_ids = {live.id for live, _ in pairs}
    feedback = store.signals(interaction_ids=sorted(live_ids))
    ratings: dict[str, float] = {}
    corrections: dict[str, str] = {}
    for signal in feedback:
        if signal.kind == "rating" and signal.rating is not None:
            ratings[signal.interaction_id] = signal.rating  # type: ignore[index]
        elif signal.kind == "correction" and signal.text:
            corrections[signal.interaction_id] = signal.text  # type: ignore[index]
    for live, shadow in pairs:
        f1 = token_f1(shadow.response, live.response) if live.response.strip() else float(not shadow.response.strip())
        agreements.append(f1)
        live_fail = _violations(criteria, live.response, policy.refusal_markers)
        shadow_fail = _violations(criteria, shadow.response, policy.refusal_markers)
        live_bad += bool(live_fail)
        shadow_bad += bool(shadow_fail)
        if ratings.get(live.id, 0.0) > 0:
            rated += 1
            regressions += f1 < REGRESSION_F1
        if live.id in corrections:
            corrected += 1
            fixes += token_f1(shadow.response, corrections[live.id]) >= REGRESSION_F1
        if len(samples) < examples:
            samples.append(
                {
                    "prompt": live.messages[-1]["content"] if live.messages else "",
                    "live": live.response,
                    "shadow": shadow.response,
                    "agreement": round(f1, 3),
                    "shadow_violations": shadow_fail,
                }
            )
    agreement = sum(agreements) / len(agreements) if agreements else 0.0
    verdict, reasons = shadow_verdict(
        criteria, pairs=len(pairs), agreement=agreement, live_violations=live_bad,
        shadow_violations=shadow_bad, rated_positive=rated, regressions=regressions,
    )
    if adapter is None:
        verdict, reasons = "wait", ["no adapter is in shadow mode"]
    return ShadowReport(
        adapter, len(pairs), agreement, live_bad, shadow_bad, rated, regressions, corrected, fixes,
        verdict, reasons, samples,
    )


def shadow_verdict(
    criteria: ShadowCriteria,
    *,
    pairs: int,
    agreement: float,
    live_violations: int,
    shadow_violations: int,
    rated_positive: int,
    regressions: int,
) -> tuple[Literal["promote", "retire", "wait"], list[str]]:
    """What the policy does with a shadow: retire on a rule or feedback regression (at any time), promote
    once ``min_pairs`` pairs agree well enough, retire after ``max_pairs`` without qualifying."""
    extra = shadow_violations - live_violations
    if extra > criteria.max_extra_violations:
        return "retire", [
            f"the shadow broke the answer rules {shadow_violations} times against live's {live_violations} "
            f"(allowed extra: {criteria.max_extra_violations})"
        ]
    if rated_positive and regressions / rated_positive > criteria.max_regression_rate:
        return "retire", [
            f"{regressions} of {rated_positive} positively rated live answers were answered differently by the "
            f"shadow (> {100 * criteria.max_regression_rate:.0f}%)"
        ]
    if pairs < criteria.min_pairs:
        return "wait", [f"{pairs} of {criteria.min_pairs} pairs needed before deciding"]
    if agreement >= criteria.min_agreement:
        return "promote", [
            f"{pairs} pairs: agreement {agreement:.2f} >= {criteria.min_agreement:.2f}, "
            f"rule violations {shadow_violations} (live {live_violations}), regressions {regressions}"
        ]
    if pairs >= criteria.max_pairs:
        return "retire", [
            f"agreement {agreement:.2f} stayed below {criteria.min_agreement:.2f} after {pairs} pairs"
        ]
    return "wait", [f"agreement {agreement:.2f} below {criteria.min_agreement:.2f} after {pairs} pairs"]


def _violations(criteria: ShadowCriteria, answer: str, markers: Sequence[str]) -> list[str]:
    failures: list[str] = []
    for rule in criteria.checks:
        failures.extend(check_answer(rule, answer, refusal_markers=markers).failures)
    return failures
