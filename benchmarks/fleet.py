"""Fleet: a learner, two serving replicas and two app processes on one machine, all on the default model.

What runs (every process its own data directory and DuckDB spool; one shared directory for shipped logs):

- two ``runtime serve --role replica`` processes: serve and log, ship their logs, never learn;
- the learner, ``runtime serve`` with ``engine.replicas`` naming the two: it serves through them, imports every
  shipped segment and runs the learning cycle (policy: promotion ``manual``, so this script promotes while
  traffic runs);
- two app processes embedding ``LearningAgent`` that follow the learner (``engine.follow_replicas``: they serve
  through the replicas, on the adapter the learner made active there): each answers a few questions, teaches
  corrections (``agent.teach``), which its store ships, and then keeps sending requests until the end.

Then: the learner imports the apps' signals and learns them in one cycle; client threads send traffic through
the learner's OpenAI API while the apps send theirs through the replicas; the candidate is promoted during that
traffic, replica 2 is killed with ``kill -9`` at the same moment, and restarted; the script measures how long
the restarted replica takes to serve the new adapter. At the end every process is stopped, its spool shipped, and
the learner's store is compared with every writer's spool.

Figures (``benchmarks/results/fleet.json``):

- ``requests_total``: requests sent through the learner and by the apps (``requests_by_apps`` of them);
- ``stale_adapter_responses``: answers (no error) from an adapter that was neither the learner's active one when
  the request started nor when it ended (a request that started before the switch may finish on the adapter it
  started with), counted over the learner's traffic and the apps' (``stale_app_responses``);
- ``acked_rows_lost``: rows a writer committed to its spool (read after the run) that never reached the learner;
- ``rows_imported_twice``: rows added by importing every segment once more (idempotence), plus duplicate ids;
- ``signals_learned`` / ``signals_sent``: the apps' corrections the learner's cycle consumed;
- ``promotion_seconds``: the promote call (two-phase: load on every replica, then switch);
- ``replica_catch_up_seconds``: from restarting the killed replica until it serves the new active adapter.

    python benchmarks/fleet.py --data ../shared/data/facts_dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.jsonl import read_jsonl  # noqa: E402
from runtime.models import DEFAULT_MODEL, resolve_model  # noqa: E402
from runtime.store import Store, import_segments  # noqa: E402
from server.process import ServerStartError, free_port, start_server, stop_server, wait_ready  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "facts_dev.jsonl"
ADMIN = "fleet-admin"
REPLICA_TOKEN = "fleet-replica"
LOG_TABLES = ("interactions", "signals", "documents")

APP_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import httpx
    from agent import LearningAgent
    from benchmarks.fleet import _active

    def main():
        config_path, job_path, out_path = sys.argv[1:4]
        job = json.loads(open(job_path).read())
        agent = LearningAgent.from_config(config_path)  # engine.follow_replicas: it serves through the replicas
        admin = httpx.Client(base_url=job["learner_url"])
        headers = {"Authorization": "Bearer " + job["admin_token"]}

        def learner_active():  # instrumentation only: what the learner says is active
            return _active(admin, headers)

        answered, records = 0, []
        try:
            for question in job["questions"]:
                agent.invoke(question)
                answered += 1
            for fact in job["teach"]:
                agent.teach(fact["question"], fact["demonstration"])
            open(job["taught_file"], "w").write("taught")  # shipped within store.ship_interval_s
            n = 0
            while not os.path.exists(job["stop_file"]):  # traffic through the replicas, during the promotion
                before = learner_active()
                error = served = None
                try:
                    served = agent.invoke(job["traffic"][n % len(job["traffic"])]).adapter
                except Exception as exc:
                    error = type(exc).__name__ + ": " + str(exc)[:200]
                after = learner_active()
                records.append({"served": served, "before": before, "after": after, "error": error,
                                "stale": error is None and served not in (before, after)})
                n += 1
        finally:
            agent.close()  # flushes the spool and ships it one last time
        open(out_path, "w").write(json.dumps({"requests": answered + len(records), "taught": len(job["teach"]),
                                              "records": records}))

    if __name__ == "__main__":
        main()
""")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL facts: question, demonstration")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--facts-per-app", type=int, default=1, help="corrections each app teaches")
    parser.add_argument("--questions-per-app", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="client threads through the learner")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--method", default=None, help="learning method (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="engine.num_threads of each process")
    parser.add_argument("--after-s", type=float, default=15.0,
                        help="seconds of traffic after the killed replica caught up")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--learn-timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args(argv)

    rows = [r for _n, r in read_jsonl(args.data) if r.get("demonstration") and r.get("question")]
    needed = 2 * args.facts_per_app + 2 * args.questions_per_app + 4
    if len(rows) < needed:
        raise SystemExit(f"{args.data}: {len(rows)} rows with question and demonstration; need {needed}")
    model_dir = resolve_model(args.model)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        result = _run(Path(tmp), rows, str(model_dir), args)
    result["wall_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


class _Process:
    """A ``runtime serve`` child with its config, log and URL."""

    def __init__(self, name: str, tmp: Path, config: dict[str, Any], role: str, token: str) -> None:
        self.name, self.tmp, self.role, self.token = name, tmp, role, token
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_server(self.config_path, self.port, self.log, admin_token=self.token,
                                 extra_args=["--role", self.role])

    def ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        wait_ready(self.url, self.proc, self.log, timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_server(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _run(tmp: Path, rows: list[dict[str, Any]], model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    shared = tmp / "shared-logs"
    shared.mkdir()
    engine = {"max_new_tokens": args.max_tokens, "num_threads": args.threads}

    def writer_config(name: str) -> dict[str, Any]:
        return {"data_dir": str(tmp / name), "model": {"name": model_dir}, "engine": dict(engine),
                "store": {"ship_to": str(shared), "writer_id": name, "ship_interval_s": 1.0}}

    replicas = [_Process(f"replica-{i}", tmp, writer_config(f"replica-{i}"), "replica", REPLICA_TOKEN)
                for i in (1, 2)]
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "name": "fleet", "promotion": {"mode": "manual"},
                                      "targets": {"metric": "contains", "min_pass_rate": 0.5}}))
    learner_config: dict[str, Any] = {
        "data_dir": str(tmp / "learner"), "model": {"name": model_dir}, "policy": str(policy),
        "engine": {**engine, "replicas": [{"kind": "runtime", "base_url": r.url, "api_key": REPLICA_TOKEN}
                                          for r in replicas], "replica_probe_interval_s": 0.5},
        "store": {"import_from": str(shared), "ship_interval_s": 1.0},
    }
    if args.method:
        learner_config["learning"] = {"method": args.method}
    learner = _Process("learner", tmp, learner_config, "learner", ADMIN)
    processes = [*replicas, learner]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    traffic = _Traffic(learner.url, [r["question"] for r in rows[-4:]], args.max_tokens)
    try:
        for process in replicas:
            process.start()
        for process in replicas:
            process.ready(args.ready_timeout)
        learner.start()
        learner.ready(args.ready_timeout)
        print("replicas and learner ready", flush=True)

        apps = _start_apps(tmp, rows, model_dir, shared, engine, replicas, learner.url, args)
        _wait_taught(apps, args.ready_timeout)
        taught = [fact["question"] for app in apps for fact in app["job"]["teach"]]
        print(f"apps taught {len(taught)} corrections and send traffic through the replicas", flush=True)

        with httpx.Client(base_url=learner.url, timeout=600, headers=auth) as http:
            _wait_signals(http, len(taught), timeout_s=120)
            traffic.start(args.clients)
            cycle = _learn(http, args)
            candidate = ((cycle.get("result") or {}).get("adapter") or {}).get("name")
            promotion_s = catch_up_s = None
            if candidate and (cycle.get("result") or {}).get("status") in ("approved", "awaiting_promotion"):
                promotion_s, catch_up_s = _promote_with_a_replica_killed(http, candidate, replicas[1], args)
            time.sleep(args.after_s)  # traffic on the new adapter, the caught-up replica included
            traffic.stop()
            _stop_apps(apps, tmp)
            learned = _learned(http)
        print(f"cycle: {(cycle.get('result') or {}).get('status')}; promoted {candidate}", flush=True)
    finally:
        traffic.stop()
        (tmp / "apps.stop").touch()
        for process in processes:
            process.stop()
    losses = _compare_spools(tmp, shared, [p.name for p in replicas] + [a["name"] for a in apps])
    app_records = [r for a in apps for r in a["records"]]
    records = traffic.records + app_records
    return {
        "benchmark": "fleet",
        "requests_total": len(traffic.records) + sum(a["requests"] for a in apps),
        "requests_by_apps": sum(a["requests"] for a in apps),
        "requests_failed": sum(1 for r in records if r["error"]),
        "stale_adapter_responses": sum(1 for r in records if r["stale"]),
        "stale_app_responses": sum(1 for r in app_records if r["stale"]),
        "app_requests_by_adapter": _by_adapter(app_records),
        "acked_rows_lost": losses["lost"],
        "rows_imported_twice": losses["twice"],
        "rows_per_writer": losses["per_writer"],
        "signals_sent": len(taught),
        "signals_learned": learned,
        "promotion_seconds": promotion_s,
        "replica_catch_up_seconds": catch_up_s,
        "candidate": candidate,
        "cycle": {k: (cycle.get("result") or {}).get(k) for k in ("status", "message")},
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "goals": {"stale_adapter_responses": 0, "acked_rows_lost": 0, "rows_imported_twice": 0,
                  "signals_learned": "= signals_sent"},
        "config": {"model": str(args.model), "data": str(args.data), "clients": args.clients,
                   "max_tokens": args.max_tokens, "facts_per_app": args.facts_per_app,
                   "method": args.method or "config default", "threads_per_process": args.threads,
                   "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"},
    }


def _start_apps(tmp: Path, rows: list[dict[str, Any]], model_dir: str, shared: Path, engine: dict[str, Any],
                replicas: list[_Process], learner_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start both app processes: each follows the learner through the replicas, answers questions, teaches
    corrections, then sends traffic until ``apps.stop`` exists."""
    script = tmp / "app.py"
    script.write_text(APP_SCRIPT)
    k, q = args.facts_per_app, args.questions_per_app
    follow = {**engine, "follow_replicas": True, "replica_probe_interval_s": 0.5,
              "replicas": [{"kind": "runtime", "base_url": r.url, "api_key": REPLICA_TOKEN} for r in replicas]}
    apps = []
    for i in (1, 2):
        name = f"app-{i}"
        config = tmp / f"{name}.yaml"
        store = {"ship_to": str(shared), "writer_id": name, "ship_interval_s": 1.0}
        config.write_text(yaml.safe_dump({"data_dir": str(tmp / name), "model": {"name": model_dir},
                                          "engine": follow, "store": store}))
        job = {"teach": rows[(i - 1) * k: i * k],
               "questions": [r["question"] for r in rows[2 * k + (i - 1) * q: 2 * k + i * q]],
               "traffic": [r["question"] for r in rows[-4:]],
               "learner_url": learner_url, "admin_token": ADMIN,
               "taught_file": str(tmp / f"{name}.taught"), "stop_file": str(tmp / "apps.stop")}
        (tmp / f"{name}.job.json").write_text(json.dumps(job))
        out = tmp / f"{name}.out.json"
        log = (tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen([sys.executable, str(script), str(config), str(tmp / f"{name}.job.json"), str(out)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"})
        apps.append({"name": name, "proc": proc, "out": out, "job": job, "log": tmp / f"{name}.log"})
    return apps


def _wait_taught(apps: list[dict[str, Any]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for app in apps:
        while not Path(app["job"]["taught_file"]).exists():
            if app["proc"].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{app['name']} failed:\n{app['log'].read_text()[-3000:]}")
            time.sleep(0.2)


def _stop_apps(apps: list[dict[str, Any]], tmp: Path) -> None:
    (tmp / "apps.stop").touch()
    for app in apps:
        if app["proc"].wait() != 0:
            raise SystemExit(f"{app['name']} failed:\n{app['log'].read_text()[-3000:]}")
        app.update(json.loads(app["out"].read_text()))


def _by_adapter(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        key = "error" if r["error"] else str(r["served"] or "base")
        counts[key] = counts.get(key, 0) + 1
    return counts


class _Traffic:
    """Client threads sending chat requests through the learner; each record says which adapter served it and
    which was active when it started and when it ended."""

    def __init__(self, url: str, prompts: list[str], max_tokens: int) -> None:
        self.url, self.prompts, self.max_tokens = url, prompts, max_tokens
        self.records: list[dict[str, Any]] = []
        self.base_label: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, clients: int) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as http:  # what the base model's answers are labelled
            response = http.post("/v1/chat/completions", json={
                "model": "base", "messages": [{"role": "user", "content": self.prompts[0]}], "max_tokens": 1})
            response.raise_for_status()
            self.base_label = response.json()["model"]
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _client(self, index: int) -> None:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=self.url, timeout=600) as http:
            n = 0
            while not self._stop.is_set():
                before = _active(http, headers)
                error = served = None
                try:
                    response = http.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": self.prompts[(index + n) % len(self.prompts)]}],
                        "max_tokens": self.max_tokens})
                    if response.status_code == 200:
                        label = response.json()["model"]  # the adapter's name, or the base model's id
                        served = None if label == self.base_label else label
                    else:
                        error = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                after = _active(http, headers)
                stale = error is None and served not in {before, after}
                with self._lock:
                    self.records.append({"served": served, "before": before, "after": after, "error": error,
                                         "stale": stale})
                n += 1


def _active(http: httpx.Client, headers: dict[str, str]) -> str | None:
    """The learner's active adapter (``None``: the base model). Retried: a kept-alive connection the server
    closed just as it was reused is reset, which says nothing about the fleet."""
    for attempt in range(3):
        try:
            response = http.get("/admin/adapters", headers=headers)
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
    response.raise_for_status()
    return response.json()["active"]


def _wait_signals(http: httpx.Client, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = http.get("/admin/signals", params={"state": "pending"}).json()["signals"]
        if len(pending) >= expected:
            return
        time.sleep(1.0)
    print(f"warning: the learner did not see {expected} pending signals within {timeout_s:.0f}s", flush=True)


def _learn(http: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    started = http.post("/admin/learn", json={"method": args.method} if args.method else None)
    if started.status_code != 202:
        raise SystemExit(f"could not start learning: HTTP {started.status_code} {started.text}")
    job_id = started.json()["id"]
    deadline = time.monotonic() + args.learn_timeout
    while time.monotonic() < deadline:
        job = http.get(f"/admin/learn/{job_id}").json()
        if job.get("status") not in ("queued", "running"):
            return dict(job)
        time.sleep(2.0)
    raise SystemExit(f"the learning cycle did not end within {args.learn_timeout:.0f}s")


def _promote_with_a_replica_killed(http: httpx.Client, candidate: str, victim: _Process,
                                   args: argparse.Namespace) -> tuple[float, float | None]:
    """Promote ``candidate`` while ``victim`` is killed with SIGKILL; restart it and time its catch-up."""
    killer = threading.Thread(target=victim.kill)
    t0 = time.monotonic()
    killer.start()
    response = http.post(f"/admin/adapters/{candidate}/promote")
    promotion_s = time.monotonic() - t0
    killer.join()
    if response.status_code != 200:
        raise SystemExit(f"promotion failed: HTTP {response.status_code} {response.text}")
    print(f"promoted {candidate} in {promotion_s:.2f}s with {victim.name} killed; restarting it", flush=True)
    victim.start()
    restarted = time.monotonic()
    try:
        victim.ready(args.ready_timeout)
    except ServerStartError as exc:
        print(f"warning: {victim.name} did not restart: {exc}", flush=True)
        return promotion_s, None
    headers = {"Authorization": f"Bearer {REPLICA_TOKEN}"}
    with httpx.Client(base_url=victim.url, timeout=60, headers=headers) as replica:
        while time.monotonic() - restarted < args.ready_timeout:
            state = replica.get("/admin/replica").json()
            if state.get("active") == candidate:
                return promotion_s, time.monotonic() - restarted
            time.sleep(0.25)
    return promotion_s, None


def _learned(http: httpx.Client) -> int:
    """Signals the learner's cycle consumed (the learner has no signals of its own: all came from the apps)."""
    return len(http.get("/admin/signals", params={"state": "learned", "limit": 10_000}).json()["signals"])


def _compare_spools(tmp: Path, shared: Path, writers: list[str]) -> dict[str, Any]:
    """Every writer's committed rows against the learner's store, after importing every segment twice."""
    learner_path = tmp / "learner" / "runtime.duckdb"
    with Store(learner_path) as learner:
        import_segments(learner, str(shared))  # whatever was shipped at the processes' shutdown
    before = _counts(learner_path)
    with Store(learner_path) as learner:
        import_segments(learner, str(shared))  # again: nothing may change
    after = _counts(learner_path)
    twice = sum(after[t] - before[t] for t in LOG_TABLES)
    per_writer: dict[str, dict[str, int]] = {}
    with duckdb.connect(str(learner_path), read_only=True) as db:
        twice += sum(int(db.execute(f"SELECT count(*) - count(DISTINCT id) FROM {t}").fetchone()[0])
                     for t in LOG_TABLES)
        for writer in writers:
            rows = missing = 0
            with duckdb.connect(str(tmp / writer / "runtime.duckdb"), read_only=True) as spool:
                for table in LOG_TABLES:
                    ids = [r[0] for r in spool.execute(f"SELECT id FROM {table}").fetchall()]
                    rows += len(ids)
                    if ids:
                        have = db.execute(f"SELECT count(*) FROM {table} WHERE list_contains(?, id)", [ids])
                        missing += len(ids) - int(have.fetchone()[0])
            per_writer[writer] = {"rows": rows, "missing": missing}
    return {"lost": sum(w["missing"] for w in per_writer.values()), "twice": twice, "per_writer": per_writer}


def _counts(path: Path) -> dict[str, int]:
    with duckdb.connect(str(path), read_only=True) as db:
        return {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in LOG_TABLES}


def _markdown(r: dict[str, Any]) -> str:
    return (
        "| requests (by apps) | failed | stale answers (apps') | acked rows lost | rows imported twice | "
        "signals learned / sent | promotion s | replica catch-up s |\n|---|---|---|---|---|---|---|---|\n"
        f"| {r['requests_total']} ({r['requests_by_apps']}) | {r['requests_failed']} | "
        f"{r['stale_adapter_responses']} ({r['stale_app_responses']}) | {r['acked_rows_lost']} | "
        f"{r['rows_imported_twice']} | {r['signals_learned']} / {r['signals_sent']} | "
        f"{_fmt(r['promotion_seconds'])} | {_fmt(r['replica_catch_up_seconds'])} |\n\n"
        f"Apps' requests by the adapter that served them: {r['app_requests_by_adapter']}.\n\n"
        f"Goals: stale 0, lost 0, twice 0, every signal learned. Cycle: {r['cycle']}. "
        f"Machine: {r['config']['machine']}; wall {r.get('wall_s')} s.\n"
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
