"""The CLI beside a running server (issue 15): with the store held by `runtime serve`, every command acts
through the server's admin API, with the same output and exit codes as on the store itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from learners.config import load_config
from runtime.adapters import AdapterRegistry, Lineage
from runtime.server_file import read_server_file, remove_server_file, server_file, write_server_file
from runtime.store import Store
from server import create_app
from tests.test_server import serve_in_thread

runner = CliRunner()
TOKEN = "remote-cli-token"
READS = (["adapters", "list"], ["adapters", "show", "a1"], ["decisions"], ["signals"], ["log"])


@pytest.fixture
def setup(tmp_path: Path, tiny_model_dir: Path, tiny_adapter_dir: Path) -> tuple[Path, Path, dict[str, str]]:
    """A config, and a store with two adapters (a1 active, a2 a candidate), an interaction, a held signal and
    a pending one."""
    data = tmp_path / "data"
    config = tmp_path / "runtime.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(data), "model": {"name": str(tiny_model_dir)}, "engine": {"device": "cpu", "num_threads": 1},
        "learning": {"method": "sft", "sft": {"num_epochs": 1, "min_steps": 0}, "lora": {"r": 4},
                     "anchors": {"enabled": False}},
    }))
    with Store(data / "runtime.duckdb") as store:
        registry = AdapterRegistry(data / "adapters", store)
        for name in ("a1", "a2"):
            shutil.copytree(tiny_adapter_dir, tmp_path / f"staged-{name}")
            registry.publish(tmp_path / f"staged-{name}", name, Lineage(None, "sft", "r", {}, {}))
        registry.activate("a1")
        iid = store.log_interaction([{"role": "user", "content": "Capital of Veloria?"}], "Nova Haven")
        held = store.add_signal("correction", interaction_id=iid, text="Marenport")
        store.set_learning_state("held", signal_ids=[held], reason="vetoed update")
        pending = store.add_signal("demonstration", text="Zebulon", messages=[{"role": "user", "content": "Who?"}])
        review = [store.add_signal("demonstration", text=t, principal="partner", state="review",
                                   messages=[{"role": "user", "content": f"{t}?"}]) for t in ("Yes", "No")]
    return config, data / "runtime.duckdb", {"held": held, "pending": pending, "approve": review[0],
                                             "reject": review[1]}


def invoke(*args: str, token: str | None = TOKEN) -> object:
    env = {"RUNTIME_ADMIN_TOKEN": token} if token else {}
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def local_reads(config: Path) -> dict[str, object]:
    out = {}
    for command in READS:
        result = invoke(*command, "--config", str(config), "--json")
        assert result.exit_code == 0, (command, result.output)
        out[" ".join(command)] = json.loads(result.output)
    return out


def test_every_command_works_through_the_server_holding_the_store(setup, tmp_path: Path) -> None:
    config, store_path, ids = setup
    before = local_reads(config)
    os.environ.pop("RUNTIME_SERVER", None)
    cfg = load_config(config)
    app_ = create_app(cfg, admin_token=TOKEN, background_learning=False)
    with serve_in_thread(app_) as url:
        host, port = url.removeprefix("http://").split(":")
        write_server_file(store_path, host, int(port))
        try:
            # The store is held: opening it here fails, so every command below went through the server.
            with pytest.raises(Exception, match="already open|locked"):
                Store(store_path, read_only=True)

            assert local_reads(config) == before  # same JSON, read through /admin

            listed = invoke("adapters", "list", "--config", str(config))
            assert listed.exit_code == 0 and "a1" in listed.output and "active" in listed.output
            log = invoke("log", "--config", str(config))
            assert log.exit_code == 0 and "Capital of Veloria?" in log.output and "Marenport" in log.output

            no_token = invoke("adapters", "list", "--config", str(config), token=None)
            assert no_token.exit_code == 2 and "RUNTIME_ADMIN_TOKEN" in no_token.output
            unknown = invoke("adapters", "show", "nope", "--config", str(config))
            assert unknown.exit_code == 1 and "no adapter named" in unknown.output

            retried = invoke("signals", "retry", ids["held"][:10], "--config", str(config))
            assert retried.exit_code == 0 and "1 signal(s) pending again" in retried.output, retried.output
            missing = invoke("signals", "retry", "nope", "--config", str(config))
            assert missing.exit_code == 1 and "matches no signal" in missing.output
            dismissed = invoke("signals", "dismiss", ids["pending"], "--reason", "wrong", "--config", str(config))
            assert dismissed.exit_code == 0 and "1 signal(s) dismissed" in dismissed.output

            approved = invoke("signals", "approve", ids["approve"], "--config", str(config))
            assert approved.exit_code == 0 and "1 signal(s) approved" in approved.output, approved.output
            rejected = invoke("signals", "reject", ids["reject"], "--reason", "wrong", "--config", str(config))
            assert rejected.exit_code == 0 and "1 signal(s) rejected" in rejected.output, rejected.output
            exported = invoke("adapters", "export", "a1", str(tmp_path / "exported"), "--config", str(config))
            assert exported.exit_code == 0 and (tmp_path / "exported" / "README.md").is_file(), exported.output
            shadow = invoke("shadow", "report", "--config", str(config))
            assert shadow.exit_code == 0 and "shadow adapter" in shadow.output, shadow.output

            promoted = invoke("adapters", "promote", "a2", "--config", str(config))
            assert promoted.exit_code == 0 and "a2 is active" in promoted.output, promoted.output
            assert app_.state.runtime.engine.active_adapter == "a2"  # the server serves what the CLI promoted
            rolled = invoke("adapters", "rollback", "--config", str(config))
            assert rolled.exit_code == 0 and "a2 -> a1" in rolled.output, rolled.output

            loop = invoke("learn", "--loop", "--config", str(config))
            assert loop.exit_code == 2 and "--once" in loop.output
            learned = invoke("learn", "--config", str(config), "--method", "sft")
            assert learned.exit_code == 0, learned.output
            assert "activated" in learned.output and "runs the cycle" in learned.output

            doc = tmp_path / "doc.md"
            doc.write_text("The zebra code is quokka.")
            ingested = invoke("ingest", str(doc), "--config", str(config))
            assert ingested.exit_code == 0 and "stored" in ingested.output, ingested.output

            # --server names a server when no address file points at it
            remove_server_file(store_path)
            assert read_server_file(store_path) is None
            named = invoke("decisions", "--config", str(config), "--server", url, "--json")
            assert named.exit_code == 0 and any(d["decision"] == "rollback" for d in json.loads(named.output))
            remote_after = {" ".join(c): json.loads(invoke(*c, "--config", str(config), "--server", url,
                                                           "--json").output) for c in READS}
        finally:
            remove_server_file(store_path)
    assert local_reads(config) == remote_after  # the same output with the store opened directly
    with Store(store_path, read_only=True) as store:
        assert store.get_signal(ids["pending"]).state == "dismissed"
        assert store.get_signal(ids["approve"]).state == "learned"  # approved, then learned by the cycle
        assert store.get_signal(ids["reject"]).state == "dismissed"
        assert {r.decision for r in store.signal_reviews()} == {"approve", "reject"}
        assert len(store.documents()) == 1
        assert sum(a.method == "sft" and a.status == "active" for a in store.adapters()) == 1


def test_the_address_file_names_only_a_live_server(tmp_path: Path) -> None:
    store_path = tmp_path / "runtime.duckdb"
    assert read_server_file(store_path) is None
    info = write_server_file(store_path, "0.0.0.0", 8123)
    assert info.url == "http://127.0.0.1:8123" and read_server_file(store_path) == info
    server_file(store_path).write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": 2**22 + 12345}))
    assert read_server_file(store_path) is None  # that process is gone: the store is opened directly
    remove_server_file(store_path)  # not this process's file: left alone
    assert server_file(store_path).exists()
    server_file(store_path).write_text("{not json")
    assert read_server_file(store_path) is None


def test_a_locked_store_without_a_known_server_says_how_to_name_one(setup) -> None:
    config, store_path, _ = setup
    with Store(store_path):
        result = invoke("adapters", "list", "--config", str(config))
    assert result.exit_code == 2 and "--server URL" in result.output
