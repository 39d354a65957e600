"""The dashboard page rendered by headless Chromium against a running server with real store content.

Needs the Debian `chromium` package (/usr/bin/chromium; `.ci/run` installs it). Set
RUNTIME_DASHBOARD_SCREENSHOT=PATH to also save the screenshot there (docs/dashboard.png was made so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestration.service import RuntimeService
from runtime.store import Store
from server import create_app
from server.learn_jobs import LearnJob
from tests.test_server import serve_in_thread, tiny_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "dash-token"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium)"
)


def populate(store: Store, adapter_dir: Path) -> dict[str, str]:
    """A store with what an operator looks at: interactions, a shadow pair, adapters, decisions and runs."""
    q = [{"role": "user", "content": "What is the refund window?"}]
    live = store.log_interaction(q, "The refund window is 30 days.", thread_id="user-42", adapter="sft-2",
                                 latency_ms=212.0, prompt_tokens=31, completion_tokens=9)
    store.log_interaction(q, "The refund window is 45 days.", kind="shadow", shadow_of=live, adapter="sdft-3",
                          latency_ms=230.0, prompt_tokens=31, completion_tokens=9)
    store.log_interaction([{"role": "user", "content": "Capital of France?"}], "Paris.", thread_id="user-7",
                          adapter="sft-2", latency_ms=95.0, prompt_tokens=24, completion_tokens=3)
    correction = store.add_signal("correction", interaction_id=live, text="The refund window is 45 days.")
    held = store.add_signal("demonstration", text="The moon is cheese.",
                            messages=[{"role": "user", "content": "What is the moon made of?"}])
    review = store.add_signal("demonstration", text="Two years.", principal="partner-app", state="review",
                              state_reason="signals of principal 'partner-app' need review",
                              messages=[{"role": "user", "content": "How long is the warranty?"}])

    ok_run = store.create_run("sft", parent_adapter=None, data_counts={"new": 4, "replay": 0})
    store.update_run(ok_run, status="running")
    store.update_run(ok_run, status="succeeded", output_adapter="sft-1",
                     metrics={"history": [{"step": s, "loss": 2.0 / s} for s in range(1, 11)]})
    store.upsert_adapter("sft-1", adapter_dir, method="sft", run_id=ok_run, status="retired",
                         metrics={"data_counts": {"new": 4, "replay": 0}})
    store.upsert_adapter("sft-2", adapter_dir, parent="sft-1", method="sft", status="active",
                         metrics={"data_counts": {"new": 3, "replay": 2}})
    store.upsert_adapter("sdft-3", adapter_dir, parent="sft-2", method="sdft", status="shadow",
                         metrics={"data_counts": {"new": 1, "replay": 1}})
    store.upsert_adapter("sft-4", adapter_dir, parent="sft-2", method="sft", status="rejected")
    failed = store.create_run("sdft", parent_adapter="sft-2", data_counts={"new": 2})
    store.update_run(failed, status="failed", error="training worker exited with code -9 (out of memory)")
    store.record_decision("sft-2", "approve", reasons=["all 5 protected behaviours pass"], run_id=ok_run)
    store.record_decision("sft-4", "veto", reasons=["protected behaviour 'capital-france' failed: expected "
                                                    "'Paris' in the answer"], run_id=failed,
                          checks=[{"kind": "protected", "name": "capital-france", "passed": False, "veto": True,
                                   "detail": "passes on the active adapter but the candidate's answer lacks 'Paris'",
                                   "active": {"answer": "Paris is the capital.", "passed": True},
                                   "candidate": {"answer": "Lyon is the capital.", "passed": False}}])
    store.set_learning_state("held", signal_ids=[held], reason="its update was vetoed", run_id=failed)
    store.mark_consumed(ok_run, signal_ids=[correction])
    return {"live": live, "failed_run": failed, "held": held, "review": review}


@pytest.fixture
def dashboard_server(tiny_engine, tiny_model_dir: Path, tiny_adapter_dir: Path,
                     tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    config = tiny_config(tmp_path, tiny_model_dir)
    tiny_engine.load_adapter("sft-2", tiny_adapter_dir, activate=True)  # the registry's active adapter serves
    try:
        with Store(config.store_path) as store:
            ids = populate(store, tiny_adapter_dir)
            service = RuntimeService(config, tiny_engine, store)
            app = create_app(config, engine=tiny_engine, store=store, service=service, admin_token=TOKEN)
            job = LearnJob(id="job-1", method="sft", status="finished", result={"status": "vetoed", "message": "m"},
                           progress={"phase": "gate", "phase_done": 3, "phase_total": 5, "step": 20, "total": 20})
            app.state.runtime.learn_jobs._jobs[job.id] = job  # a cycle this server ran, as the page shows it
            with serve_in_thread(app) as url:
                # One real chat completion, so the page shows an interaction logged by the server itself.
                served = httpx.post(url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hello from the dashboard test"}], "max_tokens": 6})
                assert served.status_code == 200
                ids["served"] = served.json()["interaction_id"]
                yield url, ids
    finally:
        tiny_engine.unload_adapter("sft-2")


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def test_dashboard_renders_store_content(dashboard_server: tuple[str, dict[str, str]], browser: object,
                                         tiny_model_dir: Path, tmp_path: Path) -> None:
    url, ids = dashboard_server
    page = browser.new_page(viewport={"width": 1400, "height": 1100})  # type: ignore[attr-defined]
    external: list[str] = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith(url) else None)
    page.goto(url + "/dashboard")
    page.wait_for_selector("body[data-loaded='true']")

    assert page.inner_text("#active") == "sft-2"  # what the engine serves
    assert page.inner_text("#model") == str(tiny_model_dir)
    counts = page.inner_text("#counts")
    assert "4 interactions" in counts and "3 signals" in counts and "4 adapters" in counts

    active_row = page.locator("tr[data-adapter='sft-2']")
    assert "active" in active_row.inner_text()
    shadow_row = page.locator("tr[data-adapter='sdft-3']").inner_text()
    assert "shadow" in shadow_row and "base" in shadow_row and "sft-1" in shadow_row and "sft-2" in shadow_row
    assert "3 new + 2 replay" in active_row.inner_text()
    assert "rejected" in page.locator("tr[data-adapter='sft-4']").inner_text()

    decisions = page.inner_text("#decisions")
    assert "veto" in decisions and "protected behaviour 'capital-france' failed" in decisions
    assert "all 5 protected behaviours pass" in decisions

    shadow = page.inner_text("#shadow")
    assert "The refund window is 45 days." in shadow and "The refund window is 30 days." in shadow
    assert "0 of 1 recent answers identical" in shadow and "differs" in shadow

    runs = page.inner_text("#runs")
    assert "out of memory" in runs and "failed" in runs and "succeeded" in runs
    assert page.locator(f"tr[data-run='{ids['failed_run']}']").count() == 1

    assert "gate 3/5" in page.inner_text("tr[data-job='job-1']")  # the phase the cycle reached

    # Over time: loss per run, veto rate, latency and signals learned per day; the lineage as a graph.
    assert page.locator("svg[data-chart='loss'] polyline").count() == 1
    assert page.locator("svg[data-chart='veto'] [data-bar]").count() >= 1
    assert page.locator("svg[data-chart='latency'] polyline").count() == 1
    assert page.locator("svg[data-chart='learned'] [data-bar]").count() >= 1
    assert page.locator("#lineage-graph [data-node]").count() == 5  # base and four adapters
    assert page.locator("#lineage-graph [data-edge='sft-2->sdft-3']").count() == 1
    assert page.locator("#lineage-graph [data-edge='base->sft-1']").count() == 1
    # Each gate check's answers before and after, side by side; the signals each run used.
    veto_row = page.locator("tr[data-decision='veto']")
    veto_row.locator("summary").click()
    check = veto_row.locator("tr[data-check='capital-france']").inner_text()
    assert "Paris is the capital." in check and "Lyon is the capital." in check
    failed_run = page.locator(f"tr[data-run='{ids['failed_run']}']")
    failed_run.locator("summary").click()
    assert "What is the moon made of?" in failed_run.inner_text()

    interactions = page.inner_text("#interactions")
    assert "What is the refund window?" in interactions and "Capital of France?" in interactions
    assert "Hello from the dashboard test" in interactions
    assert page.locator(f"tr[data-interaction='{ids['served']}']").count() == 1
    assert page.locator(f"tr[data-interaction='{ids['live']}']").count() == 1

    assert not external, f"the page fetched outside the server: {external}"
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    record = os.environ.get("RUNTIME_DASHBOARD_SCREENSHOT")
    if record:
        page.screenshot(path=record, full_page=True)


def test_dashboard_with_token_asks_for_it(tiny_engine, tiny_model_dir: Path, tmp_path: Path,
                                          browser: object) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        store.log_interaction([{"role": "user", "content": "secret question"}], "secret answer")
        service = RuntimeService(config, tiny_engine, store)
        app = create_app(config, engine=tiny_engine, store=store, service=service, admin_token=TOKEN,
                         dashboard_requires_token=True)
        with serve_in_thread(app) as url:
            assert httpx.get(url + "/dashboard/api/summary").status_code == 401
            page = browser.new_page()  # type: ignore[attr-defined]
            page.goto(url + "/dashboard")
            page.wait_for_selector("#auth-form", state="visible")
            assert "secret question" not in page.inner_text("body")
            page.fill("#token", TOKEN)
            page.click("#auth-form button")
            page.wait_for_selector("body[data-loaded='true']")
            assert "secret question" in page.inner_text("#interactions")
            assert not page.is_visible("#auth")


def test_dashboard_acts_through_the_admin_api(dashboard_server: tuple[str, dict[str, str]], browser: object) -> None:
    """Approve a signal awaiting review, dismiss a held one (with the reason asked for), and see the server's
    refusal when a promotion cannot be done; force-promotion is offered only for the vetoed adapter."""
    url, ids = dashboard_server
    page = browser.new_page()  # type: ignore[attr-defined]
    page.on("dialog", lambda dialog: dialog.accept("not a fact"))
    page.goto(url + "/dashboard")
    page.evaluate(f"sessionStorage.setItem('runtime-admin-token', '{TOKEN}')")
    page.wait_for_selector("body[data-loaded='true']")
    admin = {"Authorization": f"Bearer {TOKEN}"}

    page.locator(f"#review tr[data-signal='{ids['review']}'] button[data-action='approve']").click()
    page.wait_for_selector(f"#review tr[data-signal='{ids['review']}']", state="detached")
    pending = httpx.get(url + "/admin/signals", params={"state": "pending"}, headers=admin).json()["signals"]
    assert ids["review"] in [s["id"] for s in pending]

    page.locator(f"#held tr[data-signal='{ids['held']}'] button[data-action='dismiss']").click()
    page.wait_for_selector(f"#held tr[data-signal='{ids['held']}']", state="detached")
    dismissed = httpx.get(url + "/admin/signals", params={"state": "dismissed"}, headers=admin).json()["signals"]
    assert [(s["id"], s["state_reason"]) for s in dismissed] == [(ids["held"], "not a fact")]

    assert page.locator("tr[data-adapter='sft-4'] button[data-action='force promote']").count() == 1
    assert page.locator("tr[data-adapter='sft-2'] button").count() == 0  # the active one
    page.locator("tr[data-adapter='sft-1'] button[data-action='promote']").click()
    page.wait_for_selector("#error:not(:empty)")
    assert "sft-1" in page.inner_text("#error")  # the server's reason, shown (its files have no checksum here)
