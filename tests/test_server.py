"""`runtime serve`'s app on a tiny model, served by uvicorn on loopback and driven by real clients.

The official `openai` client and LangChain's `ChatOpenAI` talk to it over HTTP; every answer must be the
engine's own (greedy) answer and be logged to the store with the id the response reports.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from orchestration.service import RuntimeService
from runtime.adapters import adapter_checksum
from runtime.config import RuntimeConfig
from runtime.engines import SamplingParams
from runtime.store import Store
from server import ServerLimits, create_app
from server.http_protocol import uvicorn_config

TOKEN = "test-admin-token"
MAX_TOKENS = 12


# --- a real server in a background thread ------------------------------------------------------------------


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    store: Store


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port (lifespan included); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:  # a start-up guard, not a timing assertion
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during start-up")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def tiny_config(tmp: Path, model_dir: Path) -> RuntimeConfig:
    config = RuntimeConfig(data_dir=tmp / "data")
    config.model.name = str(model_dir)
    config.engine.device = "cpu"
    config.engine.max_new_tokens = MAX_TOKENS
    return config


def register_adapter(store: Store, name: str, source: Path, root: Path, status: str = "candidate") -> Path:
    """Copy an adapter directory under `root` and record it in the registry with its real checksum."""
    path = root / name
    shutil.copytree(source, path)
    store.upsert_adapter(name, path, method="sft", status=status, checksum=adapter_checksum(path),
                         metrics={"data_counts": {"new": 2, "replay": 1}})
    return path


@pytest.fixture(scope="module")
def server(tiny_engine, tiny_model_dir: Path, tiny_adapter_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("server")
    config = tiny_config(tmp, tiny_model_dir)
    store = Store(config.store_path)
    register_adapter(store, "reg-a", tiny_adapter_dir, config.adapters_dir)
    tiny_engine.load_adapter("tiny-a", tiny_adapter_dir)
    limits = ServerLimits(max_body_bytes=64 * 1024, max_messages=8)
    app = create_app(config, engine=tiny_engine, store=store, admin_token=TOKEN, limits=limits,
                     background_learning=False)
    try:
        with serve_in_thread(app) as url:
            yield RunningServer(url, app, store)
    finally:
        for name in tiny_engine.list_adapters():
            tiny_engine.unload_adapter(name)
        tiny_engine.set_active_adapter(None)
        store.close()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy(engine: Any, messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS, adapter: Any = None) -> str:
    params = SamplingParams(max_new_tokens=max_tokens)
    return engine.chat([messages], params, adapter=adapter)[0].text


def extra(obj: Any, key: str) -> Any:
    return (obj.model_extra or {}).get(key)


# --- chat completions --------------------------------------------------------------------------------------


def test_chat_completion_is_the_engines_answer_and_is_logged(server: RunningServer, client: openai.OpenAI,
                                                             tiny_engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=messages, extra_headers={"X-Thread-Id": "thread-7"}, user="alice")
    completion = raw.parse()
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(tiny_engine, messages)
    assert choice.finish_reason in ("stop", "length")
    interaction_id = extra(completion, "interaction_id")
    assert interaction_id and raw.headers["X-Interaction-Id"] == interaction_id
    assert extra(choice, "interaction_id") == interaction_id
    assert completion.model == str(tiny_model_name(tiny_engine))

    row = server.store.get_interaction(interaction_id)
    assert row is not None
    assert row.response == choice.message.content
    assert row.messages[-1] == {"role": "user", "content": "What is the capital of France?"}
    assert row.thread_id == "thread-7"
    assert row.metadata.get("user") == "alice"
    assert row.adapter is None
    assert completion.usage.prompt_tokens == row.prompt_tokens > 0
    assert completion.usage.completion_tokens == row.completion_tokens
    assert completion.usage.total_tokens == row.prompt_tokens + row.completion_tokens


def tiny_model_name(engine: Any) -> str:
    return str(engine.model_name)


def test_max_tokens_and_stop(client: openai.OpenAI, tiny_engine) -> None:
    messages = [{"role": "user", "content": "Hello, world! How are you today?"}]
    short = client.chat.completions.create(model="default", messages=messages, max_tokens=3)
    assert short.usage.completion_tokens <= 3
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3
    # max_completion_tokens (the newer name) means the same.
    newer = client.chat.completions.create(model="default", messages=messages, max_completion_tokens=3)
    assert newer.choices[0].message.content == short.choices[0].message.content

    full = greedy(tiny_engine, messages, max_tokens=16)
    cut_at = next(i for i in range(2, len(full)) if not full[i].isspace())
    stop = full[cut_at:cut_at + 2]
    stopped = client.chat.completions.create(model="default", messages=messages, max_tokens=16, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    as_string = client.chat.completions.create(model="default", messages=messages, max_tokens=16, stop=stop)
    assert as_string.choices[0].message.content == full[: full.index(stop)]


def test_stream(server: RunningServer, client: openai.OpenAI, tiny_engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about refunds"}]
    chunks = list(client.chat.completions.create(model="default", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(tiny_engine, messages)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    interaction_id = extra(finals[0], "interaction_id")
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    row = server.store.get_interaction(interaction_id)
    assert row is not None and row.response == text
    assert usage.completion_tokens == row.completion_tokens and usage.prompt_tokens == row.prompt_tokens


def test_n_choices_each_logged(server: RunningServer, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    raw = client.chat.completions.with_raw_response.create(model="default", messages=messages, n=2,
                                                           temperature=1.0, seed=3)
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1]
    ids = [extra(c, "interaction_id") for c in completion.choices]
    assert len(set(ids)) == 2 and raw.headers["X-Interaction-Id"] == ",".join(ids)
    for choice, interaction_id in zip(completion.choices, ids, strict=True):
        assert server.store.get_interaction(interaction_id).response == choice.message.content
    again = client.chat.completions.create(model="default", messages=messages, n=2, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in completion.choices]


def test_model_selects_adapter_base_or_active(server: RunningServer, client: openai.OpenAI, tiny_engine) -> None:
    messages = [{"role": "user", "content": "hello"}]
    by_name = client.chat.completions.create(model="tiny-a", messages=messages)
    assert by_name.model == "tiny-a"
    assert by_name.choices[0].message.content == greedy(tiny_engine, messages, adapter="tiny-a")
    assert server.store.get_interaction(extra(by_name, "interaction_id")).adapter == "tiny-a"

    tiny_engine.set_active_adapter("tiny-a")
    try:
        default = client.chat.completions.create(model="default", messages=messages)
        base = client.chat.completions.create(model="base", messages=messages)
    finally:
        tiny_engine.set_active_adapter(None)
    assert extra(default, "adapter") == "tiny-a" and default.model == "tiny-a"
    assert extra(base, "adapter") is None
    assert base.choices[0].message.content == greedy(tiny_engine, messages)


def test_models_list_and_registry_adapter_loaded_on_use(server: RunningServer, client: openai.OpenAI,
                                                        tiny_engine) -> None:
    before = {m.id: m for m in client.models.list().data}
    assert extra(before[tiny_model_name(tiny_engine)], "status") == "base"
    assert extra(before["reg-a"], "status") == "candidate" and extra(before["reg-a"], "loaded") is False
    assert extra(before["tiny-a"], "loaded") is True
    server.store.upsert_adapter("seal-generator-1", "/nonexistent", method="seal", role="generator")
    assert "seal-generator-1" not in {m.id for m in client.models.list().data}  # a learner's tool, never served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="seal-generator-1", messages=[{"role": "user", "content": "hi"}])
    answer = client.chat.completions.create(model="reg-a", messages=[{"role": "user", "content": "hi"}])
    assert extra(answer, "adapter") == "reg-a"
    after = {m.id: m for m in client.models.list().data}
    assert extra(after["reg-a"], "loaded") is True


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    error = info.value.body
    assert info.value.status_code == 404
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "GET /v1/models" in error["message"]


def test_request_limits(server: RunningServer, client: openai.OpenAI) -> None:
    huge = [{"role": "user", "content": "x" * 70_000}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="default", messages=huge)
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large"

    too_many = [{"role": "user", "content": "hi"}] * 9
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=too_many)
    assert info.value.body["code"] == "too_many_messages"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    assert info.value.body["code"] == "max_tokens_too_large" and info.value.body["param"] == "max_tokens"

    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(1500))}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=long_prompt)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "context" in info.value.body["message"]

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert info.value.body["code"] == "unsupported_parameter"


def test_malformed_and_invalid_requests_get_openai_errors(server: RunningServer) -> None:
    url = server.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    body = bad_json.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "invalid_json" and body["type"] == "invalid_request_error"

    missing = httpx.post(url, json={"model": "default"})
    assert missing.status_code == 400 and "messages" in missing.json()["error"]["message"]
    bad_role = httpx.post(url, json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"].startswith("messages")
    image = httpx.post(url, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert image.status_code == 400 and "text only" in image.json()["error"]["message"]


def test_hostile_values_get_400_with_the_param(server: RunningServer) -> None:
    """A lone surrogate, a seed past 64 bits and malformed document questions are the client's error, not 500
    or a stored signal."""
    before = server.store.counts()
    surrogate = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    for path in ("/v1/chat/completions", "/v1/teach"):
        body = surrogate if path.endswith("completions") else b'{"prompt": "\\udfff", "demonstration": "x"}'
        answer = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert "surrogate" in answer.json()["error"]["message"]
    for body in (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b"[" * 20_000 + b"]" * 20_000):
        unreadable = httpx.post(server.url + "/v1/chat/completions", content=body,
                                headers={"content-type": "application/json"})
        assert unreadable.status_code == 400 and unreadable.json()["error"]["code"] == "invalid_json", unreadable.text
    long_stop = httpx.post(server.url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 5000]})
    assert long_stop.status_code == 400 and long_stop.json()["error"]["param"] == "stop"
    huge_seed = httpx.post(server.url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "seed": 2**64})
    assert huge_seed.status_code == 400 and huge_seed.json()["error"]["param"] == "seed"
    for questions in ([{"junk": 1}], [{"question": 5, "answer": None}], [{"question": "Q?"}]):
        doc = httpx.post(server.url + "/v1/documents", json={"text": "Some text.", "questions": questions})
        assert doc.status_code == 400, (questions, doc.text)
        assert doc.json()["error"]["param"].startswith("questions")
    after = server.store.counts()
    assert (after["signals"], after["documents"]) == (before["signals"], before["documents"])


def test_langchain_chat_openai_invoke_and_stream(server: RunningServer, tiny_engine) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="default", temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0)
    expected = greedy(tiny_engine, [{"role": "user", "content": "What is two plus two?"}])
    before = server.store.counts()["interactions"]
    answer = llm.invoke("What is two plus two?")
    assert answer.content == expected
    with_headers = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="default", temperature=0,
                              max_tokens=MAX_TOKENS, max_retries=0, include_response_headers=True)
    interaction_id = with_headers.invoke("What is two plus two?").response_metadata["headers"]["x-interaction-id"]
    server.store.flush()
    assert server.store.get_interaction(interaction_id) is not None  # the id docs/server.md says to correct
    streamed = "".join(str(chunk.content) for chunk in llm.stream("What is two plus two?"))
    assert streamed == expected
    assert server.store.counts()["interactions"] == before + 3


# --- feedback ----------------------------------------------------------------------------------------------


def test_feedback_routes_store_signals(server: RunningServer, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="default",
                                                messages=[{"role": "user", "content": "refund window?"}])
    interaction_id = extra(completion, "interaction_id")
    with httpx.Client(base_url=server.url) as http:
        rated = http.post(f"/v1/interactions/{interaction_id}/rating", json={"score": -1, "comment": "outdated"})
        assert rated.status_code == 201 and rated.json()["kind"] == "rating"
        corrected = http.post(f"/v1/interactions/{interaction_id}/correction",
                              json={"text": "The refund window is 45 days."})
        assert corrected.status_code == 201
        taught = http.post("/v1/teach", json={"prompt": "How long is the warranty?",
                                              "demonstration": "Two years."})
        taught_conv = http.post("/v1/teach", json={
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Warranty?"}],
            "demonstration": "Two years."})
        document = http.post("/v1/documents", json={
            "text": "The refund window is now 45 days.", "title": "Policy update",
            "questions": [{"question": "How long is the refund window?", "answer": "45 days"}]})
        assert taught.status_code == taught_conv.status_code == document.status_code == 201

        unknown = http.post("/v1/interactions/nope/rating", json={"score": 1})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "interaction_not_found"
        unknown_fix = http.post("/v1/interactions/nope/correction", json={"text": "x"})
        assert unknown_fix.status_code == 404
        empty_fix = http.post(f"/v1/interactions/{interaction_id}/correction", json={"text": "  "})
        assert empty_fix.status_code == 400 and "non-empty" in empty_fix.json()["error"]["message"]
        assert empty_fix.json()["error"]["param"] == "text"
        both = http.post("/v1/teach", json={"prompt": "a", "messages": [{"role": "user", "content": "a"}],
                                            "demonstration": "b"})
        assert both.status_code == 400
        empty_doc = http.post("/v1/documents", json={"text": ""})
        assert empty_doc.status_code == 400
        bad_score = http.post(f"/v1/interactions/{interaction_id}/rating", json={"score": "great"})
        assert bad_score.status_code == 400

    signals = {s.kind: s for s in server.store.signals(interaction_id=interaction_id)}
    assert signals["rating"].rating == -1.0 and signals["rating"].comment == "outdated"
    assert signals["correction"].text == "The refund window is 45 days."
    demos = [s for s in server.store.signals("demonstration") if s.text == "Two years."]
    assert {"role": "user", "content": "How long is the warranty?"} in [m for d in demos for m in d.messages]
    assert any(d.messages[0] == {"role": "system", "content": "Be brief."} for d in demos)
    stored = server.store.get_document(document.json()["id"])
    assert stored.title == "Policy update" and stored.questions[0]["answer"] == "45 days"


# --- admin -------------------------------------------------------------------------------------------------


def test_admin_routes_need_the_token(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        missing = http.get("/admin/adapters")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_admin_token"
        wrong = http.get("/admin/adapters", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = http.get("/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert http.post("/admin/rollback").status_code == 401


def test_admin_reads(server: RunningServer) -> None:
    run_id = server.store.create_run("sft", data_counts={"new": 2})
    server.store.update_run(run_id, status="failed", error="worker crashed: out of memory")
    server.store.record_decision("reg-a", "veto", reasons=["protected behaviour 'capital' failed"], run_id=run_id)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=auth) as http:
        adapters = http.get("/admin/adapters").json()
        reg = next(a for a in adapters["adapters"] if a["name"] == "reg-a")
        assert reg["lineage_path"] == ["base", "reg-a"] and reg["status"] == "candidate"
        one = http.get("/admin/adapters/reg-a").json()
        assert one["decisions"][0]["reasons"] == ["protected behaviour 'capital' failed"]
        assert http.get("/admin/adapters/nope").status_code == 404
        decisions = http.get("/admin/decisions", params={"adapter": "reg-a"}).json()["decisions"]
        assert decisions[0]["decision"] == "veto"
        runs = http.get("/admin/runs").json()["runs"]
        assert runs[0]["id"] == run_id and runs[0]["error"] == "worker crashed: out of memory"
        assert http.get(f"/admin/runs/{run_id}").json()["status"] == "failed"
        assert http.get("/admin/runs/nope").status_code == 404


def test_admin_signals_list_retry_and_dismiss(server: RunningServer) -> None:
    store = server.store
    held = [store.add_signal("demonstration", text=f"t{i}", messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(3)]
    store.set_learning_state("held", signal_ids=held, run_id="r-vetoed", reason="vetoed: protected 'x'")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=auth) as http:
        assert httpx.get(server.url + "/admin/signals").status_code == 401
        listed = http.get("/admin/signals", params={"state": "held"}).json()["signals"]
        assert {s["id"] for s in listed} >= set(held) and all(s["state"] == "held" for s in listed)
        assert listed[-1]["state_reason"] == "vetoed: protected 'x'"
        assert http.get("/admin/signals", params={"state": "lost"}).status_code == 400
        retried = http.post("/admin/signals/retry", json={"ids": [held[0]]}).json()
        assert retried == {"retried": 1, "requested": 1}
        assert http.post("/admin/signals/retry", json={}).status_code == 400
        assert http.post("/admin/signals/dismiss", json={"ids": [held[1]], "reason": "  "}).status_code == 400
        dismissed = http.post("/admin/signals/dismiss", json={"ids": [held[1]], "reason": "wrong"}).json()
        assert dismissed == {"dismissed": 1, "requested": 1}
        rest = http.post("/admin/signals/retry", json={"all_held": True}).json()
        assert rest["retried"] >= 1
        summary = http.get("/dashboard/api/summary").json()
    assert store.get_signal(held[0]).state == "pending" and store.get_signal(held[2]).state == "pending"
    assert store.get_signal(held[1]).state == "dismissed" and store.get_signal(held[1]).state_reason == "wrong"
    assert "held_signals" in summary


def test_admin_promote_rollback_and_shadow_report(server: RunningServer, tiny_engine) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=auth) as http:
        # test_admin_reads recorded a veto of reg-a: it takes force, with a reason, every time
        assert http.post("/admin/adapters/reg-a/promote").status_code == 400
        promoted = http.post("/admin/adapters/reg-a/promote", json={"force": True, "reason": "checked"})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["active"]["name"] == "reg-a"
        assert tiny_engine.active_adapter == "reg-a"
        served = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert served["adapter"] == "reg-a"
        assert http.post("/admin/adapters/nope/promote").status_code == 404

        rolled = http.post("/admin/rollback")
        assert rolled.status_code == 200 and rolled.json()["serving"] == "base"
        assert tiny_engine.active_adapter is None
        assert http.post("/admin/rollback").status_code == 409  # nothing left to roll back
        report = http.get("/admin/shadow-report")
        assert report.status_code == 200 and isinstance(report.json(), dict)


def test_learn_now_runs_in_the_background(tiny_engine, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=tiny_engine, store=store, admin_token=TOKEN, background_learning=False)
        with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            started = http.post("/admin/learn", json={"method": "sft"})
            assert started.status_code == 202, started.text
            job = started.json()
            assert started.headers["location"] == f"/admin/learn/{job['id']}"
            while job["status"] == "running":  # no signals: the cycle ends without training
                time.sleep(0.05)
                job = http.get(f"/admin/learn/{job['id']}").json()
            assert job["status"] == "finished", job
            assert job["result"]["status"] in ("nothing_to_learn", "skipped")
            if job["result"]["status"] == "nothing_to_learn":
                assert job["progress"]["phase"] == "dataset"  # the phase it reached, in the job API
            assert http.post("/admin/learn", json={"method": "nonsense"}).status_code == 400
            assert http.get("/admin/learn").json()["jobs"][0]["id"] == job["id"]


def test_admin_disabled_without_a_token(tiny_engine, tiny_model_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNTIME_ADMIN_TOKEN", raising=False)
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=tiny_engine, store=store, service=RuntimeService(config, tiny_engine, store))
        with TestClient(app) as http:
            refused = http.get("/admin/adapters", headers={"Authorization": "Bearer anything"})
            assert refused.status_code == 403
            assert "RUNTIME_ADMIN_TOKEN" in refused.json()["error"]["message"]
            assert "--admin-token" in refused.json()["error"]["message"]
            assert http.post("/admin/learn").status_code == 403


def test_admin_token_from_environment(tiny_engine, tiny_model_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_ADMIN_TOKEN", "from-env")
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=tiny_engine, store=store, service=RuntimeService(config, tiny_engine, store))
        with TestClient(app) as http:
            assert http.get("/admin/runs", headers={"Authorization": "Bearer from-env"}).status_code == 200


# --- health and metrics ------------------------------------------------------------------------------------


def test_healthz_and_metrics(server: RunningServer, client: openai.OpenAI, tiny_engine) -> None:
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "count me"}])
    health = httpx.get(server.url + "/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model"] == tiny_model_name(tiny_engine)
    assert body["store"]["ok"] and body["store"]["counts"]["interactions"] > 0
    assert body["engine"]["implementation"] == "TransformersEngine" and body["engine"]["context_length"] == 512

    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    samples = _samples(text)
    assert samples[('runtime_http_requests_total', (('method', 'POST'), ('route', '/v1/chat/completions'),
                                                    ('status', '200')))] >= 1
    assert samples[('runtime_http_requests_total', (('method', 'POST'), ('route', '/v1/chat/completions'),
                                                    ('status', '404')))] >= 1
    assert samples[('runtime_generated_tokens_total', (('adapter', 'base'),))] > 0
    assert samples[('runtime_store_rows', (('table', 'interactions'),))] > 0
    assert samples[('runtime_active_adapter_info', (('adapter', 'base'), ('model', tiny_model_name(tiny_engine))))] == 1
    assert "runtime_http_request_duration_seconds_bucket" in text


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_openapi_schema_lists_the_routes(server: RunningServer) -> None:
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/models", "/v1/teach", "/v1/documents", "/admin/rollback",
                 "/v1/interactions/{interaction_id}/rating", "/healthz", "/dashboard/api/summary"):
        assert path in paths, path
    assert json.dumps(paths)  # serialisable


def test_chunked_oversize_body_is_413(server: RunningServer) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(server.url + "/v1/chat/completions", content=body(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes and read the reply until the server closes. The server answers and closes before it has
    read everything of an oversized request, so the send or a later read may meet a reset; what arrived counts."""
    host, port = url.removeprefix("http://").split(":")
    reply = b""
    with socket.create_connection((host, int(port))) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    return reply


def test_oversized_headers_get_431_in_the_api_error_shape(server: RunningServer) -> None:
    """h11 refuses the request before the app sees it; the answer still says what went wrong and what to do."""
    reply = _raw_exchange(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and "smaller headers" in error["message"]


def test_a_malformed_request_line_gets_a_json_400(server: RunningServer) -> None:
    head, _, body = _raw_exchange(server.url, b"NOT A REQUEST\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


class _GatedEngine:
    """The tiny engine, but generating waits for a gate: shows whether the server answers while it waits."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.gate = threading.Event()

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.gate.wait()
        return self._engine.chat(*args, **kwargs)

    def stream_chat(self, *args: Any, **kwargs: Any) -> Any:  # how the server generates every answer
        self.entered.set()
        self.gate.wait()
        return self._engine.stream_chat(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_generation_does_not_block_other_requests(tiny_engine, tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = _GatedEngine(tiny_engine)
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=engine, store=store,  # type: ignore[arg-type]
                         service=RuntimeService(config, engine, store))  # type: ignore[arg-type]
        with serve_in_thread(app) as url:
            results: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: results.append(httpx.post(
                url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                timeout=None)))
            thread.start()
            assert engine.entered.wait(60), "the request never reached the engine"
            try:
                # The generation is parked in a worker thread; the event loop still answers.
                assert httpx.get(url + "/healthz").status_code == 200
                assert httpx.get(url + "/v1/models").status_code == 200
                assert not results
            finally:
                engine.gate.set()
                thread.join()
            assert results[0].status_code == 200


def test_stream_that_cannot_start_is_an_http_error(client: openai.OpenAI) -> None:
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(1500))}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=long_prompt, stream=True)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], stream=True)


def test_learning_loop_runs_with_the_app(tiny_engine, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        app = create_app(config, engine=tiny_engine, store=store, background_learning=True)
        service = app.state.runtime.service
        assert service.loop is None
        with TestClient(app) as http:
            assert service.loop is not None  # started by the lifespan
            assert http.get("/healthz").json()["service"] is True
        assert service.loop is None  # stopped at shutdown; the engine and store were the caller's
        assert not store.closed


def test_force_promotion_over_http_is_audited(tiny_engine, tiny_model_dir: Path, tiny_adapter_dir: Path,
                                              tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        register_adapter(store, "vetoed", tiny_adapter_dir, config.adapters_dir, status="rejected")
        store.record_decision("vetoed", "veto", reasons=["protected check failed"])
        app = create_app(config, engine=tiny_engine, store=store, admin_token=TOKEN, background_learning=False)
        admin = {"Authorization": f"Bearer {TOKEN}"}
        try:
            with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=admin, timeout=60) as http:
                plain = http.post("/admin/adapters/vetoed/promote")
                assert plain.status_code == 400 and "vetoed by the gate" in plain.json()["error"]["message"]
                no_reason = http.post("/admin/adapters/vetoed/promote", json={"force": True})
                assert no_reason.status_code == 400 and "reason" in no_reason.json()["error"]["message"]
                forced = http.post("/admin/adapters/vetoed/promote", json={"force": True, "reason": "checked"})
                assert forced.status_code == 200 and forced.json()["active"]["name"] == "vetoed"
                assert http.post("/admin/rollback").status_code == 200
                assert http.post("/admin/adapters/vetoed/promote").status_code == 400  # still needs force
        finally:
            for name in tiny_engine.list_adapters():
                tiny_engine.unload_adapter(name)
            tiny_engine.set_active_adapter(None)
        promoted = store.decisions(adapter="vetoed", decision="promote")
        assert promoted[0].reasons == ["forced past the gate's veto by admin: checked"]


def test_metrics_answer_an_operators_questions(tiny_engine, tiny_model_dir: Path, tiny_adapter_dir: Path,
                                               tmp_path: Path) -> None:
    """Runs by method and status, decisions, the checks that vetoed, signals waiting, the time from a correction
    to the adapter that learned it serving, and the store's queue, from the log at scrape time."""
    config = tiny_config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        learned = store.add_signal("demonstration", text="a", messages=[{"role": "user", "content": "q1"}])
        store.add_signal("demonstration", text="b", messages=[{"role": "user", "content": "q2"}])
        run = store.create_run("rewrite")
        store.update_run(run, status="succeeded", output_adapter="good")
        register_adapter(store, "good", tiny_adapter_dir, config.adapters_dir)
        store.mark_consumed(run, signal_ids=[learned])
        store.record_decision("good", "promote", reasons=["approved by the gate"], run_id=run)
        store.record_decision("bad", "veto", checks=[{"kind": "protected", "name": "refuses", "veto": True},
                                                     {"kind": "protected", "name": "math", "veto": False}])
        app = create_app(config, engine=tiny_engine, store=store, background_learning=False)
        try:
            with serve_in_thread(app) as url:
                streamed = httpx.post(url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4})
                assert streamed.status_code == 200
                samples = _samples(httpx.get(url + "/metrics").text)
        finally:
            for name in tiny_engine.list_adapters():
                tiny_engine.unload_adapter(name)
            tiny_engine.set_active_adapter(None)
    assert samples[("runtime_learning_runs_total", (("method", "rewrite"), ("status", "succeeded")))] == 1
    assert samples[("runtime_gate_decisions_total", (("decision", "veto"),))] == 1
    assert samples[("runtime_gate_vetoes_total", (("check", "refuses"), ("kind", "protected")))] == 1
    assert ("runtime_gate_vetoes_total", (("check", "math"), ("kind", "protected"))) not in samples
    assert samples[("runtime_signals", (("state", "pending"),))] == 1
    assert samples[("runtime_signals", (("state", "learned"),))] == 1
    assert samples[("runtime_correction_to_serving_seconds_count", ())] == 1
    assert samples[("runtime_correction_to_serving_seconds_sum", ())] >= 0
    assert samples[("runtime_store_queue_depth", ())] >= 0
    assert samples[("runtime_store_rejected_writes_total", ())] == 0
    assert samples[("runtime_time_to_first_token_seconds_count", ())] == 1
    assert samples[("runtime_engine_queue_depth", ())] == 0  # nothing waits for the engine at scrape time


class DiesMidAnswer:
    """The tiny engine, except that its first ``breaks`` streamed answers break off after their first delta with
    the error a replica that went away mid-answer gives (everything else passes through)."""

    def __init__(self, engine: Any, breaks: int) -> None:
        self._engine, self.breaks = engine, breaks

    def stream_chat(self, conversation: Any, params: Any = None, adapter: Any = None) -> Any:
        from runtime.engines import ACTIVE, ServerConnectionError, StreamResult

        inner = self._engine.stream_chat(conversation, params, adapter=ACTIVE if adapter is None else adapter)
        if self.breaks <= 0:
            return inner
        self.breaks -= 1

        def broken() -> Iterator[str]:
            with inner as stream:
                for delta in stream:
                    yield delta
                    raise ServerConnectionError("peer closed connection without sending complete message body")
            return None  # pragma: no cover

        return StreamResult(broken())  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.mark.parametrize("breaks", [1, 2])
def test_a_non_streamed_answer_cut_off_by_its_server_is_generated_again_once(
    breaks: int, tiny_engine: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, tiny_model_dir)
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6}
    expected = tiny_engine.chat([body["messages"]], SamplingParams(max_new_tokens=6))[0].text
    with Store(config.store_path) as store:
        engine = DiesMidAnswer(tiny_engine, breaks)
        app = create_app(config, engine=engine, store=store, admin_token=TOKEN, background_learning=False)  # type: ignore[arg-type]
        with TestClient(app) as http:
            response = http.post("/v1/chat/completions", json=body)
        store.flush()
        logged = store.recent_interactions(limit=10)
    if breaks == 1:  # the client had received nothing: the answer is generated again, and logged once
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
        assert len(logged) == 1
    else:  # it broke again: a 503 the client may retry, not a 500
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert logged == []
