"""`runtime serve` end to end: it answers the openai client, learns from corrections posted to it, and shows it
all on the dashboard.

    python examples/serve_and_learn.py                                  # the default model, on the CPU
    python examples/serve_and_learn.py --screenshot docs/dashboard.png  # what made the docs' screenshot

Nothing here calls the runtime in-process: the script starts the real server (``python -m server serve``)
on a free loopback port and talks to it over HTTP only, as an app would:

1. writes a runtime.yaml into a fresh ``--data-dir`` (the default model, ``engine.max_new_tokens`` 40, learning
   method rewrite (the default) with its default settings), starts the server with an admin token and waits for
   ``/healthz``;
2. asks questions about fictional facts (``cli.demo.DEMO_FACTS``) and their paraphrases with the official
   ``openai`` client, prints the (wrong) answers and their interaction ids, posts a correction for each
   question (``POST /v1/interactions/{id}/correction``), and streams one reading-comprehension answer;
3. starts a learning cycle (``POST /admin/learn``), polls the job and prints its progress, then prints the
   gate's decision (``GET /admin/decisions``);
4. asks the same questions and paraphrases again and counts how many answers now hold the fact;
5. if ``/usr/bin/chromium`` exists, renders ``/dashboard`` in headless Chromium (Playwright) and saves a
   screenshot;
6. stops the server with SIGINT (a graceful shutdown that flushes the log) and prints a summary; the exit
   status is 1 if any step failed.

**No policy** is configured, on purpose: without one the gate approves every verified candidate (and still
records its decision with the reason, which step 3 prints) and promotes it at once, so step 4 asks the adapter
that learned the corrections. A real policy (``examples/policies/support_bot.yaml``) adds protected-behaviour
and retention checks that take minutes more on a CPU and promotes through shadow mode, where the questions
asked again would still be answered by the old model; ``examples/embed_in_app.py`` and
``examples/shadow_mode.py`` show that path. Without a policy the server's background learning loop keeps its
defaults (a check every 10 minutes, 4 new signals needed), so it does not start a cycle of its own here.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `examples/policies/` must not shadow the package

from cli.demo import DEMO_FACTS, PASSAGE, PASSAGE_ANSWER, PASSAGE_QUESTION, DemoFact  # noqa: E402
from runtime.models import DEFAULT_MODEL  # noqa: E402
from runtime.textmatch import contains_answer  # noqa: E402
from server.process import (  # noqa: E402
    ServerStartError,
    free_port,
    log_tail,
    start_server,
    stop_server,
    wait_ready,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DEFAULT_DATA_DIR = Path(".runtime-examples") / "serve_and_learn"

T = TypeVar("T")


class StepFailed(RuntimeError):
    """A step of the example did not do what it should; the message says what happened."""


@dataclass
class Step:
    """One step's outcome, for the summary."""

    name: str
    status: str = "running"
    """``ok``, ``failed`` or ``skipped``."""
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Asked:
    """One question put to the server and how it was answered."""

    question: str
    expected: str
    answer: str
    interaction_id: str | None
    adapter: str | None

    @property
    def right(self) -> bool:
        return contains_answer(self.answer, self.expected)


@dataclass
class Report:
    """What one run of the example did (``main`` prints it; the test inspects it)."""

    steps: list[Step] = field(default_factory=list)
    url: str | None = None
    model: str | None = None
    before: list[Asked] = field(default_factory=list)
    after: list[Asked] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)
    """Ids of the correction signals the server created."""
    streamed: Asked | None = None
    streamed_chunks: int = 0
    job: dict[str, Any] = field(default_factory=dict)
    """The final ``GET /admin/learn/{id}`` of the cycle."""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """``GET /admin/decisions`` about the cycle's adapter."""
    retention_after: Asked | None = None
    screenshot: Path | None = None
    dashboard: dict[str, str] = field(default_factory=dict)
    server_exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.status == "ok" for s in self.steps)

    @property
    def cycle_seconds(self) -> float | None:
        if self.job.get("ended_at") and self.job.get("started_at"):
            return float(self.job["ended_at"] - self.job["started_at"])
        return None

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)


class Runner:
    """Runs the steps in order; a failed step is recorded, and a failed *required* step skips the rest."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.aborted: str | None = None

    def run(self, name: str, title: str, fn: Callable[[], T], *, required: bool = True) -> T | None:
        step = Step(name)
        self.report.steps.append(step)
        if self.aborted is not None:
            step.status, step.detail = "skipped", f"step '{self.aborted}' failed"
            return None
        print(f"\n== {title}", flush=True)
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the summary
            step.status = "failed"
            step.detail = str(exc) if isinstance(exc, StepFailed | ServerStartError) else f"{type(exc).__name__}: {exc}"
            print(f"   FAILED: {step.detail}", flush=True)
            if required:
                self.aborted = name
            return None
        finally:
            step.seconds = time.perf_counter() - started
        step.status = "ok"
        return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local model directory")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="fresh directory for the config, log, store and adapters (removed at start)")
    parser.add_argument("--method", default="rewrite", help="learning method: rewrite (default), sdft, sft or auto")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="engine.max_new_tokens of the server")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine.num_threads of the server (default: torch's; 1 helps on a busy 2-core machine)")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="where to save the dashboard screenshot (default: DATA_DIR/dashboard.png)")
    parser.add_argument("--no-screenshot", action="store_true", help="skip the dashboard step")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /healthz")
    parser.add_argument("--learn-timeout", type=float, default=3600.0, help="seconds to wait for the cycle")
    return parser.parse_args(argv)


def write_config(data_dir: Path, model: str, max_new_tokens: int, method: str, threads: int | None = None) -> Path:
    """A runtime.yaml in `data_dir`: the model, short answers, the learning method with its defaults, no policy."""
    engine: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if threads:
        engine["num_threads"] = threads
    config = {
        "data_dir": str(data_dir.resolve()),
        "model": {"name": model},
        "engine": engine,
        "learning": {"method": method},
    }
    path = data_dir / "runtime.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def fresh_data_dir(data_dir: Path) -> None:
    """Empty `data_dir` for this run. A non-empty directory without a runtime.yaml is not one this script made,
    and is refused rather than deleted."""
    if data_dir.exists():
        if not data_dir.is_dir():
            raise SystemExit(f"--data-dir {data_dir} is a file; give a directory")
        if any(data_dir.iterdir()) and not (data_dir / "runtime.yaml").exists():
            raise SystemExit(f"--data-dir {data_dir} is not empty and holds no runtime.yaml: not removing it; "
                             "give a new or empty directory")
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)


def run_example(args: argparse.Namespace) -> Report:
    """Run steps 1 to 6 against a fresh server; never raises for a failed step (see `Report.steps`)."""
    report = Report()
    runner = Runner(report)
    data_dir: Path = args.data_dir
    fresh_data_dir(data_dir)
    token = secrets.token_hex(16)
    log_path = data_dir / "server.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        config_path = write_config(data_dir, str(args.model), args.max_new_tokens, args.method, args.threads)
        print(f"   {config_path}:\n" + "".join(f"     {line}\n" for line in config_path.read_text().splitlines()))
        port = free_port()
        report.url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        procs.append(start_server(config_path, port, log_path, admin_token=token, background_learning=True))
        health = wait_ready(report.url, procs[0], log_path, args.ready_timeout)
        report.model = health.get("model")
        engine = health.get("engine") or {}
        print(f"   serving {report.model} on {engine.get('device')} at {report.url} "
              f"(ready in {time.perf_counter() - started:.1f}s; log: {log_path})")

    try:
        runner.run("start", "1. Start `runtime serve` (default model, no policy) and wait for /healthz", start)
        client = _openai_client(report.url) if report.url else None
        with httpx.Client(base_url=report.url or "http://127.0.0.1", timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            runner.run("ask", "2. Ask about facts the model cannot know (openai client)",
                       lambda: report.before.extend(_ask_all(client, "before")))
            runner.run("correct", "   Post a correction for each question",
                       lambda: report.corrections.extend(_correct(http, report.before)))
            runner.run("stream", "   One streamed request (reading comprehension, passage in context)",
                       lambda: _stream(client, report), required=False)
            runner.run("learn", f"3. Learn now: POST /admin/learn {{'method': '{args.method}'}}",
                       lambda: report.job.update(_learn(http, args.method, args.learn_timeout)))
            runner.run("decision", "   The gate's decision: GET /admin/decisions",
                       lambda: report.decisions.extend(_decisions(http, report.job)))
            runner.run("ask_again", "4. The same questions and their paraphrases again",
                       lambda: _ask_again(client, report))
            if args.no_screenshot:
                print("\n== 5. Dashboard: skipped (--no-screenshot)")
            elif not CHROMIUM.exists():
                print(f"\n== 5. Dashboard: skipped ({CHROMIUM} is not installed)")
            else:
                shot = args.screenshot or data_dir / "dashboard.png"
                runner.run("dashboard", f"5. The dashboard in headless Chromium -> {shot}",
                           lambda: _screenshot(report, shot), required=False)
    finally:
        if procs:
            # Stopping runs even after a failed step (the runner skips nothing here).
            runner.aborted = None

            def stop() -> None:
                report.server_exit_code = stop_server(procs[0])
                if report.server_exit_code != 0:
                    raise StepFailed(f"runtime serve exited with {report.server_exit_code}:\n{log_tail(log_path)}")
                print("   runtime serve exited with 0 (SIGINT: graceful shutdown, log flushed)")

            runner.run("stop", "6. Stop the server (SIGINT, wait)", stop)
    return report


def _openai_client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="not-checked", timeout=600, max_retries=0)


def _ask(client: Any, question: str, expected: str, label: str, shown: str | None = None,
         thread: str = "serve-and-learn") -> Asked:
    """Ask `question` (printed as `shown`, if given) in conversation `thread` (the X-Thread-Id header the
    server logs) and print the answer, right or wrong, and its id."""
    if client is None:
        raise StepFailed("no server")
    answer = client.chat.completions.create(model="default", messages=[{"role": "user", "content": question}],
                                            extra_headers={"X-Thread-Id": thread})
    extra = answer.model_extra or {}
    asked = Asked(question, expected, answer.choices[0].message.content or "", extra.get("interaction_id"),
                  extra.get("adapter"))
    if not asked.interaction_id:
        raise StepFailed(f"the response to {question!r} carries no interaction_id")
    mark = "right" if asked.right else "wrong"
    print(f"   [{label}] Q: {shown or question}\n"
          f"     A: {' '.join(asked.answer.split())}\n"
          f"     {mark} (expected {expected!r}); interaction {asked.interaction_id}; "
          f"served by {asked.adapter or 'the base model'}", flush=True)
    return asked


def _ask_all(client: Any, label: str) -> list[Asked]:
    asked = [_ask(client, f.question, f.answer, f"{label}, question", thread=f"fact-{i}-{label}")
             for i, f in enumerate(DEMO_FACTS)]
    asked += [_ask(client, f.paraphrase, f.answer, f"{label}, paraphrase", thread=f"fact-{i}-{label}")
              for i, f in enumerate(DEMO_FACTS)]
    return asked


def _fact(question: str) -> DemoFact:
    return next(f for f in DEMO_FACTS if question in (f.question, f.paraphrase))


def _correct(http: httpx.Client, asked: list[Asked]) -> list[str]:
    """Correct the answer to each original question (paraphrases are left for the check after learning)."""
    ids = []
    for item in asked:
        fact = _fact(item.question)
        if item.question != fact.question:
            continue
        response = http.post(f"/v1/interactions/{item.interaction_id}/correction", json={"text": fact.correction})
        if response.status_code != 201:
            raise StepFailed(f"correction of {item.interaction_id}: HTTP {response.status_code} {response.text}")
        body = response.json()
        print(f"   {item.interaction_id} <- {fact.correction!r} (signal {body['id']}, {body['kind']})")
        ids.append(str(body["id"]))
    return ids


def _passage_prompt() -> str:
    return f"Read the passage and answer the question.\n\nPassage: {PASSAGE}\n\nQuestion: {PASSAGE_QUESTION}"


def _stream(client: Any, report: Report) -> None:
    if client is None:
        raise StepFailed("no server")
    parts: list[str] = []
    interaction_id = adapter = None
    chunks = 0
    usage = None
    print(f"   Q: {PASSAGE_QUESTION} (passage in context)\n   A: ", end="", flush=True)
    stream = client.chat.completions.create(model="default", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": _passage_prompt()}],
                                            extra_headers={"X-Thread-Id": "reading-before"})
    for chunk in stream:
        chunks += 1
        extra = chunk.model_extra or {}
        interaction_id = extra.get("interaction_id") or interaction_id
        adapter = extra.get("adapter") or adapter
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    report.streamed = Asked(PASSAGE_QUESTION, PASSAGE_ANSWER, "".join(parts), interaction_id, adapter)
    report.streamed_chunks = chunks
    if not interaction_id:
        raise StepFailed("the stream's last chunk carried no interaction_id")
    tokens = f"{usage.completion_tokens} tokens" if usage is not None else "no usage chunk"
    print(f"   {chunks} chunks, {tokens}; {'right' if report.streamed.right else 'wrong'} "
          f"(expected {PASSAGE_ANSWER!r}); interaction {interaction_id}")


def _learn(http: httpx.Client, method: str, timeout_s: float) -> dict[str, Any]:
    started = http.post("/admin/learn", json={"method": method})
    if started.status_code != 202:
        raise StepFailed(f"POST /admin/learn: HTTP {started.status_code} {started.text}")
    job = started.json()
    print(f"   job {job['id']} {job['status']} (Location: {started.headers.get('location')})", flush=True)
    deadline = time.monotonic() + timeout_s
    shown: str | None = None
    while job["status"] == "running":
        if time.monotonic() > deadline:
            raise StepFailed(f"the cycle was still running after {timeout_s:.0f}s (job {job['id']})")
        time.sleep(2.0)
        job = http.get(f"/admin/learn/{job['id']}").json()
        line = _progress_line(job)
        if line != shown:
            print(f"   {line}", flush=True)
            shown = line
    result = job.get("result") or {}
    seconds = (job["ended_at"] - job["started_at"]) if job.get("ended_at") else float("nan")
    print(f"   job {job['status']} in {seconds:.1f}s: {result.get('status')} - {result.get('message') or job['error']}")
    if result:
        metrics = result.get("metrics") or {}
        shown_metrics = {k: round(metrics[k], 3) if isinstance(metrics[k], float) else metrics[k]
                         for k in ("train_seconds", "steps", "train_loss") if k in metrics}
        print(f"   run {result.get('run_id')}; data {result.get('counts')}; {json.dumps(shown_metrics)}")
    if job["status"] != "finished":
        raise StepFailed(f"the learning job ended with {job['status']}: {job.get('error')}")
    if result.get("status") != "activated":
        raise StepFailed(f"the cycle ended {result.get('status')!r}, not 'activated': {result.get('message')}")
    return dict(job)


def _progress_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    elapsed = time.time() - job["started_at"]
    if not progress:
        return f"{job['status']}: preparing (dataset, worker process) ..."
    loss = f", loss {progress['loss']:.3f}" if isinstance(progress.get("loss"), int | float) else ""
    return f"{job['status']}: step {progress.get('step')}/{progress.get('total')}{loss} ({elapsed:.0f}s)"


def _decisions(http: httpx.Client, job: dict[str, Any]) -> list[dict[str, Any]]:
    adapter = ((job.get("result") or {}).get("adapter") or {}).get("name")
    if not adapter:
        raise StepFailed("the cycle published no adapter")
    response = http.get("/admin/decisions", params={"adapter": adapter})
    response.raise_for_status()
    decisions = list(response.json()["decisions"])
    if not any(d.get("decision") in ("approve", "veto") for d in decisions):
        raise StepFailed(f"no gate decision recorded about {adapter}")
    for d in decisions:
        print(f"   {d.get('adapter')}: {d.get('decision')} - {'; '.join(d.get('reasons') or [])}")
    return decisions


def _ask_again(client: Any, report: Report) -> None:
    report.after.extend(_ask_all(client, "after"))
    report.retention_after = _ask(client, _passage_prompt(), PASSAGE_ANSWER, "after, reading comprehension",
                                  shown=f"{PASSAGE_QUESTION} (passage in context)", thread="reading-after")
    adapter = ((report.job.get("result") or {}).get("adapter") or {}).get("name")
    served = {a.adapter for a in report.after}
    if served != {adapter}:
        raise StepFailed(f"the answers after learning came from {sorted(map(str, served))}, not from {adapter}")
    right = sum(a.right for a in report.after)
    print(f"   right now: {right}/{len(report.after)} (questions and paraphrases), "
          f"before: {sum(a.right for a in report.before)}/{len(report.before)}")


def _screenshot(report: Report, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = report.url
    adapter = ((report.job.get("result") or {}).get("adapter") or {}).get("name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{url}/dashboard")
            page.wait_for_selector("body[data-loaded='true']", timeout=60_000)
            seen = {key: page.inner_text(f"#{key}") for key in ("active", "counts", "decisions", "runs")}
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    report.screenshot = path
    report.dashboard = seen
    print(f"   serving: {seen['active']}; {seen['counts']}\n   saved {path} ({path.stat().st_size} bytes)")
    if adapter and seen["active"] != adapter:
        raise StepFailed(f"the dashboard shows {seen['active']!r} serving, not {adapter!r}")
    if adapter and adapter not in seen["decisions"]:
        raise StepFailed(f"the dashboard's decisions do not mention {adapter!r}")


def summary_lines(report: Report) -> Iterator[str]:
    """The printed summary: each step, the answers right before and after, the cycle."""
    yield "== Summary"
    for s in report.steps:
        detail = f" - {s.detail.splitlines()[0]}" if s.detail else ""
        yield f"   {s.name:<10} {s.status:<7} {s.seconds:7.1f}s{detail}"
    n_q = len(DEMO_FACTS)

    def count(items: list[Asked], questions: bool) -> str:
        facts = {f.question for f in DEMO_FACTS}
        chosen = [a for a in items if (a.question in facts) == questions]
        return f"{sum(a.right for a in chosen)}/{len(chosen)}" if chosen else "-"

    yield f"   model: {report.model}"
    yield (f"   right before learning: questions {count(report.before, True)}, paraphrases "
           f"{count(report.before, False)}")
    yield (f"   right after learning:  questions {count(report.after, True)}, paraphrases "
           f"{count(report.after, False)}   ({n_q} questions corrected)")
    if report.streamed is not None or report.retention_after is not None:
        def mark(a: Asked | None) -> str:
            return "-" if a is None else ("right" if a.right else "wrong")

        yield f"   reading comprehension (passage in context): before {mark(report.streamed)}, after " \
              f"{mark(report.retention_after)}"
    result = report.job.get("result") or {}
    if report.job:
        metrics = result.get("metrics") or {}
        train = metrics.get("train_seconds")
        train_s = f", training {train:.1f}s" if isinstance(train, int | float) else ""
        cycle = report.cycle_seconds
        yield (f"   cycle: {report.job.get('method')} {result.get('status') or report.job.get('status')}"
               f"{f' in {cycle:.1f}s' if cycle is not None else ''}{train_s}; adapter "
               f"{(result.get('adapter') or {}).get('name')}")
    for d in report.decisions:
        if d.get("decision") in ("approve", "veto"):
            yield f"   gate: {d.get('decision')} - {'; '.join(d.get('reasons') or [])}"
    if report.screenshot is not None:
        yield f"   dashboard screenshot: {report.screenshot}"
    failed = [s.name for s in report.steps if s.status != "ok"]
    yield "   all steps ok" if report.ok else f"   FAILED: {', '.join(failed) or 'nothing ran'}"


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (0: every step ok)."""
    args = parse_args(argv)
    started = time.perf_counter()
    report = run_example(args)
    print()
    for line in summary_lines(report):
        print(line)
    print(f"   total {time.perf_counter() - started:.0f}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
