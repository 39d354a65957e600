"""Who may teach the model: API keys with roles, principals on signals, trust in the policy, the review queue,
agreement, rate limits and the per-update cap."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from agent import LearningAgent
from learners.datasets import build_dataset
from orchestration.service import RuntimeService
from policies.schema import Policy
from runtime.api_keys import ApiKeysError, add_key, load_api_keys
from runtime.config import RuntimeConfig
from runtime.store import Store
from server import create_app
from tests.test_server import TOKEN, serve_in_thread, tiny_config

runner = CliRunner()


def policy(**signals) -> Policy:
    return Policy.model_validate({"signals": signals})


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> RuntimeConfig:
    return tiny_config(tmp_path, tiny_model_dir)


def agent_with(config: RuntimeConfig, engine, store: Store, trust: Policy) -> tuple[LearningAgent, RuntimeService]:
    service = RuntimeService(config, engine, store, trust)
    return LearningAgent(engine, store=store, service=service, max_new_tokens=2), service


def test_untrusted_senders_wait_for_review_and_every_decision_is_stored(config, tiny_engine) -> None:
    with Store(config.store_path) as store:
        agent, service = agent_with(config, tiny_engine, store, policy(default="review", principals={"alice": "learn"}))
        with service:
            trusted = agent.teach("What is the refund window?", "45 days.", principal="alice")
            waiting = agent.teach("What is the refund window?", "Ten years.", principal="mallory")
            anonymous = agent.teach("What is the warranty?", "Two years.")
            store.flush()
            states = {s.id: s for s in store.signals()}
            assert states[trusted].state == "pending" and states[trusted].principal == "alice"
            assert states[waiting].state == "review" and "mallory" in (states[waiting].state_reason or "")
            assert states[anonymous].state == "pending"  # `unauthenticated` defaults to learn
            assert [e.source_id for e in build_dataset(store).new] == [trusted, anonymous]  # review: not learned

            assert store.review_signals([waiting], "reject", reason="wrong", reviewer="ops") == 1
            assert store.signals(state="dismissed")[0].id == waiting
            assert store.review_signals([waiting], "approve") == 0  # no longer awaiting review
            second = agent.teach("Who are you?", "A bot.", principal="mallory")
            store.flush()
            assert store.review_signals([second], "approve", reviewer="ops") == 1
            assert store.get_signal(second).state == "pending"  # type: ignore[union-attr]
            decisions = [(r.signal_id, r.decision, r.reason, r.reviewer) for r in store.signal_reviews()]
            assert decisions == [(waiting, "reject", "wrong", "ops"), (second, "approve", None, "ops")]


def test_agreement_of_distinct_principals_releases_a_correction(config, tiny_engine) -> None:
    with Store(config.store_path) as store:
        agent, service = agent_with(config, tiny_engine, store, policy(default="review", min_agreeing_principals=2))
        with service:
            first = agent.teach("What is the refund window?", "45 days.", principal="bob")
            again = agent.teach("what is the refund window", "45 days", principal="bob")  # same sender: no
            store.flush()
            assert {s.state for s in store.signals()} == {"review"}
            other = agent.teach("What is the refund window?", "Ninety days.", principal="carol")  # different answer
            store.flush()
            assert {s.state for s in store.signals()} == {"review"}
            agreeing = agent.teach("What is the refund window?", "45 days.", principal="carol")
            store.flush()
            states = {s.id: s.state for s in store.signals()}
            assert states[first] == states[again] == states[agreeing] == "pending" and states[other] == "review"
            assert {r.reviewer for r in store.signal_reviews()} == {"agreement"}


def test_one_principal_fills_at_most_its_share_of_an_update(config) -> None:
    with Store(config.store_path) as store:
        for i in range(5):
            store.add_signal("demonstration", text=f"a{i}", messages=[{"role": "user", "content": f"q{i}"}],
                             principal="loud")
        store.add_signal("demonstration", text="b", messages=[{"role": "user", "content": "qb"}], principal="quiet")
        store.flush()
        build = build_dataset(store, max_per_principal=2)
        assert sorted(e.demonstration for e in build.new) == ["a0", "a1", "b"]


def test_keys_file_holds_hashes_only_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "support-app", ["chat", "feedback"])
    assert key not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    keys = load_api_keys(path)
    assert keys.authenticate(key).principal == "support-app"  # type: ignore[union-attr]
    assert keys.authenticate(key + "x") is None
    path.write_text("keys:\n  - principal: a\n    roles: [chat, sudo]\n    sha256: " + "0" * 64 + "\n")
    with pytest.raises(ApiKeysError, match=r"keys.yaml:3"):
        load_api_keys(path)


def test_the_server_asks_each_route_for_its_role_and_records_the_principal(
    config, tiny_engine, tmp_path: Path
) -> None:
    keys_path = tmp_path / "keys.yaml"
    chat_key = add_key(keys_path, "chatter", ["chat"])
    teach_key = add_key(keys_path, "teacher", ["chat", "feedback", "teach"])
    admin_key = add_key(keys_path, "ops", ["admin"])
    config.policy = tmp_path / "policy.yaml"
    config.policy.write_text("signals:\n  default: review\n  rate_limit_per_hour: 3\n")
    with Store(config.store_path) as store:
        app = create_app(config, engine=tiny_engine, store=store, admin_token=TOKEN, background_learning=False,
                         api_keys=load_api_keys(keys_path))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=chat).status_code == 401
            assert http.post("/v1/chat/completions", json=chat,
                             headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
            assert http.post("/v1/chat/completions", json=chat,
                             headers={"Authorization": f"Bearer {chat_key}"}).status_code == 200
            lesson = {"prompt": "What is the refund window?", "demonstration": "45 days."}
            denied = http.post("/v1/teach", json=lesson, headers={"Authorization": f"Bearer {chat_key}"})
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "missing_role"
            teacher = {"Authorization": f"Bearer {teach_key}"}
            ids = [http.post("/v1/teach", json=lesson, headers=teacher).json()["id"] for _ in range(3)]
            limited = http.post("/v1/teach", json=lesson, headers=teacher)
            assert limited.status_code == 429 and limited.headers["Retry-After"]
            store.flush()
            assert {(s.principal, s.state) for s in store.signals()} == {("teacher", "review")}

            ops = {"Authorization": f"Bearer {admin_key}"}
            queue = http.get("/admin/signals", params={"state": "review"}, headers=ops)
            assert queue.status_code == 200 and len(queue.json()["signals"]) == 3
            assert http.post("/admin/signals/review", json={"ids": ids[:1], "decision": "reject"},
                             headers=ops).status_code == 400  # a rejection says why
            approved = http.post("/admin/signals/review", json={"ids": ids[:2], "decision": "approve"}, headers=ops)
            assert approved.json()["decided"] == 2
            rejected = http.post("/admin/signals/review", headers={"Authorization": f"Bearer {TOKEN}"},
                                 json={"ids": ids[2:], "decision": "reject", "reason": "duplicate"})
            assert rejected.json()["decided"] == 1
            reviews = http.get("/admin/signals/reviews", headers=ops).json()["reviews"]
            assert [(r["decision"], r["reviewer"]) for r in reviews] == [("approve", "ops")] * 2 + [("reject", "admin")]
            assert http.get("/admin/signals", headers={"Authorization": f"Bearer {teach_key}"}).status_code == 401


def test_cli_keys_and_review(tmp_path: Path) -> None:
    from cli.app import app

    keys = tmp_path / "keys.yaml"
    made = runner.invoke(app, ["keys", "add", "alice", "--roles", "chat,teach", "--file", str(keys)])
    assert made.exit_code == 0, made.output
    key = made.output.strip().splitlines()[-1]
    assert load_api_keys(keys).authenticate(key).principal == "alice"  # type: ignore[union-attr]
    assert runner.invoke(app, ["keys", "add", "bob", "--roles", "sudo", "--file", str(keys)]).exit_code == 2
    assert "alice" in runner.invoke(app, ["keys", "list", "--file", str(keys)]).output
    assert runner.invoke(app, ["keys", "revoke", "alice", "--file", str(keys)]).exit_code == 0
    assert load_api_keys(keys).keys == []

    config = tmp_path / "runtime.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    with Store(tmp_path / "data" / "runtime.duckdb") as store:
        waiting = store.add_signal("demonstration", text="x", messages=[{"role": "user", "content": "q"}],
                                   principal="p", state="review", state_reason="needs review")
    listed = runner.invoke(app, ["signals", "--state", "review", "--config", str(config)])
    assert waiting[:12] in listed.output
    no_reason = runner.invoke(app, ["signals", "reject", waiting, "--reason", " ", "--config", str(config)])
    assert no_reason.exit_code == 2
    approved = runner.invoke(app, ["signals", "approve", waiting, "--reviewer", "me", "--config", str(config)])
    assert approved.exit_code == 0 and "1 signal(s) approved" in approved.output
    with Store(tmp_path / "data" / "runtime.duckdb") as store:
        assert store.get_signal(waiting).state == "pending"  # type: ignore[union-attr]
        assert store.signal_reviews(waiting)[0].reviewer == "me"
