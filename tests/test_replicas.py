"""Serving replicas: a `ReplicaSet` over REAL `runtime serve --role replica` apps on the tiny model.

Each replica is the server's own app (`create_app(..., role="replica")`) with its own `TransformersEngine` and
store, served by uvicorn on a loopback port in a thread. A replica is "killed" by stopping its server and
"restarted" on the same port with a fresh engine that has no adapters, as a restarted process would be.

The last tests are PROTOCOL tests: the same `ReplicaSet` over vLLM-kind endpoints served by the stand-ins of
`tests/http_standins.py` (not vLLM; no model runs there), to show the set drives the vLLM client code too.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from runtime.adapters import LINEAGE_FILE, adapter_checksum
from runtime.config import ConfigError, ReplicaEndpointConfig, RuntimeConfig
from runtime.engines import (
    AdapterLoadError,
    FollowerError,
    ReplicaEndpoint,
    ReplicaSet,
    ReplicaStatus,
    SamplingParams,
    TransformersEngine,
)
from runtime.factory import create_engine
from server import create_app
from server.http_protocol import uvicorn_config
from tests.http_standins import run_standin
from tests.tiny_model import make_lora_adapter

TOKEN = "replica-admin-token"
PARAMS = SamplingParams(max_new_tokens=6)
WAIT_S = 120  # an upper bound for start-up and catch-up, never a timing assertion
HELLO = [{"role": "user", "content": "hello there"}]


# --- real replicas -----------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `runtime serve --role replica` app on a fixed loopback port, stoppable and restartable."""

    data_dir: Path
    model_dir: Path
    port: int
    app: FastAPI | None = None
    engine: TransformersEngine | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    logged: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = RuntimeConfig(data_dir=self.data_dir)
        config.model.name = str(self.model_dir)
        config.engine.device = "cpu"
        self.engine = TransformersEngine(self.model_dir, device="cpu")  # a restarted process: no adapters
        self.app = create_app(config, engine=self.engine, admin_token=TOKEN, role="replica")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._server = uvicorn.Server(uvicorn_config(self.app, port=self.port, log_level="warning", lifespan="on",
                                                     grace_s=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self._server.started:  # a start-up guard, not a timing assertion
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the replica did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (the port refuses connections afterwards); keeps what it logged in `logged`."""
        assert self._server is not None and self._thread is not None and self.engine is not None
        store = self.app.state.runtime.store  # type: ignore[union-attr]
        store.flush()
        self.logged.extend(store.recent_interactions(limit=10_000))
        self._server.should_exit = True
        self._thread.join(30)
        self.engine.close()

    def info(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/admin/replica", headers={"Authorization": f"Bearer {TOKEN}"})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def interactions(self) -> list[Any]:
        store = self.app.state.runtime.store  # type: ignore[union-attr]
        store.flush()
        return store.recent_interactions(limit=10_000)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def replicas(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    started = [Replica(tmp_path / f"replica-{i}", tiny_model_dir, _free_port()) for i in range(2)]
    for replica in started:
        replica.start()
    yield started
    for replica in started:
        if replica._thread is not None and replica._thread.is_alive():
            replica.stop()


def learner_config(tmp_path: Path, replicas: list[Replica]) -> RuntimeConfig:
    config = RuntimeConfig(data_dir=tmp_path / "learner")
    config.engine.replicas = [ReplicaEndpointConfig(kind="runtime", base_url=r.url, api_key=TOKEN) for r in replicas]
    config.engine.replica_probe_interval_s = 0.2
    return config


@pytest.fixture
def replica_set(replicas: list[Replica], tmp_path: Path) -> Iterator[ReplicaSet]:
    engine = create_engine(learner_config(tmp_path, replicas))  # the factory builds the set from engine.replicas
    assert isinstance(engine, ReplicaSet)
    yield engine
    engine.close()


def published(adapter_dir: Path, target: Path) -> Path:
    """A copy of an adapter with the lineage.json publishing writes (holding the registry's checksum)."""
    shutil.copytree(adapter_dir, target)
    (target / LINEAGE_FILE).write_text(f'{{"checksum": "{adapter_checksum(target)}"}}')
    return target


def all_in_rotation(statuses: list[ReplicaStatus]) -> bool:
    return all(s.in_rotation for s in statuses)


def local_answer(tiny_engine: TransformersEngine, adapter_dir: Path | None) -> str:
    """The greedy answer of the same model (with that adapter) in this process."""
    if adapter_dir is None:
        return tiny_engine.chat([HELLO], PARAMS, adapter=None)[0].text
    tiny_engine.load_adapter("reference", adapter_dir, replace=tiny_engine.has_adapter("reference"))
    try:
        return tiny_engine.chat([HELLO], PARAMS, adapter="reference")[0].text
    finally:
        tiny_engine.unload_adapter("reference")


# --- tests on real replicas --------------------------------------------------------------------------------


def test_requests_are_spread_over_both_replicas_and_logged_there(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_engine: TransformersEngine
) -> None:
    answers = [replica_set.chat([HELLO], PARAMS)[0] for _ in range(4)]

    expected = local_answer(tiny_engine, None)
    assert [a.text for a in answers] == [expected] * 4
    assert all(a.adapter is None for a in answers)
    assert [s.served for s in replica_set.replicas()] == [2, 2]
    assert [len(r.interactions()) for r in replicas] == [2, 2]  # each replica logs what it served
    batch = replica_set.chat([HELLO] * 4, PARAMS)
    assert [g.text for g in batch] == [expected] * 4


def test_two_phase_promotion_loads_on_every_replica_before_switching(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_engine: TransformersEngine, tiny_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    adapter = published(tiny_adapter_dir, tmp_path / "adapters" / "cand")
    base_answer, cand_answer = local_answer(tiny_engine, None), local_answer(tiny_engine, adapter)
    assert base_answer != cand_answer  # the adapter really changes the answer

    replica_set.load_adapter("cand", adapter)  # phase 1
    for replica in replicas:
        info = replica.info()
        assert [a["name"] for a in info["adapters"]] == ["cand"] and info["active"] is None
    assert replica_set.active_adapter is None
    assert {(g.adapter, g.text) for g in replica_set.chat([HELLO] * 2, PARAMS)} == {(None, base_answer)}

    replica_set.set_active_adapter("cand")  # phase 2
    served = replica_set.chat([HELLO] * 4, PARAMS)
    assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}
    assert all(r.info()["active"] == "cand" for r in replicas)
    with replica_set.stream_chat(HELLO, PARAMS) as stream:
        assert "".join(stream) == cand_answer
    assert stream.generation.adapter == "cand"

    replica_set.set_active_adapter(None)  # rollback, the same way
    assert {(g.adapter, g.text) for g in replica_set.chat([HELLO] * 2, PARAMS)} == {(None, base_answer)}
    logged = [i.adapter for r in replicas for i in r.interactions()]
    assert sorted(logged, key=str) == sorted([None] * 4 + ["cand"] * 5, key=str)


def test_a_replica_down_during_promotion_leaves_rotation_and_catches_up_before_serving_again(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_engine: TransformersEngine, tiny_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    adapter = published(tiny_adapter_dir, tmp_path / "adapters" / "cand")
    cand_answer = local_answer(tiny_engine, adapter)
    first, second = replicas
    second.stop()

    replica_set.load_adapter("cand", adapter)  # the second replica cannot load it
    statuses = replica_set.replicas()
    assert [s.in_rotation for s in statuses] == [True, False]
    assert "cand" in (statuses[1].reason or "")
    replica_set.set_active_adapter("cand")
    served = replica_set.chat([HELLO] * 4, PARAMS)
    assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}
    assert [s.served for s in replica_set.replicas()] == [4, 0]

    second.start()  # restarted: a fresh process without adapters
    replica_set.probe_now()
    assert replica_set.wait_for(all_in_rotation, timeout=WAIT_S)
    info = second.info()
    assert [a["name"] for a in info["adapters"]] == ["cand"] and info["active"] == "cand"

    served = [replica_set.chat([HELLO], PARAMS)[0] for _ in range(4)]
    assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}
    assert replica_set.replicas()[1].served > 0
    assert [i.adapter for i in second.interactions()] == ["cand"] * replica_set.replicas()[1].served
    assert first.info()["active"] == "cand"


def test_a_replica_that_stops_answering_is_skipped_and_the_request_succeeds_elsewhere(
    replica_set: ReplicaSet, replicas: list[Replica]
) -> None:
    replicas[0].stop()
    answers = [replica_set.chat([HELLO], PARAMS)[0] for _ in range(3)]
    assert len(answers) == 3
    statuses = replica_set.replicas()
    assert [s.in_rotation for s in statuses] == [False, True]
    assert "unreachable" in (statuses[0].reason or "")
    assert statuses[1].served == 3


def test_a_checksum_mismatch_refuses_the_load_and_changes_nothing(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    adapter = published(tiny_adapter_dir, tmp_path / "adapters" / "tampered")
    other = make_lora_adapter(tiny_model_dir, tmp_path / "other", seed=7)
    shutil.copy(other / "adapter_model.safetensors", adapter / "adapter_model.safetensors")  # changed after publishing

    with pytest.raises(AdapterLoadError, match="do not match the registry checksum"):
        replica_set.load_adapter("tampered", adapter)
    assert replica_set.list_adapters() == []
    assert all_in_rotation(replica_set.replicas())  # a bad adapter is no reason to drop a healthy replica
    assert all(r.info()["adapters"] == [] for r in replicas)

    response = httpx.put(f"{replicas[0].url}/admin/replica/adapters/tampered",
                         headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"location": str(adapter), "checksum": adapter_checksum(tiny_adapter_dir)})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "adapter_verification_failed"


def test_a_replica_serves_and_logs_but_refuses_to_learn(replicas: list[Replica]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = replicas[0].url
    for path in ("/admin/learn", "/admin/rollback", "/admin/adapters/x/promote"):
        response = httpx.post(url + path, headers=headers, json={})
        assert response.status_code == 409, path
        assert response.json()["error"]["code"] == "replica_role"
        assert "never learns" in response.json()["error"]["message"]
    assert replicas[0].app.state.runtime.service.loop is None  # type: ignore[union-attr]  # no learning loop
    answer = httpx.post(url + "/v1/chat/completions",
                        json={"model": replicas[0].info()["model"], "messages": HELLO, "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["adapter"] is None


def test_a_replica_refuses_requests_for_its_default_until_a_learner_set_it(
    replica_set: ReplicaSet, replicas: list[Replica]
) -> None:
    url, headers = replicas[0].url, {"Authorization": f"Bearer {TOKEN}"}
    assert replicas[0].info()["in_step"] is False  # a fresh process: no learner has set its default yet
    refused = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "replica_not_in_step"
    assert httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": HELLO,
                                                           "max_tokens": 4}).status_code == 200

    replica_set.set_active_adapter(None)  # what a learner does at start-up (RuntimeService.sync_engine)
    assert all(r.info()["in_step"] for r in replicas)
    answer = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["adapter"] is None

    assert httpx.delete(url + "/admin/replica/active", headers=headers).json()["in_step"] is False
    assert httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}).status_code == 503


# --- followers: app processes that serve through the replicas and follow the learner's promotions ---------


def follower_config(tmp_path: Path, replicas: list[Replica]) -> RuntimeConfig:
    config = learner_config(tmp_path, replicas)
    config.data_dir = tmp_path / "app"
    config.engine.follow_replicas = True
    return config


def test_a_follower_is_served_what_the_learner_promoted_and_changes_nothing_itself(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_engine: TransformersEngine, tiny_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    adapter = published(tiny_adapter_dir, tmp_path / "adapters" / "cand")
    base_answer, cand_answer = local_answer(tiny_engine, None), local_answer(tiny_engine, adapter)
    replica_set.set_active_adapter(None)
    follower = create_engine(follower_config(tmp_path, replicas))
    assert isinstance(follower, ReplicaSet) and follower.follower
    try:
        assert {(g.adapter, g.text) for g in follower.chat([HELLO] * 2, PARAMS)} == {(None, base_answer)}

        replica_set.load_adapter("cand", adapter)  # phase 1: the default does not move yet
        assert {g.adapter for g in follower.chat([HELLO] * 2, PARAMS)} == {None}
        replica_set.set_active_adapter("cand")  # phase 2
        served = [follower.chat([HELLO], PARAMS)[0] for _ in range(4)]
        assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}
        assert {s.served > 0 for s in follower.replicas()} == {True}  # both replicas answered
        assert follower.active_adapter == "cand"
        with follower.stream_chat(HELLO, PARAMS) as stream:
            assert "".join(stream) == cand_answer
        assert stream.generation.adapter == "cand"

        for change in (lambda: follower.load_adapter("x", adapter), lambda: follower.set_active_adapter(None),
                       lambda: follower.unload_adapter("cand")):
            with pytest.raises(FollowerError, match="follows the fleet's learner"):
                change()
        assert all(r.info()["active"] == "cand" for r in replicas)

        replica_set.set_active_adapter(None)  # a rollback reaches the follower the same way
        assert {(g.adapter, g.text) for g in follower.chat([HELLO] * 2, PARAMS)} == {(None, base_answer)}
    finally:
        follower.close()


def test_a_follower_skips_a_restarted_replica_until_the_learner_brought_it_in_step(
    replica_set: ReplicaSet, replicas: list[Replica], tiny_engine: TransformersEngine, tiny_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    adapter = published(tiny_adapter_dir, tmp_path / "adapters" / "cand")
    cand_answer = local_answer(tiny_engine, adapter)
    replica_set.load_adapter("cand", adapter, activate=True)
    follower = create_engine(follower_config(tmp_path, replicas))
    assert isinstance(follower, ReplicaSet)
    try:
        second = replicas[1]
        second.stop()
        second.start()  # a fresh process: base model only, not in step
        served = [follower.chat([HELLO], PARAMS)[0] for _ in range(4)]
        assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}  # never the restarted one's base
        assert second.interactions() == []

        # the learner notices the restart on its own (its prober checks replicas in rotation) and catches it up
        deadline = time.monotonic() + WAIT_S  # a guard against hanging, not a timing assertion
        while not second.info()["in_step"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.info()["in_step"] and second.info()["active"] == "cand"
        assert replica_set.wait_for(all_in_rotation, timeout=WAIT_S)
        follower.probe_now()
        assert follower.wait_for(all_in_rotation, timeout=WAIT_S)
        served = [follower.chat([HELLO], PARAMS)[0] for _ in range(4)]
        assert {(g.adapter, g.text) for g in served} == {("cand", cand_answer)}
        assert [i.adapter for i in second.interactions()] == ["cand"] * len(second.interactions())
        assert second.interactions()
    finally:
        follower.close()


def test_a_process_that_follows_neither_learns_nor_changes_the_replicas(
    replica_set: ReplicaSet, replicas: list[Replica], tmp_path: Path
) -> None:
    from orchestration.service import RuntimeService

    replica_set.set_active_adapter(None)
    config = follower_config(tmp_path, replicas)
    config.model.name = replicas[0].info()["model"]
    service = RuntimeService.from_config(config)  # no sync: the learner chose what the replicas serve
    try:
        assert service.engine.follower
        for call in (service.learn_now, service.start_background, service.rollback,
                     lambda: service.promote("anything")):
            with pytest.raises(FollowerError, match="Do it on the learner"):
                call()
        assert all(r.info()["in_step"] for r in replicas)
    finally:
        service.close()

    from agent import LearningAgent

    with pytest.raises(FollowerError, match="background learning"):
        LearningAgent.from_config(config, background_learning=True)
    agent = LearningAgent.from_config(config)  # an app beside the learner: serves through the replicas, logs here
    try:
        result = agent.invoke("hello there")
        assert result.adapter is None and result.interaction_id
        agent.teach("What is the capital of Veloria?", "The capital of Veloria is Telmar.")
        assert agent.store is not None
        agent.store.flush()
        assert [i.id for i in agent.store.recent_interactions(limit=10, kind="live")] == [result.interaction_id]
        assert len(agent.store.signals()) == 1  # shipped to the learner with store.ship_to
    finally:
        agent.close()


def test_the_replica_routes_exist_on_replicas_only(tiny_engine: TransformersEngine, tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    config = RuntimeConfig(data_dir=tmp_path / "learner")
    config.model.name = str(tiny_model_dir)
    app = create_app(config, engine=tiny_engine, admin_token=TOKEN, background_learning=False)
    with TestClient(app) as client:
        response = client.get("/admin/replica", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_a_replica"


def test_replica_config_is_checked(tmp_path: Path) -> None:
    endpoint = {"kind": "runtime", "base_url": "http://127.0.0.1:9"}
    with pytest.raises(ValueError, match="listed once"):
        RuntimeConfig.model_validate({"engine": {"replicas": [endpoint, endpoint]}})
    with pytest.raises(ValueError, match="base_url"):
        RuntimeConfig.model_validate({"engine": {"replicas": [{"kind": "runtime", "base_url": "localhost:8000"}]}})
    config = RuntimeConfig.model_validate({"engine": {"replicas": [endpoint], "base_url": "http://127.0.0.1:9"}})
    with pytest.raises(ConfigError, match="both set"):
        create_engine(config)
    with pytest.raises(ValueError, match="needs engine.replicas"):
        RuntimeConfig.model_validate({"engine": {"follow_replicas": True}})
    with pytest.raises(ValueError, match="of kind `runtime`"):
        RuntimeConfig.model_validate({"engine": {"follow_replicas": True, "replicas": [
            {"kind": "vllm", "base_url": "http://127.0.0.1:9"}]}})
    with pytest.raises(ValueError, match="runtime replicas"):
        ReplicaSet([ReplicaEndpoint("vllm", "http://127.0.0.1:9")], follow=True)


# --- PROTOCOL tests: vLLM-kind replicas (stand-ins, not vLLM) ----------------------------------------------


def test_protocol_replica_set_over_vllm_standins_promotes_on_both_and_drops_one_that_cannot_load(
    tiny_adapter_dir: Path,
) -> None:
    with run_standin("vllm") as a, run_standin("vllm") as b:
        engine = ReplicaSet([ReplicaEndpoint("vllm", a.url), ReplicaEndpoint("vllm", b.url)], probe_interval_s=0.2)
        try:
            assert {g.adapter for g in engine.chat([HELLO] * 2, PARAMS)} == {None}
            engine.load_adapter("v1", tiny_adapter_dir)
            assert a.state.adapters == b.state.adapters == {"v1": str(tiny_adapter_dir.resolve())}
            engine.set_active_adapter("v1")
            served = [engine.chat([HELLO], PARAMS)[0] for _ in range(4)]
            assert {g.adapter for g in served} == {"v1"}
            assert all(g.text.startswith(f"lora[{tiny_adapter_dir.name}]") for g in served)
            assert [s.served for s in engine.replicas()] == [3, 3]

            b.state.runtime_lora = False  # b can no longer load adapters
            engine.load_adapter("v2", tiny_adapter_dir)
            assert [s.in_rotation for s in engine.replicas()] == [True, False]
            engine.set_active_adapter("v2")
            assert {g.adapter for g in engine.chat([HELLO] * 3, PARAMS)} == {"v2"}
            assert [s.served for s in engine.replicas()] == [6, 3]

            b.state.runtime_lora = True
            engine.probe_now()
            assert engine.wait_for(all_in_rotation, timeout=WAIT_S)
            assert set(b.state.adapters) >= {"v1", "v2"}
        finally:
            engine.close()
