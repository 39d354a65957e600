"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (``GET /metrics``).

- ``runtime_http_requests_total{method,route,status}`` and ``runtime_http_request_duration_seconds``
  (a histogram; a streamed response counts until its last byte), by route template;
- ``runtime_prompt_tokens_total`` / ``runtime_generated_tokens_total{adapter}``;
- ``runtime_time_to_first_token_seconds`` (a histogram, streamed requests: the first text chunk);
- at scrape time: ``runtime_active_adapter_info{adapter}``, ``runtime_loaded_adapters``,
  ``runtime_engine_queue_depth`` (calls waiting for the embedded engine),
  ``runtime_store_rows{table}``, ``runtime_learning_job_running``, ``runtime_adapters_refused_total``, and from
  the log: ``runtime_learning_runs_total{method,status}``, ``runtime_gate_decisions_total{decision}``,
  ``runtime_gate_vetoes_total{kind,check}`` (the checks that vetoed), ``runtime_signals{state}`` (``pending`` are
  waiting to be learned), ``runtime_correction_to_serving_seconds`` (a summary: from a signal's arrival to the
  promotion of the adapter that learned it), ``runtime_store_queue_depth`` and
  ``runtime_store_rejected_writes_total``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """The metrics of one server app; `snapshot` (a callable returning live state) feeds the gauges."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("runtime_http_requests", "HTTP requests answered, by route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("runtime_http_request_duration_seconds",
                                 "Time from request to the last byte of the response, by route.",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("runtime_prompt_tokens", "Prompt tokens of chat completions, by adapter.",
                                     ["adapter"], registry=self.registry)
        self.generated_tokens = Counter("runtime_generated_tokens", "Tokens generated, by adapter.",
                                        ["adapter"], registry=self.registry)
        self.first_token = Histogram("runtime_time_to_first_token_seconds",
                                     "Streamed chat completions: from the request to its first generated text.",
                                     buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(snapshot))

    def record_tokens(self, adapter: str | None, prompt: int, completion: int) -> None:
        """Count the tokens of one finished generation."""
        label = adapter or "base"
        self.prompt_tokens.labels(label).inc(prompt)
        self.generated_tokens.labels(label).inc(completion)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read at scrape time: the active adapter, loaded adapters, store row counts, learning job."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to describe up front (no store query at registration)

    def collect(self) -> Iterator[Metric]:
        try:
            state = self._snapshot()
        except Exception as exc:  # a scrape must not fail because the store is busy or closed
            log.warning("metrics snapshot failed: %s", exc)
            return
        active = GaugeMetricFamily("runtime_active_adapter_info",
                                   "The adapter serving requests by default (base = the base model).",
                                   labels=["adapter", "model"])
        active.add_metric([state.get("active_adapter") or "base", state.get("model", "")], 1.0)
        yield active
        yield GaugeMetricFamily("runtime_loaded_adapters", "Adapters loaded in the engine.",
                                value=float(state.get("loaded_adapters", 0)))
        if state.get("engine_queue_depth") is not None:  # unknown for a remote engine (vLLM, SGLang)
            yield GaugeMetricFamily("runtime_engine_queue_depth",
                                    "Calls (requests, adapter loads, gate evaluations) waiting for the engine.",
                                    value=float(state["engine_queue_depth"]))
        rows = GaugeMetricFamily("runtime_store_rows", "Rows in the store, by table.", labels=["table"])
        for table, count in sorted(state.get("store_counts", {}).items()):
            rows.add_metric([table], float(count))
        yield rows
        yield GaugeMetricFamily("runtime_learning_job_running",
                                "1 while a learning cycle started by this server is running.",
                                value=1.0 if state.get("learning") else 0.0)
        refused = CounterMetricFamily(
            "runtime_adapters_refused",
            "Adapters refused since start because their files failed checksum verification or did not load.",
        )
        refused.add_metric([], float(state.get("adapters_refused", 0)))
        yield refused
        yield from _learning_metrics(state.get("learning_figures") or {})
        writes = state.get("store_writes") or {}
        yield GaugeMetricFamily("runtime_store_queue_depth", "Writes waiting for the store's writer thread.",
                                value=float(writes.get("queue_depth", 0)))
        rejected = CounterMetricFamily("runtime_store_rejected_writes",
                                       "Writes refused because the store's queue stayed full (not stored).")
        rejected.add_metric([], float(writes.get("rejected_writes", 0)))
        yield rejected


def _learning_metrics(figures: dict[str, Any]) -> Iterator[Metric]:
    runs = CounterMetricFamily("runtime_learning_runs", "Training runs (cycle attempts), by method and status.",
                               labels=["method", "status"])
    for (method, status), count in sorted(figures.get("runs", {}).items()):
        runs.add_metric([method, status], float(count))
    yield runs
    decisions = CounterMetricFamily("runtime_gate_decisions", "Gate and promotion decisions, by kind.",
                                    labels=["decision"])
    for decision, count in sorted(figures.get("decisions", {}).items()):
        decisions.add_metric([decision], float(count))
    yield decisions
    vetoes = CounterMetricFamily("runtime_gate_vetoes", "Checks that vetoed a candidate, by kind and name.",
                                 labels=["kind", "check"])
    for (kind, name), count in sorted(figures.get("vetoes_by_check", {}).items()):
        vetoes.add_metric([kind, name], float(count))
    yield vetoes
    signals = GaugeMetricFamily("runtime_signals", "Learning signals by state (pending: waiting to be learned).",
                                labels=["state"])
    for state, count in sorted(figures.get("signals_by_state", {}).items()):
        signals.add_metric([state], float(count))
    yield signals
    delays = figures.get("correction_to_serving_seconds", [])
    summary = SummaryMetricFamily("runtime_correction_to_serving_seconds",
                                  "From a signal's arrival to the promotion of the adapter that learned it.",
                                  count_value=len(delays), sum_value=float(sum(delays)))
    yield summary


class MetricsMiddleware:
    """Counts requests and their latency by route template (``/v1/interactions/{interaction_id}/rating``)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status == 404 else "other")
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
