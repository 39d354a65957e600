"""Server load: concurrent clients against `runtime serve`, idle and while a learning cycle trains.

Starts the real server (`python -m server serve`) on loopback with a fresh store, then in one run:

1. **idle**: ``--clients`` threads send chat completions (questions from ``--data``) back to back for
   ``--duration`` seconds;
2. **learning**: ``--facts`` facts from ``--data`` are taught (``POST /v1/teach``), a cycle is started
   (``POST /admin/learn``; it trains in the learner's low-priority worker process), and the same load runs
   again for ``--duration`` seconds or until the cycle ends, whichever is first.

Latency is per request, end to end (client side). The ratio of the two medians says how much a training
cycle in the background slows serving; ``learning_overlap_s`` says how much of the second phase really
had a cycle running (a cycle that ends early makes the comparison weak, and the JSON says so).

    python benchmarks/server_load.py --data ../shared/data/facts_dev.jsonl

Writes benchmarks/results/server_load.json and server_load.md. Input: JSONL rows with ``question`` and
``demonstration`` (the format of facts_dev.jsonl). Goal on CPU: 0 errors, p50 ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.stats import percentile  # noqa: E402
from runtime.jsonl import read_jsonl  # noqa: E402
from runtime.models import DEFAULT_MODEL  # noqa: E402
from server.process import ServerStartError, free_port, start_server, stop_server, wait_ready  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
TOKEN = "server-load-benchmark"


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = [row for _n, row in read_jsonl(path) if row.get("question")]
    if not rows:
        raise SystemExit(f"{path}: no rows with a 'question' field")
    return rows


@dataclass
class PhaseResult:
    """What one load phase measured."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    completion_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        ms = [x * 1000 for x in lat]
        return {
            "requests": len(lat) + self.errors,
            "ok": len(lat),
            "errors": self.errors,
            "error_examples": self.error_examples[:5],
            "duration_s": round(self.duration_s, 2),
            "throughput_rps": round(len(lat) / self.duration_s, 3) if self.duration_s else None,
            "completion_tokens_per_s": round(self.completion_tokens / self.duration_s, 2) if self.duration_s else None,
            "p50_ms": round(percentile(ms, 50), 1) if ms else None,
            "p90_ms": round(percentile(ms, 90), 1) if ms else None,
            "p99_ms": round(percentile(ms, 99), 1) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None,
        }


def run_phase(url: str, prompts: list[str], *, clients: int, duration_s: float, max_tokens: int,
              stop: threading.Event | None = None) -> PhaseResult:
    """``clients`` threads send chat completions back to back until ``duration_s`` passes (or ``stop``)."""
    result = PhaseResult()
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s
    stop = stop or threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            i = index
            while time.perf_counter() < deadline and not stop.is_set():
                prompt = prompts[i % len(prompts)]
                i += clients
                start = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                        "temperature": 0})
                    elapsed = time.perf_counter() - start
                    ok = response.status_code == 200
                    detail = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                    tokens = response.json()["usage"]["completion_tokens"] if ok else 0
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    elapsed, ok, detail, tokens = time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}", 0
                with lock:
                    if ok:
                        result.latencies_s.append(elapsed)
                        result.completion_tokens += tokens
                    else:
                        result.errors += 1
                        result.error_examples.append(detail)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.duration_s = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with question and demonstration")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias or local model directory")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--facts", type=int, default=8, help="facts taught before the learning phase")
    parser.add_argument("--method", default=None, help="learning method (default: the config's)")
    parser.add_argument("--threads", type=int, default=None, help="engine.num_threads of the server")
    parser.add_argument("--warmup", type=int, default=4, help="requests before measuring")
    parser.add_argument("--learn-timeout", type=float, default=3600.0, help="wait this long for the cycle to end")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="wait this long for the server")
    parser.add_argument("--out", type=Path, default=RESULTS / "server_load.json")
    args = parser.parse_args(argv)

    rows = read_rows(args.data)
    prompts = [r["question"] for r in rows]
    facts = [r for r in rows if r.get("demonstration")][: args.facts]
    if len(facts) < args.facts:
        raise SystemExit(f"{args.data}: only {len(facts)} rows have a 'demonstration'; asked for {args.facts}")

    with tempfile.TemporaryDirectory(prefix="server-load-") as tmp:
        tmp_path = Path(tmp)
        config: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "model": {"name": str(args.model)},
                                  "engine": {"max_new_tokens": args.max_tokens}}
        if args.threads:
            config["engine"]["num_threads"] = args.threads
        if args.method:
            config["learning"] = {"method": args.method}
        config_path = tmp_path / "runtime.yaml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "server.log"
        proc = start_server(config_path, port, log_path, admin_token=TOKEN)
        try:
            try:
                health = wait_ready(url, proc, log_path, args.ready_timeout)
            except ServerStartError as exc:
                raise SystemExit(str(exc)) from None
            _warm_up(url, prompts, args)
            print(f"idle phase: {args.clients} clients for {args.duration:.0f}s", flush=True)
            idle = run_phase(url, prompts, clients=args.clients, duration_s=args.duration, max_tokens=args.max_tokens)
            print(json.dumps(idle.summary()), flush=True)

            auth = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=url, timeout=60) as http:
                for fact in facts:
                    taught = http.post("/v1/teach", json={"prompt": fact["question"],
                                                          "demonstration": fact["demonstration"]})
                    taught.raise_for_status()
                started = http.post("/admin/learn", json={"method": args.method} if args.method else None,
                                    headers=auth)
                if started.status_code != 202:
                    raise SystemExit(f"could not start learning: HTTP {started.status_code} {started.text}")
                job_id = started.json()["id"]
                done = threading.Event()
                watcher = threading.Thread(target=_watch_job, args=(url, job_id, done), daemon=True)
                watcher.start()
                print(f"learning phase: cycle {job_id} running; {args.clients} clients for up to "
                      f"{args.duration:.0f}s", flush=True)
                learning = run_phase(url, prompts, clients=args.clients, duration_s=args.duration,
                                     max_tokens=args.max_tokens, stop=done)
                overlap = learning.duration_s  # the cycle ran through the whole phase ...
                if done.is_set():  # ... unless it ended first
                    overlap = min(learning.duration_s, _job_elapsed(http, job_id, auth) or learning.duration_s)
                print(json.dumps(learning.summary()), flush=True)
                job = _wait_job(http, job_id, auth, args.learn_timeout)
        finally:
            stop_server(proc)

    idle_s, learn_s = idle.summary(), learning.summary()
    ratio = (learn_s["p50_ms"] / idle_s["p50_ms"]) if idle_s["p50_ms"] and learn_s["p50_ms"] else None
    p99_ratio = (learn_s["p99_ms"] / idle_s["p99_ms"]) if idle_s["p99_ms"] and learn_s["p99_ms"] else None
    learn_s["learning_overlap_s"] = round(overlap, 2)
    learn_s["learning_active_fraction"] = round(overlap / learning.duration_s, 3) if learning.duration_s else None
    result = {
        "idle": idle_s,
        "learning": learn_s,
        "p50_ratio_learning_over_idle": round(ratio, 3) if ratio else None,
        "p99_ratio_learning_over_idle": round(p99_ratio, 3) if p99_ratio else None,
        "errors_total": idle_s["errors"] + learn_s["errors"],
        "learning_cycle": job,
        "config": {
            "model": str(args.model), "data": str(args.data), "clients": args.clients,
            "duration_s": args.duration, "max_tokens": args.max_tokens, "facts_taught": len(facts),
            "method": args.method or "config default", "engine_threads": args.threads,
            "engine": health.get("engine", {}).get("implementation"),
            "device": health.get("engine", {}).get("device"),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        },
        "goals": {"errors_total": "0", "p50_ratio_learning_over_idle": "<= 1.5 on CPU"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| phase | requests | errors | p50 ms | p99 ms | req/s |\n|---|---|---|---|---|---|\n"
        f"| idle | {idle_s['requests']} | {idle_s['errors']} | {idle_s['p50_ms']} | {idle_s['p99_ms']} | "
        f"{idle_s['throughput_rps']} |\n"
        f"| learning ({learn_s['learning_overlap_s']} s of cycle) | {learn_s['requests']} | {learn_s['errors']} | "
        f"{learn_s['p50_ms']} | {learn_s['p99_ms']} | {learn_s['throughput_rps']} |\n\n"
        f"p50 ratio learning / idle: **{result['p50_ratio_learning_over_idle']}** (goal <= 1.5); "
        f"p99 ratio: {result['p99_ratio_learning_over_idle']}; errors: {result['errors_total']} (goal 0).\n"
        f"Cycle: {(job.get('result') or {}).get('status', job.get('status'))} - "
        f"{(job.get('result') or {}).get('message', job.get('error'))}\n"
    )
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


def _warm_up(url: str, prompts: list[str], args: argparse.Namespace) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        for prompt in prompts[: args.warmup]:
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                    "max_tokens": args.max_tokens}).raise_for_status()


def _watch_job(url: str, job_id: str, done: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        while True:
            try:
                if http.get(f"/admin/learn/{job_id}").json()["status"] != "running":
                    done.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)


def _job_elapsed(http: httpx.Client, job_id: str, auth: dict[str, str]) -> float | None:
    job = http.get(f"/admin/learn/{job_id}", headers=auth).json()
    return (job["ended_at"] - job["started_at"]) if job.get("ended_at") else None


def _wait_job(http: httpx.Client, job_id: str, auth: dict[str, str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/admin/learn/{job_id}", headers=auth).json()
        if job["status"] != "running" or time.monotonic() > deadline:
            return job
        time.sleep(1.0)


if __name__ == "__main__":
    main()
